"""GPT-2 (models/gpt2.py) against transformers on tiny random checkpoints.

A packed batch of three sequences must give the logits transformers gives each sequence
alone; decoding through the paged KV cache must give the plain forward's logits; a
bfloat16 load must hold the float32 weights rounded to bfloat16; the orbax round trip
and the OpenAI-style tensor names give the same parameters.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import model_parity as mp
import models
from hf_fixtures import VOCAB_SIZE, load_hf_model
from models import gpt2

LENGTHS = [5, 11, 3]


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint("gpt2")


@pytest.fixture(scope="module")
def model_and_config(checkpoint):
    return models.load(checkpoint, "float32")


@pytest.fixture(scope="module")
def forward(model_and_config):
    return mp.jitted(model_and_config[0])


def test_config_from_hf_reads_gpt2_names(checkpoint, model_and_config):
    hf = models.loading.read_hf_config(checkpoint)
    config = model_and_config[1]
    assert isinstance(config, gpt2.GPT2Config)
    assert (config.hidden_size, config.num_layers, config.num_heads) == (hf["n_embd"], hf["n_layer"], hf["n_head"])
    assert config.head_dim * config.num_heads == config.hidden_size
    assert config.intermediate_size == hf["n_inner"]
    assert config.max_position_embeddings == hf["n_positions"]
    assert config.tie_word_embeddings and config.hidden_act == "gelu_new"
    assert config.eos_token_ids == (hf["eos_token_id"],)
    # n_inner absent means 4 * n_embd.
    assert gpt2.config_from_hf({**hf, "n_inner": None}).intermediate_size == 4 * hf["n_embd"]


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="n_embd=10 must be a multiple of n_head=4"):
        gpt2.config_from_hf({"n_embd": 10, "n_head": 4})
    with pytest.raises(ValueError, match="activation_function='swiglu_xyz'"):
        gpt2.config_from_hf({"n_embd": 8, "n_head": 2, "activation_function": "swiglu_xyz"})
    with pytest.raises(ValueError, match="add_cross_attention"):
        gpt2.config_from_hf({"n_embd": 8, "n_head": 2, "add_cross_attention": True})


def test_every_parameter_has_logical_axes(model_and_config):
    model = model_and_config[0]
    names = {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "norm", "qkv", None}
    params = nnx.state(model, nnx.Param)
    for path, var in nnx.to_flat_state(params):
        axes = var.get_metadata().get("logical_axes")
        assert axes is not None and len(axes) == var[...].ndim, path
        assert set(axes) <= names, (path, axes)


def test_packed_logits_match_transformers(checkpoint, model_and_config, forward):
    config = model_and_config[1]
    packed = mp.packed_batch(LENGTHS, config.vocab_size, seed=1)
    logits, cache = forward(jnp.asarray(packed.input_ids), jnp.asarray(packed.positions),
                            jnp.asarray(packed.segment_ids))
    assert cache is None
    assert logits.shape == (len(packed.input_ids), config.vocab_size) and logits.dtype == jnp.float32
    mp.assert_matches_hf(logits, packed, mp.hf_logits(load_hf_model(checkpoint, "gpt2"), packed.seqs))


def test_logits_indices_select_rows(model_and_config, forward):
    config = model_and_config[1]
    packed = mp.packed_batch(LENGTHS, config.vocab_size, seed=2)
    args = (jnp.asarray(packed.input_ids), jnp.asarray(packed.positions), jnp.asarray(packed.segment_ids))
    full, _ = forward(*args)
    last = np.asarray([s + n - 1 for s, n in zip(packed.starts, LENGTHS)], np.int32)
    picked, _ = forward(*args, logits_indices=jnp.asarray(last))
    assert picked.shape == (len(LENGTHS), config.vocab_size)
    assert mp.rel_error(picked, np.asarray(full)[last]) <= mp.RTOL


@pytest.mark.parametrize("page_size,prefill", [(4, [2, 5, 0]), (3, [1, 1, 1])])
def test_paged_decode_matches_full_forward(model_and_config, forward, page_size, prefill):
    model, config = model_and_config
    packed = mp.packed_batch([7, 10, 5], config.vocab_size, seed=3)
    full, _ = forward(jnp.asarray(packed.input_ids), jnp.asarray(packed.positions), jnp.asarray(packed.segment_ids))
    decoded = mp.decode_paged(forward, config, packed, prefill=prefill, page_size=page_size)
    assert mp.rel_error(decoded, mp.real_rows(full, packed)) <= mp.RTOL


def test_untied_head_and_inverse_layer_scaling(tmp_path):
    # A variant that exercises lm_head.weight and scale_attn_by_inverse_layer_idx.
    path = mp.tiny_variant(tmp_path, "gpt2", seed=5, tie_word_embeddings=False, scale_attn_by_inverse_layer_idx=True)
    model, config = models.load(path, "float32")
    assert not config.tie_word_embeddings and config.scale_attn_by_inverse_layer_idx
    packed = mp.packed_batch(LENGTHS, config.vocab_size, seed=4)
    logits, _ = mp.jitted(model)(
        jnp.asarray(packed.input_ids), jnp.asarray(packed.positions), jnp.asarray(packed.segment_ids)
    )
    mp.assert_matches_hf(logits, packed, mp.hf_logits(load_hf_model(path, "gpt2"), packed.seqs))


def test_orbax_round_trip_is_identical(checkpoint, tmp_path):
    packed = mp.packed_batch(LENGTHS, VOCAB_SIZE, seed=7)
    args = (jnp.asarray(packed.input_ids), jnp.asarray(packed.positions), jnp.asarray(packed.segment_ids))
    mp.assert_orbax_round_trip(checkpoint, tmp_path / "orbax", lambda model: mp.jitted(model)(*args)[0])


def test_openai_layout_without_prefix_and_with_mask_buffers(checkpoint, model_and_config, tmp_path):
    # The original OpenAI conversions name tensors without "transformer." and carry
    # causal-mask buffers; they load to the same parameters, with no warning.
    mask = np.tril(np.ones((1, 1, 8, 8), np.float32))
    extra = {f"h.{i}.attn.bias": mask for i in range(model_and_config[1].num_layers)}
    path = mp.renamed_checkpoint(checkpoint, tmp_path / "openai", lambda n: n.removeprefix("transformer."), extra)
    model, _ = mp.load_quietly(path)
    mp.assert_same_params(model, model_and_config[0])


def test_bfloat16_load(checkpoint, model_and_config):
    model32 = model_and_config[0]
    model16, config = models.load(checkpoint, "bfloat16")
    flat32 = dict(nnx.to_flat_state(nnx.state(model32, nnx.Param)))
    flat16 = dict(nnx.to_flat_state(nnx.state(model16, nnx.Param)))
    assert flat16.keys() == flat32.keys()
    for path, var in flat16.items():
        assert var[...].dtype == jnp.bfloat16, path
        np.testing.assert_array_equal(np.asarray(var[...]), np.asarray(flat32[path][...].astype(jnp.bfloat16)))
    packed = mp.packed_batch(LENGTHS, config.vocab_size, seed=6)
    logits, _ = mp.jitted(model16)(
        jnp.asarray(packed.input_ids), jnp.asarray(packed.positions), jnp.asarray(packed.segment_ids)
    )
    assert logits.dtype == jnp.float32
    full, _ = mp.jitted(model32)(
        jnp.asarray(packed.input_ids), jnp.asarray(packed.positions), jnp.asarray(packed.segment_ids)
    )
    assert mp.rel_error(mp.real_rows(logits, packed), mp.real_rows(full, packed)) <= mp.BF16_RTOL
