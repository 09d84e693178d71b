"""Checks shared by the model family tests: packed batches, the transformers reference, paged decoding.

``packed_batch`` builds one padding-free batch of several sequences (plus bucket padding
at the end); ``hf_logits`` runs ``transformers`` on each sequence alone; ``decode_paged``
feeds the same sequences through a paged KV cache, a chunked prefill followed by one
token per sequence per step, and returns every token's logits in packed order so they
can be compared with the plain forward. Page tables, slots and context lengths are
built here by hand, independently of ``energon_jax/batch.py``. ``tiny_variant`` saves a
tiny checkpoint of a ``hf_fixtures`` variant with config fields overridden (e.g. OPT's
post-LN layout), randomised the same way as the shared fixtures.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels import PagedAttentionMetadata, make_kv_pages

RTOL = 1e-4  # max |error| relative to max |reference| (issue 2, float32)
# bfloat16 weights and activations against float32: bfloat16 keeps 8 mantissa bits (a
# relative step of 2^-8 ~ 0.4%); the tiny two-layer models land near 1%, so 3% bounds them.
BF16_RTOL = 3e-2


@dataclasses.dataclass(frozen=True)
class Packed:
    seqs: list[np.ndarray]  # token ids of each sequence
    input_ids: np.ndarray  # [T] int32
    positions: np.ndarray  # [T] int32
    segment_ids: np.ndarray  # [T] int32, -1 for the trailing padding
    starts: list[int]  # offset of each sequence in the packed arrays

    @property
    def num_real(self) -> int:
        return sum(len(s) for s in self.seqs)


def packed_batch(lengths: list[int], vocab: int, seed: int, *, pad: int = 3, low: int = 3) -> Packed:
    """Random sequences of ``lengths`` packed back to back, then ``pad`` padding tokens."""
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(low, vocab, n).astype(np.int32) for n in lengths]
    starts = list(np.cumsum([0, *lengths[:-1]]))
    ids = np.concatenate([*seqs, np.zeros(pad, np.int32)])
    pos = np.concatenate([*(np.arange(n) for n in lengths), np.zeros(pad, np.int64)]).astype(np.int32)
    seg = np.concatenate([*(np.full(n, i) for i, n in enumerate(lengths)), np.full(pad, -1)]).astype(np.int32)
    return Packed(seqs, ids, pos, seg, [int(s) for s in starts])


def forward(model, packed: Packed, **kwargs):
    return model(
        jnp.asarray(packed.input_ids), jnp.asarray(packed.positions), jnp.asarray(packed.segment_ids), **kwargs
    )


def hf_logits(hf_model, seqs: list[np.ndarray]) -> list[np.ndarray]:
    """``transformers`` logits of each sequence run alone (batch of one, no padding): ``[L, V]`` each."""
    import torch

    out = []
    with torch.no_grad():
        for s in seqs:
            out.append(hf_model(torch.tensor(s[None].astype(np.int64))).logits[0].float().numpy())
    return out


def rel_error(actual: np.ndarray, expected: np.ndarray) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert np.isfinite(actual).all(), "non-finite values in the output"
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def assert_matches_hf(logits: np.ndarray, packed: Packed, reference: list[np.ndarray], rtol: float = RTOL) -> None:
    """Every real token's row of ``logits [T, V]`` matches the per-sequence reference."""
    logits = np.asarray(logits)
    assert logits.shape[0] == len(packed.input_ids)
    for i, (start, ref) in enumerate(zip(packed.starts, reference)):
        err = rel_error(logits[start : start + len(ref)], ref)
        assert err <= rtol, f"sequence {i}: max relative error {err:.3g} > {rtol}"


def decode_paged(
    model,
    packed: Packed,
    *,
    num_kv_heads: int,
    head_dim: int,
    num_layers: int,
    prefill: list[int],
    page_size: int,
    seed: int = 0,
    bucket: int | None = None,
) -> np.ndarray:
    """Run ``packed``'s sequences through the paged cache; returns logits ``[num_real, V]`` in packed order.

    Step 0 is a chunked prefill of ``prefill[i]`` tokens of each sequence (0 allowed);
    then every unfinished sequence gets one token per step. Each step is padded to
    ``bucket`` tokens (segment -1, slot 0 in the null page). Pages are handed out in a
    shuffled order so that no sequence's pages are contiguous, and the page tables have
    one spare column padded with the null page.
    """
    rng = np.random.default_rng(seed)
    lengths = [len(s) for s in packed.seqs]
    pages_per_seq = [-(-n // page_size) for n in lengths]
    max_pages = max(pages_per_seq) + 1
    num_pages = sum(pages_per_seq) + 3  # null page plus two never-used pages
    free = rng.permutation(np.arange(1, num_pages))
    tables = np.zeros((len(lengths), max_pages), np.int32)
    taken = 0
    for b, n in enumerate(pages_per_seq):
        tables[b, :n] = free[taken : taken + n]
        taken += n
    cache = tuple(make_kv_pages(num_pages, page_size, num_kv_heads, head_dim) for _ in range(num_layers))

    plan = [list(prefill)]  # tokens of each sequence fed at each step
    done = list(prefill)
    while any(d < n for d, n in zip(done, lengths)):
        plan.append([1 if d < n else 0 for d, n in zip(done, lengths)])
        done = _advance(done, plan[-1])
    done = [0] * len(lengths)  # tokens of each sequence already in the cache
    vocab_logits: dict[tuple[int, int], np.ndarray] = {}
    for step in plan:
        rows, pos = [], []
        for b, count in enumerate(step):
            rows += [b] * count
            pos += list(range(done[b], done[b] + count))
        t = len(rows) if bucket is None else max(bucket, len(rows))
        ids = np.zeros(t, np.int32)
        positions = np.zeros(t, np.int32)
        segs = np.full(t, -1, np.int32)
        slots = np.zeros(t, np.int32)  # padding writes slot 0 (null page)
        for i, (b, p) in enumerate(zip(rows, pos)):
            ids[i], positions[i], segs[i] = packed.seqs[b][p], p, b
            slots[i] = tables[b, p // page_size] * page_size + p % page_size
        done = _advance(done, step)
        meta = PagedAttentionMetadata(
            slot_mapping=jnp.asarray(slots),
            page_tables=jnp.asarray(tables),
            context_lens=jnp.asarray(np.asarray(done, np.int32)),
        )
        logits, cache = model(
            jnp.asarray(ids), jnp.asarray(positions), jnp.asarray(segs), kv_cache=cache, attn_meta=meta
        )
        assert len(cache) == num_layers
        logits = np.asarray(logits)
        for i, (b, p) in enumerate(zip(rows, pos)):
            vocab_logits[(b, p)] = logits[i]
    return np.stack([vocab_logits[(b, p)] for b, n in enumerate(lengths) for p in range(n)])


def _advance(done: list[int], step: list[int]) -> list[int]:
    return [d + s for d, s in zip(done, step)]


def real_rows(logits: np.ndarray, packed: Packed) -> np.ndarray:
    """The rows of ``logits [T, V]`` that belong to real tokens, in packed order."""
    return np.asarray(logits)[: packed.num_real]


def jitted(model):
    """``model``'s forward under one ``jax.jit`` (one compile per input shape, as the runner does)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, input_ids, positions, segment_ids, kv_cache, attn_meta, logits_indices):
        m = nnx.merge(graphdef, state)
        return m(input_ids, positions, segment_ids, kv_cache=kv_cache, attn_meta=attn_meta, logits_indices=logits_indices)

    def call(input_ids, positions, segment_ids, kv_cache=None, attn_meta=None, logits_indices=None):
        return run(state, input_ids, positions, segment_ids, kv_cache, attn_meta, logits_indices)

    return call


def tiny_variant(out_dir: Path, base: str, seed: int = 0, **overrides) -> Path:
    """Save a tiny random ``base`` checkpoint (see ``hf_fixtures``) with config fields overridden."""
    import torch
    import transformers as tf

    from hf_fixtures import _hf_config, _randomize

    config = _hf_config(base)
    for name, value in overrides.items():
        if not hasattr(config, name):
            raise ValueError(f"{base} config has no field {name!r}")
        setattr(config, name, value)
    torch.manual_seed(seed)
    model = (tf.BertModel(config, add_pooling_layer=False) if base == "bert" else tf.AutoModelForCausalLM.from_config(config))
    model = model.to(torch.float32).eval()
    _randomize(model, seed)
    model.save_pretrained(str(out_dir))
    return Path(out_dir)
