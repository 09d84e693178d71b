"""Building blocks shared by the model families.

Glossary: ``T`` tokens, ``N`` query heads, ``K`` KV heads, ``H`` head dim, ``D`` model
dim, ``F`` MLP dim, ``V`` vocab. Every parameter carries ``logical_axes`` metadata that
``energon_jax/parallel/mesh.py`` maps to mesh axes; nothing here knows about devices.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import RopeScaling
from pallas_kernels import KVPages, PagedAttentionMetadata, flash_attention, write_kv
from pallas_kernels.step_attention import step_attention

Axes = tuple[str | None, ...]


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: Axes, dtype, *, init: str = "normal") -> nnx.Param:
    """A parameter with logical axes. ``init`` is "normal" (std 0.02), "zeros" or "ones"."""
    if len(shape) != len(axes):
        raise ValueError(f"{shape=} and {axes=} differ in rank")
    if init == "zeros":
        value = jnp.zeros(shape, dtype)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    else:
        value = (0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, logical_axes=axes)


class Linear(nnx.Module):
    """``y = x @ kernel + bias`` with ``kernel [in, out]``."""

    def __init__(self, in_features: int, out_features: int, *, axes: Axes, use_bias: bool, dtype, rngs: nnx.Rngs):
        self.kernel = param(rngs, (in_features, out_features), axes, dtype)
        self.bias = param(rngs, (out_features,), (axes[1],), dtype, init="zeros") if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x, self.kernel[...].astype(x.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        return y


def untied_head(config, in_features: int, *, dtype, rngs: nnx.Rngs) -> Linear | None:
    """The output head ``[in, V]``, or ``None`` when it is tied to the token embedding."""
    if config.tie_word_embeddings:
        return None
    return Linear(in_features, config.vocab_size, axes=("embed", "vocab"), use_bias=False, dtype=dtype, rngs=rngs)


def check_cache_layers(kv_cache, num_layers: int) -> None:
    """A cache handed to a model must hold one ``KVPages`` per layer."""
    if kv_cache is not None and len(kv_cache) != num_layers:
        raise ValueError(f"kv_cache has {len(kv_cache)} layers; the model has num_layers={num_layers}")


class Embed(nnx.Module):
    """Token embedding ``[V, D]``; ``attend`` is the tied output head."""

    def __init__(self, num_embeddings: int, features: int, *, dtype, rngs: nnx.Rngs, axes: Axes = ("vocab", "embed")):
        self.embedding = param(rngs, (num_embeddings, features), axes, dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:
        return jnp.einsum("TD,VD->TV", x, self.embedding[...].astype(x.dtype))


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = param(rngs, (dim,), ("norm",), dtype, init="ones")

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, dtype, rngs: nnx.Rngs, use_bias: bool = True):
        self.eps = eps
        self.scale = param(rngs, (dim,), ("norm",), dtype, init="ones")
        self.bias = param(rngs, (dim,), ("norm",), dtype, init="zeros") if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...].astype(jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> jax.Array:
    """Inverse frequencies ``[H // 2]``, with ``linear`` or ``llama3`` scaling as in Hugging Face."""
    inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling is None or scaling.rope_type == "default":
        return inv
    if scaling.rope_type == "linear":
        return inv / scaling.factor
    # llama3: keep high frequencies, divide low ones by `factor`, blend in between.
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > low_wavelen, inv / scaling.factor, inv)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, blended, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotary embedding on ``x [T, N, H]`` (Hugging Face's rotate-half convention)."""
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [T, H/2]
    cos = jnp.cos(angles)[:, None, :]
    sin = jnp.sin(angles)[:, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array,
    positions: jax.Array,
    kv_pages: KVPages | None,
    attn_meta: PagedAttentionMetadata | None,
    causal: bool = True,
    sm_scale: float | None = None,
    sliding_window: int | None = None,
    implementation: str = "auto",
) -> tuple[jax.Array, KVPages | None]:
    """Attention for one layer: ``q [T, N, H]``, ``k, v [T, K, H]`` -> ``([T, N, H], pages)``.

    Without a cache this is packed prefill (``flash_attention``); with one, the new
    K/V are written to their slots and the queries attend over the page pool
    (``step_attention``: the ragged kernel on GPU/TPU; ``implementation`` is the model
    config's ``attention_implementation``). ``sliding_window=W`` (the layer's window, None for
    full attention) limits each query to its ``W`` latest positions on both paths.
    """
    if kv_pages is None:
        out = flash_attention(q, k, v, segment_ids=segment_ids, positions=positions, causal=causal, sm_scale=sm_scale,
                              sliding_window=sliding_window)
        return out, None
    if attn_meta is None:
        raise ValueError("attn_meta is required when a KV cache is given")
    kv_pages = write_kv(kv_pages, k, v, attn_meta.slot_mapping)
    out = step_attention(q, kv_pages, attn_meta, segment_ids=segment_ids, positions=positions, sm_scale=sm_scale,
                         sliding_window=sliding_window, implementation=implementation)
    return out, kv_pages
