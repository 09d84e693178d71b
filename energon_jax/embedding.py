"""The encoder's runner: sentence embeddings from an encoder checkpoint (BERT).

What flows in: texts. What flows out: ``[len(texts), D]`` float32 embeddings. Which
thread: the caller's (``AsyncEngine.embed`` runs it on a worker thread, one call at a time).
An ``Engine`` over an encoder holds one ``EmbeddingRunner`` and no scheduler or KV pool.

One ``embed`` call:

1. tokenize every text with the checkpoint's template ([CLS] ... [SEP]); padding and
   truncation stored in ``tokenizer.json`` never apply (``tokenizer.py``). A text longer
   than the limit is a ValueError naming it, or, with ``truncate=True``, is cut to the
   limit keeping its special tokens (what sentence-transformers does silently at its
   ``max_seq_length``);
2. pack the texts end to end, in order, into padding-free batches within
   ``max_num_batched_tokens`` tokens and ``max_num_seqs`` texts;
3. pad each batch to a token bucket and its rows to the row bucket, by the decoder's
   rules (``batch.Buckets``), so there are a few shapes, all known up front;
4. run that bucket's jitted function: encoder forward, then pooling per text (the
   checkpoint's sentence-transformers pooling, ``models/sentence_config.py``; mean without
   one), then L2 normalisation when asked. Normalisation is a runtime flag, so every
   bucket compiles once (at warm-up, or at first use with ``warmup=False``).

``normalize=None`` follows the checkpoint: on when its pipeline has a Normalize module.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from energon_jax.batch import Buckets
from models.pooling import PoolingConfig, l2_normalize, pool
from models.sentence_config import SentenceConfig

logger = logging.getLogger(__name__)

# A checkpoint without a sentence-transformers pipeline pools as sentence-transformers
# pools a plain Hugging Face encoder: mean, no normalisation.
DEFAULT_POOLING = PoolingConfig(mode="mean", normalize=False)


@dataclasses.dataclass(frozen=True)
class EmbedderConfig:
    """Sizes of the encoder runner."""

    max_model_len: int  # longest text, in tokens with its special tokens
    max_num_seqs: int  # texts per batch
    max_num_batched_tokens: int  # tokens per batch (the largest token bucket)
    min_token_bucket: int = 16

    def __post_init__(self) -> None:
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "min_token_bucket"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")

    @property
    def max_text_tokens(self) -> int:
        """The longest text one batch can hold."""
        return min(self.max_model_len, self.max_num_batched_tokens)


def embedder_config(
    model_config: Any,
    sentence: SentenceConfig | None,
    *,
    max_model_len: int | None,
    max_num_seqs: int,
    max_num_batched_tokens: int,
    min_token_bucket: int = 16,
) -> EmbedderConfig:
    """The runner's sizes: ``max_model_len`` defaults to the checkpoint's ``max_seq_length``
    (sentence-transformers) capped at ``max_position_embeddings``; more is an error."""
    limit = model_config.max_position_embeddings
    if max_model_len is None:
        max_model_len = min(sentence.max_seq_length or limit, limit) if sentence is not None else limit
    elif max_model_len > limit:
        raise ValueError(f"{max_model_len=} exceeds the encoder's max_position_embeddings={limit}")
    return EmbedderConfig(max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                          max_num_batched_tokens=max(max_num_batched_tokens, max_num_seqs),
                          min_token_bucket=min_token_bucket)


def pack_texts(lengths: Sequence[int], max_tokens: int, max_rows: int) -> list[list[int]]:
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


class EmbeddingRunner:
    """An encoder model, its tokenizer and pooling, and one compiled function per bucket."""

    def __init__(
        self,
        model: Any,
        model_config: Any,
        tokenizer: Any | None,
        config: EmbedderConfig,
        sentence: SentenceConfig | None = None,
    ) -> None:
        from flax import nnx

        if not model_config.is_encoder:
            raise ValueError(f"model {model_config.architecture} is a decoder: embed() needs an encoder (BERT)")
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.config = config
        self.sentence = sentence
        self.pooling = sentence.pooling if sentence is not None else DEFAULT_POOLING
        # The decoder's bucket rules; the page fields of Buckets are unused here.
        self.buckets = Buckets.create(
            max_num_batched_tokens=config.max_num_batched_tokens, max_num_seqs=config.max_num_seqs,
            max_model_len=config.max_model_len, page_size=1, min_tokens=config.min_token_bucket,
        )
        self._graphdef, self._state = nnx.split(model)
        self._fns: dict[tuple[int, int], Any] = {}  # (T, B) -> compiled encoder + pooling
        self.num_compiles = 0

    @property
    def default_normalize(self) -> bool:
        """Whether ``embed`` normalises unless told: the checkpoint has a Normalize module."""
        return self.pooling.normalize

    @property
    def dim(self) -> int:
        return self.model_config.hidden_size

    def warmup(self) -> int:
        """Compile every bucket shape; returns the number of compiles so far."""
        start = time.perf_counter()
        for t, b in self.buckets.all_shapes():
            self._fn(t, b)
        logger.info("encoder warm-up: %d shapes compiled in %.1fs", self.num_compiles, time.perf_counter() - start)
        return self.num_compiles

    def _fn(self, t: int, b: int) -> Any:
        fn = self._fns.get((t, b))
        if fn is not None:
            return fn
        from flax import nnx

        graphdef, config = self._graphdef, dataclasses.replace(self.pooling, normalize=False)

        def encode(state, ids, pos, seg, normalize):
            hidden = nnx.merge(graphdef, state)(ids, pos, seg)  # [T, D]
            pooled = pool(hidden, seg, b, config)  # [B, D] float32
            return jnp.where(normalize, l2_normalize(pooled), pooled)

        start = time.perf_counter()
        tokens = jax.ShapeDtypeStruct((t,), jnp.int32)
        fn = jax.jit(encode).lower(self._state, tokens, tokens, tokens, jax.ShapeDtypeStruct((), jnp.bool_)).compile()
        self._fns[(t, b)] = fn
        self.num_compiles += 1
        logger.info("compiled encoder for tokens=%d rows=%d (%s pooling) in %.2fs", t, b, self.pooling.mode,
                    time.perf_counter() - start)
        return fn

    def tokenize(self, texts: Sequence[str], *, truncate: bool = False) -> list[list[int]]:
        """Token ids of every text; ValueError for an empty or (unless ``truncate``) too long one."""
        if self.tokenizer is None:
            raise ValueError("embed needs a tokenizer.json in the checkpoint")
        if self.sentence is not None and self.sentence.do_lower_case:
            texts = [t.lower() if isinstance(t, str) else t for t in texts]
        c = self.config
        ids = self.tokenizer.encode_batch(texts, max_length=c.max_text_tokens if truncate else None)
        for i, seq in enumerate(ids):
            if not seq:
                raise ValueError(f"texts[{i}] has no tokens")
            if len(seq) > c.max_text_tokens:
                raise ValueError(
                    f"texts[{i}] has {len(seq)} tokens; the limit is min(max_model_len={c.max_model_len}, "
                    f"max_num_batched_tokens={c.max_num_batched_tokens}) (embed(..., truncate=True) cuts "
                    "longer texts to it)"
                )
        return ids

    def embed(self, texts: str | Sequence[str], *, normalize: bool | None = None,
              truncate: bool = False) -> np.ndarray:
        """``[len(texts), D]`` float32 embeddings (see the module docstring)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise ValueError("texts must not be empty")
        normalize = self.default_normalize if normalize is None else bool(normalize)
        ids = self.tokenize(texts, truncate=truncate)
        c = self.config
        out = np.zeros((len(texts), self.dim), np.float32)
        for batch in pack_texts([len(s) for s in ids], c.max_num_batched_tokens, c.max_num_seqs):
            seqs = [np.asarray(ids[i], np.int32) for i in batch]
            lengths = [len(s) for s in seqs]
            n = sum(lengths)
            t = self.buckets.token_bucket(n)
            b = self.buckets.row_bucket(t)
            tok = np.zeros(t, np.int32)
            pos = np.zeros(t, np.int32)
            seg = np.full(t, -1, np.int32)  # bucket padding: no segment, pooled by none
            tok[:n] = np.concatenate(seqs)
            pos[:n] = np.concatenate([np.arange(k, dtype=np.int32) for k in lengths])
            seg[:n] = np.repeat(np.arange(len(batch), dtype=np.int32), lengths)
            pooled = self._fn(t, b)(self._state, tok, pos, seg, np.bool_(normalize))  # [B, D]
            out[batch] = np.asarray(pooled)[: len(batch)]
        return out
