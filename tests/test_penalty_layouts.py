"""Penalties on every layout: counts on the device, in one process and across processes.

Host only: ``batch.pack`` gives a step without a penalty row a zero-width history and a step
with one the full ``[B, max_model_len]`` width, through both packers, for buckets without
device tables (a runner built without them, as the tests' reference); every width is a
warm-up shape; with device tables no batch carries a history.

In a child with 8 simulated CPU devices the same random 2-layer Llama runs a staggered mix
(random prompts, fixed seeds; greedy and seeded sampling, with and without repetition,
presence and frequency penalties; penalty rows join late and leave early, so many steps
have none; a late prompt shares a cached prefix, so its slot is rebuilt on the host and
loaded) on one device (``ModelRunner`` with device tables) and on:

- the disaggregated engine in one process (the slow run adds the pipeline, offloading,
  tp, pp x tp and dp x pp): device penalty tables, and no batch carries a history;
- (slow) "history": batches that carry each penalty row's history instead of tables, the
  history only in a step that has a penalty row;
- (slow) across 2 processes (tp, pp x tp, and the stacked dp x tp and dp x pp replicas):
  tables on every process, no history in any step, every load broadcast.

Every layout's tokens equal the one-device engine's, and the greedy penalty rows equal an
independent reference (a cache-less forward with the penalties applied in numpy over the
whole history).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time

import numpy as np
import pytest

from test_parallel_mesh import ROOT, run_child

HERE = os.path.dirname(os.path.abspath(__file__))
MAX_MODEL_LEN = 48


# -- host only ---------------------------------------------------------------------------
def test_history_width_follows_the_step():
    from energon_jax.batch import Buckets, pack, warmup_batches
    from energon_jax.host_rows import HostRows
    from energon_jax.request import Request, SamplingParams
    from energon_jax.scheduler import ScheduledRow, StepPlan

    buckets = Buckets.create(max_num_batched_tokens=16, max_num_seqs=4, max_model_len=MAX_MODEL_LEN, page_size=4)
    assert buckets.history_widths() == (MAX_MODEL_LEN, 0)
    assert {(b.num_tokens_bucket, b.num_rows_bucket, b.sampling.history.shape[1]) for b in warmup_batches(buckets)} \
        == {(t, r, h) for t, r in buckets.all_shapes() for h in (MAX_MODEL_LEN, 0)}
    rng = np.random.default_rng(11)

    def req(rid, n, **kw):
        r = Request(rid, rng.integers(3, 90, n).tolist(), SamplingParams(max_tokens=4, **kw))
        r.pages = list(range(1 + 4 * int(rid[-1]), 1 + 4 * int(rid[-1]) + -(-n // 4)))
        return r

    plain, pen = req("r1", 5), req("r2", 7, repetition_penalty=1.3)
    host = HostRows(buckets, 4)
    for rows, width in (([plain], 0), ([plain, pen], MAX_MODEL_LEN)):
        plan = StepPlan([ScheduledRow(r, list(r.prompt_token_ids), 0, True) for r in rows])
        for batch in (pack(plan, buckets), pack(plan, buckets, host_rows=host)):
            assert batch.sampling.history.shape == (batch.num_rows_bucket, width)
            if width:  # the penalty row's prompt, the other row's -1s
                np.testing.assert_array_equal(batch.sampling.history[1, :7], pen.prompt_token_ids)
                assert np.all(batch.sampling.history[1, 7:] == -1) and np.all(batch.sampling.history[0] == -1)
    # device tables: never a history
    on_device = Buckets.create(max_num_batched_tokens=16, max_num_seqs=4, max_model_len=MAX_MODEL_LEN, page_size=4,
                               penalty_tables=True)
    assert on_device.history_widths() == (0,)
    plan = StepPlan([ScheduledRow(pen, list(pen.prompt_token_ids), 0, True)])
    assert pack(plan, on_device).sampling.history.shape == (4, 0)
    with pytest.raises(ValueError, match=re.escape("history_len=-1 must be >= 0")):
        Buckets((16,), 4, 4, 8, -1)


# -- engines on 8 simulated devices -------------------------------------------------------
# The default run keeps one engine besides one device's (test_parallel_engine's default
# layouts run the pipeline, offload and pp x tp, device tables, with penalty rows against one
# device); the slow run adds the others.
LAYOUTS = {
    "default": [("device", dict(prefill_devices=1, decode_devices=1))],
    "more": [("device", dict(pp=2)), ("device", dict(offload="host", resident_layers=1)),
             ("device", dict(pp=2, tp=2)), ("device", dict(dp=2, pp=2)), ("device", dict(tp=2)),
             ("history", dict(pp=2)),
             ("history", dict(offload="host", resident_layers=1)), ("history", dict(tp=2))],
}


@pytest.fixture(scope="module")
def default_run():
    return run_child(__file__, "default")


def _check(out, group):
    base = out["base"]
    assert out["reference"] == out["base_greedy_penalized"]  # one device == numpy reference
    assert [[m, layout] for m, layout in LAYOUTS[group]] == [c["case"] for c in out["cases"]]
    for case in out["cases"]:
        mode, _ = case["case"]
        assert case["tokens"] == base, case
        # per packed batch: [history width, whether a row uses a penalty, whether a row's slot is rebuilt in it]
        widths = case["widths"]
        assert any(p for _, p in widths) and any(not p for _, p in widths), case  # both kinds of step ran
        if mode == "device":
            assert case["history_len"] == 0 and case["tables"], case
            assert all(w == 0 for w, _ in widths), case
            if "decode_devices" in case["case"][1]:  # a moved request's slot is rebuilt on the decode group
                assert case["rebuilds"] > 0, case
        else:  # stacked replicas across processes: no tables, the history in a step with a penalty row
            assert case["history_len"] == MAX_MODEL_LEN and not case["tables"], case
            assert all(w == (MAX_MODEL_LEN if p else 0) for w, p in widths), case
        if mode != "device":
            assert case["compiles_after_warmup"] == 0, case


def test_penalties_on_every_layout_equal_one_device(default_run):
    _check(default_run, "default")


@pytest.mark.slow
def test_penalties_on_more_layouts_equal_one_device():
    _check(run_child(__file__, "more"), "more")


# 2 processes x 2 devices: the layout's engine options and the runner the engine drives
MULTI = {"pp": ({"pp": 2, "tp": 2}, "PipelineController"), "tp": ({"tp": 4}, "Controller"),
         "dp": ({"dp": 2, "tp": 2}, "StackedReplicas"), "dp-pp": ({"dp": 2, "pp": 2}, "StackedPipelines")}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(MULTI))
def test_penalties_across_two_processes(tmp_path, layout):
    """2 processes x 2 devices (pp=2 x tp=2: the PipelineController; tp=4: the Controller; the
    stacked replicas of dp=2 x tp=2 and dp=2 x pp=2, one replica per process): device tables
    on every process, no step carries a history; the rebuilt slot and every joining row's
    page table go to every process in a broadcast load."""
    from process_harness import launch_children

    base = run_child(__file__, "base", devices=1)["base"]
    got, worker = launch_children(__file__, f"multi-{layout}", tmp_path, devices_per_process=2)
    assert got["tokens"] == base
    assert got["runner"] == worker["runner"] == MULTI[layout][1]
    assert got["tables"] and worker["tables"] and got["history_len"] == 0 and got["rebuilds"] > 0
    assert all(w == 0 for w, _ in got["widths"]), got  # no step carries a history
    assert worker["steps"] == got["steps"] > 0
    # the rebuilt slot and every joining row's page table went to each process in a broadcast load
    assert worker["loads"] == got["loads"] > got["rebuilds"], (got, worker)


# ----------------------------------------------------------------- the child
def _mix():
    """Random prompts (fixed seed) and their parameters; penalty rows arrive late and stop early."""
    from energon_jax.request import SamplingParams

    rng = np.random.default_rng(2024)
    lengths = [9, 3, 21, 6, 13, 4]
    prompts = [rng.integers(3, 96, n).tolist() for n in lengths]
    # shares 3 pages with prompt 2 and arrives late: a prefix-cache hit, so its slot is rebuilt
    prompts.append(prompts[2][:12] + rng.integers(3, 96, 5).tolist())
    params = [
        SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=10, temperature=0.9, seed=7, ignore_eos=True),
        SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, repetition_penalty=1.7),
        SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, presence_penalty=0.9, frequency_penalty=0.6),
        SamplingParams(max_tokens=5, temperature=0.8, top_k=20, seed=3, ignore_eos=True, repetition_penalty=1.4,
                       frequency_penalty=0.3),
        SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, repetition_penalty=1.3, frequency_penalty=0.4),
    ]
    arrivals = [0, 0, 3, 4, 4, 6, 12]
    return prompts, params, arrivals


def _run(engine, prompts, params, arrivals) -> list[list[int]]:
    rids: dict[int, str] = {}
    tokens: dict[str, list[int]] = {}
    step = 0
    while len(rids) < len(prompts) or engine.has_unfinished():
        for i, at in enumerate(arrivals):
            if at == step:
                rids[i] = engine.add_request(prompts[i], params[i], request_id=f"r{i}")
        for delta in engine.step():
            tokens.setdefault(delta.request_id, []).extend(int(x) for x in delta.token_ids)
        step += 1
    return [tokens[rids[i]] for i in range(len(prompts))]


def _loops(engine) -> list:
    """The engine's step loops (a disaggregated engine's two groups, dp replicas, or the one)."""
    loop = engine._loop
    groups = [x for x in (getattr(loop, "prefill", None), getattr(loop, "decode", None)) if x is not None]
    return groups or getattr(loop, "loops", [loop])


def _recorded(engine) -> list[list]:
    """Wrap every step loop's packer; returns the list each packed batch appends to."""
    seen: list[list] = []
    for one in _loops(engine):
        pack = one._pack_batch

        def recording(plan, buckets, penalty=None, *args, _pack=pack, **kw):
            batch = _pack(plan, buckets, penalty, *args, **kw)
            seen.append([int(batch.sampling.history.shape[1]),
                         any(row.request.params.uses_penalties for row in plan.rows)])
            return batch

        one._pack_batch = recording
    return seen


def _penalized_greedy(fwd, prompt, params) -> list[int]:
    """Cache-less greedy with the penalties applied in numpy over the whole history each token;
    ``fwd(ids, positions, segment_ids) -> logits [T, V]``, the model without any cache."""
    import jax.numpy as jnp

    ids, out = list(prompt), []
    for _ in range(params.max_tokens):
        n = len(ids)
        arr = np.zeros(MAX_MODEL_LEN, np.int32)
        arr[:n] = ids
        seg = np.where(np.arange(MAX_MODEL_LEN) < n, 0, -1).astype(np.int32)
        logits = np.asarray(fwd(jnp.asarray(arr), jnp.arange(MAX_MODEL_LEN, dtype=jnp.int32),
                                jnp.asarray(seg)))[n - 1].astype(np.float64)
        rp = params.repetition_penalty
        for tok in set(ids):
            logits[tok] = logits[tok] / rp if logits[tok] > 0 else logits[tok] * rp
        for tok in set(out):
            logits[tok] -= params.frequency_penalty * out.count(tok) + params.presence_penalty
        out.append(int(logits.argmax()))
        ids.append(out[-1])
    return out


def _child(group: str) -> dict:
    import jax

    from energon_jax.batch import Buckets
    from energon_jax.parallel import runtime

    prompts, params, arrivals = _mix()
    engine = _engine
    t0 = time.perf_counter()
    model, one = engine()
    base = _run(one, prompts, params, arrivals)
    fwd = jax.jit(lambda ids, pos, seg: model(ids, pos, seg)[0])
    greedy_pen = [i for i, p in enumerate(params) if p.temperature == 0 and p.uses_penalties]
    out = {"base": base, "base_greedy_penalized": [base[i] for i in greedy_pen],
           "reference": [_penalized_greedy(fwd, prompts[i], params[i]) for i in greedy_pen], "cases": [],
           "s": round(time.perf_counter() - t0, 1)}
    on_device, create = runtime.device_penalties, Buckets.create.__func__
    for mode, layout in LAYOUTS[group]:
        # "history": batches that carry each penalty row's history, no tables
        if mode == "history":
            Buckets.create = classmethod(lambda cls, **kw: create(cls, **{**kw, "penalty_tables": False}))
            runtime.device_penalties = lambda options: False
        try:
            _, eng = engine(warmup=mode != "device", **layout)
        finally:
            runtime.device_penalties, Buckets.create = on_device, classmethod(create)
        widths = _recorded(eng)
        compiles = eng.runner.num_compiles
        tokens = _run(eng, prompts, params, arrivals)
        runners = getattr(eng.runner, "replicas", None) or [getattr(eng.runner, "pipeline", eng.runner)]
        out["cases"].append({
            "case": [mode, layout], "tokens": tokens, "widths": widths, "history_len": eng.buckets.history_len,
            "tables": all(getattr(r, "penalty_tables", None) is not None for r in runners),
            "compiles_after_warmup": eng.runner.num_compiles - compiles,
            "rebuilds": sum(x._penalty.rebuilds for x in _loops(eng) if getattr(x, "_penalty", None) is not None), "s": round(time.perf_counter() - t0, 1),
        })
    return out


def _engine(warmup=False, **layout):
    """The child's engine (warm-up compiles every shape: only where compiles are counted)."""
    from energon_jax.engine import Engine
    from test_parallel_tp_models import build_model

    model, config = build_model("llama", num_hidden_layers=2)
    return model, Engine(model, config, None, max_model_len=MAX_MODEL_LEN, page_size=4, kv_cache_pages=40,
                         max_num_seqs=4, max_num_batched_tokens=16, warmup=warmup, **layout)


def _child_multi(mode: str, outdir: str) -> None:
    from energon_jax.parallel import distributed
    from process_harness import lead_or_serve, write_result

    assert distributed.initialize_from_env()
    _, eng = _engine(**MULTI[mode.removeprefix("multi-")][0])
    controller = getattr(eng.runner, "step_runner", eng.runner)  # the stacked replicas' Controller
    tables = controller.penalty_tables is not None and controller.page_table is not None

    def lead():
        widths = _recorded(eng)
        tokens = _run(eng, *_mix())
        return {"tokens": tokens, "widths": widths, "history_len": eng.buckets.history_len,
                "rebuilds": sum(x._penalty.rebuilds for x in _loops(eng) if getattr(x, "_penalty", None) is not None)}

    out = lead_or_serve(controller, lead)
    write_result(outdir, {"runner": type(eng.runner).__name__, "tables": tables,
                          "loads": controller.controller_stats.loads, **out})


if __name__ == "__main__":
    sys.path[:0] = [ROOT, HERE]
    if sys.argv[1].startswith("multi-"):
        _child_multi(sys.argv[1], sys.argv[2])
    elif sys.argv[1] == "base":
        prompts, params, arrivals = _mix()
        print(json.dumps({"base": _run(_engine()[1], prompts, params, arrivals)}))
    else:
        print(json.dumps(_child(sys.argv[1])))
