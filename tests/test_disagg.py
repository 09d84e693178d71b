"""Prefill/decode disaggregation in one process (``energon_jax/disagg.py``).

Engine-level checks run in a child process with several simulated CPU devices
(``--xla_force_host_platform_device_count``), since the test process has one:

- default run, ``prefill_devices=1, decode_devices=1`` on the tiny decoder: greedy tokens
  equal a colocated engine's for prompts of many lengths (1 token, exact page multiples,
  one chunk exactly, longer than two chunks), arriving over several steps while the decode
  group is full (so requests wait in the transfer queue and the prefill group keeps
  running); the first token is sampled on the prefill group and every later one on the
  decode group (each group's dispatched token counts); both groups had a step on their
  devices at once; each group's pages live on its own device. Then aborts: one request
  waiting in the transfer queue, one decoding, one still in the inbox; the queue's bound
  holds; every page of both pools is back at the end.
- slow: ``P=2 (tp2), D=2 (tp2)`` and ``P=1, D=2 (tp2)`` on the demo model, and int8 KV
  pages (both engines' pools swapped to int8 before their first step).

In process (one device): ``PageMover`` copies float and int8 pages (scales included)
between two pools; option errors name the field.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from test_parallel_mesh import run_child

LENGTHS = [1, 2, 3, 4, 7, 8, 12, 15, 16, 17, 31, 32, 33, 45]  # page 4, chunk 16
ENGINE_KW = dict(max_model_len=128, page_size=4, max_num_seqs=3, max_num_batched_tokens=16, kv_cache_pages=40,
                 warmup=False, prefix_cache_seed=1)


def _prompts(lengths, seed: int = 0, vocab: int = 97) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(1, vocab, n)] for n in lengths]


# ----------------------------------------------------------------------------- child process


def _drive(engine, arrivals, on_step=None) -> tuple[dict[str, list[int]], dict]:
    """Add ``(prompt, params, step)`` requests at their steps, step to the end; tokens by request id."""
    tokens: dict[str, list[int]] = {}
    rids: list[str] = []
    step = 0
    facts = {"prefill_ran_while_pending": 0, "max_pending": 0, "inbox_while_full": 0}
    while len(rids) < len(arrivals) or engine.has_unfinished():
        for prompt, params, at in arrivals:
            if at == step:
                rid = engine.add_request(prompt, params)
                rids.append(rid)
                tokens[rid] = []
        s = getattr(engine.scheduler, "pending", None)
        pending_before = 0 if s is None else len(s)
        before = engine._loop.prefill.counts.batches if s is not None else 0
        for delta in engine.step():
            tokens[delta.request_id].extend(delta.token_ids)
        if s is not None:
            sched = engine.scheduler
            facts["max_pending"] = max(facts["max_pending"], len(sched.pending))
            if pending_before and engine._loop.prefill.counts.batches > before:
                facts["prefill_ran_while_pending"] += 1
            if len(sched.pending) >= sched.max_pending and sched.inbox:
                facts["inbox_while_full"] += 1
        if on_step is not None:
            on_step(engine, step, tokens)
        step += 1
        assert step < 2000, "the engine never finished"
    return {rid: tokens[rid] for rid in rids}, facts


def _child_p1d1() -> dict:
    from tiny_decoder import TinyConfig, TinyDecoder

    from energon_jax import Engine, SamplingParams

    config = TinyConfig()
    model = TinyDecoder(config, seed=3)
    prompts = _prompts(LENGTHS)
    params = [SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True) for _ in prompts]
    params[4] = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)  # finishes on the prefill group
    arrivals = [(p, sp, i // 3) for i, (p, sp) in enumerate(zip(prompts, params))]
    colocated = Engine(model, config, **ENGINE_KW)
    want, _ = _drive(colocated, arrivals)
    engine = Engine(model, config, prefill_devices=1, decode_devices=1, **ENGINE_KW)
    got, facts = _drive(engine, arrivals)
    loop, runner, sched = engine._loop, engine.runner, engine.scheduler
    out = {
        "want": list(want.values()), "got": list(got.values()),
        "prefill_tokens": loop.prefill.counts.tokens, "decode_tokens": loop.decode.counts.tokens,
        "expected_prefill_tokens": sum(LENGTHS), "expected_decode_tokens": sum(sp.max_tokens - 1 for sp in params),
        "prefix_hits": sched.prefix_cache_hits, "preemptions": sched.num_preemptions,
        "both_on_device": loop.both_on_device, "transfers": runner.mover.stats.transfers,
        "prefill_devices": sorted(d.id for d in runner.prefill.kv_cache[0].k.devices()),
        "decode_devices": sorted(d.id for d in runner.decode.kv_cache[0].k.devices()),
        "pages_after_finish": [sched.prefill.pages_used, sched.decode.pages_used],
        "layout": engine.disagg.layout(), "overlap": engine.overlap, **facts,
    }
    # Prefix caching on the prefill side: a second prompt sharing five full pages with the first.
    base = _prompts([20], seed=2)[0]
    shared = [(base + [5, 6], params[0], 0), (base + [7, 8, 9], params[0], 4)]
    want, _ = _drive(colocated, shared)
    hits = sched.prefix_cache_hits
    got, _ = _drive(engine, shared)
    out.update(shared_want=list(want.values()), shared_got=list(got.values()),
               shared_hit_tokens=sched.prefix_cache_hits - hits)
    out.update(_aborts(engine, prompts))
    out.update(_served(engine, prompts[:3], params[0]))
    # Warm-up compiles every step shape on both groups and every transfer bucket; nothing after.
    compiles = engine.warmup()
    again = engine.generate(prompts[-3:], params[0], use_tqdm=False)
    out.update(warm_compiles=[compiles, engine.num_compiles], mover_compiles=engine.runner.mover.num_compiles,
               mover_buckets=len(engine.runner.mover.buckets), again=[o.token_ids for o in again])
    return out


def _served(engine, prompts, params) -> dict:
    """The same engine behind ``AsyncEngine`` (what ``energon serve`` runs): tokens and info."""
    import asyncio

    from energon_jax.async_engine import AsyncEngine

    served = AsyncEngine(engine)
    served.start()

    async def one(i, prompt):
        return [t for d in [d async for d in served.submit(prompt, params, request_id=f"s{i}")] for t in d.token_ids]

    async def every():
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))

    try:
        tokens = asyncio.run(every())
        info = served.info
    finally:
        served.shutdown()
    return {"served": tokens, "info_layout": info.layout, "info_overlap": info.overlap}


def _aborts(engine, prompts) -> dict:
    """Long requests on a 3-row decode group, a transfer queue of 2: abort one in each place."""
    from energon_jax import SamplingParams

    sched = engine.scheduler
    sched.max_pending = 2
    sp = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    arrivals = [(p, sp, 0) for p in prompts]
    where: dict[str, str] = {}

    def abort_once(eng, step, tokens):
        if "pending" not in where and sched.pending:
            rid = sched.pending[-1].request_id
            where["pending"] = rid
            assert eng.abort(rid) is not None
        if "decode" not in where and sched.decode.running:
            rid = sched.decode.running[0].request_id
            where["decode"] = rid
            eng.abort(rid)
        if "inbox" not in where and sched.inbox:
            rid = sched.inbox[-1].request_id
            where["inbox"] = rid
            eng.abort(rid)
        where.setdefault("pages_mid_run", sched.prefill.pages_used + sched.decode.pages_used)

    _, facts = _drive(engine, arrivals, abort_once)
    return {"aborted_in": sorted(k for k in where if k != "pages_mid_run"),
            "abort_max_pending": facts["max_pending"], "abort_inbox_while_full": facts["inbox_while_full"],
            "pages_after_abort": [sched.prefill.pages_used, sched.decode.pages_used],
            "allocated_after_abort": [sched.prefill.allocator.num_used, sched.decode.allocator.num_used],
            "left": [len(sched.inbox), len(sched.pending), sched.prefill.has_work(), sched.decode.has_work()]}


def _child_demo(case: str) -> dict:
    """The demo model: colocated vs disaggregated layouts (``tp``), or int8 KV pages (``int8``)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from energon_jax import Engine, SamplingParams
    from pallas_kernels import make_kv_pages

    kw = dict(ENGINE_KW, max_model_len=256, page_size=8, max_num_batched_tokens=32, kv_cache_pages=80)
    prompts = _prompts([1, 7, 8, 16, 31, 32, 33, 70], seed=1, vocab=4096)
    sp = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    arrivals = [(p, sp, i // 2) for i, p in enumerate(prompts)]

    def int8_pools(runner):
        def like(pages):
            n, s, k, h = pages.k.shape
            return make_kv_pages(n, s, k, h, jnp.int8, sharding=pages.k.sharding)
        runner.kv_cache = tuple(like(p) for p in runner.kv_cache)

    colocated = Engine.from_pretrained(None, **kw)
    if case == "int8":
        int8_pools(colocated.runner)
    want, _ = _drive(colocated, arrivals)
    layouts = [(1, 1)] if case == "int8" else [(2, 2), (1, 2)]
    out: dict = {"want": list(want.values()), "got": [], "pages": [], "scales": [], "shared": []}
    for p, d in layouts:
        engine = Engine.from_pretrained(None, prefill_devices=p, decode_devices=d, **kw)
        if case == "int8":
            int8_pools(engine.runner.prefill)
            int8_pools(engine.runner.decode)
            out["scales"].append(engine.runner.decode.kv_cache[0].k_scale is not None)
        loaded = jax.tree.leaves(nnx.state(engine._model))  # read straight into the prefill group's shards
        out["shared"].append(all(a is b for a, b in zip(loaded, jax.tree.leaves(engine.runner.prefill._state))))
        got, _ = _drive(engine, arrivals)
        out["got"].append(list(got.values()))
        s = engine.scheduler
        out["pages"].append([s.prefill.pages_used, s.decode.pages_used])
    return out


def _child_window() -> dict:
    """A tiny Mistral windowing every layer (window 8): prompts past the window, whose prefill
    released pages behind it (null entries in the page table) before they moved."""
    import tempfile
    from pathlib import Path

    from model_parity import tiny_variant

    from energon_jax import Engine, SamplingParams

    path = tiny_variant(Path(tempfile.mkdtemp()) / "mistral", "mistral", seed=3, sliding_window=8)
    kw = dict(ENGINE_KW, max_num_batched_tokens=8, min_token_bucket=8)
    prompts = _prompts([5, 8, 23, 30], seed=3, vocab=300)
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    arrivals = [(p, sp, i) for i, p in enumerate(prompts)]
    want, _ = _drive(Engine.from_pretrained(path, **kw), arrivals)
    engine = Engine.from_pretrained(path, prefill_devices=1, decode_devices=1, **kw)
    got, _ = _drive(engine, arrivals)
    s, stats = engine.scheduler, engine.runner.mover.stats
    return {"want": list(want.values()), "got": list(got.values()), "window": s.config.attention_window,
            "pages": [s.prefill.pages_used, s.decode.pages_used], "transfers": stats.transfers,
            "moved_pages": stats.pages, "prompt_pages": sum(-(-len(p) // kw["page_size"]) for p in prompts)}


def _child_preempt() -> dict:
    """A decode pool that holds one whole sequence: decoding requests preempt each other and are
    recomputed on the decode group (the colocated engine, same pool, preempts too)."""
    from tiny_decoder import TinyConfig, TinyDecoder

    from energon_jax import Engine, SamplingParams

    config = TinyConfig()
    model = TinyDecoder(config, seed=3)
    kw = dict(ENGINE_KW, max_model_len=48, kv_cache_pages=13)
    sp = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    arrivals = [(p, sp, 0) for p in _prompts([12, 9, 14, 5], seed=4)]
    want, _ = _drive(Engine(model, config, **kw), arrivals)
    engine = Engine(model, config, prefill_devices=1, decode_devices=1, **kw)
    got, _ = _drive(engine, arrivals)
    s = engine.scheduler
    return {"want": list(want.values()), "got": list(got.values()), "preemptions": s.decode.num_preemptions,
            "pages": [s.prefill.pages_used, s.decode.pages_used]}


# ----------------------------------------------------------------------------- default run


@pytest.fixture(scope="module")
def p1d1() -> dict:
    return run_child(__file__, "p1d1", devices=2)


def test_greedy_tokens_equal_colocated(p1d1):
    assert len(p1d1["want"]) == len(LENGTHS)
    assert p1d1["got"] == p1d1["want"]
    assert [len(t) for t in p1d1["got"]] == [1 if i == 4 else 6 for i in range(len(LENGTHS))]


def test_first_token_on_prefill_group_the_rest_on_decode(p1d1):
    assert p1d1["prefix_hits"] == 0 and p1d1["preemptions"] == 0
    assert p1d1["prefill_tokens"] == p1d1["expected_prefill_tokens"]
    assert p1d1["decode_tokens"] == p1d1["expected_decode_tokens"]
    assert p1d1["transfers"] == len(LENGTHS) - 1  # the max_tokens=1 request never moves


def test_prefix_cache_hits_on_the_prefill_group(p1d1):
    assert p1d1["shared_got"] == p1d1["shared_want"]
    assert p1d1["shared_hit_tokens"] == 20  # the second prompt's five full shared pages


def test_groups_on_disjoint_devices_compute_at_once(p1d1):
    assert p1d1["prefill_devices"] == [0] and p1d1["decode_devices"] == [1]
    assert p1d1["both_on_device"] > 0
    assert p1d1["layout"] == {"prefill_devices": 1, "decode_devices": 1, "prefill_tp": 1, "decode_tp": 1}
    assert p1d1["overlap"].startswith("disaggregated: prefill on devices 0..0 (tp=1), decode on devices 1..1")


def test_async_engine_serves_it_and_info_shows_the_layout(p1d1):
    assert p1d1["served"] == p1d1["want"][:3]
    assert p1d1["info_layout"] == {"dp": 1, "tp": 1, "pp": 1, "prefill_devices": 1, "decode_devices": 1,
                                   "prefill_tp": 1, "decode_tp": 1}
    assert p1d1["info_overlap"].startswith("disaggregated: prefill on devices 0..0")


def test_warmup_compiles_both_groups_and_every_transfer_bucket(p1d1):
    compiles, after = p1d1["warm_compiles"]
    assert compiles == after  # a request mix after warm-up compiles nothing
    assert p1d1["mover_compiles"] == p1d1["mover_buckets"] == 6  # 1..32 pages (max_model_len 128 / 4)
    assert p1d1["again"] == p1d1["want"][-3:]


def test_queue_holds_prefilled_requests_while_prefill_runs_on(p1d1):
    assert p1d1["max_pending"] > 0  # requests waited for decode pages/rows...
    assert p1d1["prefill_ran_while_pending"] > 0  # ...while the prefill group went on


def test_pages_back_after_finish_and_aborts(p1d1):
    assert p1d1["pages_after_finish"] == [0, 0]
    assert p1d1["aborted_in"] == ["decode", "inbox", "pending"]
    assert p1d1["abort_max_pending"] <= 2 and p1d1["abort_inbox_while_full"] > 0  # back-pressure
    assert p1d1["pages_after_abort"] == [0, 0] and p1d1["allocated_after_abort"] == [0, 0]
    assert p1d1["left"] == [0, 0, False, False]


def _pools(dtype, seed: int):
    import jax.numpy as jnp

    from pallas_kernels import KVPages, make_kv_pages

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(2):  # layers
        p = make_kv_pages(9, 4, 2, 8, dtype)
        fill = {f: jnp.asarray(rng.integers(-100, 100, a.shape).astype(a.dtype)) if a.dtype == jnp.int8
                else jnp.asarray(rng.standard_normal(a.shape).astype(a.dtype))
                for f, a in vars(p).items() if a is not None}
        out.append(KVPages(**fill))
    return tuple(out)


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_page_mover_copies_pages_and_scales(dtype):
    import jax

    from energon_jax.page_transfer import PageMover

    src, dst = _pools(dtype, 0), _pools(dtype, 1)
    want = jax.tree.map(np.asarray, dst)
    mover = PageMover(8)
    assert mover.buckets == (1, 2, 4, 8)
    out = mover.move(src, dst, [3, 5, 1], [7, 2, 4])  # padded to 4 pages with the null page
    for layer_src, layer_out, layer_want in zip(src, out, want):
        for field in ("k", "v", "k_scale", "v_scale"):
            a, b, w = (getattr(x, field) for x in (layer_src, layer_out, layer_want))
            if dtype == "float32" and field.endswith("scale"):
                assert a is None and b is None
                continue
            a, b = np.asarray(a), np.asarray(b)
            np.testing.assert_array_equal(b[[7, 2, 4]], a[[3, 5, 1]])
            untouched = [6, 8, 3, 5, 1]  # every page but the null page and the destinations
            np.testing.assert_array_equal(b[untouched], w[untouched])
    assert mover.num_compiles == 1


def test_options_errors_name_the_field():
    from tiny_decoder import TinyConfig, TinyDecoder

    from energon_jax import Engine
    from energon_jax.disagg import DisaggOptions

    assert DisaggOptions.from_kwargs(None, None) is None
    with pytest.raises(ValueError, match=r"give both prefill_devices=2 and decode_devices=None"):
        DisaggOptions.from_kwargs(2, None)
    with pytest.raises(ValueError, match=r"decode_devices=0 must be an integer >= 1"):
        DisaggOptions(1, 0)
    with pytest.raises(ValueError, match=r"prefill_tp=1 must equal prefill_devices=2"):
        DisaggOptions(2, 2, prefill_tp=1)
    with pytest.raises(ValueError, match=r"prefill_tp=2 / decode_tp=None need prefill_devices"):
        DisaggOptions.from_kwargs(None, None, prefill_tp=2)
    config = TinyConfig()
    model = TinyDecoder(config, seed=3)
    with pytest.raises(ValueError, match=r"= 3 devices asked, but only 1 exist"):
        Engine(model, config, prefill_devices=1, decode_devices=2, **ENGINE_KW)
    with pytest.raises(ValueError, match=r"must be the default \(tp, pp, dp, offload unset\)"):
        Engine(model, config, prefill_devices=1, decode_devices=1, tp=2, **ENGINE_KW)


def test_cli_flags_reach_the_engine():
    from energon_jax.cli import build_parser
    from energon_jax.commands.generate import parallel_kwargs

    args = build_parser().parse_args(["generate", "hi", "--prefill-devices", "2", "--decode-devices", "1",
                                      "--prefill-tp", "2"])
    assert parallel_kwargs(args) == {"prefill_devices": 2, "decode_devices": 1, "prefill_tp": 2}


def test_energon_info_prints_the_layout(capsys):
    from energon_jax.cli import main

    assert main(["info", "--prefill-devices", "2", "--decode-devices", "1"]) == 0
    assert ("disaggregated: prefill on devices 0..1 (tp=2), decode on devices 2..2 (tp=1)"
            in capsys.readouterr().out)
    assert main(["info", "--decode-devices", "1"]) == 2
    assert "give both prefill_devices=None and decode_devices=1" in capsys.readouterr().err


# ----------------------------------------------------------------------------- slow run


@pytest.mark.slow
def test_tensor_parallel_groups_equal_colocated():
    out = run_child(__file__, "tp", devices=4)
    assert out["got"] == [out["want"], out["want"]]
    assert out["pages"] == [[0, 0], [0, 0]]
    assert out["shared"] == [True, True]  # the prefill runner holds the loaded weights, no extra copy


@pytest.mark.slow
def test_int8_pages_move_with_their_scales():
    out = run_child(__file__, "int8", devices=2)
    assert out["scales"] == [True]
    assert out["got"] == [out["want"]]
    assert out["pages"] == [[0, 0]]


@pytest.mark.slow
def test_sliding_window_pages_move_without_the_released_ones():
    out = run_child(__file__, "window", devices=2)
    assert out["window"] == 8 and out["transfers"] == 4
    assert out["moved_pages"] < out["prompt_pages"]  # pages behind the window were not moved
    assert out["got"] == out["want"]
    assert out["pages"] == [0, 0]


@pytest.mark.slow
def test_decode_pool_preemption_recomputes_on_the_decode_group():
    out = run_child(__file__, "preempt", devices=2)
    assert out["preemptions"] > 0
    assert out["got"] == out["want"]
    assert out["pages"] == [0, 0]


if __name__ == "__main__":
    case = sys.argv[1]
    children = {"p1d1": _child_p1d1, "window": _child_window, "preempt": _child_preempt}
    result = children[case]() if case in children else _child_demo(case)
    print(json.dumps(result))
