"""Llama / Mistral / Qwen2 against transformers on tiny random checkpoints.

Packed batches of three sequences must match transformers run on each sequence alone;
decoding through a hand-built paged KV cache must match the cache-free forward;
bfloat16 loading must stay close to the float32 reference.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_fixtures import load_hf_model
from model_checks import hf_logits, packed, paged_decode_logits, random_seqs, rel_err

import models
from models.llama import LlamaConfig

VARIANTS = ["llama", "llama_gqa", "llama3_rope", "llama_tied", "mistral", "qwen2"]
LENS = [7, 13, 4]
F32_TOL = 1e-4
# bfloat16 keeps 8 mantissa bits (relative step 2^-8 ~ 0.4%); a few roundings per layer add up.
BF16_TOL = 3e-2


@nnx.jit
def forward_cached(model, ids, pos, seg, cache, meta):
    return model(ids, pos, seg, kv_cache=cache, attn_meta=meta)


@nnx.jit
def forward(model, ids, pos, seg):
    return model(ids, pos, seg)[0]


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    cache = {}

    def get(variant, dtype="float32"):
        if (variant, dtype) not in cache:
            path = tiny_checkpoint(variant)
            cache[variant, dtype] = (*models.load(path, dtype), load_hf_model(path, variant))
        return cache[variant, dtype]

    return get


@pytest.mark.parametrize("variant", VARIANTS)
def test_packed_batch_matches_transformers(variant, loaded):
    model, config, ref = loaded(variant)
    assert isinstance(config, LlamaConfig)
    seqs = random_seqs(np.random.default_rng(1), LENS, config.vocab_size)
    ids, pos, seg = packed(seqs)
    logits = np.asarray(forward(model, ids, pos, seg))
    assert logits.dtype == np.float32 and logits.shape == (sum(LENS), config.vocab_size)
    start = 0
    for seq in seqs:
        want = hf_logits(ref, seq)
        assert rel_err(logits[start:start + len(seq)], want) <= F32_TOL
        start += len(seq)


@pytest.mark.parametrize("variant", VARIANTS)
def test_paged_decode_matches_full_forward(variant, loaded):
    model, config, _ = loaded(variant)
    seqs = random_seqs(np.random.default_rng(2), LENS, config.vocab_size)
    ids, pos, seg = packed(seqs)
    full = np.asarray(forward(model, ids, pos, seg))
    # Page size 3 divides none of the lengths; prefills of different sizes, one of them empty.
    rows = paged_decode_logits(model, config, seqs, [3, 5, 0], page_size=3, dtype=jnp.float32, forward=forward_cached)
    start = 0
    for seq, got in zip(seqs, rows):
        assert got.shape == (len(seq), config.vocab_size)
        assert rel_err(got, full[start:start + len(seq)]) <= F32_TOL
        start += len(seq)


def test_logits_indices_pick_last_tokens(loaded):
    model, config, _ = loaded("llama_gqa")
    seqs = random_seqs(np.random.default_rng(3), LENS, config.vocab_size)
    ids, pos, seg = packed(seqs)
    full = np.asarray(forward(model, ids, pos, seg))
    last = np.cumsum(LENS) - 1
    got, cache = model(jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(seg), logits_indices=jnp.asarray(last))
    assert cache is None
    assert rel_err(got, full[last]) <= F32_TOL


@pytest.mark.parametrize("variant", ["llama_gqa", "qwen2"])
def test_bfloat16_close_to_float32_reference(variant, loaded):
    model, config, ref = loaded(variant, "bfloat16")
    for var in nnx.iter_graph(model):
        if isinstance(var[1], nnx.Param):
            assert var[1].get_value().dtype == jnp.bfloat16, var[0]
    seqs = random_seqs(np.random.default_rng(4), LENS, config.vocab_size)
    ids, pos, seg = packed(seqs)
    logits = np.asarray(forward(model, ids, pos, seg))
    assert logits.dtype == np.float32
    start = 0
    for seq in seqs:
        assert rel_err(logits[start:start + len(seq)], hf_logits(ref, seq)) <= BF16_TOL
        start += len(seq)


def test_config_fields(loaded):
    _, gqa, _ = loaded("llama_gqa")
    assert (gqa.num_heads, gqa.num_kv_heads, gqa.head_dim) == (4, 2, 24)
    _, rope, _ = loaded("llama3_rope")
    assert rope.rope_scaling is not None and rope.rope_scaling.rope_type == "llama3"
    assert rope.rope_scaling.factor == 8.0 and rope.rope_theta == 100.0
    _, tied, _ = loaded("llama_tied")
    assert tied.tie_word_embeddings
    _, qwen, _ = loaded("qwen2")
    assert qwen.qkv_bias and not qwen.o_bias


def test_legacy_rope_fields_and_sliding_window():
    from models.llama import config_from_hf

    hf = dict(
        architectures=["MistralForCausalLM"], vocab_size=10, hidden_size=8, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, intermediate_size=16, max_position_embeddings=64,
        rope_theta=500.0, rope_scaling={"type": "linear", "factor": 2.0}, sliding_window=32,
    )
    cfg = config_from_hf(hf)
    assert cfg.rope_theta == 500.0 and cfg.rope_scaling.rope_type == "linear" and cfg.rope_scaling.factor == 2.0
    # The window is attention's business (tests/test_sliding_window.py), no longer a length cap.
    assert cfg.max_position_embeddings == 64 and cfg.layer_windows == (32,)
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        config_from_hf({**hf, "hidden_act": "gelu", "sliding_window": None})
    with pytest.raises(ValueError, match="rope_type='yarn'"):
        config_from_hf({**hf, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}, "sliding_window": None})


def test_logical_axes_on_every_param(loaded):
    model, _, _ = loaded("qwen2")
    axes = {
        ".".join(map(str, p)): v.get_metadata()["logical_axes"]
        for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)
    }
    assert axes["layers.0.self_attn.q_proj.kernel"] == ("embed", "heads")
    assert axes["layers.0.self_attn.k_proj.kernel"] == ("embed", "kv_heads")
    assert axes["layers.0.self_attn.k_proj.bias"] == ("kv_heads",)
    assert axes["layers.0.self_attn.o_proj.kernel"] == ("heads", "embed")
    assert axes["layers.1.mlp.down_proj.kernel"] == ("mlp", "embed")
    assert axes["embed_tokens.embedding"] == ("vocab", "embed")
    assert axes["lm_head.kernel"] == ("embed", "vocab")
    for name, value in axes.items():
        assert value is not None and len(value) >= 1, name


def test_llama_attention_and_mlp_bias(tmp_path):
    """``attention_bias`` (q/k/v/o biases) and ``mlp_bias`` map to the right parameters."""
    from hf_fixtures import make_tiny_checkpoint

    path = make_tiny_checkpoint(tmp_path, "llama_gqa", overrides={"attention_bias": True, "mlp_bias": True})
    model, config = models.load(path)
    assert config.qkv_bias and config.o_bias and config.mlp_bias
    ref = load_hf_model(path, "llama_gqa")
    seqs = random_seqs(np.random.default_rng(5), LENS, config.vocab_size)
    ids, pos, seg = packed(seqs)
    logits = np.asarray(forward(model, ids, pos, seg))
    start = 0
    for seq in seqs:
        assert rel_err(logits[start:start + len(seq)], hf_logits(ref, seq)) <= F32_TOL
        start += len(seq)
