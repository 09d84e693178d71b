"""Weight-only int8 matmul for TPU (Mosaic): the same algorithm as ``int8_matmul_pallas``
laid out the TPU way.

Differences from the GPU kernel, and why:

- K is the last grid axis (``"arbitrary"``) instead of a loop inside the kernel: Mosaic
  double-buffers the ``[block_k, block_n]`` int8 weight tile DMAs across grid steps, which
  is what keeps a batch-1 (weight-bound) matmul at HBM speed. The float32 accumulator
  lives in VMEM scratch; the output tile is written once, at the last K step, scaled.
- Tiles follow the TPU's (8/16 sublanes x 128 lanes) layout: ``block_n`` and ``block_k``
  are multiples of 128 (or the whole dimension), ``block_m`` a multiple of 16 (bfloat16
  rows pack two per sublane; int8 weight rows four, hence ``block_k % 32 == 0`` too).
- Scales are a ``[1, N]`` row so that their tile is a lane vector broadcast over rows.

Status: tested in TPU interpret mode on CPU and lowered for TPU by ``jax.export``; never
compiled by Mosaic on a real TPU yet.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.block_sizes import MatmulBlockSizes

# TPU defaults: big tiles amortise the ~0.35 us per grid step; 512 x 512 int8 is 256 KiB.
TPU_BLOCKS = MatmulBlockSizes(block_m=128, block_n=512, block_k=512)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _tile(dim: int, preferred: int, align: int) -> tuple[int, int]:
    """(block, padded dim): the whole dim when it fits one block, else the largest multiple of
    ``align`` <= ``preferred`` that divides it (no padding), else ``preferred`` with padding."""
    if dim <= preferred:
        return dim, dim
    for b in range(preferred - preferred % align, align - 1, -align):
        if dim % b == 0:
            return b, dim
    return preferred, _round_up(dim, preferred)


def _kernel(x_ref, w_ref, s_ref, o_ref, acc_ref, *, precision):
    # x_ref [bm, bk], w_ref [bk, bn] int8, s_ref [1, bn] f32, o_ref [bm, bn], acc_ref [bm, bn] f32
    kk = pl.program_id(2)

    @pl.when(kk == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    x = x_ref[...]
    w = w_ref[...].astype(x.dtype)  # widen on chip: int8 is exact in bf16
    acc_ref[...] += jax.lax.dot_general(
        x, w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32, precision=precision
    )

    @pl.when(kk == pl.num_programs(2) - 1)
    def _finish():
        o_ref[...] = (acc_ref[...] * s_ref[...]).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_sizes",))
def int8_matmul_tpu(
    x: jax.Array,  # [M, K]
    w_int8: jax.Array,  # [K, N]
    scales: jax.Array,  # [N]
    *,
    block_sizes: MatmulBlockSizes | None = None,
) -> jax.Array:
    """``x @ (w_int8 * scales)`` -> ``[M, N]`` in ``x.dtype``. Interpret it on CPU by tracing
    under ``pltpu.force_tpu_interpret_mode()``."""
    m, k = x.shape
    n = w_int8.shape[1]
    bs = block_sizes or TPU_BLOCKS
    bm = min(_round_up(m, 16), max(16, _round_up(bs.block_m, 16)))
    mp = _round_up(m, bm)
    bn, np_ = _tile(n, max(128, bs.block_n), 128)
    bk, kp = _tile(k, max(128, bs.block_k), 128)
    x_p = jnp.pad(x, ((0, mp - m), (0, kp - k)))
    # Padding the weight copies it each call; _tile picks divisors so model shapes never do.
    w_p = jnp.pad(w_int8, ((0, kp - k), (0, np_ - n))) if (kp, np_) != (k, n) else w_int8
    s_p = jnp.pad(scales.astype(jnp.float32), (0, np_ - n))[None, :]  # [1, Np]
    precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    out = pl.pallas_call(
        functools.partial(_kernel, precision=precision),
        grid=(mp // bm, np_ // bn, kp // bk),
        in_specs=[
            pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk)),
            pl.BlockSpec((bk, bn), lambda i, j, kk: (kk, j)),
            pl.BlockSpec((1, bn), lambda i, j, kk: (0, j)),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j)),
        out_shape=jax.ShapeDtypeStruct((mp, np_), x.dtype),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        name="int8_matmul_tpu",
    )(x_p, w_p, s_p)
    return out[:m, :n]
