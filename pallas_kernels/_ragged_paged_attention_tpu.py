"""Ragged paged attention for TPU (Mosaic): the work items of ``ragged_schedule`` with
manual, double-buffered page DMAs.

The story of one call (shapes in ``ragged_paged_attention``'s docstring):

1. The wrapper builds the work list (``ragged_schedule``) and each item's query tiles
   ``[K, block_q * G, H]`` (``gather_query_blocks``); item rows, lengths, first positions
   and the flattened page tables are scalar-prefetched into SMEM.
2. The grid is ``(items,)``. Items past the step's real work skip everything
   (``pl.when``). The pool stays in HBM (``memory_space=pl.ANY``), viewed as
   ``[P, S, K * H]`` (a free reshape): one page of every KV head is one contiguous DMA.
3. A work item walks the KV blocks its queries can see (from the sliding window's start
   or 0 to its last query's position), ``pages_per_block`` pages per block. Block
   ``b + 1``'s page DMAs are started before block ``b`` is waited for and computed, into
   the other half of a two-slot VMEM buffer (double buffering); pages past the item's
   last visible key, or wholly behind its first query's window, are never fetched.
4. Per block, each KV head's keys are a lane slice ``[:, k*H:(k+1)*H]`` of the buffer;
   the head's ``block_q * G`` query rows attend to them with the causal (and window)
   mask and an online softmax carried through the loop. K/V are read from HBM once
   per item, whatever the group size.

int8 pages: the page's scales ``[S, K]`` come with it; keys and values are widened and
scaled per token in VMEM.

Status: tested in TPU interpret mode on CPU and lowered to Mosaic by ``jax.export``;
never compiled by libtpu nor run on a TPU. Not yet done: prefetching the next item's
first block across grid steps (each item waits for its first block), and head dims
other than 64 or multiples of 128 (``RaggedBlockSizes.check_tpu`` refuses them).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._paged_attention_pallas import MASK_VALUE
from pallas_kernels.block_sizes import RaggedBlockSizes
from pallas_kernels.ragged_paged_attention import (
    default_block_sizes,
    gather_query_blocks,
    ragged_schedule,
    scatter_query_blocks,
)


def _kernel(
    item_row_ref, item_len_ref, item_pos_ref, tables_ref,  # SMEM [W], [W], [W], [B * M]
    q_ref,  # [K, R, H]: one item's query tiles
    k_hbm, v_hbm,  # [P, S, K * H] in HBM
    *rest,  # (ks_hbm, vs_hbm [P, S, K]) for int8, then o_ref [K, R, H], then scratch
    page_size: int, pages_per_block: int, max_pages: int, group: int, scale: float,
    window: int | None, soft_cap: float | None, quantized: bool, precision,
):
    if quantized:
        ks_hbm, vs_hbm, o_ref, k_buf, v_buf, ks_buf, vs_buf, sems = rest
    else:
        o_ref, k_buf, v_buf, sems = rest
        ks_hbm = vs_hbm = ks_buf = vs_buf = None
    w = pl.program_id(0)
    n_q = item_len_ref[w]
    kh, rows, head_dim = q_ref.shape
    kv_block = pages_per_block * page_size

    @pl.when(n_q > 0)
    def _item():
        row, pos0 = item_row_ref[w], item_pos_ref[w]
        last = pos0 + n_q - 1
        first = jnp.maximum(pos0 - window + 1, 0) if window is not None else 0
        blk_lo, blk_hi = first // kv_block, last // kv_block + 1
        first_page, last_page = first // page_size, last // page_size

        def copies(blk, slot):
            """The DMAs of block ``blk`` into ``slot``, each with the condition that it is needed."""
            out = []
            for i in range(pages_per_block):
                p = blk * pages_per_block + i
                page = tables_ref[row * max_pages + jnp.minimum(p, max_pages - 1)]
                pairs = [(k_hbm, k_buf), (v_hbm, v_buf)] + ([(ks_hbm, ks_buf), (vs_hbm, vs_buf)] if quantized else [])
                for j, (src, dst) in enumerate(pairs):
                    dma = pltpu.make_async_copy(src.at[page], dst.at[slot, pl.ds(i * page_size, page_size)],
                                                sems.at[slot, j])
                    out.append(((p <= last_page) & (p >= first_page), dma))
            return out

        def start(blk, slot):
            for needed, dma in copies(blk, slot):
                pl.when(needed)(dma.start)

        def wait(blk, slot):
            for needed, dma in copies(blk, slot):
                pl.when(needed)(dma.wait)

        start(blk_lo, 0)
        q_pos = pos0 + jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0) // group  # [R, 1]
        row_ok = jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0) < n_q * group

        def body(blk, carry):
            slot = (blk - blk_lo) % 2

            @pl.when(blk + 1 < blk_hi)
            def _prefetch():
                start(blk + 1, 1 - slot)

            wait(blk, slot)
            key = blk * kv_block + jax.lax.broadcasted_iota(jnp.int32, (1, kv_block), 1)  # [1, C]
            key_col = blk * kv_block + jax.lax.broadcasted_iota(jnp.int32, (kv_block, 1), 0)  # [C, 1]
            mask = row_ok & (key <= q_pos)  # [R, C]
            if window is not None:
                mask &= key > q_pos - window
            # [C, 1]: rows of pages not fetched (past the last query, behind the window) hold stale data
            fetched = (key_col <= last) & (key_col >= first_page * page_size)
            new = []
            for h in range(kh):
                m, l, acc = carry[h]
                q = q_ref[h]
                cols = pl.ds(h * head_dim, head_dim)
                k = k_buf[slot, :, cols]
                v = v_buf[slot, :, cols]
                if quantized:
                    k = (k.astype(jnp.float32) * ks_buf[slot, :, pl.ds(h, 1)]).astype(q.dtype)
                    v = (v.astype(jnp.float32) * vs_buf[slot, :, pl.ds(h, 1)]).astype(q.dtype)
                v = jnp.where(fetched, v, jnp.zeros_like(v))
                s = jax.lax.dot_general(q, k.astype(q.dtype), (((1,), (1,)), ((), ())),
                                        preferred_element_type=jnp.float32, precision=precision) * scale
                if soft_cap is not None:
                    s = soft_cap * jnp.tanh(s / soft_cap)
                s = jnp.where(mask, s, MASK_VALUE)
                m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
                p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
                alpha = jnp.exp(m - m_new)
                pv = jax.lax.dot_general(p.astype(q.dtype), v.astype(q.dtype), (((1,), (0,)), ((), ())),
                                         preferred_element_type=jnp.float32, precision=precision)
                new.append((m_new, l * alpha + jnp.sum(p, axis=1, keepdims=True), acc * alpha + pv))
            return tuple(new)

        init = tuple((jnp.full((rows, 1), MASK_VALUE, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
                      jnp.zeros((rows, head_dim), jnp.float32)) for _ in range(kh))
        final = jax.lax.fori_loop(blk_lo, blk_hi, body, init)
        for h in range(kh):
            _, l, acc = final[h]
            o_ref[h] = jnp.where(l > 0, acc / jnp.where(l > 0, l, 1.0), 0.0).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap", "block_sizes"))
def ragged_paged_attention_tpu(
    q: jax.Array,  # [T, N, H]
    k_pages: jax.Array,  # [P, S, K, H]
    v_pages: jax.Array,  # [P, S, K, H]
    page_tables: jax.Array,  # [B, M]
    context_lens: jax.Array,  # [B]
    cu_q_lens: jax.Array,  # [B + 1]
    num_rows: jax.Array,  # [] or [1]
    *,
    sm_scale: float | None = None,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    k_scales: jax.Array | None = None,  # [P, S, K]
    v_scales: jax.Array | None = None,  # [P, S, K]
    block_sizes: RaggedBlockSizes | None = None,
) -> jax.Array:
    """Ragged paged attention on TPU; returns ``[T, N, H]`` in ``q.dtype``. Interpret it on
    CPU by tracing under ``pltpu.force_tpu_interpret_mode()``."""
    t, n, h = q.shape
    num_pages, page_size, kh, _ = k_pages.shape
    b, max_pages = page_tables.shape
    group = n // kh
    bs = block_sizes or default_block_sizes(num_tokens=t, num_rows=b, page_size=page_size, group=group, tpu=True)
    bs.check_tpu(page_size=page_size, group=group, head_dim=h, kv_dtype=k_pages.dtype)
    quantized = k_scales is not None
    compute_dtype = jnp.float32 if quantized and q.dtype == jnp.float32 else q.dtype
    rows = bs.block_q * group
    sched = ragged_schedule(cu_q_lens, num_rows, context_lens, num_tokens=t, block_q=bs.block_q)
    w = sched.item_len.shape[0]
    qb = gather_query_blocks(q.astype(compute_dtype), sched, block_q=bs.block_q, num_kv_heads=kh, rows=rows,
                             head_dim=h)  # [W, K, R, H]
    kv_block = bs.pages_per_block * page_size
    hbm = pl.BlockSpec(memory_space=pl.ANY)
    in_specs = [pl.BlockSpec((None, kh, rows, h), lambda i, *_: (i, 0, 0, 0)), hbm, hbm]
    args = [qb, k_pages.reshape(num_pages, page_size, kh * h), v_pages.reshape(num_pages, page_size, kh * h)]
    scratch = [pltpu.VMEM((2, kv_block, kh * h), k_pages.dtype), pltpu.VMEM((2, kv_block, kh * h), k_pages.dtype)]
    if quantized:
        in_specs += [hbm, hbm]
        args += [x.astype(jnp.float32) for x in (k_scales, v_scales)]
        scratch += [pltpu.VMEM((2, kv_block, kh), jnp.float32), pltpu.VMEM((2, kv_block, kh), jnp.float32)]
    scratch.append(pltpu.SemaphoreType.DMA((2, 4 if quantized else 2)))
    kernel = functools.partial(
        _kernel, page_size=page_size, pages_per_block=bs.pages_per_block, max_pages=max_pages, group=group,
        scale=h**-0.5 if sm_scale is None else sm_scale, window=sliding_window, soft_cap=soft_cap,
        quantized=quantized, precision=jax.lax.Precision.HIGHEST if compute_dtype == jnp.float32 else None,
    )
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4, grid=(w,), in_specs=in_specs,
            out_specs=pl.BlockSpec((None, kh, rows, h), lambda i, *_: (i, 0, 0, 0)), scratch_shapes=scratch,
        ),
        out_shape=jax.ShapeDtypeStruct((w, kh, rows, h), q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        name="ragged_paged_attention_tpu",
    )(sched.item_row, sched.item_len, sched.item_pos, page_tables.astype(jnp.int32).reshape(-1), *args)
    return scatter_query_blocks(out, sched, block_q=bs.block_q, num_heads=n, head_dim=h)
