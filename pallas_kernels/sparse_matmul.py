"""Unstructured sparse weights, "load as sparse, compute as dense" (Flash-LLM).

Format (``pack_sparse``): the weight ``w [K, N]`` is zero-padded to whole
``tile_k x tile_n`` tiles and the tiles are laid out column-tile major
(tile ``t = nt * KT + kt``, so one output column tile reads one contiguous run). Per tile:

- ``bitmap``: ``tile_k * tile_n / 32`` uint32 words, bit ``e`` of the tile (row-major
  ``e = r * tile_n + c``) set where the weight is non-zero;
- ``values``: the non-zeros of all tiles, concatenated in that order (row-major inside a
  tile), in the weight's dtype;
- ``tile_offsets [KT * NT + 1]`` int32: where each tile's values start.

At 80 % sparsity in bfloat16 this is ``1/16 + 0.2`` of the dense bytes per element
(26 %); the bitmap replaces Flash-LLM's 16-bit in-tile positions, which would cost
``0.2 * 2`` more.

The kernel (generic ``pl.pallas_call``; everything it does - gather loads, shifts, two
cumsums, ``where``, ``dot`` - has a Triton lowering) runs one program per
``block_m x tile_n`` output tile and K range (split-K when there are few output tiles).
For each K tile it loads the tile's bitmap words and values (sparse bytes only), expands
them to a dense ``[tile_k, tile_n]`` tile on chip (each set bit's value index is its rank
among the set bits: a row cumsum plus the row-start offsets), and multiplies that dense
tile with the activation tile.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from pallas_kernels.dispatch import (
    ENV_VAR,
    GPU_ONLY,
    backend,
    gpu_compiler_params,
    resolve_implementation,
    use_interpret,
)
from pallas_kernels.block_sizes import split_k
from pallas_kernels.int8_matmul import _round_up


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=("values", "bitmap", "tile_offsets"),
    meta_fields=("shape", "tile_k", "tile_n"),
)
@dataclasses.dataclass(frozen=True)
class PackedSparse:
    """A pruned ``[K, N]`` weight in the tiled bitmap format (see the module docstring)."""

    values: jax.Array  # [nnz] weight dtype
    bitmap: jax.Array  # [KT * NT * tile_k * tile_n / 32] uint32
    tile_offsets: jax.Array  # [KT * NT + 1] int32
    shape: tuple[int, int]  # (K, N) of the dense weight
    tile_k: int
    tile_n: int

    @property
    def grid(self) -> tuple[int, int]:
        """(KT, NT): tiles along K and along N."""
        return -(-self.shape[0] // self.tile_k), -(-self.shape[1] // self.tile_n)

    @property
    def packed_bytes(self) -> int:
        return sum(a.size * a.dtype.itemsize for a in (self.values, self.bitmap, self.tile_offsets))

    @property
    def dense_bytes(self) -> int:
        return self.shape[0] * self.shape[1] * self.values.dtype.itemsize


def pack_sparse(w, *, tile_k: int = 64, tile_n: int = 64) -> PackedSparse:
    """Pack a (pruned) weight ``w [K, N]``; runs on the host once, at load time."""
    for name, t in (("tile_k", tile_k), ("tile_n", tile_n)):
        if t < 1 or t & (t - 1):
            raise ValueError(f"{name}={t} must be a power of two")
    if tile_k * tile_n % 32:
        raise ValueError(f"tile_k * tile_n = {tile_k * tile_n} must be a multiple of 32 (bitmap words)")
    dtype = jnp.asarray(w).dtype
    wf = np.asarray(jnp.asarray(w).astype(jnp.float32))
    if wf.ndim != 2:
        raise ValueError(f"w.shape={wf.shape} must be [K, N]")
    k, n = wf.shape
    kt, nt = -(-k // tile_k), -(-n // tile_n)
    padded = np.zeros((kt * tile_k, nt * tile_n), np.float32)
    padded[:k, :n] = wf
    tiles = padded.reshape(kt, tile_k, nt, tile_n).transpose(2, 0, 1, 3).reshape(nt * kt, tile_k * tile_n)
    mask = tiles != 0
    bits = mask.reshape(nt * kt, -1, 32).astype(np.uint64) << np.arange(32, dtype=np.uint64)
    bitmap = bits.sum(axis=-1).astype(np.uint32).reshape(-1)
    values = tiles[mask]  # tile order, row-major inside each tile
    offsets = np.concatenate([[0], np.cumsum(mask.sum(axis=1))]).astype(np.int32)
    return PackedSparse(
        values=jnp.asarray(values).astype(dtype), bitmap=jnp.asarray(bitmap),
        tile_offsets=jnp.asarray(offsets), shape=(k, n), tile_k=tile_k, tile_n=tile_n,
    )


def _expand_tile(bitmap_ref, values_ref, offsets_ref, t, tile_k: int, tile_n: int, dtype) -> jax.Array:
    """Dense ``[tile_k, tile_n]`` tile ``t`` from its bitmap words and values (used by kernel and reference)."""
    words_per_tile = tile_k * tile_n // 32
    e = jax.lax.broadcasted_iota(jnp.int32, (tile_k, tile_n), 0) * tile_n + jax.lax.broadcasted_iota(
        jnp.int32, (tile_k, tile_n), 1
    )
    words = bitmap_ref[t * words_per_tile + e // 32]  # [tk, tn] uint32 (gather load)
    bits = ((words >> (e % 32).astype(jnp.uint32)) & 1).astype(jnp.int32)
    in_row = jnp.cumsum(bits, axis=1)  # inclusive rank inside the row
    row_nnz = jnp.sum(bits, axis=1, keepdims=True)  # [tk, 1]
    row_start = jnp.cumsum(row_nnz, axis=0) - row_nnz  # exclusive
    rank = row_start + in_row - bits
    idx = jnp.where(bits != 0, offsets_ref[t] + rank, 0)
    return jnp.where(bits != 0, values_ref[idx], 0).astype(dtype)


def unpack_sparse(packed: PackedSparse) -> jax.Array:
    """The dense ``[K, N]`` weight back (jnp)."""
    kt, nt = packed.grid
    tk, tn = packed.tile_k, packed.tile_n
    values = packed.values if packed.values.size else jnp.zeros((1,), packed.values.dtype)
    tiles = jax.vmap(
        lambda t: _expand_tile(packed.bitmap, values, packed.tile_offsets, t, tk, tn, packed.values.dtype)
    )(jnp.arange(kt * nt))
    dense = tiles.reshape(nt, kt, tk, tn).transpose(1, 2, 0, 3).reshape(kt * tk, nt * tn)
    return dense[: packed.shape[0], : packed.shape[1]]


def sparse_matmul(
    x: jax.Array,
    packed_w: PackedSparse,
    *,
    implementation: str = "auto",
    interpret: bool = False,
    block_m: int = 16,
    num_splits: int | None = None,
) -> jax.Array:
    """``x [..., K] @ W [K, N] -> [..., N]`` in ``x.dtype``, ``W`` given packed.

    ``block_m``: activation rows per program. ``num_splits``: K ranges reduced afterwards
    (split-K; ``None`` picks enough for ``SPLIT_K_TARGET_PROGRAMS`` on a GPU, see
    ``block_sizes.split_k``).
    """
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"{num_splits=} must be >= 1 (or None for the heuristic)")
    if x.shape[-1] != packed_w.shape[0]:
        raise ValueError(f"shapes do not chain: {x.shape=}, packed_w.shape={packed_w.shape}")
    if resolve_implementation(implementation, interpret=interpret, backends=GPU_ONLY) == "pallas":
        if backend() == "tpu" and not interpret:
            # The on-chip expansion gathers values by rank, which Mosaic cannot lower.
            raise ValueError(
                f"sparse_matmul has no TPU kernel: {implementation=} (or {ENV_VAR}) asks for 'pallas' on TPU; "
                "use 'auto' or 'reference' there"
            )
        lead = x.shape[:-1]
        y = sparse_matmul_pallas(
            x.reshape(-1, x.shape[-1]), packed_w, interpret=use_interpret(interpret), block_m=block_m,
            num_splits=num_splits,
        )
        return y.reshape(*lead, packed_w.shape[1])
    return sparse_matmul_reference(x, packed_w)


@jax.jit
def sparse_matmul_reference(x: jax.Array, packed_w: PackedSparse) -> jax.Array:
    """Plain jnp: unpack to dense, matmul in float32."""
    w = unpack_sparse(packed_w).astype(jnp.float32)
    return jnp.dot(x.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST).astype(x.dtype)


def _sparse_kernel(
    offsets_ref, bitmap_ref, values_ref, x_ref, o_ref, *, num_k_tiles: int, k_per_split: int, tile_k: int, precision
):
    # x_ref [bm, Kp], o_ref [bm, tn]: this K range's partial sum; bitmap/values/offsets: the whole packed arrays.
    nt, start = pl.program_id(1), pl.program_id(2) * k_per_split
    block_m, tile_n = o_ref.shape

    def body(kt, acc):
        w = _expand_tile(bitmap_ref, values_ref, offsets_ref, nt * num_k_tiles + kt, tile_k, tile_n, x_ref.dtype)
        x = x_ref[:, pl.ds(pl.multiple_of(kt * tile_k, tile_k), tile_k)]
        return acc + jax.lax.dot_general(
            x, w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32, precision=precision
        )

    end = jnp.minimum(start + k_per_split, num_k_tiles)
    acc = jax.lax.fori_loop(start, end, body, jnp.zeros((block_m, tile_n), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("interpret", "block_m", "num_splits"))
def sparse_matmul_pallas(
    x: jax.Array, packed: PackedSparse, *, interpret: bool = False, block_m: int = 16, num_splits: int | None = None
) -> jax.Array:
    m, k = x.shape
    kt, nt = packed.grid
    tk, tn = packed.tile_k, packed.tile_n
    mp = _round_up(m, block_m)
    on_gpu = gpu_compiler_params(interpret=interpret) is not None
    splits, k_per_split = split_k(num_splits, programs=(mp // block_m) * nt, num_k_blocks=kt, on_gpu=on_gpu)
    x_p = jnp.pad(x, ((0, mp - m), (0, kt * tk - k)))
    values = packed.values if packed.values.size else jnp.zeros((1,), packed.values.dtype)
    whole = lambda a: pl.BlockSpec(a.shape, lambda i, j, s: (0,))  # noqa: E731
    precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    out = pl.pallas_call(
        functools.partial(_sparse_kernel, num_k_tiles=kt, k_per_split=k_per_split, tile_k=tk, precision=precision),
        grid=(mp // block_m, nt, splits),
        in_specs=[
            whole(packed.tile_offsets), whole(packed.bitmap), whole(values),
            pl.BlockSpec((block_m, kt * tk), lambda i, j, s: (i, 0)),
        ],
        out_specs=pl.BlockSpec((None, block_m, tn), lambda i, j, s: (s, i, j)),
        # One split writes x.dtype directly; several write float32 partials, summed here.
        out_shape=jax.ShapeDtypeStruct((splits, mp, nt * tn), x.dtype if splits == 1 else jnp.float32),
        interpret=interpret,
        compiler_params=gpu_compiler_params(interpret=interpret, num_warps=4, num_stages=2),
        name="sparse_matmul",
    )(packed.tile_offsets, packed.bitmap, values, x_p)
    return jnp.sum(out, axis=0).astype(x.dtype)[:m, : packed.shape[1]]
