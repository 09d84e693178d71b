"""Automatic prefix caching in the engine, on the tiny decoder.

Greedy tokens with caching on equal caching off for a shared system prompt, page-size
multiples, a fully cached prompt, chunked prefill over cached pages, preemption of
requests that share pages, and different cache salts; the logits of a prefill over
cached pages equal a cold prefill (float32, 1e-5); int8 KV pages and tp=2 in the slow
run; usage reaches gRPC, Prometheus and the log line. The host-only tests (hashes, the
allocator, the scheduler) are in ``test_prefix_cache.py``.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from energon_jax import Engine, SamplingParams
from energon_jax.batch import Buckets, pack
from energon_jax.request import Request
from energon_jax.scheduler import ScheduledRow, StepPlan
from tiny_decoder import TinyConfig, TinyDecoder, make_cache

PS = 4  # page size of every test here


def _req(rid: str, prompt: list[int]) -> Request:
    return Request(rid, prompt, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))


# -- the engine on the tiny decoder -------------------------------------------------------------
CONFIG = TinyConfig(vocab_size=300, max_position_embeddings=256)
# A 32-token step budget: every prompt past 32 uncached tokens is prefilled in chunks. A pool
# of 64 usable pages (one max_model_len sequence): requests that share nothing preempt.
ENGINE_KW = dict(max_model_len=256, page_size=PS, max_num_seqs=6, max_num_batched_tokens=32, warmup=False,
                 kv_cache_pages=65)
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return TinyDecoder(CONFIG, seed=5)


@pytest.fixture(scope="module")
def engines(model):
    on = Engine(model, CONFIG, prefix_cache_seed=1, **ENGINE_KW)
    off = Engine(model, CONFIG, enable_prefix_caching=False, **ENGINE_KW)
    assert on.enable_prefix_caching and not off.enable_prefix_caching
    return on, off


def _tokens(engine, prompts, params=GREEDY, arrivals=None):
    """Greedy tokens per prompt (prompt i queued before step arrivals[i]) and num_cached_tokens."""
    arrivals = arrivals or [0] * len(prompts)
    rids: dict[int, str] = {}
    step = 0
    while len(rids) < len(prompts) or engine.has_unfinished():
        for i, at in enumerate(arrivals):
            if at == step:
                rids[i] = engine.add_request(prompts[i], params)
        engine.step()
        step += 1
    outs = [engine.take_output(rids[i]) for i in range(len(prompts))]
    assert engine.scheduler.pages_used == 0
    return [o.token_ids for o in outs], [o.num_cached_tokens for o in outs]


def _rand(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, CONFIG.vocab_size, n).tolist()


def test_shared_system_prompt_page_multiples_and_fully_cached(engines):
    on, off = engines
    system = _rand(0, 48)  # 12 pages
    # Suffix lengths: page multiples (0 = the system prompt alone, fully cached the second time), odd sizes.
    prompts = [system + _rand(10 + i, n) for i, n in enumerate([5, 0, 4, 8, 1, 13, 16, 3])]
    want, _ = _tokens(off, prompts)
    got, cached = _tokens(on, prompts, arrivals=[0, 1, 1, 2, 3, 3, 5, 8])
    assert got == want
    assert cached[0] == 0 and all(c >= 44 for c in cached[1:]), cached  # the system prompt, from page 0 on
    again, cached = _tokens(on, prompts)  # everything cached now, up to the last token of each prompt
    assert again == want and cached == [(len(p) - 1) // PS * PS for p in prompts]


def test_chunked_prefill_resumes_over_cached_pages(engines):
    on, off = engines
    doc = _rand(1, 72)
    prompts = [doc + _rand(20, 70), doc[:40] + _rand(21, 45), doc + _rand(22, 3)]
    want, _ = _tokens(off, prompts)
    _tokens(on, [doc + [7]])  # the document alone first
    got, cached = _tokens(on, prompts, arrivals=[0, 0, 4])
    assert got == want and cached == [72, 40, 72]  # 70 and 45 uncached tokens: chunks of 32 after them


def test_preempted_requests_that_share_pages(engines):
    # 64 usable pages of 4 tokens: six requests of 60+ tokens that decode 48 tokens do not fit,
    # even sharing their first 10 pages.
    on, off = engines
    system = _rand(2, 40)
    prompts = [system + _rand(30 + i, 20 + 3 * i) for i in range(6)]
    params = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
    want, _ = _tokens(off, prompts, params)
    preemptions, hits = on.scheduler.num_preemptions, on.scheduler.prefix_cache_hits
    got, cached = _tokens(on, prompts, params, arrivals=[0, 1, 1, 2, 2, 3])
    assert on.scheduler.num_preemptions > preemptions and got == want
    assert min(cached[1:]) >= 40  # the system prompt's pages, shared
    assert on.scheduler.prefix_cache_hits - hits > sum(cached)  # readmitted requests hit their own pages too


def test_cache_salt_separates_and_usage_reports_cached_tokens(engines):
    on, off = engines
    prompt = _rand(3, 30)
    want = off.generate([prompt], GREEDY, use_tqdm=False)[0].token_ids
    first = list(on.stream(prompt, GREEDY))[-1]
    rid_a = on.add_request(prompt, GREEDY, cache_salt="tenant-a")
    rid_b = on.add_request(prompt, GREEDY, cache_salt="tenant-b")
    rid_c = on.add_request(prompt, GREEDY)
    while on.has_unfinished():
        on.step()
    a, b, c = (on.take_output(r) for r in (rid_a, rid_b, rid_c))
    assert a.token_ids == b.token_ids == c.token_ids == want
    assert first.usage.cached_tokens == 0 and c.num_cached_tokens == 28  # unsalted: the first run's pages
    assert a.num_cached_tokens == b.num_cached_tokens == 0  # a salt never hits another salt's pages
    rid = on.add_request(prompt, GREEDY, cache_salt="tenant-a")
    while on.has_unfinished():
        on.step()
    assert on.take_output(rid).num_cached_tokens == 28
    for bad in ("", 5):
        with pytest.raises(ValueError, match=re.escape("must be None or a non-empty string")):
            on.add_request(prompt, GREEDY, cache_salt=bad)
    with pytest.raises(ValueError, match="prefix_cache_seed=-1 must be None or an integer >= 0"):
        Engine(TinyDecoder(CONFIG), CONFIG, prefix_cache_seed=-1, **ENGINE_KW)


def test_abort_releases_references_but_not_shared_pages(engines):
    on, off = engines
    system = _rand(4, 40)
    prompts = [system + _rand(40 + i, 9) for i in range(3)]
    want, _ = _tokens(off, prompts[:2], dataclasses.replace(GREEDY, max_tokens=12))
    _tokens(on, [system + [1]])
    params = dataclasses.replace(GREEDY, max_tokens=12)
    keep = [on.add_request(p, params) for p in prompts[:2]]
    victim = on.add_request(prompts[2], params)
    on.step()
    on.step()
    on.abort(victim)
    while on.has_unfinished():
        on.step()
    assert [on.take_output(r).token_ids for r in keep] == want and on.scheduler.pages_used == 0


def test_logits_of_a_prefill_over_cached_pages_equal_a_cold_prefill(model):
    """Model forward over the page pool: prompt B shares A's first 3 pages. B's suffix fed over
    A's pages gives the logits of B fed whole into fresh pages (float32, 1e-5)."""
    a = _rand(5, 14)
    b = a[:12] + _rand(6, 7)
    buckets = Buckets.create(max_num_batched_tokens=32, max_num_seqs=2, max_model_len=64, page_size=PS, min_tokens=32)

    @jax.jit
    def fwd(kv, batch):
        return model(batch.input_ids, batch.positions, batch.segment_ids, kv_cache=kv, attn_meta=batch.attn,
                     logits_indices=batch.logits_indices)

    def forward(kv, rows):
        logits, kv = fwd(kv, pack(StepPlan(rows), buckets))
        return np.asarray(logits), kv

    kv = make_cache(CONFIG, 20, PS)
    ra = _req("a", a)
    ra.pages = [1, 2, 3, 4]
    _, kv = forward(kv, [ScheduledRow(ra, a, 0, True)])
    rb = _req("b", b)
    rb.pages = [1, 2, 3, 5, 6]  # A's three full pages, then its own
    warm, kv = forward(kv, [ScheduledRow(rb, b[12:], 12, True)])
    cold_b = _req("b2", b)
    cold_b.pages = [7, 8, 9, 10, 11]
    cold, _ = forward(make_cache(CONFIG, 20, PS), [ScheduledRow(cold_b, b, 0, True)])
    np.testing.assert_allclose(warm[0], cold[0], rtol=1e-5, atol=1e-5)
    assert np.abs(cold[0]).max() > 0.1  # not trivially zero


@pytest.mark.slow
def test_int8_kv_pages_cached_equal_cold(model):
    """int8 pages keep per-token scales beside the values, so a hit reuses both: the tokens of
    a run over cached pages equal those of the same engine run cold (cache reset before each)."""
    from pallas_kernels import make_kv_pages

    eng = Engine(model, CONFIG, prefix_cache_seed=3, **ENGINE_KW)
    eng.runner.kv_cache = tuple(
        make_kv_pages(eng.config.num_pages, PS, CONFIG.num_kv_heads, CONFIG.head_dim, jnp.int8)
        for _ in range(CONFIG.num_layers)
    )
    system = _rand(7, 40)
    prompts = [system + _rand(70 + i, n) for i, n in enumerate([3, 0, 9, 20])]
    cold = []
    for p in prompts:
        eng.scheduler.reset_prefix_cache()
        cold.append(_tokens(eng, [p])[0][0])
    eng.scheduler.reset_prefix_cache()
    _tokens(eng, [system + [9]])
    warm, cached = _tokens(eng, prompts)
    assert warm == cold and min(cached) >= 36
    assert all(layer.quantized for layer in eng.runner.kv_cache)  # the steps really ran on int8 pages


@pytest.mark.slow
def test_tp2_cached_equals_uncached():
    """tp=2 (KV heads split over two devices, in a child with 8 CPU devices): the tokens of
    requests that hit a shared prefix equal those of a tp=2 engine without caching."""
    from test_parallel_mesh import run_child

    out = run_child(__file__, "tp2", devices=8)
    assert out["on"] == out["off"] and len(out["on"]) == 4
    assert out["cached"][0] == 0 and min(out["cached"][1:]) >= 20 and out["pages_used"] == 0


def _child_tp2() -> dict:
    from test_parallel_tp_models import build_model

    model, config = build_model("llama", num_hidden_layers=2)
    kw = dict(max_model_len=64, page_size=PS, max_num_seqs=4, max_num_batched_tokens=16, warmup=False, tp=2)
    on = Engine(model, config, None, prefix_cache_seed=4, **kw)
    off = Engine(model, config, None, enable_prefix_caching=False, **kw)
    rng = np.random.default_rng(9)
    system = rng.integers(3, config.vocab_size, 24).tolist()
    prompts = [system + rng.integers(3, config.vocab_size, n).tolist() for n in (3, 0, 8, 5)]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    off_tokens = [o.token_ids for o in off.generate(prompts, params, use_tqdm=False)]
    first = on.generate(prompts[:1], params, use_tqdm=False)
    rest = on.generate(prompts[1:], params, use_tqdm=False)
    outs = first + rest
    return {"on": [list(map(int, o.token_ids)) for o in outs], "off": [list(map(int, t)) for t in off_tokens],
            "cached": [o.num_cached_tokens for o in outs], "pages_used": on.scheduler.pages_used}


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps({"tp2": _child_tp2}[sys.argv[1]]()))


def test_usage_reaches_grpc_prometheus_and_the_log_line(engines, caplog):
    from energon_jax.async_engine import AsyncEngine, EngineStats
    from energon_jax.request import StreamDelta, Usage
    from serving.convert import response_from_delta
    from serving.metrics import ServingMetrics

    resp = response_from_delta("r", StreamDelta("r", "", [1], None, True, "length", Usage(30, 1, 28)))
    assert (resp.usage.prompt_tokens, resp.usage.cached_tokens) == (30, 28)
    stats = EngineStats(0, 0, 0, 10, prefix_cache_queries=200, prefix_cache_hits=150)
    reg = ServingMetrics(lambda: stats).registry
    assert reg.get_sample_value("energon_prefix_cache_queries_total") == 200
    assert reg.get_sample_value("energon_prefix_cache_hits_total") == 150
    on, _ = engines
    aengine = AsyncEngine(on)  # not started: its stats and log line read the engine as it is
    live = aengine._read_stats(0)
    assert live.prefix_cache_queries == on.scheduler.prefix_cache_queries > live.prefix_cache_hits > 0
    aengine._last_log = -1e9
    with caplog.at_level("INFO", logger="energon_jax.async_engine"):
        aengine._log_stats(stats)
    assert "prefix cache hit rate 75.0% (150 of 200 tokens)" in caplog.text


def test_async_submit_takes_a_cache_salt_and_cli_flags_reach_the_engine(engines):
    import argparse
    import asyncio

    from energon_jax.async_engine import AsyncEngine
    from energon_jax.commands.generate import add_parallel_arguments, parallel_kwargs

    on, _ = engines
    prompt = _rand(8, 21)
    aengine = AsyncEngine(on)
    aengine.start()
    try:
        async def last(rid: str, salt: str | None):
            return [d async for d in aengine.submit(prompt, GREEDY, request_id=rid, cache_salt=salt)][-1]

        async def main():
            first = await last("s1", "tenant")
            return first, await last("s2", "tenant"), await last("s3", "other")

        first, second, other = asyncio.run(main())
        assert (first.usage.cached_tokens, second.usage.cached_tokens, other.usage.cached_tokens) == (0, 20, 0)
        assert first.token_ids == second.token_ids == other.token_ids

        async def bad():
            async for _ in aengine.submit(prompt, GREEDY, request_id="s4", cache_salt=""):
                pass

        with pytest.raises(ValueError, match="cache_salt"):
            asyncio.run(bad())
    finally:
        aengine.shutdown()
    parser = argparse.ArgumentParser()
    add_parallel_arguments(parser)
    assert parallel_kwargs(parser.parse_args([])) == {}
    kw = parallel_kwargs(parser.parse_args(["--no-prefix-caching", "--prefix-cache-seed", "5"]))
    assert kw == {"enable_prefix_caching": False, "prefix_cache_seed": 5}
