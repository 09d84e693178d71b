"""Ragged paged attention as a generic ``pl.pallas_call`` (Triton lowering on GPU, interpret on CPU).

The story of one call (shapes in ``ragged_paged_attention``'s docstring):

1. ``ragged_schedule`` cuts each row's query tokens into ``block_q`` blocks (work items);
   ``gather_query_blocks`` lays each item's ``block_q x G`` queries of a KV head out as
   one tile, padded to a power of two in rows (>= 16 on a GPU, ``tl.dot``'s minimum) and
   in head dim (80 -> 128: Triton tensors are power-of-two sized; the pad columns are 0).
2. The grid is ``(items, K, splits)``. A program walks the KV blocks its queries can see,
   its split's share of them; items past the step's work return at once. A KV block is
   ``pages_per_block`` pages, read in one gathered load of ``[kv_block, H]`` through the
   page table (key ``j``'s slot is ``table[j // S] * S + j % S`` in the pool viewed as
   ``[P * S, K, H]``), masked past the block and past ``H``, so any page size (12) and
   head dim (80, 96, 24) works without padding the pool. The loop body has no branch,
   so Triton can pipeline the next block's loads under the current block's matmuls.
3. Causal (and sliding-window) masking per element, online softmax; each split writes
   an unnormalised accumulator with its running max and sum, and the wrapper merges the
   splits (``combine_splits``) and scatters the tiles back to packed token order.

int8 pages are widened and scaled per token in the kernel (``k * k_scale``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels._paged_attention_pallas import MASK_VALUE, combine_splits
from pallas_kernels.block_sizes import RaggedBlockSizes, split_k
from pallas_kernels.dispatch import gpu_compiler_params
from pallas_kernels.ragged_paged_attention import (
    default_block_sizes,
    gather_query_blocks,
    ragged_schedule,
    scatter_query_blocks,
)


def _kernel(
    item_row_ref, item_len_ref, item_pos_ref,  # [W] int32
    table_ref,  # [B * M] int32: all page tables, flattened
    q_ref,  # [R, Hp]: one item's query tile for one KV head
    k_ref, v_ref,  # [P * S, H]: this KV head's slice of the pool
    *rest,  # (k_scale_ref, v_scale_ref [P * S]) for int8 pages, then acc, m, l outputs
    page_size: int, max_pages: int, group: int, kv_block: int, kv_block_p2: int, num_splits: int,
    scale: float, window: int | None, soft_cap: float | None, quantized: bool, precision,
):
    if quantized:
        ks_ref, vs_ref, acc_ref, m_ref, l_ref = rest
    else:
        acc_ref, m_ref, l_ref = rest
    w, split = pl.program_id(0), pl.program_id(2)
    rows, head_dim_p = q_ref.shape
    head_dim = k_ref.shape[1]
    n_q = item_len_ref[w]

    @pl.when(n_q > 0)
    def _item():
        row, pos0 = item_row_ref[w], item_pos_ref[w]
        last = pos0 + n_q - 1  # position of the item's last query: keys past it are never seen
        first = jnp.maximum(pos0 - window + 1, 0) if window is not None else 0
        blk_lo, blk_hi = first // kv_block, last // kv_block + 1
        per_split = (blk_hi - blk_lo + num_splits - 1) // num_splits
        start = blk_lo + split * per_split
        end = jnp.minimum(start + per_split, blk_hi)
        q = q_ref[...]
        q_pos = pos0 + jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0) // group  # [R, 1]
        row_ok = jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0) < n_q * group
        col = jnp.arange(head_dim_p)
        col_ok = col < head_dim

        def body(b, carry):
            acc, m, l = carry
            key = b * kv_block + jnp.arange(kv_block_p2)  # [C] key positions of the block
            in_block = jnp.arange(kv_block_p2) < kv_block
            page = table_ref[row * max_pages + jnp.minimum(key // page_size, max_pages - 1)]
            slot = page * page_size + key % page_size
            # Keys behind the window of the item's first query are never loaded: their pages may
            # already be released (the null page) or hold anything.
            key_ok = in_block & (key <= last) & (key >= first)
            ld_mask = key_ok[:, None] & col_ok[None, :]
            k = plt.load(k_ref.at[slot[:, None], col[None, :]], mask=ld_mask, other=0)  # [C, Hp]
            v = plt.load(v_ref.at[slot[:, None], col[None, :]], mask=ld_mask, other=0)
            if quantized:
                k = (k.astype(jnp.float32) * plt.load(ks_ref.at[slot], mask=key_ok, other=0)[:, None]).astype(q.dtype)
                v = (v.astype(jnp.float32) * plt.load(vs_ref.at[slot], mask=key_ok, other=0)[:, None]).astype(q.dtype)
            s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
                                    precision=precision) * scale  # [R, C]
            if soft_cap is not None:
                s = soft_cap * jnp.tanh(s / soft_cap)
            mask = row_ok & key_ok[None, :] & (key[None, :] <= q_pos)
            if window is not None:
                mask &= key[None, :] > q_pos - window
            s = jnp.where(mask, s, MASK_VALUE)
            m_new = jnp.maximum(m, jnp.max(s, axis=1))
            p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
            alpha = jnp.exp(m - m_new)
            pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                     preferred_element_type=jnp.float32, precision=precision)
            return acc * alpha[:, None] + pv, m_new, l * alpha + jnp.sum(p, axis=1)

        init = (jnp.zeros((rows, head_dim_p), jnp.float32), jnp.full((rows,), MASK_VALUE, jnp.float32),
                jnp.zeros((rows,), jnp.float32))
        acc, m, l = jax.lax.fori_loop(start, end, body, init)
        acc_ref[...] = acc
        m_ref[...] = m
        l_ref[...] = l


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap", "block_sizes", "interpret"))
def ragged_paged_attention_pallas(
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
    interpret: bool = False,
) -> jax.Array:
    """Ragged paged attention with split-K; returns ``[T, N, H]`` in ``q.dtype``."""
    t, n, h = q.shape
    num_pages, page_size, kh, _ = k_pages.shape
    b, max_pages = page_tables.shape
    group = n // kh
    on_gpu = gpu_compiler_params(interpret=interpret) is not None
    bs = block_sizes or default_block_sizes(num_tokens=t, num_rows=b, page_size=page_size, group=group, tpu=False)
    block_q = bs.block_q
    rows = max(pl.next_power_of_2(block_q * group), bs.min_rows, 16 if on_gpu else 1)
    head_dim_p = pl.next_power_of_2(h) if on_gpu or h & (h - 1) else h
    head_dim_p = max(head_dim_p, 16 if on_gpu else 1)
    kv_block = bs.pages_per_block * page_size
    kv_block_p2 = max(pl.next_power_of_2(kv_block), 16 if on_gpu else 1)
    sched = ragged_schedule(cu_q_lens, num_rows, context_lens, num_tokens=t, block_q=block_q)
    w = sched.item_len.shape[0]
    num_k_blocks = -(-max_pages // bs.pages_per_block)
    num_splits, _ = split_k(bs.num_splits, programs=w * kh, num_k_blocks=num_k_blocks, on_gpu=on_gpu)
    quantized = k_scales is not None
    compute_dtype = jnp.float32 if quantized and q.dtype == jnp.float32 else q.dtype
    qb = gather_query_blocks(q.astype(compute_dtype), sched, block_q=block_q, num_kv_heads=kh, rows=rows,
                             head_dim=head_dim_p)  # [W, K, R, Hp]

    whole = lambda size: pl.BlockSpec((size,), lambda i, j, s: (0,))  # noqa: E731
    pool_spec = pl.BlockSpec((num_pages * page_size, None, h), lambda i, j, s: (0, j, 0))
    in_specs = [whole(w), whole(w), whole(w), whole(b * max_pages),
                pl.BlockSpec((None, None, rows, head_dim_p), lambda i, j, s: (i, j, 0, 0)), pool_spec, pool_spec]
    flat = (num_pages * page_size, kh, h)
    args = [sched.item_row, sched.item_len, sched.item_pos, page_tables.astype(jnp.int32).reshape(-1), qb,
            k_pages.reshape(flat), v_pages.reshape(flat)]
    if quantized:
        scale_spec = pl.BlockSpec((num_pages * page_size, None), lambda i, j, s: (0, j))
        in_specs += [scale_spec, scale_spec]
        args += [x.astype(jnp.float32).reshape(num_pages * page_size, kh) for x in (k_scales, v_scales)]
    def part(*shape):  # one split's partial result of one (item, KV head)
        return pl.BlockSpec((None, None, None, *shape), lambda i, j, s: (i, j, s) + (0,) * len(shape))

    kernel = functools.partial(
        _kernel, page_size=page_size, max_pages=max_pages, group=group, kv_block=kv_block, kv_block_p2=kv_block_p2,
        num_splits=num_splits, scale=h**-0.5 if sm_scale is None else sm_scale, window=sliding_window,
        soft_cap=soft_cap, quantized=quantized,
        precision=jax.lax.Precision.HIGHEST if compute_dtype == jnp.float32 else None,
    )
    acc, m, l = pl.pallas_call(
        kernel,
        grid=(w, kh, num_splits),
        in_specs=in_specs,
        out_specs=[part(rows, head_dim_p), part(rows), part(rows)],
        out_shape=[jax.ShapeDtypeStruct((w, kh, num_splits, rows, head_dim_p), jnp.float32),
                   jax.ShapeDtypeStruct((w, kh, num_splits, rows), jnp.float32),
                   jax.ShapeDtypeStruct((w, kh, num_splits, rows), jnp.float32)],
        interpret=interpret,
        compiler_params=gpu_compiler_params(interpret=interpret, num_warps=4 if head_dim_p <= 64 else 8,
                                            num_stages=2),
        name="ragged_paged_attention",
    )(*args)
    out = combine_splits(acc, m, l)  # [W, K, R, Hp]
    return scatter_query_blocks(out, sched, block_q=block_q, num_heads=n, head_dim=h).astype(q.dtype)
