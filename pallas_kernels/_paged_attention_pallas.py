"""Paged attention as a generic ``pl.pallas_call``: one program per (query token, KV head, split).

The story of one call:

1. The wrapper resolves, per query token, its row's page table (``[T, M]``, a gather
   of ``page_tables``) and the number of cache positions it may see
   (``min(lengths[row], position + 1)``; 0 for padding tokens).
2. The grid is ``(T, K, num_splits)``. A program takes the ``G`` query heads that share
   KV head ``k`` as one ``[G, H]`` tile (GQA: each K/V page is loaded once per group,
   not once per query head) and walks its split's share of the page table, reading each
   K/V page through the table: the pool is viewed as ``[P * S, K, H]`` and a page is one
   masked load of rows ``page * S + [0, Sp)`` and columns ``[0, Hp)``, ``Sp`` and ``Hp``
   the page size and head dim rounded up to powers of two (Triton tensors are power-of-two
   sized), so page size 12 or head dim 80 work without padding the pool. Pages past the
   visible length are not visited: the loop bound is the token's own page count.
3. Each split writes an unnormalised accumulator with its running max and sum; the
   wrapper combines the splits with a log-sum-exp (split-K, "flash decoding"), so a long
   context is read by several programs in parallel.

int8 pages are dequantised in the kernel with their per-token, per-head scales.

Decode (one query per row) is the case this is built for. Multi-token rows (chunked
prefill, speculative decoding) use the same kernel, one program per query token; each
token re-reads its row's pages, which is fine for a few tokens per row but wasteful for
long prefill chunks. The serving path therefore uses ``ragged_paged_attention`` (query
blocks per row, K/V read once per block) on GPU and TPU; this kernel stays for direct calls.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.block_sizes import PagedBlockSizes
from pallas_kernels.dispatch import gpu_compiler_params

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def _paged_kernel(
    tok_len_ref,  # [T] int32: cache positions visible to each query token
    table_ref,  # [M] int32: this token's row's page table
    q_ref,  # [Gp, Hp]: the query heads of one KV group, zero-padded to Hp columns
    k_ref, v_ref,  # [P * S, H]: this KV head's slice of the whole pool
    *rest,  # (k_scale_ref, v_scale_ref [P * S]) for int8 pages, then acc_ref, m_ref, l_ref
    page_size: int,
    page_size_p2: int,
    pages_per_split: int,
    scale: float,
    quantized: bool,
    precision,
):
    if quantized:
        ks_ref, vs_ref, acc_ref, m_ref, l_ref = rest
    else:
        acc_ref, m_ref, l_ref = rest
    t, split = pl.program_id(0), pl.program_id(2)
    rows, head_dim = q_ref.shape
    col = jnp.arange(head_dim)
    col_ok = col < k_ref.shape[1]
    in_page = jnp.arange(page_size_p2)
    q = q_ref[...]
    n_tok = tok_len_ref[t]
    n_pages = (n_tok + page_size - 1) // page_size
    start = split * pages_per_split
    end = jnp.minimum(start + pages_per_split, n_pages)

    def body(p, carry):
        acc, m, l = carry
        key = p * page_size + in_page  # [Sp] cache positions of the page's (padded) rows
        key_ok = (in_page < page_size) & (key < n_tok)
        slot = table_ref[p] * page_size + in_page
        ld_mask = key_ok[:, None] & col_ok[None, :]
        k = plt.load(k_ref.at[slot[:, None], col[None, :]], mask=ld_mask, other=0)  # [Sp, Hp]
        v = plt.load(v_ref.at[slot[:, None], col[None, :]], mask=ld_mask, other=0)
        if quantized:
            k = (k.astype(jnp.float32) * plt.load(ks_ref.at[slot], mask=key_ok, other=0)[:, None]).astype(q.dtype)
            v = (v.astype(jnp.float32) * plt.load(vs_ref.at[slot], mask=key_ok, other=0)[:, None]).astype(q.dtype)
        s = jax.lax.dot_general(
            q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32, precision=precision
        ) * scale  # [Gp, Sp]
        mask = key_ok[None, :]
        s = jnp.where(mask, s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        prob = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
        alpha = jnp.exp(m - m_new)
        pv = jax.lax.dot_general(
            prob.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32,
            precision=precision,
        )
        return acc * alpha[:, None] + pv, m_new, l * alpha + jnp.sum(prob, axis=1)

    init = (
        jnp.zeros((rows, head_dim), jnp.float32),
        jnp.full((rows,), MASK_VALUE, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    acc, m, l = jax.lax.fori_loop(start, end, body, init)
    acc_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def combine_splits(acc: jax.Array, m: jax.Array, l: jax.Array) -> jax.Array:
    """Log-sum-exp merge of split partials: ``acc [..., Sp, G, H]``, ``m, l [..., Sp, G]`` -> ``[..., G, H]``."""
    m_all = jnp.max(m, axis=-2, keepdims=True)
    w = jnp.exp(m - m_all)  # [..., Sp, G]; 0 for splits that saw nothing (m = MASK_VALUE)
    num = jnp.sum(acc * w[..., None], axis=-3)
    den = jnp.sum(l * w, axis=-2)
    return jnp.where(den[..., None] > 0, num / jnp.where(den > 0, den, 1.0)[..., None], 0.0)


@functools.partial(jax.jit, static_argnames=("sm_scale", "interpret", "block_sizes"))
def paged_attention_pallas(
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
    interpret: bool = False,
    block_sizes: PagedBlockSizes | None = None,
) -> jax.Array:
    """Paged attention with split-K; returns ``[T, N, H]`` in ``q.dtype``."""
    t, n, h = q.shape
    num_pages, page_size, kh, _ = k_pages.shape
    max_pages = page_tables.shape[1]
    group = n // kh
    bs = block_sizes or PagedBlockSizes()
    on_gpu = gpu_compiler_params(interpret=interpret) is not None
    # tl.dot needs >= 16 rows: on a GPU the group's query heads are padded up to 16.
    rows = max(pl.next_power_of_2(group), bs.min_group_rows, 16 if on_gpu else 1)
    num_splits, pages_per_split = bs.splits(programs=t * kh, num_pages=max_pages, on_gpu=on_gpu)
    scale = h**-0.5 if sm_scale is None else sm_scale
    quantized = k_scale is not None

    valid = segment_ids >= 0
    row = jnp.where(valid, segment_ids, 0)
    tok_len = jnp.where(valid, jnp.minimum(lengths[row], positions + 1), 0).astype(jnp.int32)  # [T]
    tok_tables = page_tables[row].astype(jnp.int32)  # [T, M]
    # Triton tensors are power-of-two sized: pad the head dim (80 -> 128) and the page (12 -> 16)
    # in the kernel's tiles; loads past H or past the page are masked, so the pool is not copied.
    hp = max(pl.next_power_of_2(h), 16 if on_gpu else 1)
    page_size_p2 = max(pl.next_power_of_2(page_size), 16 if on_gpu else 1)
    qg = q.reshape(t, kh, group, h)
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, rows - group), (0, hp - h)))
    if quantized:
        qg = qg.astype(jnp.float32) if q.dtype == jnp.float32 else qg
    compute_dtype = qg.dtype

    pool_spec = pl.BlockSpec((num_pages * page_size, None, h), lambda i, j, s: (0, j, 0))
    in_specs = [
        pl.BlockSpec((t,), lambda i, j, s: (0,)),
        pl.BlockSpec((None, max_pages), lambda i, j, s: (i, 0)),
        pl.BlockSpec((None, None, rows, hp), lambda i, j, s: (i, j, 0, 0)),
        pool_spec,
        pool_spec,
    ]
    flat = (num_pages * page_size, kh, h)
    args = [tok_len, tok_tables, qg, k_pages.reshape(flat), v_pages.reshape(flat)]
    if quantized:
        scale_spec = pl.BlockSpec((num_pages * page_size, None), lambda i, j, s: (0, j))
        in_specs += [scale_spec, scale_spec]
        args += [x.astype(jnp.float32).reshape(num_pages * page_size, kh) for x in (k_scale, v_scale)]
    part = lambda *shape: pl.BlockSpec((None, None, None, *shape), lambda i, j, s: (i, j, s) + (0,) * len(shape))  # noqa: E731
    precision = jax.lax.Precision.HIGHEST if compute_dtype == jnp.float32 else None
    kernel = functools.partial(
        _paged_kernel, page_size=page_size, page_size_p2=page_size_p2, pages_per_split=pages_per_split, scale=scale, quantized=quantized, precision=precision
    )
    acc, m, l = pl.pallas_call(
        kernel,
        grid=(t, kh, num_splits),
        in_specs=in_specs,
        out_specs=[part(rows, hp), part(rows), part(rows)],
        out_shape=[
            jax.ShapeDtypeStruct((t, kh, num_splits, rows, hp), jnp.float32),
            jax.ShapeDtypeStruct((t, kh, num_splits, rows), jnp.float32),
            jax.ShapeDtypeStruct((t, kh, num_splits, rows), jnp.float32),
        ],
        interpret=interpret,
        compiler_params=gpu_compiler_params(interpret=interpret, num_warps=4, num_stages=2),
        name="paged_attention",
    )(*args)
    out = combine_splits(acc, m, l)[:, :, :group, :h]  # [T, K, G, H]
    return out.reshape(t, n, h).astype(q.dtype)
