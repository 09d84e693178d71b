"""Mixtral against transformers, and the sorted-experts MoE against a dense reference."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_fixtures import load_hf_model
from model_checks import hf_logits, packed, paged_decode_logits, random_seqs, rel_err

import models
from models.mixtral import MixtralConfig, MixtralMoE

LENS = [9, 4, 12]
F32_TOL = 1e-4
BF16_TOL = 3e-2  # see test_models_llama.py


@nnx.jit
def forward_cached(model, ids, pos, seg, cache, meta):
    return model(ids, pos, seg, kv_cache=cache, attn_meta=meta)


@nnx.jit
def forward(model, ids, pos, seg):
    return model(ids, pos, seg)[0]


@pytest.fixture(scope="module")
def mixtral(tiny_checkpoint):
    path = tiny_checkpoint("mixtral")
    return (*models.load(path), load_hf_model(path, "mixtral"), path)


def test_packed_batch_matches_transformers(mixtral):
    model, config, ref, _ = mixtral
    assert isinstance(config, MixtralConfig) and (config.num_experts, config.num_experts_per_tok) == (4, 2)
    seqs = random_seqs(np.random.default_rng(1), LENS, config.vocab_size)
    ids, pos, seg = packed(seqs)
    logits = np.asarray(forward(model, ids, pos, seg))
    start = 0
    for seq in seqs:
        assert rel_err(logits[start:start + len(seq)], hf_logits(ref, seq)) <= F32_TOL
        start += len(seq)


def test_paged_decode_matches_full_forward(mixtral):
    model, config, _, _ = mixtral
    seqs = random_seqs(np.random.default_rng(2), LENS, config.vocab_size)
    ids, pos, seg = packed(seqs)
    full = np.asarray(forward(model, ids, pos, seg))
    rows = paged_decode_logits(model, config, seqs, [4, 0, 7], page_size=5, dtype=jnp.float32, forward=forward_cached)
    start = 0
    for seq, got in zip(seqs, rows):
        assert rel_err(got, full[start:start + len(seq)]) <= F32_TOL
        start += len(seq)


def test_bfloat16_close_to_float32_reference(mixtral):
    _, config, ref, path = mixtral
    model, _ = models.load(path, "bfloat16")
    assert model.layers[0].mlp.w_gate[...].dtype == jnp.bfloat16
    seqs = random_seqs(np.random.default_rng(3), LENS, config.vocab_size)
    ids, pos, seg = packed(seqs)
    logits = np.asarray(forward(model, ids, pos, seg))
    start = 0
    for seq in seqs:
        assert rel_err(logits[start:start + len(seq)], hf_logits(ref, seq)) <= BF16_TOL
        start += len(seq)


def _dense_moe_reference(x, router, w_gate, w_up, w_down, k):
    """Every expert on every token (float64 numpy), weighted by the renormalised top-k softmax."""
    logits = x @ router  # [T, E]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top = np.argsort(-probs, axis=-1)[:, :k]  # [T, k]
    weights = np.zeros_like(probs)
    np.put_along_axis(weights, top, np.take_along_axis(probs, top, -1), -1)
    weights /= weights.sum(-1, keepdims=True)
    gate = np.einsum("td,edf->etf", x, w_gate)
    up = np.einsum("td,edf->etf", x, w_up)
    y = np.einsum("etf,efd->etd", gate / (1 + np.exp(-gate)) * up, w_down)  # [E, T, D]
    return np.einsum("te,etd->td", weights, y)


@pytest.mark.parametrize("experts,top_k,tokens", [(8, 2, 37), (4, 1, 5), (3, 3, 16)])
def test_moe_matches_dense_reference(experts, top_k, tokens):
    config = MixtralConfig(
        architecture="MixtralForCausalLM", vocab_size=8, hidden_size=16, num_layers=1, num_heads=2,
        num_kv_heads=1, head_dim=8, intermediate_size=24, max_position_embeddings=64,
        num_experts=experts, num_experts_per_tok=top_k,
    )
    # Abstract init, then fresh random values from numpy (no eager per-op compiles).
    moe = nnx.eval_shape(lambda: MixtralMoE(config, dtype=jnp.float32, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(experts * 100 + tokens)
    params = []
    for p in (moe.router, moe.w_gate, moe.w_up, moe.w_down):
        value = rng.standard_normal(p.get_value().shape) * (1.0 if p is moe.router else 0.2)
        p.set_value(jnp.asarray(value, jnp.float32))
        params.append(np.asarray(p[...], np.float64))
    x = jnp.asarray(rng.standard_normal((tokens, 16)), jnp.float32)
    got = np.asarray(nnx.jit(lambda m, x: m(x))(moe, x))
    want = _dense_moe_reference(np.asarray(x, np.float64), *params, top_k)
    assert rel_err(got, want) <= 1e-5
    _, chosen = moe.route(x)
    assert len(np.unique(np.asarray(chosen))) > min(1, experts - 1)  # routing actually spreads


def test_num_experts_per_tok_validated():
    with pytest.raises(ValueError, match="num_experts_per_tok=3"):
        MixtralConfig(
            architecture="MixtralForCausalLM", vocab_size=8, hidden_size=16, num_layers=1, num_heads=2,
            num_kv_heads=1, head_dim=8, intermediate_size=24, max_position_embeddings=64,
            num_experts=2, num_experts_per_tok=3,
        )
