"""BERT (models/bert.py) and segment pooling (models/pooling.py) against transformers.

A packed batch of three sequences (with token types and trailing bucket padding) must
give the hidden states transformers gives each sequence alone, and its CLS / mean /
max / last-token pooled embeddings must match the same pooling of those hidden states.
A sentence-transformers ``modules.json`` + ``1_Pooling/config.json`` picks the pooling.
bfloat16 loading, the orbax round trip and task-model tensor names (``bert.`` prefix,
gamma/beta, pooler head) give the expected parameters.
"""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import model_parity as mp
import models
from hf_fixtures import load_hf_model
from models import bert, pooling

LENGTHS = [6, 13, 2]


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint("bert")


@pytest.fixture(scope="module")
def model_and_config(checkpoint):
    return models.load(checkpoint, "float32")


@pytest.fixture(scope="module")
def encode(model_and_config):
    graphdef, state = nnx.split(model_and_config[0])

    @jax.jit
    def run(state, input_ids, positions, segment_ids, token_type_ids):
        return nnx.merge(graphdef, state)(input_ids, positions, segment_ids, token_type_ids=token_type_ids)

    return lambda *args: run(state, *args)


@pytest.fixture(scope="module")
def batch(checkpoint, model_and_config, encode):
    """``(packed, token types, our hidden [T, D], transformers' hidden per sequence)``."""
    config = model_and_config[1]
    packed = mp.packed_batch(LENGTHS, config.vocab_size, seed=1, low=5)
    types = np.random.default_rng(2).integers(0, config.type_vocab_size, len(packed.input_ids)).astype(np.int32)
    hidden = encode(jnp.asarray(packed.input_ids), jnp.asarray(packed.positions),
                    jnp.asarray(packed.segment_ids), jnp.asarray(types))
    hf = load_hf_model(checkpoint, "bert")
    reference = []
    with torch.no_grad():
        for seq, start in zip(packed.seqs, packed.starts):
            out = hf(torch.tensor(seq[None].astype(np.int64)),
                     token_type_ids=torch.tensor(types[None, start : start + len(seq)].astype(np.int64)))
            reference.append(out.last_hidden_state[0].numpy())
    return packed, types, np.asarray(hidden), reference


def test_config_from_hf(checkpoint, model_and_config):
    hf = models.loading.read_hf_config(checkpoint)
    config = model_and_config[1]
    assert isinstance(config, bert.BertConfig) and config.is_encoder and not config.is_decoder
    assert config.type_vocab_size == hf["type_vocab_size"] and config.norm_eps == hf["layer_norm_eps"]
    assert config.hidden_act == "gelu"


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="position_embedding_type='relative_key'"):
        bert.config_from_hf({"hidden_size": 8, "num_attention_heads": 2, "position_embedding_type": "relative_key"})
    with pytest.raises(ValueError, match="is_decoder"):
        bert.config_from_hf({"hidden_size": 8, "num_attention_heads": 2, "is_decoder": True})
    with pytest.raises(ValueError, match="hidden_size=9 must be a multiple of num_attention_heads=2"):
        bert.config_from_hf({"hidden_size": 9, "num_attention_heads": 2})


def test_every_parameter_has_logical_axes(model_and_config):
    names = {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "norm", None}
    for path, var in nnx.to_flat_state(nnx.state(model_and_config[0], nnx.Param)):
        axes = var.get_metadata().get("logical_axes")
        assert axes is not None and len(axes) == var[...].ndim, path
        assert set(axes) <= names, (path, axes)


def test_packed_hidden_states_match_transformers(batch, model_and_config):
    packed, _, hidden, reference = batch
    assert hidden.shape == (len(packed.input_ids), model_and_config[1].hidden_size)
    mp.assert_matches_hf(hidden, packed, reference)


def test_token_types_default_to_zero(batch, encode):
    packed, _, _, _ = batch
    args = (jnp.asarray(packed.input_ids), jnp.asarray(packed.positions), jnp.asarray(packed.segment_ids))
    np.testing.assert_array_equal(np.asarray(encode(*args, None)), np.asarray(encode(*args, jnp.zeros_like(args[0]))))


REFERENCE_POOLS = {
    "cls": lambda h: h[0],
    "mean": lambda h: h.mean(axis=0),
    "max": lambda h: h.max(axis=0),
    "lasttoken": lambda h: h[-1],
    "mean_sqrt_len": lambda h: h.sum(axis=0) / np.sqrt(len(h)),
}


@pytest.mark.parametrize("mode", sorted(REFERENCE_POOLS))
def test_pooled_embeddings_match_transformers(batch, mode):
    packed, _, hidden, reference = batch
    num_segments = len(LENGTHS) + 1  # one more row than sequences: it must pool to zeros
    out = np.asarray(jax.jit(pooling.pool, static_argnums=(2, 3))(
        jnp.asarray(hidden), jnp.asarray(packed.segment_ids), num_segments, pooling.PoolingConfig(mode)))
    assert out.shape == (num_segments, hidden.shape[1]) and out.dtype == np.float32
    expected = np.stack([REFERENCE_POOLS[mode](h) for h in reference])
    assert mp.rel_error(out[: len(LENGTHS)], expected) <= mp.RTOL
    np.testing.assert_array_equal(out[len(LENGTHS):], 0.0)


def test_named_pool_helpers(batch):
    packed, _, hidden, reference = batch
    seg = jnp.asarray(packed.segment_ids)
    cls = bert.cls_pool(jnp.asarray(hidden), seg, len(LENGTHS))
    mean = bert.mean_pool(jnp.asarray(hidden), seg, len(LENGTHS))
    assert mp.rel_error(cls, np.stack([h[0] for h in reference])) <= mp.RTOL
    assert mp.rel_error(mean, np.stack([h.mean(axis=0) for h in reference])) <= mp.RTOL


def _sentence_transformers_dir(src, dst, pooling_config: dict, *, normalize: bool, folder: str = "1_Pooling"):
    shutil.copytree(src, dst)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": folder, "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (dst / "modules.json").write_text(json.dumps(modules))
    (dst / folder).mkdir()
    (dst / folder / "config.json").write_text(json.dumps(pooling_config))
    return dst


def _st_config(**modes) -> dict:
    keys = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens", "lasttoken")
    config = {"word_embedding_dimension": 64, "include_prompt": True}
    config.update({f"pooling_mode_{k}": bool(modes.get(k, False)) for k in keys})
    return config


def test_sentence_transformers_pooling_config(checkpoint, batch, tmp_path):
    packed, _, hidden, reference = batch
    assert pooling.read_pooling_config(checkpoint) is None  # a plain BertModel checkpoint has none
    st = _sentence_transformers_dir(checkpoint, tmp_path / "st", _st_config(mean_tokens=True), normalize=True,
                                    folder="pool")
    config = pooling.read_pooling_config(st)
    assert config == pooling.PoolingConfig(mode="mean", normalize=True)
    # The checkpoint still loads, and its embeddings are the normalised mean of transformers' states.
    models.load(st, "float32")
    out = np.asarray(pooling.pool(jnp.asarray(hidden), jnp.asarray(packed.segment_ids), len(LENGTHS), config))
    expected = np.stack([h.mean(axis=0) / np.linalg.norm(h.mean(axis=0)) for h in reference])
    assert mp.rel_error(out, expected) <= mp.RTOL
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)


def test_pooling_config_without_modules_json(checkpoint, tmp_path):
    st = tmp_path / "st"
    shutil.copytree(checkpoint, st)
    (st / "1_Pooling").mkdir()
    (st / "1_Pooling" / "config.json").write_text(json.dumps(_st_config(cls_token=True)))
    assert pooling.read_pooling_config(st) == pooling.PoolingConfig(mode="cls", normalize=False)


@pytest.mark.parametrize(
    "modes,match",
    [
        ({"cls_token": True, "mean_tokens": True}, r"pooling modes=\['cls', 'mean'\] are not supported"),
        ({"weightedmean_tokens": True}, r"pooling modes=\['weightedmean'\] are not supported"),
    ],
)
def test_unsupported_pooling_config_is_an_error(checkpoint, tmp_path, modes, match):
    st = _sentence_transformers_dir(checkpoint, tmp_path / "st", _st_config(**modes), normalize=False)
    with pytest.raises(ValueError, match=match):
        pooling.read_pooling_config(st)


def test_no_pooling_mode_set_means_mean(checkpoint, tmp_path):
    # As sentence-transformers 6 reads a config whose pooling_mode_* keys are all false.
    st = _sentence_transformers_dir(checkpoint, tmp_path / "st", _st_config(), normalize=True)
    assert pooling.read_pooling_config(st) == pooling.PoolingConfig(mode="mean", normalize=True)


def test_orbax_round_trip_is_identical(checkpoint, batch, tmp_path):
    packed, types, _, _ = batch
    args = (jnp.asarray(packed.input_ids), jnp.asarray(packed.positions), jnp.asarray(packed.segment_ids),
            jnp.asarray(types))
    mp.assert_orbax_round_trip(checkpoint, tmp_path / "orbax", lambda model: nnx.jit(lambda m, *a: m(*a))(model, *args))


def test_task_model_names_gamma_beta_and_pooler(checkpoint, model_and_config, tmp_path):
    # Checkpoints saved from a task model prefix "bert.", old exports call LayerNorm
    # parameters gamma/beta, and most carry the pooler head: all load, with no warning.
    def rename(name: str) -> str:
        name = name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        return "bert." + name

    d = model_and_config[1].hidden_size
    extra = {"bert.pooler.dense.weight": np.ones((d, d), np.float32), "bert.pooler.dense.bias": np.ones(d, np.float32)}
    path = mp.renamed_checkpoint(checkpoint, tmp_path / "task", rename, extra)
    model, _ = mp.load_quietly(path)
    mp.assert_same_params(model, model_and_config[0])


def test_bfloat16_load(checkpoint, model_and_config, batch, encode):
    packed, types, hidden32, _ = batch
    model16, _ = models.load(checkpoint, "bfloat16")
    flat32 = dict(nnx.to_flat_state(nnx.state(model_and_config[0], nnx.Param)))
    flat16 = dict(nnx.to_flat_state(nnx.state(model16, nnx.Param)))
    assert flat16.keys() == flat32.keys()
    for p, var in flat16.items():
        assert var[...].dtype == jnp.bfloat16, p
        np.testing.assert_array_equal(np.asarray(var[...]), np.asarray(flat32[p][...].astype(jnp.bfloat16)))
    hidden16 = nnx.jit(lambda m, *a: m(*a))(
        model16, jnp.asarray(packed.input_ids), jnp.asarray(packed.positions), jnp.asarray(packed.segment_ids),
        jnp.asarray(types),
    )
    assert hidden16.dtype == jnp.bfloat16
    n = packed.num_real
    assert mp.rel_error(np.asarray(hidden16.astype(jnp.float32))[:n], hidden32[:n]) <= mp.BF16_RTOL
