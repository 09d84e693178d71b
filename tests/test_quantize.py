"""energon_jax.quantize and models.quantized: pruning, int8, and tiny models run with compressed layers."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import models
from energon_jax.quantize import load_quantized, prune_magnitude, quantize_model
from kernel_cases import randn, rel_err
from models.quantized import Int8Linear, SparseLinear
from pallas_kernels.int8_matmul import quantize_weight_int8

# A packed batch of two sequences and two padding tokens.
SEG = jnp.asarray([0] * 12 + [1] * 6 + [-1] * 2, jnp.int32)
POS = jnp.asarray(list(range(12)) + list(range(6)) + [0, 0], jnp.int32)


def _ids():
    return jnp.asarray(np.random.default_rng(0).integers(3, 300, SEG.shape[0]), jnp.int32)


def test_prune_magnitude_hits_the_target_and_keeps_the_largest():
    rng = np.random.default_rng(0)
    w = randn(rng, (64, 48), jnp.float32)
    pruned = np.asarray(prune_magnitude(w, 0.8))
    assert np.count_nonzero(pruned) == 64 * 48 - round(0.8 * 64 * 48)
    kept = np.abs(np.asarray(w))[pruned != 0]
    dropped = np.abs(np.asarray(w))[pruned == 0]
    assert kept.min() >= dropped.max()
    np.testing.assert_array_equal(pruned[pruned != 0], np.asarray(w)[pruned != 0])


def test_int8_weight_error_is_within_half_a_step():
    rng = np.random.default_rng(1)
    w = randn(rng, (40, 24), jnp.float32)
    q, scales = quantize_weight_int8(w)
    err = np.abs(np.asarray(q, np.float32) * np.asarray(scales) - np.asarray(w))
    assert np.all(err <= np.asarray(scales) / 2 + 1e-7)
    assert np.asarray(q).dtype == np.int8 and np.abs(np.asarray(q)).max() == 127


def _int8_layers(model):
    for layer in model.layers:
        a, m = layer.self_attn, layer.mlp
        yield from (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj)


def test_int8_model(tiny_checkpoint):
    path = tiny_checkpoint("llama_gqa")
    dense, _ = models.load(path)
    want, _ = dense(_ids(), POS, SEG)
    model, _, report = load_quantized(path, quantize="int8")
    assert report.mode == "int8" and len(report.layers) == 14  # 2 layers x (4 attention + 3 MLP)
    assert isinstance(model.layers[0].self_attn.q_proj, Int8Linear)
    # int8 + float32 scales instead of float32: a quarter of the bytes plus 4 bytes per output channel.
    scale_bytes = sum(4 * lin.scales.get_value().size for lin in _int8_layers(model))
    assert report.packed_bytes == report.dense_bytes // 4 + scale_bytes
    got, _ = model(_ids(), POS, SEG)
    err = rel_err(got, want)
    print(f"\n{report.summary()}; logits max rel error vs float32: {err:.2e}")
    # Per-channel rounding is at most amax/254 per weight; a wrong scale axis or transpose
    # gives errors of order 1, so 5 % separates "quantised" from "broken" on this model.
    assert np.isfinite(np.asarray(got)).all() and err < 5e-2


def test_sparse_model_equals_its_pruned_dense_twin(tiny_checkpoint):
    path = tiny_checkpoint("llama_gqa")
    dense, _ = models.load(path)
    original, _ = dense(_ids(), POS, SEG)
    model, _, report = load_quantized(path, sparsity=0.5, tile_k=32, tile_n=32)
    assert isinstance(model.layers[1].mlp.down_proj, SparseLinear)
    # The twin: the same pruning applied to the dense layers in place.
    for layer in dense.layers:
        for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                    layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            lin.kernel.set_value(prune_magnitude(lin.kernel.get_value(), 0.5))
    twin, _ = dense(_ids(), POS, SEG)
    got, _ = model(_ids(), POS, SEG)
    assert rel_err(got, twin) <= 1e-5
    print(f"\n{report.summary()}; logits max rel error vs unpruned float32: {rel_err(got, original):.2e}")
    # float32 values: half of 4 bytes per weight plus 1/8 byte of bitmap, plus tile offsets.
    assert report.ratio == pytest.approx(0.5 + 1 / 32, abs=0.01)


def test_compressed_layers_with_kernels_forced(tiny_checkpoint, monkeypatch):
    """int8 and sparse layers give the same logits with the Pallas kernels forced on (interpret)."""
    path = tiny_checkpoint("llama_gqa")
    for kw in (dict(quantize="int8"), dict(sparsity=0.8, tile_k=32, tile_n=32)):
        model, _, _ = load_quantized(path, **kw)
        monkeypatch.setenv("ENERGON_KERNELS", "reference")
        want, _ = model(_ids(), POS, SEG)
        monkeypatch.setenv("ENERGON_KERNELS", "pallas")
        got, _ = model(_ids(), POS, SEG)
        assert rel_err(got, want) <= 1e-5


def test_errors_name_the_field(tiny_checkpoint):
    model, _ = models.load(tiny_checkpoint("llama_gqa"))
    with pytest.raises(ValueError, match="mode='fp4'"):
        quantize_model(model, "fp4")
    with pytest.raises(ValueError, match="sparsity=1.0"):
        quantize_model(model, "sparse", sparsity=1.0)
    with pytest.raises(ValueError, match="not both"):
        load_quantized(tiny_checkpoint("llama_gqa"), quantize="int8", sparsity=0.5)
