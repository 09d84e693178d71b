"""Pooling the hidden states of a packed batch into one vector per segment (sentence embeddings).

Glossary: ``T`` packed tokens, ``B`` segments (``num_segments``, static), ``D`` model dim.
``segment_ids [T]`` says which segment each token belongs to; negative ids (bucket
padding) and ids ``>= num_segments`` are ignored. A segment with no tokens pools to zeros.
Results are float32 ``[B, D]``.

A sentence-transformers checkpoint says how it pools in ``1_Pooling/config.json`` (the
folder is named in ``modules.json``) and whether it L2-normalises (a ``Normalize``
module); ``models/sentence_config.py`` reads that into a ``PoolingConfig``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp

POOLING_MODES = ("cls", "mean", "max", "mean_sqrt_len", "lasttoken")


@dataclasses.dataclass(frozen=True)
class PoolingConfig:
    mode: str = "cls"
    normalize: bool = False

    def __post_init__(self) -> None:
        if self.mode not in POOLING_MODES:
            raise ValueError(f"pooling mode={self.mode!r} is not supported; supported: {POOLING_MODES}")


def _counts(segment_ids: jax.Array, num_segments: int) -> jax.Array:
    ones = jnp.ones(segment_ids.shape, jnp.float32)
    return jax.ops.segment_sum(ones, segment_ids, num_segments)  # [B]; out-of-range ids are dropped


def _token_index_pool(hidden, segment_ids, num_segments, *, first: bool) -> jax.Array:
    t = hidden.shape[0]
    idx = jnp.arange(t, dtype=jnp.int32)
    if first:
        pick = jax.ops.segment_min(idx, segment_ids, num_segments)  # [B]; empty -> int max
    else:
        pick = jax.ops.segment_max(idx, segment_ids, num_segments)  # [B]; empty -> int min
    present = _counts(segment_ids, num_segments) > 0
    rows = hidden[jnp.clip(pick, 0, t - 1)].astype(jnp.float32)  # [B, D]
    return jnp.where(present[:, None], rows, 0.0)


def cls_pool(hidden: jax.Array, segment_ids: jax.Array, num_segments: int) -> jax.Array:
    """The first token of each segment (BERT's ``[CLS]``): ``[T, D] -> [B, D]``."""
    return _token_index_pool(hidden, segment_ids, num_segments, first=True)


def last_token_pool(hidden: jax.Array, segment_ids: jax.Array, num_segments: int) -> jax.Array:
    """The last token of each segment: ``[T, D] -> [B, D]``."""
    return _token_index_pool(hidden, segment_ids, num_segments, first=False)


def mean_pool(hidden: jax.Array, segment_ids: jax.Array, num_segments: int, *, sqrt_len: bool = False) -> jax.Array:
    """Mean of each segment's tokens (``sqrt_len``: sum divided by sqrt(length)): ``[T, D] -> [B, D]``."""
    sums = jax.ops.segment_sum(hidden.astype(jnp.float32), segment_ids, num_segments)  # [B, D]
    counts = _counts(segment_ids, num_segments)
    denom = jnp.sqrt(counts) if sqrt_len else counts
    return sums / jnp.maximum(denom, 1.0)[:, None]


def max_pool(hidden: jax.Array, segment_ids: jax.Array, num_segments: int) -> jax.Array:
    """Element-wise max over each segment's tokens: ``[T, D] -> [B, D]``."""
    m = jax.ops.segment_max(hidden.astype(jnp.float32), segment_ids, num_segments)  # empty -> -inf
    present = _counts(segment_ids, num_segments) > 0
    return jnp.where(present[:, None], m, 0.0)


def pool(hidden: jax.Array, segment_ids: jax.Array, num_segments: int, config: PoolingConfig) -> jax.Array:
    """Pool by ``config.mode`` and L2-normalise when ``config.normalize``: ``[T, D] -> [B, D]`` float32."""
    if config.mode == "cls":
        out = cls_pool(hidden, segment_ids, num_segments)
    elif config.mode == "lasttoken":
        out = last_token_pool(hidden, segment_ids, num_segments)
    elif config.mode == "max":
        out = max_pool(hidden, segment_ids, num_segments)
    else:
        out = mean_pool(hidden, segment_ids, num_segments, sqrt_len=config.mode == "mean_sqrt_len")
    if config.normalize:
        out = l2_normalize(out)
    return out


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Rows scaled to unit L2 norm (zero rows stay zero), as ``torch.nn.functional.normalize``."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
    return x / jnp.maximum(norm, eps)


def read_pooling_config(checkpoint_dir: str | Path) -> PoolingConfig | None:
    """The sentence-transformers pooling of a checkpoint (mode, and whether its pipeline
    normalises), or ``None`` if it has none. ``models/sentence_config.py`` reads it."""
    from models.sentence_config import read_sentence_config

    config = read_sentence_config(checkpoint_dir)
    return None if config is None else config.pooling
