"""Sentence embeddings from an encoder checkpoint (BERT): pack, encode, pool, normalise.

``embed_texts(engine, texts)`` tokenizes every text (the tokenizer's template adds
[CLS]/[SEP]), packs the texts end to end into padding-free batches of at most
``max_num_batched_tokens`` tokens and ``max_num_seqs`` texts (bucketed to powers of two,
like decoder steps), runs the encoder and pools each text's hidden states on device.

Pooling follows the checkpoint's sentence-transformers config (``1_Pooling/config.json``)
when it has one, else mean pooling (what sentence-transformers builds around a plain
Hugging Face encoder). ``normalize=True`` L2-normalises the result.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_POOLING_MODE = "mean"
MIN_TOKEN_BUCKET = 16


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _batches(lengths: list[int], max_tokens: int, max_rows: int) -> list[list[int]]:
    """Indices of texts per batch, in order, each batch within the token and row limits."""
    out: list[list[int]] = [[]]
    used = 0
    for i, n in enumerate(lengths):
        if out[-1] and (used + n > max_tokens or len(out[-1]) == max_rows):
            out.append([])
            used = 0
        out[-1].append(i)
        used += n
    return out


def _encoder_fn(engine: Any, t: int, b: int, mode: str, normalize: bool):
    from flax import nnx

    from models.pooling import PoolingConfig, pool

    key = (t, b, mode, normalize)
    fn = engine._embed_fns.get(key)
    if fn is None:
        graphdef, state = nnx.split(engine._model)
        config = PoolingConfig(mode=mode, normalize=normalize)

        def encode(state, ids, pos, seg):
            model = nnx.merge(graphdef, state)
            hidden = model(ids, pos, seg)  # [T, D]
            return pool(hidden, seg, b, config)  # [B, D] float32

        start = time.perf_counter()
        abstract = [jax.ShapeDtypeStruct((t,), jnp.int32)] * 3
        fn = (jax.jit(encode).lower(state, *abstract).compile(), state)
        engine._embed_fns[key] = fn
        logger.info("compiled encoder for tokens=%d rows=%d (%s) in %.2fs", t, b, mode, time.perf_counter() - start)
    return fn


def embed_texts(engine: Any, texts: str | Sequence[str], *, normalize: bool = True) -> np.ndarray:
    """``[len(texts), D]`` float32 embeddings; ValueError for empty or too long input."""
    if engine.tokenizer is None:
        raise ValueError("embed needs a tokenizer.json in the checkpoint")
    if not engine.model_config.is_encoder:
        raise ValueError(f"model {engine.model_config.architecture} is a decoder: embed() needs an encoder (BERT)")
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise ValueError("texts must not be empty")
    c = engine.config
    ids = engine.tokenizer.encode_batch(texts)
    for i, seq in enumerate(ids):
        if not seq:
            raise ValueError(f"texts[{i}] has no tokens")
        if len(seq) > min(c.max_model_len, c.max_num_batched_tokens):
            raise ValueError(
                f"texts[{i}] has {len(seq)} tokens; the limit is min(max_model_len={c.max_model_len}, "
                f"max_num_batched_tokens={c.max_num_batched_tokens})"
            )
    mode = engine._pooling.mode if engine._pooling is not None else DEFAULT_POOLING_MODE
    out = np.zeros((len(texts), engine.model_config.hidden_size), np.float32)
    for batch in _batches([len(s) for s in ids], c.max_num_batched_tokens, c.max_num_seqs):
        n = sum(len(ids[i]) for i in batch)
        t = min(max(MIN_TOKEN_BUCKET, _pow2(n)), max(c.max_num_batched_tokens, n))
        b = _pow2(len(batch))
        tok = np.zeros(t, np.int32)
        pos = np.zeros(t, np.int32)
        seg = np.full(t, -1, np.int32)
        off = 0
        for r, i in enumerate(batch):
            k = len(ids[i])
            tok[off : off + k] = ids[i]
            pos[off : off + k] = np.arange(k)
            seg[off : off + k] = r
            off += k
        fn, state = _encoder_fn(engine, t, b, mode, normalize)
        pooled = np.asarray(fn(state, tok, pos, seg))  # [B, D]
        out[batch] = pooled[: len(batch)]
    return out
