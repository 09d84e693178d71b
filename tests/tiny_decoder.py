"""A tiny decoder that obeys the model forward contract (docs/architecture.md), for
runner and engine tests that must not wait on models/: embedding, GQA attention with
rotary positions through ``models.layers.attend`` (so the paged path is the real one),
an MLP, an untied head. Its no-cache forward over one whole sequence is the reference
for greedy generation through the engine.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.layers import apply_rope, attend, rope_inv_freq
from pallas_kernels import make_kv_pages


@dataclasses.dataclass(frozen=True)
class TinyConfig:
    vocab_size: int = 97
    hidden_size: int = 32
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 8
    num_layers: int = 2
    max_position_embeddings: int = 256
    eos_token_ids: tuple[int, ...] = ()
    is_encoder: bool = False
    architecture: str = "TinyDecoder"


def _w(rngs: nnx.Rngs, *shape: int, scale: float) -> nnx.Param:
    return nnx.Param(scale * jax.random.normal(rngs.params(), shape, jnp.float32))


class _Layer(nnx.Module):
    def __init__(self, c: TinyConfig, rngs: nnx.Rngs) -> None:
        d, n, k, h = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
        self.wq = _w(rngs, d, n * h, scale=d**-0.5)
        self.wk = _w(rngs, d, k * h, scale=d**-0.5)
        self.wv = _w(rngs, d, k * h, scale=d**-0.5)
        self.wo = _w(rngs, n * h, d, scale=(n * h) ** -0.5)
        self.w1 = _w(rngs, d, 2 * d, scale=d**-0.5)
        self.w2 = _w(rngs, 2 * d, d, scale=(2 * d) ** -0.5)
        self.c = c

    def __call__(self, x, positions, segment_ids, pages, attn_meta, inv_freq):
        c = self.c
        t = x.shape[0]
        q = apply_rope((x @ self.wq[...]).reshape(t, c.num_heads, c.head_dim), positions, inv_freq)
        k = apply_rope((x @ self.wk[...]).reshape(t, c.num_kv_heads, c.head_dim), positions, inv_freq)
        v = (x @ self.wv[...]).reshape(t, c.num_kv_heads, c.head_dim)
        out, pages = attend(q, k, v, segment_ids=segment_ids, positions=positions, kv_pages=pages, attn_meta=attn_meta)
        x = x + out.reshape(t, -1) @ self.wo[...]
        x = x + jax.nn.gelu(x @ self.w1[...]) @ self.w2[...]
        return x, pages


class TinyDecoder(nnx.Module):
    def __init__(self, c: TinyConfig, *, seed: int = 0) -> None:
        rngs = nnx.Rngs(seed)
        self.c = c
        self.embed = _w(rngs, c.vocab_size, c.hidden_size, scale=1.0)
        self.layers = nnx.List([_Layer(c, rngs) for _ in range(c.num_layers)])
        self.head = _w(rngs, c.hidden_size, c.vocab_size, scale=2.0 * c.hidden_size**-0.5)

    def __call__(self, input_ids, positions, segment_ids, kv_cache=None, attn_meta=None, logits_indices=None):
        inv_freq = rope_inv_freq(self.c.head_dim, 10000.0, None)
        x = jnp.take(self.embed[...], input_ids, axis=0)  # [T, D]
        new_cache = []
        for i, layer in enumerate(self.layers):
            pages = None if kv_cache is None else kv_cache[i]
            x, pages = layer(x, positions, segment_ids, pages, attn_meta, inv_freq)
            new_cache.append(pages)
        if logits_indices is not None:
            x = x[logits_indices]
        logits = x @ self.head[...]  # [T or B, V]
        return logits, (tuple(new_cache) if kv_cache is not None else None)


def make_cache(c: TinyConfig, num_pages: int, page_size: int):
    return tuple(make_kv_pages(num_pages, page_size, c.num_kv_heads, c.head_dim) for _ in range(c.num_layers))


def greedy_reference(model: TinyDecoder, prompt: list[int], max_tokens: int, eos: tuple[int, ...] = ()) -> list[int]:
    """Greedy continuation by re-running the whole sequence without a cache each token."""
    fwd = jax.jit(lambda ids, pos, seg: model(ids, pos, seg)[0])
    ids = list(prompt)
    out: list[int] = []
    for _ in range(max_tokens):
        n = len(ids)
        # Pad to a multiple of 32 so the reference compiles only a few shapes.
        t = -(-n // 32) * 32
        arr = np.zeros(t, np.int32)
        arr[:n] = ids
        seg = np.where(np.arange(t) < n, 0, -1).astype(np.int32)
        logits = fwd(jnp.asarray(arr), jnp.arange(t, dtype=jnp.int32), jnp.asarray(seg))
        nxt = int(np.asarray(logits)[n - 1].argmax())
        out.append(nxt)
        ids.append(nxt)
        if nxt in eos:
            break
    return out
