"""dp replicas in one stacked SPMD step (``replica_step.py``) against independent replicas, one process.

    python benchmarks/replica_step.py                   # 4 simulated CPU devices, dp=2 x tp=2

Across processes ``Engine(dp=N)`` runs its replicas as one stacked step
(``StackedReplicas``); in one process it keeps ``DataParallelRunner`` (each replica its own
jitted step, dispatched one after the other). This runs both in one process on the same
saturated load (``--requests`` greedy requests of ``--max-tokens`` tokens, prompts of 2 to
8 tokens, all queued at once; a random Llama of ``--layers`` layers), the stacked one built
as a 2-process run builds it (``jax.process_count`` patched while the engine is built; its
Controller then runs the steps itself). The same load runs once first on each engine (its compiles).

Printed per layout: engine steps, wall seconds, ms per engine step, whether the tokens
equal the independent replicas', and the ratio stacked / independent measured in the same
run. On simulated CPU devices every replica shares the host's cores, so the wall time is a
host-side comparison (dispatches per step, padding to a common bucket), not a device claim.
"""

from __future__ import annotations

import argparse
import os
import sys

if "jax" not in sys.modules:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if os.environ["JAX_PLATFORMS"] == "cpu":
        os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), os.path.join(ROOT, "benchmarks")]


def main() -> None:
    from unittest import mock

    import jax

    from data_parallel import _prompts, _serve
    from energon_jax.engine import Engine
    from energon_jax.request import SamplingParams
    from test_parallel_tp_models import build_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-seqs", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--dp", type=int, default=2)
    p.add_argument("--tp", type=int, default=2)
    args = p.parse_args()

    def engine():
        model, config = build_model("llama", num_hidden_layers=args.layers)
        return Engine(model, config, None, max_model_len=64, page_size=4, kv_cache_pages=160,
                      max_num_seqs=args.max_seqs, max_num_batched_tokens=64, dp=args.dp, tp=args.tp,
                      warmup=False, enable_prefix_caching=False), config  # same shapes on the rerun

    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    independent, config = engine()
    with mock.patch.object(jax, "process_count", lambda: 2):
        stacked, _ = engine()
    stacked.runner.step_runner.process_count = 1  # one process: its Controller runs the steps itself
    prompts = _prompts(args.requests, config.vocab_size)
    rows = {}
    for name, e in (("independent", independent), ("stacked", stacked)):
        _serve(e, prompts, params)  # warm-up pass: compiles the shapes this load uses
        compiles = e.runner.num_compiles
        tokens, steps, seconds = _serve(e, prompts, params)
        rows[name] = (tokens, steps, seconds)
        print(f"{name:12s} {type(e.runner).__name__:18s} steps={steps:4d} wall={seconds:6.2f}s "
              f"ms/step={1e3 * seconds / steps:7.2f} compiles during the run={e.runner.num_compiles - compiles}")
    same = rows["stacked"][0] == rows["independent"][0]
    ratio = (rows["stacked"][2] / rows["stacked"][1]) / (rows["independent"][2] / rows["independent"][1])
    print(f"same tokens: {same}; stacked / independent ms per engine step: {ratio:.2f}")


if __name__ == "__main__":
    main()
