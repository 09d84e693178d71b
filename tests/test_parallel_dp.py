"""Data parallelism (``Engine(dp=N)``, ``parallel/data_parallel.py``) on 8 simulated CPU devices.

In a child process the same random 4-layer Llama serves 8 greedy requests of different
lengths arriving at different steps (more than one replica's ``max_num_seqs``, so
requests queue and replicas refill), through ``add_request`` / ``step``, once on one
device and once per layout: ``dp=2`` (planning ahead on), ``dp=2, tp=4`` (planning
ahead off) and ``dp=2, pp=2`` (each replica a pipeline); the slow run adds ``dp=4, tp=2``
and ``dp=2, pp=2, tp=2``. Every layout must give the single-device engine's tokens,
spread the requests over every replica (each replica ran rows: the runner's counters),
have had every replica computing at once, and end with every page back in every
replica's pool; without ``pp`` it must also need fewer engine steps than one device,
and with ``pp`` every replica's pipeline must have had ``pp`` micro-batches in flight
and every stage busy. Each replica's weights and KV pages live on its own ``pp * tp``
devices, disjoint from the others'. On ``dp=2`` and ``dp=2, pp=2`` a request running on
replica 1 is aborted mid-way, and ``generate``, ``stream`` and ``AsyncEngine.submit`` run
on the same engine. Host-only checks: routing and summed accounting of
``DataParallelScheduler``; two fake pipelines under ``DataParallelStepLoop`` both tick
before either's ids are fetched; the layouts refused with a ValueError.
"""

from __future__ import annotations

import json
import sys

import pytest

from test_parallel_mesh import ROOT, run_child

# (prompt, engine step at which it arrives)
STAGGERED = [([5, 9, 13, 7, 22, 30, 31], 0), ([40, 41, 42], 0), ([17, 3, 88, 60, 12, 11, 10, 9, 8], 0),
             ([4, 4, 4], 1), ([70, 71, 72, 73, 74], 2), ([33], 3), ([21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31], 5),
             ([8, 9], 9)]
MAX_TOKENS = 8
MAX_NUM_SEQS = 3  # per replica: 8 requests are more than one replica runs at once
# Layouts that also abort a request mid-way and serve generate / stream / AsyncEngine.submit.
EXTRAS = [dict(dp=2), dict(dp=2, pp=2)]
CASES = {
    "default": [dict(dp=2), dict(dp=2, tp=4, async_scheduling=False), dict(dp=2, pp=2)],
    "more": [dict(dp=4, tp=2), dict(dp=2, pp=2, tp=2)],
}


# Slow (default-run budget): test_replica_step runs a dp=2 x tp=2 engine by default.
@pytest.mark.slow
@pytest.mark.parametrize("group", ["default", "more"])
def test_engine_dp_matches_single_device_and_spreads_requests(group):
    out = run_child(__file__, "engine", group)
    base = out["base"]
    assert sorted(base) == [f"r{i}" for i in range(len(STAGGERED))]
    assert all(len(t) == MAX_TOKENS for t in base.values())
    assert [c["layout"] for c in out["cases"]] == CASES[group]
    for case in out["cases"]:
        dp, pp, tp = (case["layout"].get(k, 1) for k in ("dp", "pp", "tp"))
        assert case["runner"] == "DataParallelRunner", case
        assert case["replica_runners"] == ["SpmdPipelineRunner" if pp > 1 else "ModelRunner"] * dp, case
        assert case["tokens"] == base, case  # staggered add_request / step
        if pp == 1:  # (a pipeline advances each request once per pp ticks: more engine steps)
            assert case["steps"] < out["base_steps"], case  # dp replicas served rows side by side
        st = case["stats"]
        assert len(st["rows"]) == dp and all(r > 0 for r in st["rows"]), case  # every replica ran rows
        assert all(a > 0 for a in case["assigned"]) and sum(case["assigned"]) == len(STAGGERED), case
        assert st["max_on_device"] == dp, case  # every replica had a step dispatched at once
        assert 0 < st["engine_steps"] <= case["steps"], case
        assert case["pages_used"] == [0] * dp and case["running"] == [0] * dp, case
        assert case["waiting"] == [0] * dp and not case["unfinished"], case
        # each replica's KV pages and weights on its own devices, pp * tp of them, disjoint from the others'
        kv = [set(d) for d in case["kv_devices"]]
        assert all(len(d) == pp * tp for d in kv) and len(set().union(*kv)) == dp * pp * tp, case
        assert case["weight_devices"] == case["kv_devices"], case
        if pp > 1:  # every replica's pipeline had pp micro-batches in flight at once, all came out
            assert [p["max_in_flight"] for p in case["pipelines"]] == [pp] * dp, case
            assert all(p["entered"] == p["completed"] > 0 for p in case["pipelines"]), case
            assert all(all(b > 0 for b in p["busy"]) for p in case["pipelines"]), case
            assert case["planned_ahead"] == 0, case  # a micro-batch is never planned past
        elif case["layout"].get("async_scheduling", True):
            assert case["planned_ahead"] > 0, case
        if "abort" in case:
            ab = case["abort"]
            assert ab["replica"] == 1 and ab["status_before"] == "running", ab
            assert ab["delta"] == {"finished": True, "finish_reason": "abort"}, ab
            rid = ab["rid"]
            assert ab["tokens"][rid] == base[rid][: len(ab["tokens"][rid])], ab
            assert len(ab["tokens"][rid]) < MAX_TOKENS, ab
            assert {k: v for k, v in ab["tokens"].items() if k != rid} == {k: v for k, v in base.items() if k != rid}
            assert ab["pages_used"] == [0] * dp, ab
        if "generate" in case:
            want = [base[f"r{i}"] for i in range(4)]
            assert case["generate"] == want, case
            assert case["submit"] == want, case
            assert case["submit_stats"] == {"running": 0, "pages_used": 0, "pages_total": case["pages_total"]}, case
            assert case["pages_total"] == dp * case["pages_per_replica"], case
            assert case["stream"] == base["r2"], case


@pytest.mark.slow  # default-run budget (15 min quiet)
def test_from_pretrained_dp2_tp2_loads_replica0_shards(tmp_path):
    from hf_fixtures import make_tiny_checkpoint

    path = make_tiny_checkpoint(tmp_path / "ckpt", "llama")
    out = run_child(__file__, "load", str(path), devices=4)
    assert len(out["base"]) == 3 and all(len(t) == MAX_TOKENS for t in out["base"])
    assert out["dp"] == out["base"]
    # the weights were read into replica 0's two devices; replica 1 holds its own copy on the other two
    assert out["weight_devices"] == out["kv_devices"] == [[0, 1], [2, 3]], out
    assert out["loaded_devices"] == [0, 1], out


def test_dp_scheduler_routes_and_sums_host_only():
    from energon_jax.parallel.data_parallel import DataParallelScheduler
    from energon_jax.request import Request, SamplingParams
    from energon_jax.scheduler import Scheduler, SchedulerConfig

    config = SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=16, max_model_len=40, page_size=4, num_pages=9)
    dps = DataParallelScheduler([Scheduler(config) for _ in range(3)])
    params = SamplingParams(max_tokens=4)
    lengths = [9, 2, 5, 3, 1, 7, 4]
    where = [dps.add(Request(request_id=f"q{i}", prompt_token_ids=[3] * n, params=params))
             for i, n in enumerate(lengths)]
    # fewest unfinished requests first, then fewest outstanding tokens, then the lowest index
    assert where == [0, 1, 2, 1, 2, 0, 1]
    assert dps.assigned == [2, 3, 2] and dps.num_waiting == 7 and dps.num_running == 0
    for s in dps.replicas:
        s.schedule()  # admits up to max_num_seqs=2 per replica, allocating pages
    assert dps.num_running == 6 and dps.num_waiting == 1
    assert dps.pages_used == sum(s.pages_used for s in dps.replicas) > 0
    assert dps.pages_total == 3 * 8
    assert dps.replica_of("q3") == 1 and dps.get("q3").request_id == "q3"
    req = dps.abort("q3")
    assert req is not None and req.finish_reason == "abort" and dps.replica_of("q3") is None
    assert dps.abort("q3") is None and dps.finish("nope", "stop") is None
    assert dps.finish("q0", "stop").finish_reason == "stop"
    with pytest.raises(ValueError, match=r"needs 10 KV pages"):  # every replica's pool is this size
        dps.add(Request(request_id="big", prompt_token_ids=[3] * 36, params=SamplingParams(max_tokens=2)))
    assert dps.assigned == [2, 3, 2]


def test_dp_of_pipelines_ticks_every_replica_before_collecting_host_only():
    """``DataParallelStepLoop`` over two fake pipelines (``test_parallel_pipeline.EchoPipeline``,
    pp=2): in every engine step both replicas tick before either fetches ids; every request
    gets the fake model's reference tokens, both replicas ran rows with pp micro-batches in
    flight, and every page is back in both pools."""
    import random

    from energon_jax.parallel.data_parallel import DataParallelRunner, DataParallelScheduler, DataParallelStepLoop
    from energon_jax.parallel.pipeline import PipelineStepLoop
    from energon_jax.scheduler import SchedulerConfig
    from test_parallel_pipeline import EchoPipeline, echo_requests
    from test_scheduler import VOCAB, make, reference

    pp = 2
    cfg = SchedulerConfig(max_num_seqs=3, max_num_batched_tokens=16, max_model_len=40, page_size=4, num_pages=30)
    made = [make(cfg) for _ in range(2)]
    log: list = []
    pipes = [EchoPipeline(pp, model, log, name=str(i)) for i, (_, _, model) in enumerate(made)]
    dps = DataParallelScheduler([sched for sched, _, _ in made])
    buckets = made[0][1]
    loop = DataParallelStepLoop(dps, DataParallelRunner(pipes),
                                make_loop=lambda s, r: PipelineStepLoop(s, r, buckets, lambda deltas: list(deltas)))
    requests = echo_requests(random.Random(7), 12, VOCAB)  # more than one replica's max_num_seqs
    got: dict[str, list[int]] = {r.request_id: [] for r, _ in requests}
    tick = 0
    while tick < 8 or dps.has_work() or not all(p.empty for p in pipes):
        for r, arrive in requests:
            if arrive == tick:
                dps.add(r)
        n = len(log)
        for d in loop.step({r.request_id for r, a in requests if a <= tick and not r.finished}):
            got[d.request.request_id].extend(d.new_token_ids)
        kinds = [kind for kind, _ in log[n:]]
        assert kinds == sorted(kinds, key=lambda k: k != "tick"), log[n:]  # every tick before any fetch
        tick += 1
        assert tick < 500
    assert [p.max_in_flight for p in pipes] == [pp, pp]
    assert all(c.rows > 0 for c in loop.runner.stats.replicas) and loop.runner.stats.max_on_device == 2
    assert dps.pages_used == 0 and not loop.busy()
    for r, _ in requests:
        assert (r.output_token_ids, r.finish_reason) == reference(r.prompt_token_ids, r.params)
        assert got[r.request_id] == r.output_token_ids


def test_dp_across_processes_has_replicas(monkeypatch):
    import jax

    from energon_jax.parallel import runtime
    from energon_jax.parallel.runtime import ParallelOptions

    assert ParallelOptions(dp=2, pp=2, tp=2).num_devices == 8  # dp x pp is a layout now
    assert runtime.dp_replicas(ParallelOptions(dp=2)) and not runtime.dp_replicas(ParallelOptions(tp=2))
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    # Across processes the dp replicas share one stacked step (tests/test_replica_step.py; the
    # 2-process x 2-device dp=2 x tp=2 CLI run is tests/test_cli_distributed.py), dp x pp one
    # stacked pipeline tick (tests/test_replica_pipeline.py).
    assert runtime.dp_replicas(ParallelOptions(dp=2)) and runtime.dp_replicas(ParallelOptions(dp=2, pp=2))


# ----------------------------------------------------------------- the child


def _engine(**layout):
    from energon_jax.engine import Engine
    from test_parallel_tp_models import build_model

    model, config = build_model("llama", num_hidden_layers=4)
    return Engine(model, config, None, max_model_len=32, page_size=4, kv_cache_pages=24,
                  max_num_seqs=MAX_NUM_SEQS, max_num_batched_tokens=16, **layout)


def _params():
    from energon_jax.request import SamplingParams

    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)


def _staggered(engine, abort_at: int | None = None) -> dict:
    """Add STAGGERED's prompts at their steps and step until all finish: tokens per request id
    and the number of engine steps. ``abort_at``: at that step, abort the first request running
    on replica 1 and record what happened."""
    tokens: dict[str, list[int]] = {}
    pending: set[str] = set()
    out: dict = {}
    t = 0
    while pending or t <= max(a for _, a in STAGGERED):
        for i, (prompt, arrive) in enumerate(STAGGERED):
            if arrive == t:
                tokens[engine.add_request(prompt, _params(), request_id=f"r{i}")] = []
                pending.add(f"r{i}")
        if abort_at is not None and t == abort_at:
            request = engine.scheduler.replicas[1].running[0]
            rid, status = request.request_id, request.status.value
            replica = engine.scheduler.replica_of(rid)
            delta = engine.abort(rid)
            pending.discard(rid)
            tokens[rid].extend(int(x) for x in delta.token_ids)
            out["abort"] = {"rid": rid, "status_before": status, "replica": replica,
                            "delta": {"finished": delta.finished, "finish_reason": delta.finish_reason}}
        for delta in engine.step():
            tokens[delta.request_id].extend(int(x) for x in delta.token_ids)
            if delta.finished:
                pending.discard(delta.request_id)
        t += 1
    out["tokens"], out["steps"] = tokens, t
    return out


def _submit_all(engine, prompts) -> tuple[list[list[int]], dict]:
    """The prompts through AsyncEngine.submit, concurrently: tokens in prompt order, stats after."""
    import asyncio

    from energon_jax.async_engine import AsyncEngine

    aengine = AsyncEngine(engine)
    aengine.start()
    try:
        async def one(prompt, rid):
            return [int(x) async for d in aengine.submit(prompt, _params(), request_id=rid) for x in d.token_ids]

        async def main():
            return await asyncio.gather(*(one(p, f"s{i}") for i, p in enumerate(prompts)))

        tokens = asyncio.run(main())
        s = aengine.stats
        return tokens, {"running": s.running, "pages_used": s.pages_used, "pages_total": s.pages_total}
    finally:
        aengine.shutdown()


def _devices(tree) -> list[int]:
    import jax

    return sorted({d.id for x in jax.tree.leaves(tree) for d in x.devices()})


def _weights(replica) -> list:
    """A replica runner's weights: the model state, or a pipeline's pieces on every stage."""
    if hasattr(replica, "_state"):
        return replica._state
    return list(replica.weights)


def _child_engine(group: str) -> dict:
    base = _staggered(_engine())
    cases = []
    for layout in CASES[group]:
        engine = _engine(**layout)
        engine.runner.reset_stats()
        run = _staggered(engine)
        runner, sched = engine.runner, engine.scheduler
        st = runner.stats
        got = {
            "layout": layout, "runner": type(runner).__name__, "tokens": run["tokens"], "steps": run["steps"],
            "stats": {"rows": [c.rows for c in st.replicas], "engine_steps": st.engine_steps,
                      "max_on_device": st.max_on_device},
            "assigned": list(sched.assigned), "planned_ahead": engine.num_planned_ahead,
            "pages_used": [s.pages_used for s in sched.replicas], "running": [s.num_running for s in sched.replicas],
            "waiting": [s.num_waiting for s in sched.replicas], "unfinished": engine.has_unfinished(),
            "kv_devices": [_devices(kv) for kv in runner.kv_caches],
            "weight_devices": [_devices(_weights(r)) for r in runner.replicas],
            "replica_runners": [type(r).__name__ for r in runner.replicas],
        }
        if layout.get("pp", 1) > 1:
            got["pipelines"] = [{"max_in_flight": r.stats.max_in_flight, "entered": r.stats.entered,
                                 "completed": r.stats.completed, "busy": r.stats.busy} for r in runner.replicas]
        if layout in EXTRAS:
            ab = _staggered(engine, abort_at=4)
            got["abort"] = {**ab.pop("abort"), "tokens": ab["tokens"],
                            "pages_used": [s.pages_used for s in sched.replicas]}
            prompts = [p for p, _ in STAGGERED[:4]]
            outs = engine.generate(prompts, _params(), use_tqdm=False)
            got["generate"] = [list(map(int, o.token_ids)) for o in outs]
            got["submit"], got["submit_stats"] = _submit_all(engine, prompts)
            got["stream"] = [int(x) for d in engine.stream(prompts[2], _params()) for x in d.token_ids]
            got["pages_total"], got["pages_per_replica"] = sched.pages_total, sched.replicas[0].pages_total
        cases.append(got)
    return {"base": base["tokens"], "base_steps": base["steps"], "cases": cases}


def _child_load(path: str) -> dict:
    from flax import nnx

    from energon_jax.engine import Engine

    prompts = [p for p, _ in STAGGERED[:3]]
    kwargs = dict(max_model_len=32, page_size=4, kv_cache_pages=16, max_num_seqs=2, max_num_batched_tokens=16)

    def tokens(engine):
        return [list(map(int, o.token_ids)) for o in engine.generate(prompts, _params(), use_tqdm=False)]

    base = tokens(Engine.from_pretrained(path, **kwargs))
    engine = Engine.from_pretrained(path, dp=2, tp=2, **kwargs)
    runner = engine.runner
    return {
        "base": base, "dp": tokens(engine),
        "weight_devices": [_devices(r._state) for r in runner.replicas],
        "kv_devices": [_devices(kv) for kv in runner.kv_caches],
        "loaded_devices": _devices(nnx.state(engine._model)),  # where models.load placed the weights
    }


if __name__ == "__main__":
    sys.path[:0] = [ROOT]
    if sys.argv[1] == "load":
        print(json.dumps(_child_load(sys.argv[2])))
    else:
        print(json.dumps(_child_engine(sys.argv[2])))
