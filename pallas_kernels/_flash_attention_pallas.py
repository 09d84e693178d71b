"""FlashAttention-2 forward as a generic ``pl.pallas_call`` (Triton lowering on GPU, interpret on CPU).

The story of one call:

1. The wrapper pads the packed token axis to whole blocks (padding tokens get segment
   -1, so they match nothing) and the head dim to a power of two (Triton tiles).
2. ``block_schedule`` summarises each query block and each KV block by the range of its
   segment ids and positions, marks the (query block, KV block) pairs that can hold a
   visible pair of tokens, and compacts each query block's row of marks into the list of
   its needed KV blocks, ascending, with their count. All of this is a few small integer
   arrays computed in jnp.
3. The kernel runs one program per (query head, query block) and loops over its list only,
   so fully masked KV blocks are neither loaded nor multiplied, and the loop body has no
   branch (a branch around the loads would keep Triton from pipelining them).
4. Each visited block updates a running max ``m``, running sum ``l`` and an unnormalised
   accumulator; the output is divided by ``l`` once at the end (FA2). Rows that saw no
   visible key (padding, segment -1) write zeros.

GQA: query head ``n`` reads KV head ``n // G`` through the BlockSpec index map; K/V are
never repeated in memory.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.block_sizes import FlashBlockSizes
from pallas_kernels.dispatch import gpu_compiler_params

# Finite "minus infinity": exp(MASK - m) underflows to 0 without producing NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
_BIG = int(jnp.iinfo(jnp.int32).max)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def block_schedule(
    q_seg: jax.Array,  # [Tp] int32, -1 for padding
    q_pos: jax.Array,  # [Tp]
    kv_seg: jax.Array,  # [Cp]
    kv_pos: jax.Array,  # [Cp]
    *,
    block_q: int,
    block_k: int,
    causal: bool,
    sliding_window: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Which KV blocks each query block must visit.

    Returns ``needed [nq, nk]`` (bool), ``kv_blocks [nq, nk]`` and ``counts [nq]`` (int32):
    row ``i`` of ``kv_blocks`` lists the needed KV blocks of query block ``i`` in ascending
    order in its first ``counts[i]`` entries, then repeats the last of them (0 when there is
    none), so that a pipeline prefetching one entry ahead never asks for a new block. A pair
    is skipped only when no query/key pair in it can be visible: no valid token on either
    side, disjoint segment ranges, or (causal) every key position after every query
    position, or (``sliding_window=W``) every key position at or below every query position
    minus ``W``. The test is conservative, so skipping never changes the result.
    """
    nq, nk = q_seg.shape[0] // block_q, kv_seg.shape[0] // block_k
    qs, qp = q_seg.reshape(nq, block_q), q_pos.reshape(nq, block_q)
    ks, kp = kv_seg.reshape(nk, block_k), kv_pos.reshape(nk, block_k)
    qv, kv = qs >= 0, ks >= 0
    q_smin = jnp.min(jnp.where(qv, qs, _BIG), axis=1)
    q_smax = jnp.max(jnp.where(qv, qs, -1), axis=1)
    k_smin = jnp.min(jnp.where(kv, ks, _BIG), axis=1)
    k_smax = jnp.max(jnp.where(kv, ks, -1), axis=1)
    needed = jnp.any(qv, axis=1)[:, None] & jnp.any(kv, axis=1)[None, :]
    needed &= (q_smin[:, None] <= k_smax[None, :]) & (k_smin[None, :] <= q_smax[:, None])
    if causal:
        q_pmax = jnp.max(jnp.where(qv, qp, -_BIG), axis=1)
        k_pmin = jnp.min(jnp.where(kv, kp, _BIG), axis=1)
        needed &= k_pmin[None, :] <= q_pmax[:, None]
    if sliding_window is not None:
        q_pmin = jnp.min(jnp.where(qv, qp, _BIG), axis=1)
        k_pmax = jnp.max(jnp.where(kv, kp, -_BIG), axis=1)
        needed &= k_pmax[None, :] > q_pmin[:, None] - sliding_window
    counts = jnp.sum(needed, axis=1).astype(jnp.int32)
    # Stable sort of "not needed" puts the needed blocks first, in ascending order.
    order = jnp.argsort(~needed, axis=1, stable=True).astype(jnp.int32)
    last = jnp.take_along_axis(order, jnp.maximum(counts - 1, 0)[:, None], axis=1)
    kv_blocks = jnp.where(jnp.arange(nk)[None, :] < counts[:, None], order, jnp.where(counts[:, None] > 0, last, 0))
    return needed, kv_blocks, counts


def _flash_kernel(
    counts_ref, kv_blocks_ref,  # [nq], [nq * nk] int32: the block schedule
    q_seg_ref, q_pos_ref,  # [bq]
    kv_seg_ref, kv_pos_ref,  # [Cp]
    q_ref,  # [bq, Hp]
    k_ref, v_ref,  # [Cp, Hp]: the whole KV sequence of this KV head (stays in HBM on GPU)
    o_ref,  # [bq, Hp]
    *,
    block_k: int,
    num_kv_blocks: int,
    causal: bool,
    sliding_window: int | None,
    scale: float,
    precision,
):
    i = pl.program_id(1)
    block_q, head_dim = q_ref.shape
    q = q_ref[...]
    q_seg = q_seg_ref[...]
    q_pos = q_pos_ref[...]

    def visit(j, carry):
        acc, m, l = carry
        kv_slice = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
        k = k_ref[kv_slice, :]  # [bk, Hp]
        s = jax.lax.dot_general(
            q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32, precision=precision
        ) * scale  # [bq, bk]
        kv_seg = kv_seg_ref[kv_slice]
        mask = (q_seg[:, None] == kv_seg[None, :]) & (q_seg[:, None] >= 0)
        if causal:
            mask &= kv_pos_ref[kv_slice][None, :] <= q_pos[:, None]
        if sliding_window is not None:
            mask &= kv_pos_ref[kv_slice][None, :] > q_pos[:, None] - sliding_window
        s = jnp.where(mask, s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
        alpha = jnp.exp(m - m_new)
        v = v_ref[kv_slice, :]
        pv = jax.lax.dot_general(
            p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32, precision=precision
        )
        return acc * alpha[:, None] + pv, m_new, l * alpha + jnp.sum(p, axis=1)

    def body(jj, carry):
        return visit(kv_blocks_ref[i * num_kv_blocks + jj], carry)

    init = (
        jnp.zeros((block_q, head_dim), jnp.float32),
        jnp.full((block_q,), MASK_VALUE, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    acc, _, l = jax.lax.fori_loop(0, counts_ref[i], body, init)
    # FA2: normalise once, after the last block. No visible key (padding) -> zeros.
    out = jnp.where(l[:, None] > 0, acc / jnp.where(l > 0, l, 1.0)[:, None], 0.0)
    o_ref[...] = out.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("causal", "sm_scale", "sliding_window", "interpret", "block_sizes"))
def flash_attention_pallas(
    q: jax.Array,  # [T, N, H]
    k: jax.Array,  # [C, K, H]
    v: jax.Array,  # [C, K, H]
    *,
    segment_ids: jax.Array,  # [T]
    positions: jax.Array,  # [T]
    causal: bool = True,
    sm_scale: float | None = None,
    kv_segment_ids: jax.Array | None = None,  # [C]
    kv_positions: jax.Array | None = None,  # [C]
    sliding_window: int | None = None,
    interpret: bool = False,
    block_sizes: FlashBlockSizes | None = None,
) -> jax.Array:
    """Tiled FlashAttention-2 on the packed layout; returns ``[T, N, H]`` in ``q.dtype``."""
    t, n, h = q.shape
    c, kh, _ = k.shape
    group = n // kh
    bs = block_sizes or FlashBlockSizes()
    # Short inputs get smaller blocks, but never below 16 on a GPU (tl.dot's minimum).
    smallest = 16 if gpu_compiler_params(interpret=interpret) is not None else 1
    block_q = min(bs.block_q, max(pl.next_power_of_2(t), smallest))
    block_k = min(bs.block_k, max(pl.next_power_of_2(c), smallest))
    tp, cp, hp = _round_up(t, block_q), _round_up(c, block_k), pl.next_power_of_2(h)
    nq, nk = tp // block_q, cp // block_k
    scale = h**-0.5 if sm_scale is None else sm_scale
    kv_seg = segment_ids if kv_segment_ids is None else kv_segment_ids
    kv_pos = positions if kv_positions is None else kv_positions

    q_p = jnp.pad(q, ((0, tp - t), (0, 0), (0, hp - h)))
    k_p = jnp.pad(k, ((0, cp - c), (0, 0), (0, hp - h)))
    v_p = jnp.pad(v, ((0, cp - c), (0, 0), (0, hp - h)))
    q_seg = jnp.pad(segment_ids.astype(jnp.int32), (0, tp - t), constant_values=-1)
    q_pos = jnp.pad(positions.astype(jnp.int32), (0, tp - t))
    kv_seg = jnp.pad(kv_seg.astype(jnp.int32), (0, cp - c), constant_values=-1)
    kv_pos = jnp.pad(kv_pos.astype(jnp.int32), (0, cp - c))
    _, kv_blocks, counts = block_schedule(q_seg, q_pos, kv_seg, kv_pos, block_q=block_q, block_k=block_k,
                                          causal=causal, sliding_window=sliding_window)

    precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    kernel = functools.partial(
        _flash_kernel, block_k=block_k, num_kv_blocks=nk, causal=causal, sliding_window=sliding_window, scale=scale,
        precision=precision,
    )
    whole = lambda size: pl.BlockSpec((size,), lambda hd, i: (0,))  # noqa: E731
    out = pl.pallas_call(
        kernel,
        grid=(n, nq),
        in_specs=[
            whole(nq), whole(nq * nk),
            pl.BlockSpec((block_q,), lambda hd, i: (i,)),
            pl.BlockSpec((block_q,), lambda hd, i: (i,)),
            whole(cp), whole(cp),
            pl.BlockSpec((block_q, None, hp), lambda hd, i: (i, hd, 0)),
            pl.BlockSpec((cp, None, hp), lambda hd, i: (0, hd // group, 0)),
            pl.BlockSpec((cp, None, hp), lambda hd, i: (0, hd // group, 0)),
        ],
        out_specs=pl.BlockSpec((block_q, None, hp), lambda hd, i: (i, hd, 0)),
        out_shape=jax.ShapeDtypeStruct((tp, n, hp), q.dtype),
        interpret=interpret,
        compiler_params=gpu_compiler_params(interpret=interpret, num_warps=4 if hp <= 64 else 8, num_stages=2),
        name="flash_attention_packed",
    )(counts, kv_blocks.reshape(-1), q_seg, q_pos, kv_seg, kv_pos, q_p, k_p, v_p)
    return out[:t, :, :h]
