"""parallel/pipeline.py: non-blocking pipeline parallelism on 8 simulated CPU devices.

A 4-layer Llama generates greedily for 6 prompts (chunked prefill, then decode)
through ``PipelinedGeneration`` with pp=2, pp=4 and pp=2 x tp=4; the tokens must be
identical to one device running the plain ``ModelRunner`` loop (pp=1). The
instrumentation must show at least two micro-batches in flight at once, every stage
busy, and the layers split into contiguous ranges with each stage's KV pages on its
own devices.
"""

from __future__ import annotations

import json
import sys

import pytest

from test_parallel_mesh import ROOT, run_child

PROMPTS = [[5, 9, 13, 7, 22, 30, 31], [40, 41, 42], [17, 3, 88, 60, 12, 11, 10, 9, 8],
           [4, 4, 4], [70, 71, 72, 73, 74], [33]]
MAX_TOKENS = 5
LAYERS = 4


def test_pipeline_matches_single_device():
    out = run_child(__file__, "run")
    want = out["reference"]
    assert all(len(t) == MAX_TOKENS for t in want.values())
    assert [c["pp"] for c in out["cases"]] == [2, 4, 2] and out["cases"][2]["tp"] == 4
    for case in out["cases"]:
        assert case["tokens"] == want, case
        assert case["max_in_flight"] >= 2, case  # stage 0 got a new micro-batch before the last one left
        assert all(b > 0 for b in case["busy"]), case
        assert case["bounds"] == [[i * LAYERS // case["pp"], (i + 1) * LAYERS // case["pp"]]
                                  for i in range(case["pp"])], case
        # each stage's KV pages live only on that stage's devices, split by KV head over tp
        assert case["kv_devices_disjoint"], case
        assert case["kv_shard_heads"] == (2 // case["tp"] if case["tp"] <= 2 else 2), case


def test_layer_bounds_and_errors():
    from energon_jax.parallel.stages import layer_bounds

    assert layer_bounds(5, 2) == [(0, 3), (3, 5)]
    assert layer_bounds(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    with pytest.raises(ValueError, match=r"pp=3 must be in \[1, num_layers=2\]"):
        layer_bounds(2, 3)


def test_shift_pages_keeps_null_page_and_padding():
    import dataclasses

    import numpy as np

    from energon_jax.parallel.pipeline import shift_pages
    from pallas_kernels import PagedAttentionMetadata

    @dataclasses.dataclass(frozen=True)
    class Batch:  # the StepBatch fields shift_pages reads
        segment_ids: np.ndarray
        attn: PagedAttentionMetadata

    b = Batch(np.array([0, 0, 1, -1], np.int32),
              PagedAttentionMetadata(np.array([4, 5, 8, 0], np.int32), np.array([[1, 0], [2, 0]], np.int32),
                                     np.array([2, 1], np.int32)))
    out = shift_pages(b, 10, 4)
    np.testing.assert_array_equal(out.attn.page_tables, [[11, 0], [12, 0]])
    np.testing.assert_array_equal(out.attn.slot_mapping, [44, 45, 48, 0])


# ----------------------------------------------------------------- the child


def _child() -> dict:
    import jax.numpy as jnp

    from energon_jax.batch import Buckets, pack
    from energon_jax.parallel.mesh import ParallelConfig, kv_pages_sharding, make_mesh, shard_model, sharding_rules
    from energon_jax.parallel.pipeline import PipelinedGeneration, PipelineRunner
    from energon_jax.parallel.stages import decoder_parts
    from energon_jax.request import Request, SamplingParams
    from energon_jax.runner import ModelRunner
    from energon_jax.scheduler import Scheduler, SchedulerConfig
    from pallas_kernels import make_kv_pages
    from test_parallel_tp_models import build_model

    buckets = Buckets.create(max_num_batched_tokens=8, max_num_seqs=4, max_model_len=32, page_size=4, min_tokens=4)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)

    def sched(num_pages):
        return Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=8, max_model_len=32,
                                         page_size=4, num_pages=num_pages))

    # Reference: one device, the plain runner, one scheduler for every prompt.
    model, config = build_model("llama", num_hidden_layers=LAYERS)
    mesh1 = make_mesh(ParallelConfig())
    rules1 = sharding_rules(1, num_kv_heads=config.num_kv_heads)
    shard_model(model, mesh1, rules1)
    kv = tuple(make_kv_pages(40, 4, config.num_kv_heads, config.head_dim, jnp.float32,
                             sharding=kv_pages_sharding(mesh1, rules1)) for _ in range(LAYERS))
    runner = ModelRunner(model, kv)
    s = sched(40)
    for i, p in enumerate(PROMPTS):
        s.add(Request(request_id=f"r{i}", prompt_token_ids=p, params=params))
    reference = {f"r{i}": [] for i in range(len(PROMPTS))}
    while s.has_work():
        plan = s.schedule()
        for d in s.update(plan, runner.step(pack(plan, buckets))):
            reference[d.request.request_id].extend(int(t) for t in d.new_token_ids)

    cases = []
    for pp, tp in ((2, 1), (4, 1), (2, 4)):
        model, config = build_model("llama", num_hidden_layers=LAYERS)
        mesh = make_mesh(ParallelConfig(pp=pp, tp=tp))
        rules = sharding_rules(tp, num_kv_heads=config.num_kv_heads)
        per_group = 12
        prunner = PipelineRunner(decoder_parts(model), mesh, rules, num_pages=1 + pp * (per_group - 1), page_size=4)
        schedulers = [sched(per_group) for _ in range(pp)]
        for i, p in enumerate(PROMPTS):
            schedulers[i % pp].add(Request(request_id=f"r{i}", prompt_token_ids=p, params=params))
        tokens = {f"r{i}": [] for i in range(len(PROMPTS))}
        for d in PipelinedGeneration(prunner, schedulers, buckets, per_group).run():
            tokens[d.request.request_id].extend(int(t) for t in d.new_token_ids)
        devs = [{d.id for pages in stage for d in pages.k.devices()} for stage in prunner.kv]
        disjoint = all(not (devs[a] & devs[b]) for a in range(pp) for b in range(a + 1, pp))
        cases.append({
            "pp": pp, "tp": tp, "tokens": tokens, "max_in_flight": prunner.stats.max_in_flight,
            "busy": prunner.stats.busy, "ticks": prunner.stats.ticks,
            "bounds": [list(b) for b in prunner.bounds], "kv_devices_disjoint": disjoint,
            "kv_shard_heads": int(prunner.kv[0][0].k.addressable_shards[0].data.shape[2]),
        })
    return {"reference": reference, "cases": cases}


if __name__ == "__main__":
    sys.path[:0] = [ROOT]
    print(json.dumps(_child()))
