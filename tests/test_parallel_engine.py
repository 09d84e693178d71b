"""Engine(..., tp=, pp=, dp=, offload=, resident_layers=) through parallel/runtime.py.

In a child with 8 simulated CPU devices the same random 4-layer Llama generates greedily
for 3 prompts with the engine's own scheduler, once per layout: tp 2 and 8 (KV heads
sharded, then replicated), dp 2 x tp 4, pp 2, pp 2 x tp 4 and layer offloading to host
memory; the token ids must equal the single-device engine's. Across processes,
``energon launch`` runs 2 processes x 2 devices with ``tp=4``: process 0 generates, the
worker serves its controller, and the tokens equal the single-device engine's.
Impossible layouts are ValueErrors that say why.

Pipeline (``Engine(pp=N)``, the non-blocking schedule of ``parallel/pipeline.py``): 8
prompts of different lengths arrive at different steps (more than ``max_num_seqs``, so
groups refill) and go through ``add_request`` / ``step``; three of them also through
``generate``, ``stream`` and ``AsyncEngine.submit``. The greedy tokens equal the
single-device engine's, every page is back in the pool after, and the runner's counters
show ``pp`` micro-batches in flight at once. A request aborted while its micro-batch is in the pipeline finishes at once
and the others are untouched. The slow run adds pp=4 and a page pool small enough to
force preemptions (which must never touch a request in flight).
"""

from __future__ import annotations

import json
import sys

import pytest

from process_harness import HERE, ROOT, launch_children, lead_or_serve, run_child, write_result

PROMPTS = [[5, 9, 13, 7, 22, 30, 31], [40, 41, 42], [17, 3, 88, 60, 12, 11, 10, 9, 8]]
# Each layout builds and warms up its own engine; the default run keeps three (KV heads
# replicated, pipeline x tensor, offload), the slow run adds the other three.
# Pipeline runs: prompts of different lengths arriving at different steps (step index).
STAGGERED = [([5, 9, 13, 7, 22, 30, 31], 0), ([40, 41, 42], 0), ([17, 3, 88, 60, 12, 11, 10, 9, 8], 0),
             ([4, 4, 4], 1), ([70, 71, 72, 73, 74], 2), ([33], 3), ([21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31], 5),
             ([8, 9], 9)]
STAGGERED_MAX_TOKENS = 8
PIPELINE_CASES = {
    "default": [dict(pp=2), dict(pp=2, tp=4)],
    "more": [dict(pp=4), dict(pp=2, kv_cache_pages=9), dict(pp=4, kv_cache_pages=9)],
}
LAYOUTS = {
    "default": [dict(tp=8), dict(pp=2, tp=4), dict(offload="host", resident_layers=1)],
    "more": [dict(tp=2), dict(dp=2, tp=4), dict(pp=2)],
}


@pytest.mark.parametrize("group", ["default", pytest.param("more", marks=pytest.mark.slow)])
def test_engine_layouts_match_single_device(group):
    out = run_child(__file__, "layouts", group)
    base = out["base"]
    assert len(base) == 3 and all(len(t) == 5 for t in base)
    assert [c["layout"] for c in out["cases"]] == LAYOUTS[group]
    for case in out["cases"]:
        assert case["tokens"] == base, case
        assert case["runner"] == case["expect_runner"], case
        if case["layout"].get("pp", 1) > 1:  # generate kept pp micro-batches in the pipeline at once
            assert case["max_in_flight"] == case["layout"]["pp"], case
            assert not case["async_scheduling"] and case["overlap"].startswith("pipeline: "), case
        elif "offload" in case["layout"]:  # said, not silently off
            assert not case["async_scheduling"] and "OffloadedRunner cannot take" in case["overlap"], case
        else:  # tp and dp replicas plan step N+1 before fetching step N's ids...
            assert case["async_scheduling"] and case["planned_ahead"] > 0, case
            assert case["history_len"] == 0, case  # ...and keep penalty counts on the device


# Slow (default-run budget): test_spmd_pipeline's smoke and the layouts test run pp by default.
@pytest.mark.slow
@pytest.mark.parametrize("group", ["default", "more"])
def test_engine_pipeline_keeps_pp_micro_batches_in_flight(group):
    out = run_child(__file__, "pipeline", group)
    base = out["base"]
    assert sorted(base) == [f"r{i}" for i in range(len(STAGGERED))]
    assert all(len(t) == STAGGERED_MAX_TOKENS for t in base.values())
    assert [c["layout"] for c in out["cases"]] == PIPELINE_CASES[group]
    for case in out["cases"]:
        pp = case["layout"]["pp"]
        assert case["runner"] == "SpmdPipelineRunner", case
        assert case["tokens"] == base, case  # add_request/step with staggered arrivals
        assert case["pages_used"] == 0 and case["running"] == 0, case
        stats = case["stats"]
        assert stats["max_in_flight"] == pp, case  # stage 0 fed while earlier micro-batches were inside
        assert all(b > 0 for b in stats["busy"]), case
        assert stats["entered"] == stats["completed"] > 0, case
        if case["kv_cache_pages"] < 32:
            assert case["preemptions"] > 0, case  # the small pool really preempted
        if "generate" in case:  # Engine.generate and AsyncEngine.submit on the same engine
            assert case["generate"]["tokens"] == [base[f"r{i}"] for i in range(3)], case
            assert case["generate"]["max_in_flight"] == pp, case
            assert case["submit"] == [base[f"r{i}"] for i in range(3)], case
            assert case["stream"] == base["r2"], case
        if "abort" in case:
            ab = case["abort"]
            assert ab["delta"] == {"finished": True, "finish_reason": "abort"}, ab
            assert ab["status_before"] == "running", ab  # its micro-batch was inside the pipeline, unfinished
            rid = ab["rid"]
            # Nothing more after the abort (its micro-batch left the pipeline later and was dropped),
            # and what it had was right.
            assert len(ab["tokens"][rid]) == ab["tokens_at_abort"] < STAGGERED_MAX_TOKENS, ab
            assert ab["tokens"][rid] == base[rid][: ab["tokens_at_abort"]], ab
            assert {k: v for k, v in ab["tokens"].items() if k != rid} == {k: v for k, v in base.items() if k != rid}
            assert ab["pages_used"] == 0, ab


@pytest.mark.slow  # default-run budget (15 min quiet): test_parallel_controller runs tp=4 over two processes
def test_engine_tp4_across_two_processes(tmp_path):
    base = run_child(__file__, "base", devices=1)["base"]
    got, worker = launch_children(__file__, "multi", tmp_path, devices_per_process=2)
    assert got["tokens"] == base
    assert got["runner"] == worker["runner"] == "Controller"
    assert worker["steps"] == got["steps"] > 0


def test_impossible_layouts_say_why():
    from energon_jax.parallel.runtime import ParallelOptions

    with pytest.raises(ValueError, match=r"tp=0 must be an integer >= 1"):
        ParallelOptions(tp=0)
    with pytest.raises(ValueError, match=r"offload='host' runs on one compute device: dp=1, pp=1, tp=2"):
        ParallelOptions(tp=2, offload="host")
    with pytest.raises(ValueError, match=r"resident_layers=2 needs offload"):
        ParallelOptions(resident_layers=2)
    with pytest.raises(ValueError, match=r"offload='gpu' must be one of"):
        ParallelOptions(offload="gpu")


def test_expert_parallel_is_reachable_and_checked():
    """``Engine(..., expert_parallel=True)`` reaches the runtime's layout check (1 device: it
    fails before anything is placed) and the options refuse it without tp."""
    from energon_jax.engine import Engine
    from energon_jax.parallel.mesh import validate_model_parallelism
    from energon_jax.parallel.options import ParallelOptions
    from tiny_decoder import TinyConfig, TinyDecoder

    with pytest.raises(ValueError, match=r"expert_parallel=True spreads experts over tp: it needs tp > 1"):
        ParallelOptions(expert_parallel=True)
    config = TinyConfig(num_layers=1)
    model = TinyDecoder(config, seed=0)
    with pytest.raises(ValueError, match=r"expert_parallel=True needs a mixture-of-experts model"):
        Engine(model, config, None, max_model_len=32, kv_cache_pages=8, tp=2, expert_parallel=True, warmup=False)
    with pytest.raises(ValueError, match=r"tp=4 must divide num_experts=6 with expert_parallel=True"):
        validate_model_parallelism(ParallelOptions(tp=4, expert_parallel=True), num_heads=8, num_kv_heads=4,
                                   num_layers=2, num_experts=6)
    with pytest.raises(ValueError, match=r"give parallel=ParallelOptions\(.*\) or tp/pp/dp/offload/expert_parallel"):
        Engine(model, config, None, parallel=ParallelOptions(tp=2), tp=2, warmup=False)
    from energon_jax.cli import build_parser
    from energon_jax.commands.generate import parallel_kwargs

    args = build_parser().parse_args(["generate", "hi", "--tp", "2", "--expert-parallel"])
    assert parallel_kwargs(args) == {"tp": 2, "expert_parallel": True}  # serve takes the same flags
    kwargs = {"tp": 2, "expert_parallel": True, "max_model_len": 32}
    assert ParallelOptions.take(kwargs) == ParallelOptions(tp=2, expert_parallel=True) and kwargs == {
        "max_model_len": 32}


@pytest.mark.slow
def test_engine_expert_parallel_matches_single_device():
    out = run_child(__file__, "experts", devices=4)
    assert out["spec"] == ["tp", None, None]  # whole experts per tp shard
    assert out["mlp_split_spec"] == [None, None, "tp"]  # the default: each expert's MLP split
    assert out["expert_parallel"] == out["base"] == out["mlp_split"] and len(out["base"][0]) == 5


# ----------------------------------------------------------------- the children


def _child_experts() -> dict:
    """Tiny Mixtral (4 experts): single device, tp=4 with each expert's MLP split, tp=4 with whole
    experts spread over tp; greedy tokens and the placement of one expert weight."""
    from energon_jax.engine import Engine
    from test_parallel_tp_models import build_model

    def run(**layout):
        model, config = build_model("mixtral")
        engine = Engine(model, config, None, max_model_len=32, page_size=4, kv_cache_pages=32, max_num_seqs=4,
                        max_num_batched_tokens=16, warmup=False, **layout)
        spec = list(getattr(model.layers[0].mlp.w_gate.get_value().sharding, "spec", ()))  # () on one device
        return _generate(engine), spec + [None] * (3 - len(spec))

    base, _ = run()
    split, split_spec = run(tp=4)
    experts, spec = run(tp=4, expert_parallel=True)
    return {"base": base, "mlp_split": split, "mlp_split_spec": split_spec, "expert_parallel": experts,
            "spec": spec}




def _engine(kv_cache_pages: int = 32, **layout):
    from energon_jax.engine import Engine
    from test_parallel_tp_models import build_model

    model, config = build_model("llama", num_hidden_layers=4)
    return Engine(model, config, None, max_model_len=32, page_size=4, kv_cache_pages=kv_cache_pages,
                  max_num_seqs=4, max_num_batched_tokens=16, **layout)


def _generate(engine):
    """Greedy tokens of PROMPTS; the last two with penalties (device count tables in every layout)."""
    from energon_jax.request import SamplingParams

    plain = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    params = [plain, SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, repetition_penalty=1.6),
              SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, presence_penalty=0.8,
                             frequency_penalty=0.5)]
    return [list(map(int, o.token_ids)) for o in engine.generate(PROMPTS, params, use_tqdm=False)]


def _child_base() -> dict:
    return {"base": _generate(_engine())}


def _child_layouts(group: str) -> dict:
    expect = {"pp": "SpmdPipelineRunner", "offload": "OffloadedRunner", "dp": "DataParallelRunner"}
    base = _generate(_engine())
    cases = []
    for layout in LAYOUTS[group]:
        engine = _engine(**layout)
        kind = next((v for k, v in expect.items() if k in layout), "ModelRunner")
        stats = getattr(engine.runner, "stats", None)  # the pipeline's counters (reset by warm-up)
        cases.append({"layout": layout, "tokens": _generate(engine), "runner": type(engine.runner).__name__,
                      "expect_runner": kind, "max_in_flight": getattr(stats, "max_in_flight", None),
                      "async_scheduling": engine.async_scheduling, "overlap": engine.overlap,
                      "planned_ahead": engine.num_planned_ahead, "history_len": engine.buckets.history_len})
    return {"base": base, "cases": cases}


def _staggered(engine, abort_at: int | None = None) -> dict:
    """Add STAGGERED's prompts at their steps and step until all finish; tokens per request id.

    ``abort_at``: at that step, abort the first request of the micro-batch next to leave
    the pipeline (so it is surely in flight) and record what happened."""
    from energon_jax.request import SamplingParams

    params = SamplingParams(max_tokens=STAGGERED_MAX_TOKENS, temperature=0.0, ignore_eos=True)
    tokens: dict[str, list[int]] = {}
    pending: set[str] = set()
    out: dict = {}
    t = 0
    while pending or t <= max(a for _, a in STAGGERED):
        for i, (prompt, arrive) in enumerate(STAGGERED):
            if arrive == t:
                tokens[engine.add_request(prompt, params, request_id=f"r{i}")] = []
                pending.add(f"r{i}")
        if abort_at is not None and t == abort_at:
            request = engine.runner.in_flight_tags[0].rows[0].request
            rid, status = request.request_id, request.status.value
            delta = engine.abort(rid)
            pending.discard(rid)
            tokens[rid].extend(int(x) for x in delta.token_ids)
            out["abort"] = {"rid": rid, "status_before": status, "tokens_at_abort": len(tokens[rid]),
                            "delta": {"finished": delta.finished, "finish_reason": delta.finish_reason}}
        for delta in engine.step():
            tokens[delta.request_id].extend(int(x) for x in delta.token_ids)
            if delta.finished:
                pending.discard(delta.request_id)
        t += 1
    out["tokens"] = tokens
    return out


def _submit_all(engine, prompts) -> list[list[int]]:
    """The prompts through AsyncEngine.submit, concurrently; tokens in prompt order."""
    import asyncio

    from energon_jax.async_engine import AsyncEngine
    from energon_jax.request import SamplingParams

    params = SamplingParams(max_tokens=STAGGERED_MAX_TOKENS, temperature=0.0, ignore_eos=True)
    aengine = AsyncEngine(engine)
    aengine.start()
    try:
        async def one(prompt, rid):
            return [int(x) async for d in aengine.submit(prompt, params, request_id=rid) for x in d.token_ids]

        async def main():
            return await asyncio.gather(*(one(p, f"s{i}") for i, p in enumerate(prompts)))

        return asyncio.run(main())
    finally:
        aengine.shutdown()


def _child_pipeline(group: str) -> dict:
    from energon_jax.request import SamplingParams

    base = _staggered(_engine())["tokens"]
    cases = []
    for case in PIPELINE_CASES[group]:
        layout = {k: v for k, v in case.items() if k != "kv_cache_pages"}
        engine = _engine(kv_cache_pages=case.get("kv_cache_pages", 32), **layout)
        engine.runner.reset_stats()
        run = _staggered(engine)
        stats = engine.runner.stats
        got = {
            "layout": case, "runner": type(engine.runner).__name__, "tokens": run["tokens"],
            "pages_used": engine.scheduler.pages_used, "running": engine.scheduler.num_running,
            "preemptions": engine.scheduler.num_preemptions, "kv_cache_pages": case.get("kv_cache_pages", 32),
            "stats": {"max_in_flight": stats.max_in_flight, "busy": stats.busy, "entered": stats.entered,
                      "completed": stats.completed},
        }
        if group == "default":
            prompts = [p for p, _ in STAGGERED[:3]]
            engine.runner.reset_stats()
            params = SamplingParams(max_tokens=STAGGERED_MAX_TOKENS, temperature=0.0, ignore_eos=True)
            outs = engine.generate(prompts, params, use_tqdm=False)
            got["generate"] = {"tokens": [list(map(int, o.token_ids)) for o in outs],
                               "max_in_flight": engine.runner.stats.max_in_flight}
            got["submit"] = _submit_all(engine, prompts)
            got["stream"] = [int(x) for d in engine.stream(prompts[2], params) for x in d.token_ids]
            if case == dict(pp=2):
                ab = _staggered(engine, abort_at=4)
                got["abort"] = {**ab.pop("abort"), "tokens": ab["tokens"], "pages_used": engine.scheduler.pages_used}
        cases.append(got)
    return {"base": base, "cases": cases}


def _child_multi(outdir: str) -> None:
    from energon_jax.parallel import distributed

    assert distributed.initialize_from_env()
    engine = _engine(tp=4)
    out = lead_or_serve(engine.runner, lambda: {"tokens": _generate(engine)})
    write_result(outdir, {"runner": type(engine.runner).__name__, **out})


if __name__ == "__main__":
    sys.path[:0] = [ROOT, HERE]
    mode = sys.argv[1]
    if mode == "multi":
        _child_multi(sys.argv[2])
    elif mode == "layouts":
        print(json.dumps(_child_layouts(sys.argv[2])))
    elif mode == "pipeline":
        print(json.dumps(_child_pipeline(sys.argv[2])))
    elif mode == "experts":
        print(json.dumps(_child_experts()))
    else:
        print(json.dumps(_child_base()))
