"""``parallel/replica_pipeline.py``: ``dp`` pipelines in one SPMD tick (how ``dp x pp`` runs across processes).

Default run, host only: ``StackedPipelines``' per-replica clocks under the engine's own
loops, over a fake stacked tick (``StackedEcho``) whose tokens are checkable by hand.

Slow, in one process with 8 simulated CPU devices: ``Engine(dp=2, pp=2, tp=2)`` built as a
2-process run builds it (``jax.process_count`` patched while it is built), its
``Controller`` then told it is alone, serves ``test_parallel_dp``'s staggered requests
with an abort in flight. The greedy tokens must equal one device's plain ``Engine``,
both replicas' pipelines must have had ``pp`` micro-batches in flight with rows in the
same stacked ticks, each replica's pages must sit on its own four devices, and every page
must be back in both pools.

Across processes (slow): ``energon launch`` starts 2 processes x 4 CPU devices, each builds
``Engine(dp=2, pp=2, tp=2)`` (replica 0 on process 0's devices, replica 1 on process 1's);
process 0 drives the same staggered run with an abort, process 1 serves the broadcast
ticks. Same checks, plus: the worker ran every stacked tick and made no device sync.

Both slow runs also build a second engine with a pool too small for every running
sequence (across processes: a second controller in the same run): requests are
preempted and recomputed, with the same tokens and every page back.
"""

from __future__ import annotations

import json
import sys

import pytest

from process_harness import HERE, ROOT, launch_children, lead_or_serve, run_child, write_result
from test_replica_step import _child_base, _replica_devices
LAYOUT = dict(dp=2, pp=2, tp=2)
PREEMPT_PAGES = 9  # per replica: fewer than its 3 running sequences need, so some are preempted


def _check(case: dict, base: dict) -> None:
    """``case``: a dp=2 x pp=2 x tp=2 run of ``_run_case``; ``base``: one device's tokens."""
    base = base["tokens"]
    assert case["tokens"] == base, case  # staggered arrivals: every replica's rows its own
    ab = case["abort"]
    rid = ab["rid"]
    assert ab["replica"] == 1 and ab["finish_reason"] == "abort", ab
    assert ab["tokens"][rid] == base[rid][: len(ab["tokens"][rid])] and len(ab["tokens"][rid]) < len(base[rid]), ab
    assert {k: v for k, v in ab["tokens"].items() if k != rid} == {k: v for k, v in base.items() if k != rid}
    assert case["pages_used"] == [0, 0] and ab["pages_used"] == [0, 0], case
    assert case["max_in_flight"] == [2, 2], case  # each replica's pipeline held pp micro-batches at once
    assert all(r > 0 for r in case["rows"]), case  # both replicas ran rows...
    assert case["shared_ticks"] > 0, case  # ...in the same stacked tick
    kv = [set(d) for d in case["kv_devices"]]  # each replica's pages on its own pp * tp devices
    assert [len(d) for d in kv] == [4, 4] and not kv[0] & kv[1], case
    small = case["preempt"]  # a small pool: preempted requests recompute to the same tokens
    assert small["tokens"] == base and small["preemptions"] > 0 and small["pages_used"] == [0, 0], small


@pytest.mark.slow  # default-run budget: ~100 s of compiles (4 stacked ticks); the host-only test runs by default
@pytest.mark.timeout(600)
def test_replica_pipeline_one_process_matches_single_device():
    out = run_child(__file__, "local", devices=8)
    _check(out["case"], out["base"])
    assert out["case"]["runner"] == "StackedPipelines"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_dp2_pp2_tp2_across_two_processes_matches_single_device(tmp_path):
    base = run_child(__file__, "base", devices=1)["base"]
    got, worker = launch_children(__file__, "multi", tmp_path, devices_per_process=4)
    assert got["process_count"] == 2 and got["device_count"] == 8
    _check(got["case"], base)
    assert got["case"]["kv_processes"] == [[0], [1]], got  # replica r's pages on process r's devices
    assert worker["steps"] == got["steps"] > 0  # the worker ran every stacked tick
    # a worker waits for each step's header, each load's (joining rows' page tables) and the stop
    assert worker["stats"]["loads"] == got["stats"]["loads"] > 0, (got, worker)
    assert worker["stats"]["fetch_syncs"] == 0
    assert worker["stats"]["kv_waits"] == worker["steps"] + worker["stats"]["loads"] + 1, worker
    assert worker["preempt_steps"] == got["preempt_steps"] > 0  # ...and every tick of the second controller


class StackedEcho:
    """A fake stacked tick over one ``PagedEcho`` per replica: each replica's micro-batch is
    computed as it enters (so its pages are read and written in entry order, as the stages do)
    and its ids come out ``pp - 1`` ticks later, as the real tick's last stage hands them on."""

    def __init__(self, models: list, pp: int) -> None:
        from types import SimpleNamespace

        self.models, self.pp = models, pp
        self.ring: list[list] = [[None] * pp for _ in models]  # per replica: outputs in flight
        self.ticks = 0
        row = SimpleNamespace(request=SimpleNamespace(request_id=""), sample=True)
        self._plan = lambda b: SimpleNamespace(rows=[row] * b)  # PagedEcho reads ids only to force some

    num_compiles = 0
    kv_cache = ()

    def step_async(self, stacked):
        import jax
        import numpy as np

        from energon_jax.runner import StepHandle

        self.ticks += 1
        b = np.shape(stacked.logits_indices)[1]
        leaving = []
        for r, model in enumerate(self.models):
            batch = jax.tree.map(lambda a: np.asarray(a)[r], stacked)
            self.ring[r] = [model.step(batch, self._plan(b)), *self.ring[r][:-1]]
            out = self.ring[r][-1]
            ids = np.zeros(b, np.int32)
            if out is not None:
                n = min(b, len(out.token_ids))
                ids[:n] = out.token_ids[:n]
            leaving.append(ids)
        ids = np.stack(leaving)
        zeros = np.zeros((len(self.models), b, 20), np.float32)
        return StepHandle((ids, ids.astype(np.float32), zeros.astype(np.int32), zeros))


def test_stacked_pipelines_clocks_host_only():
    """``StackedPipelines`` under the engine's own loops (``DataParallelStepLoop`` over a
    ``PipelineStepLoop`` per replica, pp=2) with a fake stacked tick: one stacked tick per engine step,
    every request gets the fake model's reference tokens, both replicas ran rows in shared
    ticks with pp micro-batches in flight, and every page is back in both pools."""
    import random

    from energon_jax.parallel.data_parallel import DataParallelScheduler, DataParallelStepLoop
    from energon_jax.parallel.pipeline import PipelineStepLoop
    from energon_jax.parallel.replica_pipeline import StackedPipelines
    from energon_jax.scheduler import SchedulerConfig
    from scheduler_fakes import make
    from test_parallel_pipeline import echo_requests
    from test_scheduler import VOCAB, reference

    pp = 2
    cfg = SchedulerConfig(max_num_seqs=3, max_num_batched_tokens=16, max_model_len=40, page_size=4, num_pages=30)
    made = [make(cfg) for _ in range(2)]
    buckets = made[0][1]
    fake = StackedEcho([model for _, _, model in made], pp)
    group = StackedPipelines(fake, 2, pp, buckets)
    dps = DataParallelScheduler([sched for sched, _, _ in made])
    loop = DataParallelStepLoop(dps, group,
                                make_loop=lambda s, r: PipelineStepLoop(s, r, buckets, lambda deltas: list(deltas)))
    requests = echo_requests(random.Random(7), 12, VOCAB)
    got: dict[str, list[int]] = {r.request_id: [] for r, _ in requests}
    step = 0
    while step < 8 or dps.has_work() or not all(v.empty for v in group.replicas):
        for r, arrive in requests:
            if arrive == step:
                dps.add(r)
        ticks = fake.ticks
        for d in loop.step({r.request_id for r, a in requests if a <= step and not r.finished}):
            got[d.request.request_id].extend(d.new_token_ids)
        assert fake.ticks - ticks <= 1  # every replica's tick in one stacked tick
        step += 1
        assert step < 500
    assert [v.stats.max_in_flight for v in group.replicas] == [pp, pp]
    assert all(c.rows > 0 for c in group.stats.replicas) and group.shared_ticks > 0
    assert group.steps == fake.ticks and not group._done  # every leaving micro-batch was read
    assert dps.pages_used == 0 and not loop.busy()
    for r, _ in requests:
        assert (r.output_token_ids, r.finish_reason) == reference(r.prompt_token_ids, r.params)
        assert got[r.request_id] == r.output_token_ids


# ----------------------------------------------------------------- the children


def _run_case(engine) -> dict:
    from test_parallel_dp import _staggered

    runner, sched = engine.runner, engine.scheduler
    runner.reset_stats()
    run = _staggered(engine)
    st = runner.stats
    devices = _replica_devices(runner)
    case = {"runner": type(runner).__name__, "tokens": run["tokens"], "steps": run["steps"],
            "rows": [c.rows for c in st.replicas], "shared_ticks": runner.shared_ticks,
            "max_in_flight": [v.stats.max_in_flight for v in runner.replicas],
            "pages_used": [s.pages_used for s in sched.replicas],
            "kv_devices": [[d.id for d in ds] for ds in devices],
            "kv_processes": [sorted({d.process_index for d in ds}) for ds in devices]}
    ab = _staggered(engine, abort_at=4)
    case["abort"] = {"rid": ab["abort"]["rid"], "replica": ab["abort"]["replica"],
                     "finish_reason": ab["abort"]["delta"]["finish_reason"], "tokens": ab["tokens"],
                     "pages_used": [s.pages_used for s in sched.replicas]}
    return case


def _small_engine():
    """``test_parallel_dp._engine(**LAYOUT)`` with a pool too small for every running sequence."""
    from energon_jax.engine import Engine
    from test_parallel_dp import MAX_NUM_SEQS
    from test_parallel_tp_models import build_model

    model, config = build_model("llama", num_hidden_layers=4)
    return Engine(model, config, None, max_model_len=32, page_size=4, kv_cache_pages=PREEMPT_PAGES,
                  max_num_seqs=MAX_NUM_SEQS, max_num_batched_tokens=16, **LAYOUT)


def _run_preempt(engine) -> dict:
    from test_parallel_dp import _staggered

    run = _staggered(engine)
    sched = engine.scheduler
    return {"tokens": run["tokens"], "preemptions": sum(s.num_preemptions for s in sched.replicas),
            "pages_used": [s.pages_used for s in sched.replicas]}


def _child_local() -> dict:
    from unittest import mock

    import jax

    from test_parallel_dp import _engine, _staggered

    run = _staggered(_engine())
    base = {"tokens": run["tokens"], "steps": run["steps"]}
    with mock.patch.object(jax, "process_count", lambda: 2):
        engine, small = _engine(**LAYOUT), _small_engine()
    for e in (engine, small):
        e.runner.step_runner.process_count = 1  # one process: the Controller runs the ticks itself
    case = _run_case(engine)
    case["preempt"] = _run_preempt(small)
    return {"base": base, "case": case}


def _child_multi(outdir: str) -> None:
    import dataclasses

    from energon_jax.parallel import distributed

    assert distributed.initialize_from_env()
    import jax

    from test_parallel_dp import _engine

    out = {"device_count": jax.device_count(), "process_count": jax.process_count()}
    # Two engines, one after the other, in one run: the second controller's headers must not
    # meet the first's (controller.HeaderChannel generations). Process 0 drives each ("steps":
    # the stacked ticks it dispatched), process 1 runs them.
    engine = _engine(**LAYOUT)
    controller = engine.runner.step_runner
    out.update(lead_or_serve(controller, lambda: {"case": _run_case(engine)}))
    out["stats"] = dataclasses.asdict(controller.stats)
    small = _small_engine()
    preempt = lead_or_serve(small.runner.step_runner, lambda: {"preempt": _run_preempt(small)})
    out["preempt_steps"] = preempt["steps"]
    if "case" in out:
        out["case"]["preempt"] = preempt["preempt"]
    write_result(outdir, out)


if __name__ == "__main__":
    sys.path[:0] = [ROOT, HERE]
    mode = sys.argv[1]
    if mode == "base":
        print(json.dumps(_child_base()))
    elif mode == "local":
        print(json.dumps(_child_local()))
    else:
        _child_multi(sys.argv[2])
