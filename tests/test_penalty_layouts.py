"""Penalties on every layout: counts on the device in one process, and a history uploaded only
in a step that has a penalty row where the batch still carries one (across processes).

Host only: ``batch.pack`` gives a step without a penalty row a zero-width history and a step
with one the full ``[B, max_model_len]`` width, through both packers; every width is a
warm-up shape.

In a child with 8 simulated CPU devices the same random 2-layer Llama runs a staggered mix
(random prompts, fixed seeds; greedy and seeded sampling, with and without repetition,
presence and frequency penalties; penalty rows join late and leave early, so many steps
have none) on one device (``ModelRunner`` with device tables) and on:

- the pipeline (pp=2) and the disaggregated engine in one process (the slow run adds
  offloading, pp x tp and dp x pp): device penalty tables, and no batch carries a history;
- the pipeline as a multi-process engine packs it (``device_penalties`` false; the slow run
  adds pp x tp, offloading and tp): the history travels only in a step that has a penalty
  row, zero width otherwise, and no shape compiles after warm-up.

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
# The default run keeps three engines (test_parallel_engine's layouts also run offload and
# pp x tp with penalty rows against one device); the slow run adds the others.
LAYOUTS = {
    "default": [("device", dict(pp=2)), ("device", dict(prefill_devices=1, decode_devices=1)),
                ("history", dict(pp=2))],
    "more": [("device", dict(offload="host", resident_layers=1)), ("device", dict(pp=2, tp=2)),
             ("device", dict(dp=2, pp=2)), ("history", dict(pp=2, tp=2)),
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
        widths = case["widths"]  # per packed batch: [history width, whether a row uses a penalty]
        assert any(p for _, p in widths) and any(not p for _, p in widths), case  # both kinds of step ran
        if mode == "device":
            assert case["history_len"] == 0 and case["tables"], case
            assert all(w == 0 for w, _ in widths), case
        else:
            assert case["history_len"] == MAX_MODEL_LEN and not case["tables"], case
            assert all(w == (MAX_MODEL_LEN if p else 0) for w, p in widths), case
            assert case["compiles_after_warmup"] == 0, case


def test_penalties_on_every_layout_equal_one_device(default_run):
    _check(default_run, "default")


@pytest.mark.slow
def test_penalties_on_more_layouts_equal_one_device():
    _check(run_child(__file__, "more"), "more")


# ----------------------------------------------------------------- the child
def _mix():
    """Random prompts (fixed seed) and their parameters; penalty rows arrive late and stop early."""
    from energon_jax.request import SamplingParams

    rng = np.random.default_rng(2024)
    lengths = [9, 3, 21, 6, 13, 4]
    prompts = [rng.integers(3, 96, n).tolist() for n in lengths]
    params = [
        SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=10, temperature=0.9, seed=7, ignore_eos=True),
        SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, repetition_penalty=1.7),
        SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, presence_penalty=0.9, frequency_penalty=0.6),
        SamplingParams(max_tokens=5, temperature=0.8, top_k=20, seed=3, ignore_eos=True, repetition_penalty=1.4,
                       frequency_penalty=0.3),
        SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True),
    ]
    arrivals = [0, 0, 3, 4, 4, 6]
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


def _recorded(engine) -> list[list]:
    """Wrap every step loop's packer; returns the list each packed batch appends to."""
    seen: list[list] = []
    loop = engine._loop
    loops = [x for x in (getattr(loop, "prefill", None), getattr(loop, "decode", None)) if x is not None]
    for one in loops or getattr(loop, "loops", [loop]):
        pack = one._pack_batch

        def recording(plan, buckets, *args, _pack=pack, **kw):
            batch = _pack(plan, buckets, *args, **kw)
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

    from energon_jax.engine import Engine
    from energon_jax.parallel import runtime
    from test_parallel_tp_models import build_model

    prompts, params, arrivals = _mix()

    def engine(warmup=False, **layout):  # warm-up compiles every shape: only where compiles are counted
        model, config = build_model("llama", num_hidden_layers=2)
        return model, Engine(model, config, None, max_model_len=MAX_MODEL_LEN, page_size=4, kv_cache_pages=40,
                             max_num_seqs=4, max_num_batched_tokens=16, warmup=warmup, **layout)

    t0 = time.perf_counter()
    model, one = engine()
    base = _run(one, prompts, params, arrivals)
    fwd = jax.jit(lambda ids, pos, seg: model(ids, pos, seg)[0])
    greedy_pen = [i for i, p in enumerate(params) if p.temperature == 0 and p.uses_penalties]
    out = {"base": base, "base_greedy_penalized": [base[i] for i in greedy_pen],
           "reference": [_penalized_greedy(fwd, prompts[i], params[i]) for i in greedy_pen], "cases": [],
           "s": round(time.perf_counter() - t0, 1)}
    on_device = runtime.device_penalties
    for mode, layout in LAYOUTS[group]:
        # "history": the batches a multi-process engine packs (its workers keep no tables)
        runtime.device_penalties = on_device if mode == "device" else (lambda options: False)
        try:
            _, eng = engine(warmup=mode == "history", **layout)
        finally:
            runtime.device_penalties = on_device
        widths = _recorded(eng)
        compiles = eng.runner.num_compiles
        tokens = _run(eng, prompts, params, arrivals)
        runners = getattr(eng.runner, "replicas", None) or [getattr(eng.runner, "pipeline", eng.runner)]
        out["cases"].append({
            "case": [mode, layout], "tokens": tokens, "widths": widths, "history_len": eng.buckets.history_len,
            "tables": all(getattr(r, "penalty_tables", None) is not None for r in runners),
            "compiles_after_warmup": eng.runner.num_compiles - compiles, "s": round(time.perf_counter() - t0, 1),
        })
    return out


if __name__ == "__main__":
    sys.path[:0] = [ROOT, HERE]
    print(json.dumps(_child(sys.argv[1])))
