"""Weight-only int8 matmul: ``y = x @ (w_int8 * scales)`` with per-output-channel scales.

Layout: ``x [..., K]`` (float32 or bfloat16), ``w_int8 [K, N]`` int8, ``scales [N]``
float32; returns ``[..., N]`` in ``x.dtype``. Weights are quantised by
``energon_jax/quantize.py`` (symmetric, ``scale = max|w[:, n]| / 127``).

The Pallas kernel here (generic ``pl.pallas_call``: Triton lowering on GPU, interpret mode
on CPU; the TPU variant is ``_int8_matmul_tpu``) runs one program per ``block_m x block_n``
output tile and K range (split-K, when there are too few tiles to keep every SM busy) and
walks its K range in ``block_k`` steps: it loads an int8 weight tile (half the bytes of
bfloat16, a quarter of float32), widens it to ``x.dtype`` on chip (int8 values are exact in
bfloat16), accumulates in float32, and applies the scales at the end (they factor out of
every K sum). At batch 1 the matmul is bound by weight bytes, which is where int8 pays.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.block_sizes import MatmulBlockSizes, split_k
from pallas_kernels.dispatch import backend, gpu_compiler_params, resolve_implementation, use_interpret


def int8_matmul(
    x: jax.Array,
    w_int8: jax.Array,
    scales: jax.Array,
    *,
    implementation: str = "auto",
    interpret: bool = False,
    block_sizes: MatmulBlockSizes | None = None,
) -> jax.Array:
    """``x [..., K] @ dequant(w_int8 [K, N], scales [N]) -> [..., N]`` in ``x.dtype``.

    ``implementation="pallas"`` runs the kernel: on TPU the Mosaic variant in
    ``_int8_matmul_tpu``, elsewhere ``int8_matmul_pallas`` below (``interpret=True`` on CPU).
    """
    if w_int8.dtype != jnp.int8:
        raise ValueError(f"w_int8.dtype={w_int8.dtype} must be int8")
    if x.shape[-1] != w_int8.shape[0] or scales.shape != (w_int8.shape[1],):
        raise ValueError(f"shapes do not chain: {x.shape=}, {w_int8.shape=}, {scales.shape=}")
    if resolve_implementation(implementation, interpret=interpret) == "pallas":
        lead, x2 = x.shape[:-1], x.reshape(-1, x.shape[-1])
        if backend() == "tpu" and not interpret:
            from pallas_kernels._int8_matmul_tpu import int8_matmul_tpu

            y = int8_matmul_tpu(x2, w_int8, scales, block_sizes=block_sizes)
        else:
            y = int8_matmul_pallas(x2, w_int8, scales, interpret=use_interpret(interpret), block_sizes=block_sizes)
        return y.reshape(*lead, w_int8.shape[1])
    return int8_matmul_reference(x, w_int8, scales)


@jax.jit
def int8_matmul_reference(x: jax.Array, w_int8: jax.Array, scales: jax.Array) -> jax.Array:
    """Plain jnp: dequantise the whole weight, matmul in float32."""
    y = jnp.dot(x.astype(jnp.float32), w_int8.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return (y * scales.astype(jnp.float32)).astype(x.dtype)


def quantize_weight_int8(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Symmetric per-output-channel int8: ``w [K, N] -> (int8 [K, N], scales [N] float32)``.

    ``scale[n] = max_k |w[k, n]| / 127``; a column of zeros gets scale 1 (any value works).
    """
    wf = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(wf), axis=0)
    scales = jnp.where(amax > 0, amax / 127.0, 1.0)
    return jnp.clip(jnp.round(wf / scales), -127, 127).astype(jnp.int8), scales


def fit_block(dim: int, preferred: int, smallest: int = 16) -> int:
    """The largest power of two <= ``preferred`` (and >= ``smallest``) dividing ``dim``; else ``preferred``."""
    b = preferred
    while b >= smallest:
        if dim % b == 0:
            return b
        b //= 2
    return preferred


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _int8_kernel(x_ref, w_ref, s_ref, o_ref, *, block_k: int, k_per_split: int, precision):
    # x_ref [bm, Kp], w_ref [Kp, bn] int8, s_ref [bn] f32, o_ref [bm, bn]: this split's partial sum
    block_m, block_n = o_ref.shape
    num_k = x_ref.shape[1] // block_k
    start = pl.program_id(2) * k_per_split

    def body(kk, acc):
        ks = pl.ds(pl.multiple_of(kk * block_k, block_k), block_k)
        x = x_ref[:, ks]
        w = w_ref[ks, :].astype(x.dtype)  # widen on chip: int8 is exact in bf16
        return acc + jax.lax.dot_general(
            x, w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32, precision=precision
        )

    end = jnp.minimum(start + k_per_split, num_k)
    acc = jax.lax.fori_loop(start, end, body, jnp.zeros((block_m, block_n), jnp.float32))
    o_ref[...] = (acc * s_ref[...][None, :]).astype(o_ref.dtype)  # scales factor out of every K range


@functools.partial(jax.jit, static_argnames=("interpret", "block_sizes"))
def int8_matmul_pallas(
    x: jax.Array,  # [M, K]
    w_int8: jax.Array,  # [K, N]
    scales: jax.Array,  # [N]
    *,
    interpret: bool = False,
    block_sizes: MatmulBlockSizes | None = None,
) -> jax.Array:
    m, k = x.shape
    n = w_int8.shape[1]
    bs = block_sizes or MatmulBlockSizes()
    bm = bs.block_m
    bn, bk = fit_block(n, bs.block_n), fit_block(k, bs.block_k)
    mp, np_, kp = _round_up(m, bm), _round_up(n, bn), _round_up(k, bk)
    on_gpu = gpu_compiler_params(interpret=interpret) is not None
    splits, k_per_split = split_k(bs.num_splits, programs=(mp // bm) * (np_ // bn), num_k_blocks=kp // bk,
                                  on_gpu=on_gpu)
    x_p = jnp.pad(x, ((0, mp - m), (0, kp - k)))
    # Padding the weight costs a copy per call; pick block sizes that divide K and N
    # (fit_block does) so that real model shapes never take this branch.
    w_p = jnp.pad(w_int8, ((0, kp - k), (0, np_ - n))) if (kp, np_) != (k, n) else w_int8
    s_p = jnp.pad(scales.astype(jnp.float32), (0, np_ - n))
    precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    out = pl.pallas_call(
        functools.partial(_int8_kernel, block_k=bk, k_per_split=k_per_split, precision=precision),
        grid=(mp // bm, np_ // bn, splits),
        in_specs=[
            pl.BlockSpec((bm, kp), lambda i, j, s: (i, 0)),
            pl.BlockSpec((kp, bn), lambda i, j, s: (0, j)),
            pl.BlockSpec((bn,), lambda i, j, s: (j,)),
        ],
        out_specs=pl.BlockSpec((None, bm, bn), lambda i, j, s: (s, i, j)),
        # One split writes x.dtype directly; several write float32 partials, summed here.
        out_shape=jax.ShapeDtypeStruct((splits, mp, np_), x.dtype if splits == 1 else jnp.float32),
        interpret=interpret,
        compiler_params=gpu_compiler_params(interpret=interpret, num_warps=4, num_stages=3),
        name="int8_matmul",
    )(x_p, w_p, s_p)
    return jnp.sum(out, axis=0).astype(x.dtype)[:m, :n]
