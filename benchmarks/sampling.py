"""Time on-device sampling (``energon_jax.sampling.sample``) at ``B x V`` logits.

Cases: greedy; temperature only; top-k + top-p; top-p alone; top-k + top-p + min-p. The
baseline, measured in the same run, is a full descending sort of the same logits (what
top-k/top-p cost before the cut-offs were found by bisection: an ``argsort`` plus a
gather and a scatter, so the sort alone is a lower bound for it).

    python benchmarks/sampling.py --batch 16 --vocab 32000
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from energon_jax.batch import Buckets, SamplingBatch, dummy_batch


def _params(b: int, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0) -> SamplingBatch:
    """The engine's own neutral sampling batch for ``b`` rows, with the case's knobs set."""
    buckets = Buckets.create(max_num_batched_tokens=b, max_num_seqs=b, max_model_len=16, page_size=16, min_tokens=b)
    full = lambda v, dt: np.full(b, v, dt)  # noqa: E731
    return dataclasses.replace(
        dummy_batch(buckets, b, b).sampling, temperature=full(temperature, np.float32), top_k=full(top_k, np.int32),
        top_p=full(top_p, np.float32), min_p=full(min_p, np.float32), seed=np.arange(b, dtype=np.uint32),
    )


def _time_ms(fn, *args, reps: int, rounds: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(reps):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / reps * 1e3)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()

    from energon_jax.sampling import sample

    b, v = args.batch, args.vocab
    logits = jnp.asarray(np.random.default_rng(0).standard_normal((b, v)).astype(np.float32) * 3)
    cases = {
        "greedy": _params(b),
        "temperature 0.8": _params(b, 0.8),
        "top-k 50 + top-p 0.9": _params(b, 0.8, top_k=50, top_p=0.9),
        "top-p 0.9": _params(b, 0.8, top_p=0.9),
        "top-k + top-p + min-p 0.05": _params(b, 0.8, top_k=50, top_p=0.9, min_p=0.05),
    }
    fn = jax.jit(sample)
    sort_ms = _time_ms(jax.jit(lambda x: jnp.sort(x, axis=-1)), logits, reps=args.reps, rounds=args.rounds)
    print(f"{jax.devices()[0].platform}, {b} x {v} logits, median of {args.rounds} rounds of {args.reps} calls")
    print(f"{'baseline: sort of the logits':30s} {sort_ms:8.2f} ms")
    for name, params in cases.items():
        ms = _time_ms(fn, logits, params, reps=args.reps, rounds=args.rounds)
        print(f"{name:30s} {ms:8.2f} ms   ({ms / sort_ms:.2f}x the sort)")


if __name__ == "__main__":
    main()
