"""The pipeline as one SPMD program against the per-stage dispatch, on the same requests.

    python benchmarks/spmd_pipeline.py                  # pp=2 and pp=4 x tp=2, 8 simulated CPU devices
    python benchmarks/spmd_pipeline.py --layers 8 --requests 16 --max-tokens 24

Both runners serve the same greedy requests through the engine's own pipeline loop
(``PipelineStepLoop`` + ``Scheduler.schedule_micro_batch``, ``pp`` micro-batches in
flight): ``pipeline.PipelineRunner`` (one jitted call per stage, activations copied
between stages; the tests' reference) and ``spmd_pipeline.SpmdPipelineRunner`` (one
jitted tick over every stage, ``shard_map`` + ``ppermute``; what ``Engine(pp=N)`` runs).
Printed per layout: milliseconds per tick for each (best of ``--rounds`` after warm-up,
compiles excluded), their ratio, and whether the tokens are equal. On simulated CPU devices
the stages share the host's cores: the ratio says how the two dispatch schemes compare
there, not what a pod would see.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

if "jax" not in sys.modules:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if os.environ["JAX_PLATFORMS"] == "cpu":
        os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]


def _serve(runner, buckets, args) -> tuple[float, int, list]:
    """One pass of the requests; returns (seconds, ticks, tokens)."""
    from energon_jax.parallel.pipeline import PipelineStepLoop
    from energon_jax.request import Request, SamplingParams
    from energon_jax.scheduler import Scheduler, SchedulerConfig

    sched = Scheduler(SchedulerConfig(max_num_seqs=args.requests, max_num_batched_tokens=32, max_model_len=64,
                                      page_size=8, num_pages=args.pages))
    loop = PipelineStepLoop(sched, runner, buckets, lambda ds: list(ds) if isinstance(ds, list) else [ds])
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    reqs = [Request(f"r{i}", [(7 * i + j) % 90 + 3 for j in range(5 + i % 7)], params) for i in range(args.requests)]
    for r in reqs:
        sched.add(r)
    ticks, t0 = 0, time.perf_counter()
    while sched.has_work() or loop.busy() or loop.on_device:
        loop.step({r.request_id for r in reqs if not r.finished})
        ticks += 1
    return time.perf_counter() - t0, ticks, [r.output_token_ids for r in reqs]


def run(pp: int, tp: int, args) -> dict:
    import jax.numpy as jnp

    from energon_jax.batch import Buckets, warmup_batches
    from energon_jax.parallel.mesh import make_mesh, sharding_rules
    from energon_jax.parallel.options import ParallelOptions
    from energon_jax.parallel.pipeline import PipelineRunner
    from energon_jax.parallel.spmd_pipeline import SpmdPipelineRunner
    from energon_jax.parallel.stages import decoder_parts
    from test_parallel_tp_models import build_model

    buckets = Buckets.create(max_num_batched_tokens=32, max_num_seqs=args.requests, max_model_len=64, page_size=8,
                             min_tokens=8)
    out: dict = {"pp": pp, "tp": tp, "layers": args.layers}
    tokens = {}
    for kind in ("per_stage", "spmd"):
        model, config = build_model("llama", num_hidden_layers=args.layers, hidden_size=args.hidden,
                                    intermediate_size=2 * args.hidden)
        mesh = make_mesh(ParallelOptions(pp=pp, tp=tp))
        rules = sharding_rules(tp, num_kv_heads=config.num_kv_heads)
        kw = dict(num_pages=args.pages, page_size=8, kv_dtype=jnp.float32)
        runner = (SpmdPipelineRunner(decoder_parts(model), mesh, rules, buckets=buckets, **kw) if kind == "spmd"
                  else PipelineRunner(decoder_parts(model), mesh, rules, **kw))
        runner.warmup(warmup_batches(buckets))
        _serve(runner, buckets, args)  # anything left to compile compiles here
        best = float("inf")
        for _ in range(args.rounds):
            seconds, ticks, tokens[kind] = _serve(runner, buckets, args)
            best = min(best, seconds)
        out[f"{kind}_ms_per_tick"] = round(1000 * best / ticks, 2)
    out["spmd_over_per_stage"] = round(out["spmd_ms_per_tick"] / out["per_stage_ms_per_tick"], 2)
    out["same_tokens"] = tokens["spmd"] == tokens["per_stage"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--pages", type=int, default=160)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--layouts", default="2x1,4x2", help="pp x tp pairs, comma separated")
    args = p.parse_args()
    for layout in args.layouts.split(","):
        pp, tp = (int(v) for v in layout.split("x"))
        print(json.dumps(run(pp, tp, args)), flush=True)


if __name__ == "__main__":
    main()
