"""Attention over a packed, padding-free batch (prefill without a cache).

Layout: ``q [T, N, H]``, ``k, v [T, K, H]`` with ``N % K == 0`` (GQA: query head ``n``
reads KV head ``n // (N // K)``), ``segment_ids [T]`` (which sequence each token
belongs to; negative means padding), ``positions [T]``. Token ``i`` attends to token
``j`` iff ``segment_ids[i] == segment_ids[j] >= 0`` and, when causal,
``positions[j] <= positions[i]``; with ``sliding_window=W`` (causal only) also
``positions[j] > positions[i] - W`` (Mistral's and transformers' window: the query and the
``W - 1`` keys before it). A row with nothing to attend to returns zeros.

``kv_segment_ids`` / ``kv_positions`` let the keys be a different packed array from
the queries (``k, v [C, K, H]``); they default to the query ones.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.block_sizes import FlashBlockSizes
from pallas_kernels.dispatch import backend, resolve_implementation, use_interpret


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array,
    positions: jax.Array,
    causal: bool = True,
    sm_scale: float | None = None,
    kv_segment_ids: jax.Array | None = None,
    kv_positions: jax.Array | None = None,
    sliding_window: int | None = None,
    implementation: str = "auto",
    interpret: bool = False,
    block_sizes: FlashBlockSizes | None = None,
) -> jax.Array:
    """Packed variable-length attention; returns ``[T, N, H]`` in ``q.dtype``.

    ``implementation="pallas"`` runs the tiled FlashAttention-2 kernel: on TPU the Mosaic
    variant in ``_flash_attention_tpu``, elsewhere the Triton-style ``_flash_attention_pallas``
    (``interpret=True`` on CPU); ``block_sizes`` tunes either.
    """
    _check_shapes(q, k, v)
    check_sliding_window(sliding_window, causal)
    impl = resolve_implementation(implementation, interpret=interpret)
    if impl == "pallas" and backend() == "tpu" and not interpret:
        from pallas_kernels._flash_attention_tpu import flash_attention_tpu

        return flash_attention_tpu(
            q, k, v, segment_ids=segment_ids, positions=positions, causal=causal, sm_scale=sm_scale,
            kv_segment_ids=kv_segment_ids, kv_positions=kv_positions, sliding_window=sliding_window,
            block_sizes=block_sizes,
        )
    if impl == "pallas":
        from pallas_kernels import _flash_attention_pallas as kernel

        return kernel.flash_attention_pallas(
            q, k, v,
            segment_ids=segment_ids, positions=positions, causal=causal, sm_scale=sm_scale,
            kv_segment_ids=kv_segment_ids, kv_positions=kv_positions, sliding_window=sliding_window,
            interpret=use_interpret(interpret), block_sizes=block_sizes,
        )
    return flash_attention_reference(
        q, k, v, segment_ids=segment_ids, positions=positions, causal=causal, sm_scale=sm_scale,
        kv_segment_ids=kv_segment_ids, kv_positions=kv_positions, sliding_window=sliding_window,
    )


def flash_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array,
    positions: jax.Array,
    causal: bool = True,
    sm_scale: float | None = None,
    kv_segment_ids: jax.Array | None = None,
    kv_positions: jax.Array | None = None,
    sliding_window: int | None = None,
) -> jax.Array:
    """Plain-jnp attention with an explicit ``[T, C]`` mask; the numerical reference."""
    check_sliding_window(sliding_window, causal)
    t, n, h = q.shape
    c, kh, _ = k.shape
    g = n // kh
    scale = h**-0.5 if sm_scale is None else sm_scale
    kv_seg = segment_ids if kv_segment_ids is None else kv_segment_ids
    kv_pos = positions if kv_positions is None else kv_positions
    mask = (segment_ids[:, None] == kv_seg[None, :]) & (segment_ids[:, None] >= 0)  # [T, C]
    if causal:
        mask &= kv_pos[None, :] <= positions[:, None]
    if sliding_window is not None:
        mask &= kv_pos[None, :] > positions[:, None] - sliding_window
    qg = q.reshape(t, kh, g, h).astype(jnp.float32)
    s = jnp.einsum("tkgh,ckh->kgtc", qg, k.astype(jnp.float32)) * scale
    s = jnp.where(mask[None, None], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("kgtc,ckh->tkgh", p, v.astype(jnp.float32))
    denom = jnp.transpose(l, (2, 0, 1, 3))  # [T, K, G, 1]
    o = jnp.where(denom > 0, o / jnp.where(denom > 0, denom, 1.0), 0.0)
    return o.reshape(t, n, h).astype(q.dtype)


def check_sliding_window(sliding_window: int | None, causal: bool = True) -> None:
    """A window is a whole number of keys >= 1, over causal attention only."""
    if sliding_window is None:
        return
    if isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window < 1:
        raise ValueError(f"{sliding_window=} must be an integer >= 1 (or None for full attention)")
    if not causal:
        raise ValueError(f"{sliding_window=} needs causal attention (causal=False)")


def _check_shapes(q: jax.Array, k: jax.Array, v: jax.Array) -> None:
    if q.ndim != 3 or k.ndim != 3 or v.shape != k.shape:
        raise ValueError(f"expected q [T, N, H], k and v [C, K, H]; got {q.shape=}, {k.shape=}, {v.shape=}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"head dims differ: {q.shape[-1]=} vs {k.shape[-1]=}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} must be a multiple of KV heads {k.shape[1]}")
