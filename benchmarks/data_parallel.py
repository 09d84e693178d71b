"""Data parallelism: rows and tokens per engine step at dp = 1, 2, 4 on the same saturated load.

    python benchmarks/data_parallel.py                 # 8 simulated CPU devices
    python benchmarks/data_parallel.py --requests 128 --max-seqs 16 --max-tokens 32 --tp 2

A random Llama (``--layers`` layers) serves ``--requests`` greedy requests of
``--max-tokens`` tokens each (prompts of 2 to 8 tokens), all queued at once, through
``Engine(dp=N, tp=T)``: ``add_request`` for every prompt, then ``step()`` until every
request has finished. ``max_num_seqs`` (``--max-seqs``) and the KV pool are per replica,
so with more requests than ``dp * max_num_seqs`` the load saturates every replica.

Printed per ``dp``: engine steps (``step()`` calls), scheduled rows and tokens per engine
step (``Engine.dispatch_counts``, every replica), generated tokens per engine step, the
rows each replica ran, the most replicas computing at once, whether the tokens equal
dp=1's, and the step-count and wall-time ratios against dp=1 measured in the same run.
A saturated load should need about ``1/dp`` of dp=1's engine steps. On simulated CPU
devices all replicas share the host's cores, so the wall time says little about real
devices; the step counts are the schedule's property and hold anywhere.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if "jax" not in sys.modules:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if os.environ["JAX_PLATFORMS"] == "cpu":
        os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]


def _prompts(n: int, vocab: int) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(0)
    return [rng.integers(3, vocab, int(rng.integers(2, 9))).tolist() for _ in range(n)]


def _serve(engine, prompts, params) -> tuple[dict[str, list[int]], int, float]:
    """Queue every prompt, step until all finish: (tokens per request, engine steps, seconds)."""
    start = time.perf_counter()
    rids = [engine.add_request(p, params, request_id=f"r{i}") for i, p in enumerate(prompts)]
    tokens: dict[str, list[int]] = {rid: [] for rid in rids}
    steps = 0
    while engine.has_unfinished():
        for delta in engine.step():
            tokens[delta.request_id].extend(int(x) for x in delta.token_ids)
        steps += 1
    return tokens, steps, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-seqs", type=int, default=8, help="max_num_seqs per replica")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--dp", type=int, nargs="+", default=[1, 2, 4])
    args = p.parse_args()

    import jax

    from energon_jax.engine import Engine
    from energon_jax.request import SamplingParams
    from test_parallel_tp_models import build_model

    page_size = 8
    max_len = 8 + args.max_tokens
    prompts = _prompts(args.requests, 96)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    print(f"data parallel: llama layers={args.layers}, {args.requests} requests x {args.max_tokens} tokens queued "
          f"at once, max_num_seqs={args.max_seqs} per replica, tp={args.tp}, {len(jax.devices())} devices")
    base = None
    for dp in args.dp:
        model, config = build_model("llama", num_hidden_layers=args.layers)
        engine = Engine(model, config, None, max_model_len=max_len, page_size=page_size,
                        kv_cache_pages=1 + args.max_seqs * -(-max_len // page_size), max_num_seqs=args.max_seqs,
                        max_num_batched_tokens=max(64, args.max_seqs), dp=dp, tp=args.tp)
        _serve(engine, prompts[: 2 * dp], params)  # settle the host (compiles are done by warm-up)
        before = engine.dispatch_counts
        if dp > 1:
            engine.runner.reset_stats()
        tokens, steps, wall = _serve(engine, prompts, params)
        counts = engine.dispatch_counts - before
        generated = sum(map(len, tokens.values()))
        base = base or (tokens, steps, wall)
        line = (f"  dp={dp}: engine steps={steps} ({steps / base[1]:.2f}x dp=1) rows/step={counts.rows / steps:.2f} "
                f"tokens/step={counts.tokens / steps:.2f} generated tokens/step={generated / steps:.2f}")
        if dp > 1:
            st = engine.runner.stats
            line += f" rows per replica={[c.rows for c in st.replicas]} max replicas at once={st.max_on_device}"
        print(line + f" same tokens as dp=1: {tokens == base[0]} wall={wall:.2f}s ({wall / base[2]:.2f}x dp=1)")


if __name__ == "__main__":
    main()
