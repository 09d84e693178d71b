"""OPT (models/opt.py) against transformers on tiny random checkpoints.

Three layouts: the shared fixture (pre-LN like opt-125m), post-LN with
``word_embed_proj_dim != hidden_size`` (opt-350m's layout: project_in/project_out, no
final norm), and pre-LN with a projection, no biases and an untied head. For each: a
packed batch of three sequences matches transformers run on each sequence alone, and
decoding through the paged KV cache matches the plain forward; bfloat16 loading, the
orbax round trip and the bare-decoder tensor names give the expected parameters.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import model_parity as mp
import models
from hf_fixtures import HIDDEN, load_hf_model
from models import opt

LENGTHS = [6, 12, 3]
LAYOUTS = {
    "pre_ln": {},
    "post_ln_proj": {"do_layer_norm_before": False, "word_embed_proj_dim": HIDDEN // 2},
    "pre_ln_proj_nobias_untied": {"word_embed_proj_dim": 48, "enable_bias": False, "tie_word_embeddings": False},
}


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def layout(request, tiny_checkpoint, tmp_path_factory):
    """``(name, checkpoint dir, model, config, jitted forward)`` for one OPT layout."""
    name = request.param
    if LAYOUTS[name]:
        path = mp.tiny_variant(tmp_path_factory.mktemp(f"opt_{name}"), "opt", seed=3, **LAYOUTS[name])
    else:
        path = tiny_checkpoint("opt")
    model, config = models.load(path, "float32")
    return name, path, model, config, mp.jitted(model)


def test_config_follows_layout(layout):
    name, path, model, config, _ = layout
    hf = models.loading.read_hf_config(path)
    assert isinstance(config, opt.OPTConfig)
    assert config.do_layer_norm_before == hf["do_layer_norm_before"]
    assert config.word_dim == hf["word_embed_proj_dim"]
    assert config.has_projection == (hf["word_embed_proj_dim"] != hf["hidden_size"])
    assert (model.project_in is None) == (not config.has_projection)
    # Only pre-LN models end with a layer norm.
    assert (model.final_layer_norm is not None) == hf["do_layer_norm_before"]
    assert config.enable_bias == hf.get("enable_bias", True)
    assert (model.lm_head is None) == hf.get("tie_word_embeddings", True)
    # The position table carries OPT's offset of 2.
    assert model.embed_positions.embedding[...].shape[0] == hf["max_position_embeddings"] + opt.POSITION_OFFSET


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="hidden_size=10 must be a multiple of num_attention_heads=4"):
        opt.config_from_hf({"hidden_size": 10, "num_attention_heads": 4})
    with pytest.raises(ValueError, match="layer_norm_elementwise_affine=False"):
        opt.config_from_hf({"hidden_size": 8, "num_attention_heads": 2, "layer_norm_elementwise_affine": False})
    with pytest.raises(ValueError, match="activation_function='nope'"):
        opt.config_from_hf({"hidden_size": 8, "num_attention_heads": 2, "activation_function": "nope"})


def test_every_parameter_has_logical_axes(layout):
    model = layout[2]
    names = {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "norm", None}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = var.get_metadata().get("logical_axes")
        assert axes is not None and len(axes) == var[...].ndim, path
        assert set(axes) <= names, (path, axes)


def test_packed_logits_match_transformers(layout):
    _, path, _, config, forward = layout
    packed = mp.packed_batch(LENGTHS, config.vocab_size, seed=1)
    logits, cache = forward(jnp.asarray(packed.input_ids), jnp.asarray(packed.positions),
                            jnp.asarray(packed.segment_ids))
    assert cache is None and logits.shape == (len(packed.input_ids), config.vocab_size)
    mp.assert_matches_hf(logits, packed, mp.hf_logits(load_hf_model(path, "opt"), packed.seqs))


def test_paged_decode_matches_full_forward(layout):
    _, _, _, config, forward = layout
    packed = mp.packed_batch([7, 10, 5], config.vocab_size, seed=2)
    args = (jnp.asarray(packed.input_ids), jnp.asarray(packed.positions), jnp.asarray(packed.segment_ids))
    full, _ = forward(*args)
    decoded = mp.decode_paged(forward, config, packed, prefill=[3, 0, 4], page_size=4)
    assert mp.rel_error(decoded, mp.real_rows(full, packed)) <= mp.RTOL
    # Only the last token of each row, as the runner asks for during decode.
    last = np.asarray([s + n - 1 for s, n in zip(packed.starts, [7, 10, 5])], np.int32)
    picked, _ = forward(*args, logits_indices=jnp.asarray(last))
    assert mp.rel_error(picked, np.asarray(full)[last]) <= mp.RTOL


def test_orbax_round_trip_is_identical(layout, tmp_path):
    _, path, _, config, _ = layout
    packed = mp.packed_batch(LENGTHS, config.vocab_size, seed=7)
    args = (jnp.asarray(packed.input_ids), jnp.asarray(packed.positions), jnp.asarray(packed.segment_ids))
    mp.assert_orbax_round_trip(path, tmp_path / "orbax", lambda model: mp.jitted(model)(*args)[0])


def test_decoder_only_names_and_tied_head_copy(layout, tmp_path):
    # Exports of the bare decoder omit "model."; tied checkpoints may keep a copy of the head.
    name, path, model, config, _ = layout
    extra = {}
    if config.tie_word_embeddings:
        extra["lm_head.weight"] = np.asarray(model.embed_tokens.embedding[...])
    renamed = mp.renamed_checkpoint(path, tmp_path / "bare", lambda n: n.removeprefix("model."), extra)
    loaded, _ = mp.load_quietly(renamed)
    mp.assert_same_params(loaded, model)


def test_bfloat16_load(layout):
    _, path, model32, config, forward32 = layout
    model16, _ = models.load(path, "bfloat16")
    flat32 = dict(nnx.to_flat_state(nnx.state(model32, nnx.Param)))
    flat16 = dict(nnx.to_flat_state(nnx.state(model16, nnx.Param)))
    assert flat16.keys() == flat32.keys()
    for p, var in flat16.items():
        assert var[...].dtype == jnp.bfloat16, p
        np.testing.assert_array_equal(np.asarray(var[...]), np.asarray(flat32[p][...].astype(jnp.bfloat16)))
    packed = mp.packed_batch(LENGTHS, config.vocab_size, seed=4)
    args = (jnp.asarray(packed.input_ids), jnp.asarray(packed.positions), jnp.asarray(packed.segment_ids))
    logits, _ = mp.jitted(model16)(*args)
    full, _ = forward32(*args)
    assert logits.dtype == jnp.float32
    assert mp.rel_error(mp.real_rows(logits, packed), mp.real_rows(full, packed)) <= mp.BF16_RTOL
