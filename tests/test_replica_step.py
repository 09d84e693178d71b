"""``parallel/replica_step.py``: ``dp`` replicas in one SPMD step (how ``dp`` runs across processes).

In one process with 4 simulated CPU devices (default run): the replica step over a
``(dp=2, 1, tp=2)`` mesh, driven through ``StackedReplicas`` by the engine's own
``DataParallelScheduler`` and ``DataParallelStepLoop``, serves ``test_parallel_dp``'s
staggered requests (more than one replica holds) with an abort in flight; the greedy
tokens must equal one device's plain ``Engine``, both replicas must have run rows in
shared steps, each replica's pages must sit on its own two devices, and every page must
be back in both pools.

Across processes (slow): ``energon launch`` starts 2 processes x 2 CPU devices, each builds
``Engine(dp=2, tp=2)`` (replica 0 on process 0's devices, replica 1 on process 1's);
process 0 drives the same staggered run with an abort, process 1 serves the broadcast
steps. Same checks, plus: the worker ran every stacked step process 0 dispatched.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest

from process_harness import HERE, ROOT, launch_children, lead_or_serve, run_child, write_result


def _check(case: dict, base: dict) -> None:
    """``case``: a dp=2 x tp=2 run of ``_run_case``; ``base``: one device's tokens and engine steps."""
    case = {**case, "base_steps": base["steps"]}
    base = base["tokens"]
    assert case["tokens"] == base, case  # staggered arrivals: every replica's rows its own
    ab = case["abort"]
    rid = ab["rid"]
    assert ab["replica"] == 1 and ab["finish_reason"] == "abort", ab
    assert ab["tokens"][rid] == base[rid][: len(ab["tokens"][rid])] and len(ab["tokens"][rid]) < len(base[rid]), ab
    assert {k: v for k, v in ab["tokens"].items() if k != rid} == {k: v for k, v in base.items() if k != rid}
    assert case["pages_used"] == [0, 0] and ab["pages_used"] == [0, 0], case
    assert all(r > 0 for r in case["rows"]), case  # both replicas ran rows...
    assert case["shared_steps"] > 0, case  # ...in the same stacked step
    assert case["steps"] < case["base_steps"], case  # so fewer engine steps than one device: dp adds rows
    kv = [set(d) for d in case["kv_devices"]]  # each replica's pool on its own two devices
    assert [len(d) for d in kv] == [2, 2] and not kv[0] & kv[1], case


def test_replica_step_one_process_matches_single_device():
    out = run_child(__file__, "local", devices=4)
    _check(out["case"], out["base"])
    assert out["case"]["runner"] == "StackedReplicas"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_dp2_tp2_across_two_processes_matches_single_device(tmp_path):
    base = run_child(__file__, "base", devices=1)["base"]
    got, worker = launch_children(__file__, "multi", tmp_path, devices_per_process=2)
    assert got["process_count"] == 2 and got["device_count"] == 4
    _check(got["case"], base)
    assert got["case"]["runner"] == "StackedReplicas"
    assert got["case"]["kv_processes"] == [[0], [1]], got  # replica r's pages on process r's devices
    assert worker["steps"] == got["steps"] > 0  # the worker ran every stacked step


# ----------------------------------------------------------------- the children


def _replica_devices(runner) -> list[list[Any]]:
    """The devices holding each replica's slice of the stacked pages (replicas on the first axis:
    ``[dp, P, S, K, H]`` here, ``[dp, slots, P, S, K, H]`` in ``test_replica_pipeline``)."""
    import jax

    leaf = jax.tree.leaves(runner.step_runner.kv_cache)[0]
    dp = leaf.shape[0]
    held: list[set[Any]] = [set() for _ in range(dp)]
    for device, index in leaf.sharding.devices_indices_map(leaf.shape).items():
        for r in range(*index[0].indices(dp)):
            held[r].add(device)
    return [sorted(held[r], key=lambda d: d.id) for r in range(dp)]


def _run_case(engine) -> dict:
    from test_parallel_dp import _staggered

    runner, sched = engine.runner, engine.scheduler
    runner.reset_stats()
    run = _staggered(engine)
    st = runner.stats  # per replica: the device batches, rows and tokens its StepLoop sent
    case = {"runner": type(runner).__name__, "tokens": run["tokens"], "steps": run["steps"], "rows": [c.rows for c in st.replicas],
            "shared_steps": runner.shared_steps, "pages_used": [s.pages_used for s in sched.replicas],
            "kv_devices": [[d.id for d in ds] for ds in _replica_devices(runner)],
            "kv_processes": [sorted({d.process_index for d in ds}) for ds in _replica_devices(runner)]}
    ab = _staggered(engine, abort_at=4)
    case["abort"] = {"rid": ab["abort"]["rid"], "replica": ab["abort"]["replica"],
                     "finish_reason": ab["abort"]["delta"]["finish_reason"], "tokens": ab["tokens"],
                     "pages_used": [s.pages_used for s in sched.replicas]}
    return case


def _child_base() -> dict:
    from test_parallel_dp import _engine, _staggered

    run = _staggered(_engine())
    return {"base": {"tokens": run["tokens"], "steps": run["steps"]}}


def _child_local() -> dict:
    """The replica step in one process: ``Engine(dp=2, tp=2)`` built as a 2-process run builds it
    (``jax.process_count`` patched while it is built), its Controller then told it is alone."""
    from unittest import mock

    import jax

    from test_parallel_dp import _engine, _staggered

    run = _staggered(_engine())
    base = {"tokens": run["tokens"], "steps": run["steps"]}
    with mock.patch.object(jax, "process_count", lambda: 2):
        engine = _engine(dp=2, tp=2)
    engine.runner.step_runner.process_count = 1  # one process: the Controller runs the steps itself
    return {"base": base, "case": _run_case(engine)}


def _child_multi(outdir: str) -> None:
    from energon_jax.parallel import distributed

    assert distributed.initialize_from_env()
    import jax

    from test_parallel_dp import _engine

    engine = _engine(dp=2, tp=2)
    out = {"device_count": jax.device_count(), "process_count": jax.process_count()}
    # process 0 drives the run ("steps": the stacked steps it dispatched); process 1 runs them
    out.update(lead_or_serve(engine.runner.step_runner, lambda: {"case": _run_case(engine)}))
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
