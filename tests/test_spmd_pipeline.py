"""parallel/spmd_pipeline.py: the pipeline as one SPMD program (one jitted tick), on 8 CPU devices.

A child process (8 simulated devices) drives ``SpmdPipelineRunner`` with the engine's own
``PipelineStepLoop`` and ``Scheduler``: requests arrive at staggered ticks, one is aborted
while its micro-batch is inside the pipeline, and the greedy tokens of every other request
must equal a single-device ``Engine`` (the plain runner; the aborted one's tokens are a prefix
of its reference). After the run every page is back in the pool, ``pp`` micro-batches were in
flight at once and every stage was busy. Uneven layer counts (identity slots) and ``pp x tp``
are covered; across 2 processes x 4 devices (``jax.distributed`` on 127.0.0.1) the same run
through ``PipelineController`` gives the same tokens.

Default run: one smoke (pp=2 over 5 layers, with an abort); the grid is ``@slow``.
"""

from __future__ import annotations

import json
import sys

import pytest

from process_harness import HERE, ROOT, launch_children, lead_or_serve, run_child, write_result

PROMPTS = [[5, 9, 13, 7, 22, 30, 31], [40, 41, 42], [17, 3, 88, 60, 12, 11, 10, 9, 8, 7, 6, 5, 4],
           [4, 4, 4], [70, 71, 72, 73, 74], [33], [61, 62, 63, 64, 65, 66, 67, 68, 69, 70]]
ARRIVE = [0, 0, 1, 3, 3, 6, 9]  # tick at which each prompt is added
MAX_TOKENS = 6
ABORT = ("r4", 2)  # (request, tokens): r4 is aborted at the first tick after it has 2 tokens


def _check(out: dict) -> None:
    for case in out["cases"]:
        want = case["reference"]
        for rid, toks in case["tokens"].items():
            if rid == ABORT[0]:
                assert toks == want[rid][: len(toks)] and ABORT[1] <= len(toks) < MAX_TOKENS, (case["name"], rid, toks)
            else:
                assert toks == want[rid], (case["name"], rid, toks, want[rid])
        assert case["pages_used"] == 0 and case["free_pages"] == case["num_pages"] - 1, case
        assert case["max_in_flight"] == case["pp"], case
        assert case["aborted_in_flight"], case  # its pages were freed with a micro-batch still inside
        assert all(b > 0 for b in case["busy"]), case
        assert case["entered"] == case["completed"] > 0, case
        assert case.get("compiles_after_warmup", 0) == 0, case


def test_spmd_pipeline_smoke_uneven_layers_abort():
    out = run_child(__file__, "run", "smoke")
    assert [c["name"] for c in out["cases"]] == ["pp2_l5"]
    _check(out)
    case = out["cases"][0]
    # 5 layers over 2 stages: slots [0, 1, 2 | 3, 4, -]; each stage's pages on its own devices
    assert case["layer_of_slot"] == [0, 1, 2, 3, 4, -1]
    assert case["kv_devices_disjoint"], case


@pytest.mark.slow
def test_spmd_pipeline_grid():
    out = run_child(__file__, "run", "grid")
    assert [c["name"] for c in out["cases"]] == ["pp4_l6", "pp2_tp2_l4", "pp4_l4_tp2"]
    _check(out)
    assert out["cases"][0]["layer_of_slot"] == [0, 1, 2, 3, 4, -1, 5, -1]
    assert all(c["kv_devices_disjoint"] for c in out["cases"])
    assert out["cases"][1]["kv_shard_heads"] == 1  # 2 KV heads split over tp=2


# Across 2 processes x 4 devices: pp=2 x tp=4 over 4 layers; pp=4 x tp=2 over 6 layers (uneven:
# identity slots, and the stages of one process hand activations to the other's).
MULTI = {"multi": ("multi_pp2_tp4", 2, 4, 4), "multi_pp4": ("multi_pp4_tp2_l6", 4, 2, 6)}


@pytest.mark.slow
@pytest.mark.parametrize("mode", sorted(MULTI))
def test_spmd_pipeline_two_processes(tmp_path, mode):
    name, pp, _, layers = MULTI[mode]
    want = run_child(__file__, "reference", str(layers), devices=1)["reference"]
    got, worker = launch_children(__file__, mode, tmp_path, devices_per_process=4)
    assert got["process_count"] == 2 and got["device_count"] == 8 and (got["name"], got["pp"]) == (name, pp)
    _check({"cases": [{**got, "reference": want}]})
    assert worker["steps"] == got["steps"] > 0  # the worker ran every tick process 0 planned


def test_stacking_refuses_layers_of_different_structure():
    from test_parallel_tp_models import build_model

    from energon_jax.parallel.pipeline_layout import SlotLayout, stack_layers
    from energon_jax.parallel.stages import decoder_parts

    model, _ = build_model("qwen2", num_hidden_layers=3, use_sliding_window=True, sliding_window=4,
                           max_window_layers=1)
    with pytest.raises(ValueError, match=r"layer 1 differs in structure from layer 0"):
        stack_layers(decoder_parts(model), SlotLayout(3, 2))
    assert SlotLayout(6, 4).layer_of_slot == [0, 1, 2, 3, 4, -1, 5, -1]


# ----------------------------------------------------------------- the children

CASES = {
    "smoke": [("pp2_l5", 2, 1, 5)],
    "grid": [("pp4_l6", 4, 1, 6), ("pp2_tp2_l4", 2, 2, 4), ("pp4_l4_tp2", 4, 2, 4)],
}
ENGINE = dict(max_model_len=32, page_size=4, kv_cache_pages=40, max_num_seqs=4, max_num_batched_tokens=8,
              min_token_bucket=4)


def _params():
    from energon_jax.request import SamplingParams

    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)


def reference(layers: int) -> dict:
    """Every prompt's greedy tokens from a single-device Engine (the plain runner)."""
    from energon_jax.engine import Engine
    from test_parallel_tp_models import build_model

    model, config = build_model("llama", num_hidden_layers=layers)
    engine = Engine(model, config, None, **ENGINE)
    outs = engine.generate(PROMPTS, _params(), use_tqdm=False)
    return {f"r{i}": list(map(int, o.token_ids)) for i, o in enumerate(outs)}


def drive(runner, buckets, *, num_pages: int) -> dict:
    """The engine's pipeline loop over ``runner``: staggered arrivals, one abort."""
    from energon_jax.parallel.pipeline import PipelineStepLoop
    from energon_jax.request import Request
    from energon_jax.scheduler import Scheduler, SchedulerConfig

    sched = Scheduler(SchedulerConfig(max_num_seqs=ENGINE["max_num_seqs"],
                                      max_num_batched_tokens=ENGINE["max_num_batched_tokens"],
                                      max_model_len=ENGINE["max_model_len"], page_size=ENGINE["page_size"],
                                      num_pages=num_pages))
    # process: the scheduler deltas of one run as they are (a list; one delta in older loops)
    loop = PipelineStepLoop(sched, runner, buckets, lambda ds: list(ds) if isinstance(ds, list) else [ds])
    requests = [Request(f"r{i}", p, _params()) for i, p in enumerate(PROMPTS)]
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
    tick, aborted_in_flight = 0, None
    while tick <= max(ARRIVE) or sched.has_work() or loop.busy() or loop.on_device:
        for r, at in zip(requests, ARRIVE):
            if at == tick:
                sched.add(r)
        victim = requests[int(ABORT[0][1:])]
        if not victim.finished and len(tokens[ABORT[0]]) >= ABORT[1]:
            sched.abort(ABORT[0])  # its next micro-batch is usually inside the pipeline now
            aborted_in_flight = any(row.request is victim for tag in runner.in_flight_tags for row in tag.rows)
        live = {r.request_id for r, at in zip(requests, ARRIVE) if at <= tick and not r.finished}
        for delta in loop.step(live):
            tokens[delta.request.request_id].extend(int(t) for t in delta.new_token_ids)
        tick += 1
        assert tick < 400, "the pipeline did not drain"
    st = runner.stats
    return {"tokens": tokens, "pages_used": sched.pages_used, "free_pages": sched.allocator.num_free,
            "num_pages": num_pages, "max_in_flight": st.max_in_flight, "busy": st.busy, "entered": st.entered,
            "completed": st.completed, "ticks": st.ticks, "aborted_in_flight": aborted_in_flight}


def _buckets():
    from energon_jax.batch import Buckets

    return Buckets.create(max_num_batched_tokens=ENGINE["max_num_batched_tokens"],
                          max_num_seqs=ENGINE["max_num_seqs"], max_model_len=ENGINE["max_model_len"],
                          page_size=ENGINE["page_size"], min_tokens=ENGINE["min_token_bucket"],
                          penalty_tables=True)  # no penalty rows here: one history width (0), half the compiles


def build_runner(pp: int, tp: int, layers: int, devices=None):
    import jax.numpy as jnp

    from energon_jax.batch import warmup_batches
    from energon_jax.parallel.mesh import make_mesh, sharding_rules
    from energon_jax.parallel.options import ParallelOptions
    from energon_jax.parallel.spmd_pipeline import SpmdPipelineRunner
    from energon_jax.parallel.stages import decoder_parts
    from test_parallel_tp_models import build_model

    model, config = build_model("llama", num_hidden_layers=layers)
    mesh = make_mesh(ParallelOptions(pp=pp, tp=tp), devices)
    rules = sharding_rules(tp, num_kv_heads=config.num_kv_heads)
    buckets = _buckets()
    runner = SpmdPipelineRunner(decoder_parts(model), mesh, rules, num_pages=ENGINE["kv_cache_pages"],
                                page_size=ENGINE["page_size"], buckets=buckets, kv_dtype=jnp.float32)
    return runner, buckets, warmup_batches(buckets)


def _child(group: str) -> dict:
    refs: dict[int, dict] = {}
    cases = []
    for name, pp, tp, layers in CASES[group]:
        if layers not in refs:
            refs[layers] = reference(layers)
        runner, buckets, templates = build_runner(pp, tp, layers)
        runner.warmup(templates)
        compiles = runner.num_compiles
        case = drive(runner, buckets, num_pages=ENGINE["kv_cache_pages"])
        stage_devs: list[set] = [set() for _ in range(pp)]
        for shard in runner.kv.k.addressable_shards:
            stage_devs[shard.index[0].start // runner.layout.per_stage].add(shard.device.id)
        case.update(name=name, pp=pp, tp=tp, reference=refs[layers], layer_of_slot=runner.layout.layer_of_slot,
                    kv_devices_disjoint=all(not (stage_devs[a] & stage_devs[b]) for a in range(pp)
                                            for b in range(a + 1, pp)),
                    kv_shard_heads=int(runner.kv.k.addressable_shards[0].data.shape[3]),
                    compiles_after_warmup=runner.num_compiles - compiles)
        cases.append(case)
    return {"cases": cases}


def _child_multi(mode: str, outdir: str) -> None:
    from energon_jax.parallel import distributed
    from energon_jax.parallel.pipeline_controller import PipelineController

    assert distributed.initialize_from_env()
    import jax

    name, pp, tp, layers = MULTI[mode]
    runner, buckets, templates = build_runner(pp, tp, layers)
    controller = PipelineController(runner, templates)
    controller.warmup(templates)
    out = {"device_count": jax.device_count(), "process_count": jax.process_count(), "name": name, "pp": pp}
    out.update(lead_or_serve(controller, lambda: drive(controller, buckets, num_pages=ENGINE["kv_cache_pages"])))
    write_result(outdir, out)


if __name__ == "__main__":
    sys.path[:0] = [ROOT, HERE]
    mode, arg = sys.argv[1], sys.argv[2]
    if mode == "run":
        print(json.dumps(_child(arg)))
    elif mode == "reference":
        print(json.dumps({"reference": reference(int(arg))}))
    else:
        _child_multi(mode, arg)
