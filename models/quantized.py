"""Linear layers with compressed weights: drop-in replacements for ``models.layers.Linear``.

``Int8Linear`` holds ``kernel [in, out]`` int8 and per-output-channel ``scales [out]``
and calls ``pallas_kernels.int8_matmul``. ``SparseLinear`` holds a pruned weight in the
tiled bitmap format of ``pallas_kernels.sparse_matmul`` (values, bitmap, tile offsets)
and calls ``sparse_matmul``. Both keep the dense layer's optional ``bias [out]``.

They are built from a loaded dense ``Linear`` by ``from_linear`` (the model is loaded in
float, then compressed); ``energon_jax/quantize.py`` walks a model and swaps its layers.
The kernel choice follows the usual dispatch (``implementation`` / ``ENERGON_KERNELS``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models.layers import Linear
from pallas_kernels import PackedSparse, int8_matmul, pack_sparse, sparse_matmul
from pallas_kernels.int8_matmul import quantize_weight_int8


def _axes(var: nnx.Variable) -> tuple:
    return tuple(var.get_metadata().get("logical_axes") or (None,) * var.get_value().ndim)


def _bias(linear: Linear) -> nnx.Param | None:
    if linear.bias is None:
        return None
    return nnx.Param(linear.bias.get_value(), logical_axes=_axes(linear.bias))


class Int8Linear(nnx.Module):
    """``y = x @ (kernel * scales) + bias`` with ``kernel [in, out]`` int8, ``scales [out]`` float32."""

    def __init__(self, kernel: jax.Array, scales: jax.Array, bias: nnx.Param | None, *, axes: tuple,
                 implementation: str = "auto"):
        if kernel.dtype != jnp.int8:
            raise ValueError(f"kernel.dtype={kernel.dtype} must be int8")
        self.kernel = nnx.Param(kernel, logical_axes=axes)
        self.scales = nnx.Param(scales.astype(jnp.float32), logical_axes=(axes[1],))
        self.bias = bias
        self.implementation = implementation

    @classmethod
    def from_linear(cls, linear: Linear, *, implementation: str = "auto") -> Int8Linear:
        q, scales = quantize_weight_int8(linear.kernel.get_value())
        return cls(q, scales, _bias(linear), axes=_axes(linear.kernel), implementation=implementation)

    @property
    def weight_bytes(self) -> int:
        return self.kernel.get_value().size + 4 * self.scales.get_value().size

    def __call__(self, x: jax.Array) -> jax.Array:  # [..., in] -> [..., out]
        y = int8_matmul(x, self.kernel.get_value(), self.scales.get_value(), implementation=self.implementation)
        if self.bias is not None:
            y = y + self.bias.get_value().astype(x.dtype)
        return y


class SparseLinear(nnx.Module):
    """``y = x @ W + bias`` with a pruned ``W [in, out]`` kept packed (values, bitmap, tile offsets).

    The packed arrays have no per-axis meaning, so they carry no logical axes (replicated
    under tensor parallelism); sharding a packed weight is future work.
    """

    def __init__(self, packed: PackedSparse, bias: nnx.Param | None, *, implementation: str = "auto"):
        self.values = nnx.Param(packed.values, logical_axes=(None,))
        self.bitmap = nnx.Param(packed.bitmap, logical_axes=(None,))
        self.tile_offsets = nnx.Param(packed.tile_offsets, logical_axes=(None,))
        self.shape = packed.shape
        self.tile_k, self.tile_n = packed.tile_k, packed.tile_n
        self.bias = bias
        self.implementation = implementation

    @classmethod
    def from_linear(cls, linear: Linear, *, tile_k: int = 64, tile_n: int = 64,
                    implementation: str = "auto") -> SparseLinear:
        """Pack ``linear``'s kernel as it is (prune it first: zeros are what is left out)."""
        packed = pack_sparse(linear.kernel.get_value(), tile_k=tile_k, tile_n=tile_n)
        return cls(packed, _bias(linear), implementation=implementation)

    @property
    def packed(self) -> PackedSparse:
        return PackedSparse(
            values=self.values.get_value(), bitmap=self.bitmap.get_value(),
            tile_offsets=self.tile_offsets.get_value(), shape=self.shape, tile_k=self.tile_k, tile_n=self.tile_n,
        )

    @property
    def weight_bytes(self) -> int:
        return self.packed.packed_bytes

    def __call__(self, x: jax.Array) -> jax.Array:  # [..., in] -> [..., out]
        y = sparse_matmul(x, self.packed, implementation=self.implementation)
        if self.bias is not None:
            y = y + self.bias.get_value().astype(x.dtype)
        return y
