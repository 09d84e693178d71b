"""parallel/memory_pool.py: layer weights streamed from host memory or a peer device.

In a child with 2 CPU devices, a 4-layer Llama generates greedily for 3 prompts
(chunked prefill, then decode) through ``OffloadedRunner`` with ``offload`` "host"
(pinned_host memory) and "peer" (the second device), ``resident_layers`` 1 and 2. The
tokens must equal the fully resident ``ModelRunner``'s, the logprobs must match within
1e-5, and the weight bytes resident on the compute device must never exceed
``k + 1`` layers (and reach it: the next layer really is prefetched).

In this process (one CPU device, its ``pinned_host`` memory as the pool), an engine with
``offload="host"`` keeps the page tables on the device (``OffloadedRunner.page_table``):
its streams over a mixed workload (penalties, stop strings, min_tokens, an abort, a pool
small enough to preempt) equal those of the same engine with ``[B, M]`` page tables in
every batch.
"""

from __future__ import annotations

import json
import sys

import pytest

from test_parallel_mesh import ROOT, run_child

LAYERS = 4


@pytest.mark.slow  # default-run budget (15 min quiet): test_parallel_engine's default layouts run offload='host'
def test_offloaded_matches_resident_and_bounds_memory():
    out = run_child(__file__, "run", devices=2)
    ref = out["reference"]
    assert [(c["offload"], c["k"]) for c in out["cases"]] == [("host", 1), ("host", 2), ("peer", 1), ("peer", 2)]
    for case in out["cases"]:
        assert case["tokens"] == ref["tokens"], case
        assert case["logprob_max_diff"] <= 1e-5, case
        k = case["k"]
        assert case["peak_resident_layers"] == k + 1, case
        assert case["peak_resident_bytes"] <= (k + 1) * case["max_layer_bytes"], case
        assert case["fetches"] == case["steps"] * LAYERS, case
        assert case["pool_memory_kind"] == ("pinned_host" if case["offload"] == "host" else "device"), case
        assert case["pool_device"] == (0 if case["offload"] == "host" else 1), case


@pytest.mark.slow  # default-run budget: test_parallel_engine's default layouts run offload with device tables
def test_offload_engine_streams_equal_without_device_page_tables(tiny_checkpoint, monkeypatch):
    import jax

    from energon_jax import Engine
    from energon_jax.parallel import runtime
    from test_host_rows import _workload

    def engine():
        return Engine.from_pretrained(tiny_checkpoint("llama"), offload="host", resident_layers=1, max_model_len=48,
                                      page_size=4, max_num_seqs=8, max_num_batched_tokens=16, kv_cache_pages=13,
                                      warmup=False)

    on_device = engine()
    runner = on_device.runner
    assert type(runner).__name__ == "OffloadedRunner" and runner.page_table is not None
    assert on_device.buckets.page_slots == 16
    layer_batches = []  # what each layer call is handed: the batch already on the device, [B, M] tables gathered
    layer_fn = runner._layer_fn
    runner._layer_fn = lambda *a: layer_batches.append(a[-1]) or layer_fn(*a)
    fast = _workload(on_device, "a")
    assert on_device.scheduler.num_preemptions > 0 and on_device.scheduler.pages_used == 0
    assert layer_batches and all(isinstance(x, jax.Array) for b in layer_batches for x in jax.tree.leaves(b))
    assert {b.attn.page_tables.shape[1] for b in layer_batches} == {on_device.buckets.max_pages_per_row}
    # The same engine with [B, M] page tables in every batch (as before device page tables).
    monkeypatch.setattr(runtime, "device_page_tables", lambda *args, **kwargs: False)
    plain = engine()
    assert plain.runner.page_table is None and plain.buckets.page_slots == 0
    assert len(fast) == 8 and _workload(plain, "b") == fast


def test_offload_config_errors():
    from energon_jax.parallel.memory_pool import OffloadConfig

    with pytest.raises(ValueError, match=r"offload='disk' must be one of \('host', 'peer'\)"):
        OffloadConfig("disk", 1)
    with pytest.raises(ValueError, match=r"resident_layers=0 must be an integer >= 1"):
        OffloadConfig("host", 0)


# ----------------------------------------------------------------- the child


def _generate(runner, buckets):
    import numpy as np

    from energon_jax.batch import pack
    from energon_jax.request import Request, SamplingParams
    from energon_jax.scheduler import Scheduler, SchedulerConfig
    from test_parallel_controller import MAX_TOKENS, PROMPTS

    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=8, max_model_len=32,
                                      page_size=4, num_pages=24))
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(PROMPTS):
        sched.add(Request(request_id=f"r{i}", prompt_token_ids=p, params=params))
    tokens = {f"r{i}": [] for i in range(len(PROMPTS))}
    logprobs, steps = [], 0
    while sched.has_work():
        plan = sched.schedule()
        sampled = runner.step(pack(plan, buckets))
        steps += 1
        logprobs.append(np.asarray(sampled.logprobs)[: plan.num_rows])
        for d in sched.update(plan, sampled):
            tokens[d.request.request_id].extend(int(t) for t in d.new_token_ids)
    return tokens, np.concatenate(logprobs), steps


def _child() -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from energon_jax.batch import Buckets
    from energon_jax.parallel.memory_pool import OffloadConfig, OffloadedRunner
    from energon_jax.parallel.stages import decoder_parts
    from energon_jax.runner import ModelRunner
    from pallas_kernels import make_kv_pages
    from test_parallel_tp_models import build_model

    assert len(jax.devices()) == 2
    buckets = Buckets.create(max_num_batched_tokens=8, max_num_seqs=4, max_model_len=32, page_size=4, min_tokens=4)
    model, config = build_model("llama", num_hidden_layers=LAYERS)
    kv = tuple(make_kv_pages(24, 4, config.num_kv_heads, config.head_dim, jnp.float32) for _ in range(LAYERS))
    ref_tokens, ref_lp, _ = _generate(ModelRunner(model, kv), buckets)
    cases = []
    for kind in ("host", "peer"):
        for k in (1, 2):
            model, _ = build_model("llama", num_hidden_layers=LAYERS)
            runner = OffloadedRunner(decoder_parts(model), OffloadConfig(kind, k), num_pages=24, page_size=4)
            tokens, lp, steps = _generate(runner, buckets)
            pooled = jax.tree.leaves(runner._pooled[0])[0]
            st = runner.stats
            cases.append({
                "offload": kind, "k": k, "tokens": tokens, "steps": steps,
                "logprob_max_diff": float(np.max(np.abs(lp - ref_lp))),
                "peak_resident_layers": st.peak_resident_layers, "peak_resident_bytes": st.peak_resident_bytes,
                "max_layer_bytes": st.max_layer_bytes, "fetches": st.fetches,
                "pool_memory_kind": pooled.sharding.memory_kind,
                "pool_device": next(iter(pooled.devices())).id,
            })
    return {"reference": {"tokens": ref_tokens}, "cases": cases}


if __name__ == "__main__":
    sys.path[:0] = [ROOT]
    print(json.dumps(_child()))
