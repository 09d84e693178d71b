"""Helpers for the GPT-2, OPT and BERT tests, on top of ``model_checks`` (shared with Llama).

``packed_batch`` builds one padding-free batch of several sequences followed by bucket
padding (segment -1), so every test also checks that padding disturbs nothing;
``assert_matches_hf`` compares each real token's row with ``transformers`` run on its
sequence alone; ``decode_paged`` runs the sequences through ``model_checks.PagedRun``'s
hand-built paged cache; ``jitted`` compiles a model's forward once per shape;
``tiny_variant`` saves a tiny checkpoint of a ``hf_fixtures`` variant with config fields
overridden (e.g. OPT's post-LN layout), randomised the same way as the shared fixtures.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import model_checks

rel_error = model_checks.rel_err

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


def hf_logits(hf_model, seqs: list[np.ndarray]) -> list[np.ndarray]:
    """``transformers`` logits of each sequence run alone (batch of one, no padding): ``[L, V]`` each."""
    return [model_checks.hf_logits(hf_model, s) for s in seqs]


def assert_matches_hf(logits: np.ndarray, packed: Packed, reference: list[np.ndarray], rtol: float = RTOL) -> None:
    """Every real token's row of ``logits [T, V]`` matches the per-sequence reference."""
    logits = np.asarray(logits)
    assert logits.shape[0] == len(packed.input_ids)
    for i, (start, ref) in enumerate(zip(packed.starts, reference)):
        err = rel_error(logits[start : start + len(ref)], ref)
        assert err <= rtol, f"sequence {i}: max relative error {err:.3g} > {rtol}"


def decode_paged(forward, config, packed: Packed, *, prefill: list[int], page_size: int) -> np.ndarray:
    """Logits ``[num_real, V]`` (packed order) of ``packed``'s sequences run through the paged
    cache (``model_checks.PagedRun``): a chunked prefill of ``prefill[i]`` tokens of each
    sequence, then one token per unfinished sequence per step."""
    rows = model_checks.paged_decode_logits(
        None, config, packed.seqs, prefill, page_size=page_size, dtype=jnp.float32,
        forward=lambda _, ids, pos, seg, cache, meta: forward(ids, pos, seg, kv_cache=cache, attn_meta=meta),
    )
    return np.concatenate(rows, axis=0)


def real_rows(logits: np.ndarray, packed: Packed) -> np.ndarray:
    """The rows of ``logits [T, V]`` that belong to real tokens, in packed order."""
    return np.asarray(logits)[: packed.num_real]


def jitted(model):
    """``model``'s forward under one ``jax.jit`` (one compile per input shape, as the runner does)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, input_ids, positions, segment_ids, kv_cache, attn_meta, logits_indices):
        m = nnx.merge(graphdef, state)
        return m(
            input_ids, positions, segment_ids, kv_cache=kv_cache, attn_meta=attn_meta, logits_indices=logits_indices
        )

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
    if base == "bert":
        model = tf.BertModel(config, add_pooling_layer=False)
    else:
        model = tf.AutoModelForCausalLM.from_config(config)
    model = model.to(torch.float32).eval()
    _randomize(model, seed)
    model.save_pretrained(str(out_dir))
    return Path(out_dir)


def assert_orbax_round_trip(hf_dir: Path, out_dir: Path, outputs) -> None:
    """``energon convert`` then ``models.load`` gives the same parameters, bit for bit, and
    the same ``outputs(model)``."""
    import models
    from energon_jax.cli import main

    assert main(["convert", str(hf_dir), str(out_dir)]) == 0
    restored, config = models.load(out_dir)
    original, original_config = models.load(hf_dir)
    assert config == original_config
    assert_same_params(original, restored)
    np.testing.assert_array_equal(np.asarray(outputs(restored)), np.asarray(outputs(original)))


def renamed_checkpoint(src: Path, dst: Path, rename, extra: dict[str, np.ndarray] | None = None) -> Path:
    """A copy of checkpoint ``src`` whose tensors are named ``rename(name)``, plus ``extra``
    tensors: how other exporters lay out the same weights."""
    import shutil

    from safetensors.numpy import load_file, save_file

    dst.mkdir(parents=True)
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = {}
    for file in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    renamed = {rename(name): array for name, array in tensors.items()}
    save_file({**renamed, **(extra or {})}, str(dst / "model.safetensors"))
    return dst


def assert_same_params(a, b) -> None:
    """Two models hold the same parameters, bit for bit."""
    fa = dict(nnx.to_flat_state(nnx.state(a, nnx.Param)))
    fb = dict(nnx.to_flat_state(nnx.state(b, nnx.Param)))
    assert fa.keys() == fb.keys()
    for path in fa:
        assert fa[path][...].dtype == fb[path][...].dtype, path
        assert np.array_equal(np.asarray(fa[path][...]), np.asarray(fb[path][...])), path


def load_quietly(path: Path):
    """``models.load(path)``, failing on any "unexpected tensor" warning."""
    import warnings

    import models

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = models.load(path)
    unexpected = [str(w.message) for w in caught if "unexpected" in str(w.message)]
    assert not unexpected, unexpected
    return loaded
