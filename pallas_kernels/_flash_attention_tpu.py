"""FlashAttention-2 forward for TPU (Mosaic): the same algorithm as ``_flash_attention_pallas``
laid out the TPU way.

Differences from the GPU kernel, and why:

- The KV loop is the last grid axis (``"arbitrary"``), not a ``fori_loop``: Mosaic
  pipelines the K/V block DMAs across grid steps. The running max, sum and accumulator
  live in VMEM scratch; the output block stays resident over the KV axis and is written
  at its last step.
- The block schedule (each query block's list of needed KV blocks and its length, from
  ``block_schedule``) is scalar-prefetched into SMEM. KV step ``j`` of query block ``i``
  visits the ``j``-th needed block; steps past the list's end repeat its last block (an
  unchanged block index issues no DMA) and compute nothing (``pl.when``), so fully masked
  blocks are neither fetched nor multiplied.
- Heads lead (``q [N, T, H]``, ``k, v [K, C, H]``) so every block is a ``[tokens, H]`` tile;
  segment ids and positions of queries are ``[T, 1]`` columns and of keys ``[1, C]`` rows so
  that the mask is a broadcast with no transpose.

Status: tested in TPU interpret mode on CPU (``pltpu.force_tpu_interpret_mode``); never
compiled by Mosaic on a real TPU yet.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._flash_attention_pallas import MASK_VALUE, block_schedule
from pallas_kernels.block_sizes import FlashBlockSizes


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _tpu_kernel(
    counts_ref, kv_blocks_ref,  # SMEM [nq], [nq * nk]
    q_seg_ref, q_pos_ref,  # [bq, 1]
    kv_seg_ref, kv_pos_ref,  # [1, bk]
    q_ref,  # [bq, H]
    k_ref, v_ref,  # [bk, H]
    o_ref,  # [bq, H]
    m_sc, l_sc, acc_sc,  # VMEM [bq, 1], [bq, 1], [bq, H] float32
    *,
    num_kv_blocks: int,
    causal: bool,
    sliding_window: int | None,
    scale: float,
    precision,
):
    i, j = pl.program_id(1), pl.program_id(2)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(j < counts_ref[i])
    def _compute():
        q_seg = q_seg_ref[...]  # [bq, 1]
        mask = (q_seg == kv_seg_ref[...]) & (q_seg >= 0)  # [bq, bk]
        if causal:
            mask &= kv_pos_ref[...] <= q_pos_ref[...]
        if sliding_window is not None:
            mask &= kv_pos_ref[...] > q_pos_ref[...] - sliding_window
        s = jax.lax.dot_general(
            q_ref[...], k_ref[...], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32, precision=precision
        ) * scale
        s = jnp.where(mask, s, MASK_VALUE)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
        alpha = jnp.exp(m_prev - m_new)
        v = v_ref[...]
        pv = jax.lax.dot_general(
            p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32, precision=precision
        )
        acc_sc[...] = acc_sc[...] * alpha + pv
        l_sc[...] = l_sc[...] * alpha + jnp.sum(p, axis=1, keepdims=True)
        m_sc[...] = m_new

    @pl.when(j == num_kv_blocks - 1)
    def _finish():
        l = l_sc[...]
        out = jnp.where(l > 0, acc_sc[...] / jnp.where(l > 0, l, 1.0), 0.0)
        o_ref[...] = out.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("causal", "sm_scale", "sliding_window", "block_sizes"))
def flash_attention_tpu(
    q: jax.Array,  # [T, N, H]
    k: jax.Array,  # [C, K, H]
    v: jax.Array,  # [C, K, H]
    *,
    segment_ids: jax.Array,  # [T]
    positions: jax.Array,  # [T]
    causal: bool = True,
    sm_scale: float | None = None,
    kv_segment_ids: jax.Array | None = None,
    kv_positions: jax.Array | None = None,
    sliding_window: int | None = None,
    block_sizes: FlashBlockSizes | None = None,
) -> jax.Array:
    """TPU FlashAttention-2 on the packed layout; returns ``[T, N, H]`` in ``q.dtype``.

    Interpret it on CPU by tracing under ``pltpu.force_tpu_interpret_mode()``.
    """
    t, n, h = q.shape
    c, kh, _ = k.shape
    group = n // kh
    bs = block_sizes or FlashBlockSizes(block_q=128, block_k=128)
    bs.check_tpu()  # a ValueError naming the field, not a Mosaic lowering error
    block_q, block_k = bs.block_q, bs.block_k
    tp, cp = _round_up(t, block_q), _round_up(c, block_k)
    nq, nk = tp // block_q, cp // block_k
    scale = h**-0.5 if sm_scale is None else sm_scale
    kv_seg = segment_ids if kv_segment_ids is None else kv_segment_ids
    kv_pos = positions if kv_positions is None else kv_positions

    q_t = jnp.pad(q, ((0, tp - t), (0, 0), (0, 0))).transpose(1, 0, 2)  # [N, Tp, H]
    k_t = jnp.pad(k, ((0, cp - c), (0, 0), (0, 0))).transpose(1, 0, 2)  # [K, Cp, H]
    v_t = jnp.pad(v, ((0, cp - c), (0, 0), (0, 0))).transpose(1, 0, 2)
    q_seg = jnp.pad(segment_ids.astype(jnp.int32), (0, tp - t), constant_values=-1)
    q_pos = jnp.pad(positions.astype(jnp.int32), (0, tp - t))
    kv_seg = jnp.pad(kv_seg.astype(jnp.int32), (0, cp - c), constant_values=-1)
    kv_pos = jnp.pad(kv_pos.astype(jnp.int32), (0, cp - c))
    _, kv_blocks, counts = block_schedule(q_seg, q_pos, kv_seg, kv_pos, block_q=block_q, block_k=block_k,
                                          causal=causal, sliding_window=sliding_window)

    def kv_block(hd, i, j, counts_ref, kv_blocks_ref):
        # Past the list's end kv_blocks repeats its last entry: an unchanged index issues no DMA.
        return hd // group, kv_blocks_ref[i * nk + j], 0

    def kv_meta(hd, i, j, counts_ref, kv_blocks_ref):
        return 0, kv_blocks_ref[i * nk + j]

    q_map = lambda hd, i, j, *_: (hd, i, 0)  # noqa: E731
    q_meta = lambda hd, i, j, *_: (i, 0)  # noqa: E731
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(n, nq, nk),
        in_specs=[
            pl.BlockSpec((block_q, 1), q_meta),
            pl.BlockSpec((block_q, 1), q_meta),
            pl.BlockSpec((1, block_k), kv_meta),
            pl.BlockSpec((1, block_k), kv_meta),
            pl.BlockSpec((None, block_q, h), q_map),
            pl.BlockSpec((None, block_k, h), kv_block),
            pl.BlockSpec((None, block_k, h), kv_block),
        ],
        out_specs=pl.BlockSpec((None, block_q, h), q_map),
        scratch_shapes=[
            pltpu.VMEM((block_q, 1), jnp.float32),
            pltpu.VMEM((block_q, 1), jnp.float32),
            pltpu.VMEM((block_q, h), jnp.float32),
        ],
    )
    precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    out = pl.pallas_call(
        functools.partial(_tpu_kernel, num_kv_blocks=nk, causal=causal, sliding_window=sliding_window, scale=scale,
                          precision=precision),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((n, tp, h), q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        name="flash_attention_packed_tpu",
    )(
        counts, kv_blocks.reshape(-1),
        q_seg[:, None], q_pos[:, None], kv_seg[None, :], kv_pos[None, :], q_t, k_t, v_t,
    )
    return out.transpose(1, 0, 2)[:t]
