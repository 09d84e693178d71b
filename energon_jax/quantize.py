"""Compressing a loaded model's linear layers: int8 weights, or magnitude pruning + sparse packing.

``quantize_model(model, mode="int8")`` replaces every ``models.layers.Linear`` (except the
names in ``skip``) by ``models.quantized.Int8Linear`` (per-output-channel symmetric int8).
``quantize_model(model, mode="sparse", sparsity=0.8)`` first prunes each kernel to the
target unstructured sparsity by magnitude (the smallest ``|w|`` of that matrix go to zero),
then packs it for ``SparseLinear`` (Flash-LLM style tiled format). Both edit the model in
place and return a ``QuantizeReport`` with the dense and packed weight bytes.

``load_quantized(path, ...)`` is ``models.load`` followed by ``quantize_model``: what
``Engine.from_pretrained(..., quantize="int8" | sparsity=0.8)`` is meant to call.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import models
from models.layers import Linear
from models.quantized import Int8Linear, SparseLinear

MODES = ("int8", "sparse")


@dataclasses.dataclass(frozen=True)
class QuantizeReport:
    mode: str
    layers: tuple[str, ...]  # paths of the replaced layers, e.g. "layers.0.self_attn.q_proj"
    dense_bytes: int  # bytes of the replaced kernels before
    packed_bytes: int  # bytes of what replaced them (values + bitmap + offsets, or int8 + scales)
    sparsity: float | None = None

    @property
    def ratio(self) -> float:
        return self.packed_bytes / max(self.dense_bytes, 1)

    def summary(self) -> str:
        extra = f" at sparsity {self.sparsity:.2f}" if self.sparsity is not None else ""
        return (
            f"{self.mode}{extra}: {len(self.layers)} linear layers, {self.dense_bytes / 2**20:.2f} MiB dense -> "
            f"{self.packed_bytes / 2**20:.2f} MiB packed ({self.ratio:.1%})"
        )


def prune_magnitude(w: jax.Array, sparsity: float) -> jax.Array:
    """Zero the ``round(sparsity * w.size)`` entries of smallest magnitude (ties broken by index)."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"{sparsity=} must be in [0, 1)")
    flat = np.asarray(jnp.asarray(w).astype(jnp.float32)).reshape(-1)
    drop = int(round(sparsity * flat.size))
    keep = np.ones(flat.size, bool)
    keep[np.argsort(np.abs(flat), kind="stable")[:drop]] = False
    return jnp.where(jnp.asarray(keep.reshape(w.shape)), w, jnp.zeros((), w.dtype))


def _linears(model: nnx.Module, skip: tuple[str, ...]) -> list[tuple[tuple, Linear]]:
    found = []
    for path, node in nnx.iter_graph(model):
        if isinstance(node, Linear) and not any(str(p) in skip for p in path):
            found.append((tuple(path), node))
    return found


def _replace(model: nnx.Module, path: tuple, new: nnx.Module) -> None:
    parent = model
    for p in path[:-1]:
        parent = parent[p] if isinstance(p, int) else getattr(parent, p)
    if isinstance(path[-1], int):
        parent[path[-1]] = new
    else:
        setattr(parent, path[-1], new)


def quantize_model(
    model: nnx.Module,
    mode: str = "int8",
    *,
    sparsity: float = 0.8,
    skip: tuple[str, ...] = ("lm_head",),
    tile_k: int = 64,
    tile_n: int = 64,
    implementation: str = "auto",
) -> QuantizeReport:
    """Swap ``model``'s ``Linear`` layers for compressed ones, in place; returns the report."""
    if mode not in MODES:
        raise ValueError(f"{mode=} must be one of {MODES}")
    if mode == "sparse" and not 0.0 <= sparsity < 1.0:
        raise ValueError(f"{sparsity=} must be in [0, 1)")
    names, dense, packed = [], 0, 0
    for path, linear in _linears(model, skip):
        w = linear.kernel.get_value()
        dense += w.size * w.dtype.itemsize
        if mode == "int8":
            new = Int8Linear.from_linear(linear, implementation=implementation)
        else:
            linear.kernel.set_value(prune_magnitude(w, sparsity))
            new = SparseLinear.from_linear(linear, tile_k=tile_k, tile_n=tile_n, implementation=implementation)
        packed += new.weight_bytes
        _replace(model, path, new)
        names.append(".".join(map(str, path)))
    return QuantizeReport(mode, tuple(names), dense, packed, sparsity if mode == "sparse" else None)


def compression_mode(quantize: str | None, sparsity: float | None) -> tuple[str, float] | None:
    """``Engine.from_pretrained``'s ``quantize=`` / ``sparsity=`` as ``(mode, sparsity)`` for
    ``quantize_model`` (None: keep the weights dense); checked before any weight is read."""
    if quantize is not None and quantize != "int8":
        raise ValueError(f"{quantize=} must be 'int8' or None")
    if sparsity is not None and not (isinstance(sparsity, (int, float)) and 0.0 <= sparsity < 1.0):
        raise ValueError(f"{sparsity=} must be a float in [0, 1) or None")
    if quantize is not None and sparsity is not None:
        raise ValueError(f"give quantize={quantize!r} or sparsity={sparsity}, not both")
    if quantize is None and sparsity is None:
        return None
    return ("int8", 0.8) if quantize is not None else ("sparse", float(sparsity))


def load_quantized(
    path: str | Path, dtype: str = "float32", *, quantize: str | None = None, sparsity: float | None = None, **kw
) -> tuple[nnx.Module, object, QuantizeReport | None]:
    """``models.load`` then ``quantize_model``: ``quantize="int8"``, or ``sparsity=0.8`` for sparse layers."""
    if quantize is not None and sparsity is not None:
        raise ValueError(f"give quantize={quantize!r} or sparsity={sparsity}, not both")
    model, config = models.load(path, dtype)
    if quantize is not None:
        return model, config, quantize_model(model, quantize, **kw)
    if sparsity is not None:
        return model, config, quantize_model(model, "sparse", sparsity=sparsity, **kw)
    return model, config, None
