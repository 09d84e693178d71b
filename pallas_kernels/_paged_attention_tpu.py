"""Paged attention for TPU (Mosaic): the split-K algorithm of ``_paged_attention_pallas``
laid out the TPU way, on the shared page layout ``[P, S, K, H]``.

The story of one call:

1. The wrapper views each layer's pool as ``[P, S*K, H]`` (a free reshape: a page's
   tokens and heads are contiguous), so one page is one ``[S*K, H]`` tile whose last two
   dims are whole: a legal Mosaic block for any page size, head count and dtype.
2. The grid is ``(T, num_splits, pages_per_split)``, the last axis ``"arbitrary"``. Page
   numbers are scalar-prefetched into SMEM (``page_tables`` flattened, each token's row
   and visible length); the K/V index maps read the page number there, so Mosaic's
   pipeline DMAs the next page while the current one is multiplied. Past a token's last
   page the index is clamped to that page: an unchanged block index issues no DMA, and
   the step computes nothing (``pl.when``).
3. A program takes all ``N`` query heads of its token as one ``[N, H]`` tile against the
   page's ``[S*K, H]`` keys: ``[N, S*K]`` scores, of which only the columns of the query's
   own KV head are kept (a mask; GQA without repeating K/V). This multiplies ``K`` times
   more than needed, which decode can afford: it is bound by the K/V bytes, which are
   read once per token and page.
4. Running max, sum and accumulator live in VMEM scratch; at the split's last page they
   go out unnormalised and the wrapper merges the splits with a log-sum-exp
   (``combine_splits``), as on GPU.

int8 pages: the per-token, per-head scales (viewed ``[P, 1, S*K]``) scale the score
columns (``q . (k * s) = (q . k) * s``) and the probabilities before ``P @ V``, so the int8
tile is only widened, never dequantised element by element.

Status: tested in TPU interpret mode on CPU and lowered for TPU by ``jax.export``; never
compiled by Mosaic on a real TPU, and untuned: one page per grid step (~0.35 us of step
overhead per page) is likely well below HBM bandwidth for small pages; several pages per
step need manual DMAs (``memory_space=pl.ANY`` + ``make_async_copy``), still to write.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._paged_attention_pallas import MASK_VALUE, combine_splits
from pallas_kernels.block_sizes import PagedBlockSizes


def _kernel(
    tok_len_ref, tok_row_ref, tables_ref,  # SMEM [T], [T], [B * M]
    col_head_ref, col_tok_ref,  # [1, S*K] int32: KV head and in-page token of each key column
    row_head_ref,  # [N, 1] int32: KV head each query head reads
    q_ref,  # [N, H]
    k_ref, v_ref,  # [S*K, H]: one page, all KV heads
    *rest,  # (k_scale_ref, v_scale_ref [1, S*K]) for int8 pages, then acc, m, l outs, then scratch
    page_size: int,
    pages_per_split: int,
    scale: float,
    quantized: bool,
    precision,
):
    if quantized:
        ks_ref, vs_ref, *rest = rest
    acc_out, m_out, l_out, m_sc, l_sc, acc_sc = rest
    t, split, p = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    n_tok = tok_len_ref[t]
    page_idx = split * pages_per_split + p

    @pl.when(p == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(page_idx * page_size < n_tok)
    def _compute():
        q = q_ref[...]
        k = k_ref[...].astype(q.dtype)
        s = jax.lax.dot_general(
            q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32, precision=precision
        ) * scale  # [N, S*K]
        if quantized:
            s = s * ks_ref[...]
        key_pos = page_idx * page_size + col_tok_ref[...]  # [1, S*K]
        mask = (col_head_ref[...] == row_head_ref[...]) & (key_pos < n_tok)  # [N, S*K]
        s = jnp.where(mask, s, MASK_VALUE)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        prob = jnp.where(mask, jnp.exp(s - m_new), 0.0)
        alpha = jnp.exp(m_prev - m_new)
        l_sc[...] = l_sc[...] * alpha + jnp.sum(prob, axis=1, keepdims=True)
        if quantized:
            prob = prob * vs_ref[...]
        v = v_ref[...].astype(q.dtype)
        pv = jax.lax.dot_general(
            prob.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32,
            precision=precision,
        )
        acc_sc[...] = acc_sc[...] * alpha + pv
        m_sc[...] = m_new

    @pl.when(p == pages_per_split - 1)
    def _finish():
        acc_out[...] = acc_sc[...]
        m_out[...] = m_sc[...]
        l_out[...] = l_sc[...]


@functools.partial(jax.jit, static_argnames=("sm_scale", "block_sizes"))
def paged_attention_tpu(
    q: jax.Array,  # [T, N, H]
    k_pages: jax.Array,  # [P, S, K, H]
    v_pages: jax.Array,  # [P, S, K, H]
    page_tables: jax.Array,  # [B, M]
    lengths: jax.Array,  # [B]
    *,
    segment_ids: jax.Array,  # [T], -1 padding
    positions: jax.Array,  # [T]
    sm_scale: float | None = None,
    k_scale: jax.Array | None = None,  # [P, S, K]
    v_scale: jax.Array | None = None,  # [P, S, K]
    block_sizes: PagedBlockSizes | None = None,
) -> jax.Array:
    """Paged attention with split-K on TPU; returns ``[T, N, H]`` in ``q.dtype``. Interpret it
    on CPU by tracing under ``pltpu.force_tpu_interpret_mode()``."""
    t, n, h = q.shape
    num_pages, page_size, kh, _ = k_pages.shape
    max_pages = page_tables.shape[1]
    group = n // kh
    bs = block_sizes or PagedBlockSizes()
    num_splits, pages_per_split = bs.splits(programs=t, num_pages=max_pages, on_gpu=False)
    scale = h**-0.5 if sm_scale is None else sm_scale
    quantized = k_scale is not None
    width = page_size * kh  # key columns of one page

    valid = segment_ids >= 0
    tok_row = jnp.where(valid, segment_ids, 0).astype(jnp.int32)
    tok_len = jnp.where(valid, jnp.minimum(lengths[tok_row], positions + 1), 0).astype(jnp.int32)  # [T]
    tables = page_tables.astype(jnp.int32).reshape(-1)  # [B * M]
    col = jnp.arange(width, dtype=jnp.int32)
    col_head, col_tok = (col % kh)[None, :], (col // kh)[None, :]  # [1, S*K]
    row_head = (jnp.arange(n, dtype=jnp.int32) // group)[:, None]  # [N, 1]
    q_dtype = jnp.float32 if quantized and q.dtype == jnp.float32 else q.dtype

    def page_map(i, s, p, tok_len_ref, tok_row_ref, tables_ref):
        # Clamp to the token's last page: steps past it repeat that block (no DMA) and skip compute.
        last = jnp.maximum((tok_len_ref[i] + page_size - 1) // page_size - 1, 0)
        idx = jnp.minimum(s * pages_per_split + p, jnp.minimum(last, max_pages - 1))
        return tables_ref[tok_row_ref[i] * max_pages + idx], 0, 0

    const = lambda shape: pl.BlockSpec(shape, lambda i, s, p, *_: (0,) * len(shape))  # noqa: E731
    page_spec = pl.BlockSpec((None, width, h), page_map)
    in_specs = [
        const((1, width)), const((1, width)), const((n, 1)),
        pl.BlockSpec((None, n, h), lambda i, s, p, *_: (i, 0, 0)),
        page_spec, page_spec,
    ]
    args = [col_head, col_tok, row_head, q.astype(q_dtype),
            k_pages.reshape(num_pages, width, h), v_pages.reshape(num_pages, width, h)]
    if quantized:
        scale_spec = pl.BlockSpec((None, 1, width), page_map)
        in_specs += [scale_spec, scale_spec]
        args += [s.astype(jnp.float32).reshape(num_pages, 1, width) for s in (k_scale, v_scale)]
    part = lambda last: pl.BlockSpec((None, None, n, last), lambda i, s, p, *_: (i, s, 0, 0))  # noqa: E731
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(t, num_splits, pages_per_split),
        in_specs=in_specs,
        out_specs=[part(h), part(1), part(1)],
        scratch_shapes=[
            pltpu.VMEM((n, 1), jnp.float32),
            pltpu.VMEM((n, 1), jnp.float32),
            pltpu.VMEM((n, h), jnp.float32),
        ],
    )
    precision = jax.lax.Precision.HIGHEST if q_dtype == jnp.float32 else None
    kernel = functools.partial(
        _kernel, page_size=page_size, pages_per_split=pages_per_split, scale=scale, quantized=quantized,
        precision=precision,
    )
    acc, m, l = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=[
            jax.ShapeDtypeStruct((t, num_splits, n, h), jnp.float32),
            jax.ShapeDtypeStruct((t, num_splits, n, 1), jnp.float32),
            jax.ShapeDtypeStruct((t, num_splits, n, 1), jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        name="paged_attention_tpu",
    )(tok_len, tok_row, tables, *args)
    out = combine_splits(acc, m[..., 0], l[..., 0])  # [T, N, H]
    return out.astype(q.dtype)
