"""``Engine.from_pretrained(quantize="int8" | sparsity=...)`` against dense engines on the same weights.

The int8 engine must produce the greedy tokens of a float32 engine whose linear kernels
are the int8 weights dequantized (``q * scale``); the sparse engine those of a float32
engine whose kernels are pruned the same way (``prune_magnitude``). How often the int8
engine agrees with the original float32 weights is printed, not asserted: that is the
quantization error, not a bug.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from energon_jax.engine import Engine
from energon_jax.quantize import prune_magnitude
from energon_jax.request import SamplingParams
from models.layers import Linear
from models.loading import load
from models.quantized import Int8Linear, SparseLinear, quantize_weight_int8

SIZES = dict(max_model_len=64, max_num_seqs=2, max_num_batched_tokens=32, warmup=False)
GREEDY = SamplingParams(max_tokens=6, temperature=0.0)


def _prompts(vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(7)
    return [rng.integers(1, vocab, size=n).tolist() for n in (5, 11)]


def _tokens(engine: Engine, prompts) -> list[list[int]]:
    return [o.token_ids for o in engine.generate(prompts, GREEDY, use_tqdm=False)]


def _dense_engine(path, edit) -> Engine:
    """A float32 engine over the checkpoint with ``edit(kernel)`` applied to every Linear but lm_head."""
    model, config = load(path, "float32")
    edited = 0
    for p, node in nnx.iter_graph(model):
        if isinstance(node, Linear) and "lm_head" not in map(str, p):
            node.kernel.set_value(edit(node.kernel.get_value()))
            edited += 1
    assert edited > 0
    return Engine(model, config, None, **SIZES)


def _count(engine: Engine, cls) -> int:
    return sum(isinstance(node, cls) for _, node in nnx.iter_graph(engine._model))


@pytest.mark.slow  # default-run budget (15 min quiet): test_quantize covers the int8 layers
def test_int8_engine_matches_dequantized_dense_engine(tiny_checkpoint):
    path = tiny_checkpoint("llama")
    q_engine = Engine.from_pretrained(path, quantize="int8", **SIZES)
    assert _count(q_engine, Int8Linear) > 0
    prompts = _prompts(q_engine.model_config.vocab_size)
    got = _tokens(q_engine, prompts)

    def dequantize(w):
        q, scales = quantize_weight_int8(w)
        return q.astype(jnp.float32) * scales[None, :]

    want = _tokens(_dense_engine(path, dequantize), prompts)
    assert got == want
    assert all(len(t) == GREEDY.max_tokens for t in got)
    f32 = _tokens(Engine.from_pretrained(path, **SIZES), prompts)
    same = sum(a == b for g, f in zip(got, f32) for a, b in zip(g, f))
    print(f"int8 vs float32 weights: {same}/{sum(map(len, f32))} greedy tokens equal")


@pytest.mark.slow  # default-run budget (15 min quiet): test_quantize covers the sparse layers
def test_sparse_engine_matches_dense_engine_on_pruned_weights(tiny_checkpoint):
    path = tiny_checkpoint("llama")
    s_engine = Engine.from_pretrained(path, sparsity=0.5, **SIZES)
    assert _count(s_engine, SparseLinear) > 0
    prompts = _prompts(s_engine.model_config.vocab_size)
    got = _tokens(s_engine, prompts)
    want = _tokens(_dense_engine(path, lambda w: prune_magnitude(w, 0.5)), prompts)
    assert got == want
    assert all(len(t) == GREEDY.max_tokens for t in got)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(quantize="int4"), "quantize='int4'"),
        (dict(sparsity=1.5), "sparsity=1.5"),
        (dict(sparsity=-0.1), "sparsity=-0.1"),
        (dict(quantize="int8", sparsity=0.5), "not both"),
    ],
)
def test_bad_compression_arguments_name_the_field(tiny_checkpoint, kwargs, field):
    with pytest.raises(ValueError, match=field.replace("[", r"\[")):
        Engine.from_pretrained(tiny_checkpoint("llama"), **kwargs, **SIZES)
