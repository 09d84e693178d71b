"""The one definition of the paged KV-cache layout, shared by kernels, models and the engine.

Glossary: ``P`` pages in the pool, ``S`` tokens per page (page size), ``K`` KV heads,
``H`` head dim, ``T`` packed tokens of one step, ``B`` sequence rows of one step,
``M`` max pages per sequence row.

Layout of one layer's pool: ``k, v [P, S, K, H]``. A token at cache position ``j`` of a
sequence lives in page ``page_table[j // S]`` at offset ``j % S``; its flat *slot* is
``page * S + offset``. Page 0 is the null page: it is never handed to a sequence,
padding tokens write their K/V there, and page tables are padded with 0. Reads of
page 0 are always masked out by the sequence length.

int8 pages (optional) keep per-token, per-head scales ``k_scale, v_scale [P, S, K]``
(float32); the real value is ``int8 * scale``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

NULL_PAGE = 0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVPages:
    """One layer's slice of the page pool."""

    k: jax.Array  # [P, S, K, H]
    v: jax.Array  # [P, S, K, H]
    k_scale: jax.Array | None = None  # [P, S, K] float32, only for int8 pages
    v_scale: jax.Array | None = None  # [P, S, K] float32, only for int8 pages

    @property
    def num_pages(self) -> int:
        return self.k.shape[0]

    @property
    def page_size(self) -> int:
        return self.k.shape[1]

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None


# A model's whole cache: one KVPages per layer, in layer order.
KVCache = tuple[KVPages, ...]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedAttentionMetadata:
    """Per-step metadata for attention over the page pool (built by energon_jax/batch.py).

    Query-side facts (``segment_ids [T]``, the row of each token, -1 for padding, and
    ``positions [T]``) are passed to the model beside this object.
    """

    slot_mapping: jax.Array  # [T] int32: flat slot each token's K/V is written to (0 for padding)
    page_tables: jax.Array  # [B, M] int32: pages of each sequence row, padded with NULL_PAGE
    context_lens: jax.Array  # [B] int32: cached tokens of each row after this step's write (0 for unused rows)


def make_kv_pages(
    num_pages: int,
    page_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: jnp.dtype = jnp.float32,
    *,
    sharding: jax.sharding.Sharding | None = None,
) -> KVPages:
    """Allocate one layer's zeroed page pool (int8 dtype adds scale arrays)."""
    if num_pages < 2:
        raise ValueError(f"{num_pages=} must be >= 2 (page 0 is the reserved null page)")
    if page_size < 1:
        raise ValueError(f"{page_size=} must be >= 1")
    shape = (num_pages, page_size, num_kv_heads, head_dim)
    k = jnp.zeros(shape, dtype, device=sharding)
    v = jnp.zeros(shape, dtype, device=sharding)
    if jnp.dtype(dtype) == jnp.int8:  # scales [P, S, K] live where their pages do, split alike
        scale_sharding = sharding
        if isinstance(sharding, jax.sharding.NamedSharding):
            scale_sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[:3]))
        ks = jnp.ones(shape[:3], jnp.float32, device=scale_sharding)
        vs = jnp.ones(shape[:3], jnp.float32, device=scale_sharding)
        return KVPages(k, v, ks, vs)
    return KVPages(k, v)


def page_bytes(page_size: int, num_kv_heads: int, head_dim: int, dtype: jnp.dtype) -> int:
    """Bytes one page takes in one layer, K and V together (scales included for int8)."""
    itemsize = jnp.dtype(dtype).itemsize
    per_token = 2 * num_kv_heads * head_dim * itemsize
    if jnp.dtype(dtype) == jnp.int8:
        per_token += 2 * num_kv_heads * 4
    return page_size * per_token


def quantize_kv(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Symmetric per-token, per-head int8: ``x [T, K, H] -> (int8 [T, K, H], scale [T, K])``."""
    amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1)
    scale = jnp.maximum(amax, 1e-8) / 127.0
    q = jnp.clip(jnp.round(x.astype(jnp.float32) / scale[..., None]), -127, 127).astype(jnp.int8)
    return q, scale


def write_kv(pages: KVPages, k: jax.Array, v: jax.Array, slot_mapping: jax.Array) -> KVPages:
    """Scatter new tokens' ``k, v [T, K, H]`` into their slots; returns the updated pages."""
    num_pages, page_size, num_kv, head_dim = pages.k.shape
    flat = (num_pages * page_size, num_kv, head_dim)
    if pages.quantized:
        kq, ks = quantize_kv(k)
        vq, vs = quantize_kv(v)
        new_k = pages.k.reshape(flat).at[slot_mapping].set(kq).reshape(pages.k.shape)
        new_v = pages.v.reshape(flat).at[slot_mapping].set(vq).reshape(pages.v.shape)
        sflat = (num_pages * page_size, num_kv)
        new_ks = pages.k_scale.reshape(sflat).at[slot_mapping].set(ks).reshape(pages.k_scale.shape)
        new_vs = pages.v_scale.reshape(sflat).at[slot_mapping].set(vs).reshape(pages.v_scale.shape)
        return KVPages(new_k, new_v, new_ks, new_vs)
    new_k = pages.k.reshape(flat).at[slot_mapping].set(k.astype(pages.k.dtype)).reshape(pages.k.shape)
    new_v = pages.v.reshape(flat).at[slot_mapping].set(v.astype(pages.v.dtype)).reshape(pages.v.shape)
    return KVPages(new_k, new_v)
