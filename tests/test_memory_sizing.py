"""KV pool sized from device memory (energon_jax/memory_sizing.py).

The CPU keeps no allocator statistics, so the engine-level tests hand the engine the
statistics an accelerator would report; the expected page count is worked out here
from the model's shapes, not from the sizing code.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from energon_jax import Engine, SamplingParams, memory_sizing
from energon_jax.memory_sizing import DeviceMemory, describe_pool, pages_for_memory
from tiny_decoder import TinyConfig, TinyDecoder, greedy_reference

CONFIG = TinyConfig(vocab_size=61, num_layers=2, num_kv_heads=2, head_dim=8, max_position_embeddings=64)
PAGE = 4
# K and V, every layer, float32: what one page of the pool costs on the one CPU device.
PAGE_BYTES = 2 * CONFIG.num_layers * PAGE * CONFIG.num_kv_heads * CONFIG.head_dim * 4


def test_pages_for_memory_takes_the_tightest_device():
    a = DeviceMemory("a", limit=10_000, peak=2_000, kv_bytes=1_000)  # 100 bytes a page over 10 pages
    b = DeviceMemory("b", limit=10_000, peak=6_000, kv_bytes=500)  # 50 bytes a page
    # a: 10 + (9000 - 2000) // 100 = 80; b: 10 + (9000 - 6000) // 50 = 70
    assert pages_for_memory([a, b], provisional_pages=10, fraction=0.9) == 70
    assert pages_for_memory([a], provisional_pages=10, fraction=0.5) == 10 + 3000 // 100
    with pytest.raises(ValueError, match=re.escape("kv_cache_memory_fraction=1.5 must be a number in (0, 1]")):
        pages_for_memory([a], provisional_pages=10, fraction=1.5)


def test_describe_pool():
    assert describe_pool(33, 4, 64) == "32 pages x 4 tokens = 128 tokens; 2 sequences of max_model_len=64 at once"


@pytest.fixture
def fake_accelerator(monkeypatch):
    """Make the CPU report allocator statistics: ``limit`` and a fixed profiled ``peak``."""
    calls = {"n": 0}

    def install(limit: int, peak: int) -> dict:
        def stats(device):
            calls["n"] += 1
            return {"bytes_limit": limit, "bytes_in_use": peak // 2, "peak_bytes_in_use": peak}

        monkeypatch.setattr(memory_sizing, "memory_stats", stats)  # read there at build time
        return calls

    return install


def test_engine_sizes_its_pool_from_memory_and_generates(fake_accelerator):
    limit, peak = 2_000_000, 400_000
    calls = fake_accelerator(limit, peak)
    model = TinyDecoder(CONFIG, seed=5)
    kw = dict(max_model_len=64, page_size=PAGE, max_num_seqs=4, max_num_batched_tokens=32)
    engine = Engine(model, CONFIG, None, kv_cache_memory_fraction=0.8, **kw)
    provisional = 1 + 64 // PAGE
    expected = provisional + int((0.8 * limit - peak) // PAGE_BYTES)
    assert calls["n"] >= 2  # asked once to decide, once per pool device after the profile
    assert engine.config.num_pages == expected
    kv = engine.runner.kv_cache
    assert sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in kv_leaves(kv)) == expected * PAGE_BYTES
    rng = np.random.default_rng(11)
    prompts = [rng.integers(1, CONFIG.vocab_size, n).tolist() for n in (5, 17, 30)]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    outs = engine.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in outs] == [greedy_reference(model, p, 8) for p in prompts]
    assert engine.scheduler.pages_used == 0


def test_engine_refuses_memory_that_cannot_hold_one_sequence(fake_accelerator):
    # 0.9 * limit is below the profiled peak: no page is left beyond the provisional pool's.
    fake_accelerator(limit=1_000_000, peak=990_000)
    model = TinyDecoder(CONFIG, seed=5)
    with pytest.raises(ValueError, match="fewer than one sequence of max_model_len=64"):
        Engine(model, CONFIG, None, max_model_len=64, page_size=PAGE, max_num_seqs=2, max_num_batched_tokens=16,
               warmup=False)


def test_explicit_pool_is_not_resized(fake_accelerator):
    calls = fake_accelerator(limit=2_000_000, peak=400_000)
    engine = Engine(TinyDecoder(CONFIG, seed=5), CONFIG, None, max_model_len=64, page_size=PAGE, kv_cache_pages=20,
                    max_num_seqs=2, max_num_batched_tokens=16, warmup=False)
    assert engine.config.num_pages == 20 and calls["n"] == 0


def test_cpu_keeps_the_explicit_default():
    engine = Engine(TinyDecoder(CONFIG, seed=5), CONFIG, None, max_model_len=64, page_size=PAGE, max_num_seqs=3,
                    max_num_batched_tokens=16, warmup=False)
    assert engine.config.num_pages == 1 + 3 * (64 // PAGE)


def kv_leaves(tree):
    import jax

    return jax.tree.leaves(tree)
