"""parallel/pipeline.py: non-blocking pipeline parallelism on 8 simulated CPU devices.

A 4-layer Llama generates greedily for 6 prompts (chunked prefill, then decode; more
prompts than ``max_num_seqs``) through ``Engine(pp=N).generate``, which drives the
``PipelineRunner`` clock with ``PipelineStepLoop``; the tokens must be identical to one
device running the plain engine (pp=1). The instrumentation must show ``pp``
micro-batches in flight at once and every stage busy, the layers split into contiguous
ranges, and each stage's KV pages on its own devices (split by KV head over ``tp``).
Default run: pp=4 and pp=2 x tp=4; the slow run adds pp=2.
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
CASES = {"default": [(4, 1), (2, 4)], "more": [(2, 1)]}


@pytest.mark.parametrize("group", ["default", pytest.param("more", marks=pytest.mark.slow)])
def test_pipeline_matches_single_device(group):
    out = run_child(__file__, "run", group)
    want = out["reference"]
    assert len(want) == len(PROMPTS) and all(len(t) == MAX_TOKENS for t in want)
    assert [(c["pp"], c["tp"]) for c in out["cases"]] == CASES[group]
    for case in out["cases"]:
        assert case["tokens"] == want, case
        assert case["max_in_flight"] == case["pp"], case  # stage 0 fed while earlier micro-batches were inside
        assert case["entered"] == case["completed"] > 0, case
        assert all(b > 0 for b in case["busy"]), case
        assert case["ticks"] > 0 and case["pages_used"] == 0, case
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


# ----------------------------------------------------------------- the child


def _engine(**layout):
    from energon_jax.engine import Engine
    from test_parallel_tp_models import build_model

    model, config = build_model("llama", num_hidden_layers=LAYERS)
    return Engine(model, config, None, max_model_len=32, page_size=4, kv_cache_pages=40, max_num_seqs=4,
                  max_num_batched_tokens=8, min_token_bucket=4, **layout)


def _child(group: str) -> dict:
    from energon_jax.request import SamplingParams

    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)

    def tokens(engine):
        return [list(map(int, o.token_ids)) for o in engine.generate(PROMPTS, params, use_tqdm=False)]

    reference = tokens(_engine())  # one device, the plain runner
    cases = []
    for pp, tp in CASES[group]:
        engine = _engine(pp=pp, tp=tp)
        got = tokens(engine)
        runner, st = engine.runner, engine.runner.stats  # counters since warm-up: this generate
        devs = [{d.id for pages in stage for d in pages.k.devices()} for stage in runner.kv]
        disjoint = all(not (devs[a] & devs[b]) for a in range(pp) for b in range(a + 1, pp))
        cases.append({
            "pp": pp, "tp": tp, "tokens": got, "max_in_flight": st.max_in_flight, "busy": st.busy,
            "ticks": st.ticks, "entered": st.entered, "completed": st.completed,
            "pages_used": engine.scheduler.pages_used,
            "bounds": [list(b) for b in runner.bounds], "kv_devices_disjoint": disjoint,
            "kv_shard_heads": int(runner.kv[0][0].k.addressable_shards[0].data.shape[2]),
        })
    return {"reference": reference, "cases": cases}


if __name__ == "__main__":
    sys.path[:0] = [ROOT]
    print(json.dumps(_child(sys.argv[2])))
