"""Sliding-window attention on the CPU path: one layer's step, full attention against a window.

    python benchmarks/sliding_window.py [--reps 5] [--context 4096] [--window 256]

One step of ``paged_attention`` (``implementation="xla"``, the CPU default) as a serving
step meets it late in long sequences: 15 decode rows and one 256-token prefill chunk, every
row at ``--context`` cached tokens (pages of 16, 8 query heads over 2 KV heads of 64,
float32). The same inputs run with ``sliding_window=None`` and ``sliding_window=--window``;
with the window the page walks start at the window's first page and the chunk's keys are
gathered from its window start, so the step costs the window, not the context. Also prints
how many pages one sequence of ``--context`` tokens holds once the scheduler released those
behind the window. Prints the median of each and the ratio, measured in the same run.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from energon_jax.sliding_window import pages_behind_window
from pallas_kernels.paged_attention import paged_attention

N, K, H, S = 8, 2, 64, 16
ROWS, CHUNK = 16, 256


def step_inputs(context: int, seed: int = 0) -> tuple:
    rng = np.random.default_rng(seed)
    per_row = -(-context // S)
    num_pages = 1 + ROWS * per_row
    k_pages = jnp.asarray(rng.normal(size=(num_pages, S, K, H)), jnp.float32)
    v_pages = jnp.asarray(rng.normal(size=(num_pages, S, K, H)), jnp.float32)
    tables = jnp.asarray(1 + np.arange(ROWS * per_row).reshape(ROWS, per_row), jnp.int32)
    lengths = jnp.full((ROWS,), context, jnp.int32)
    seg = np.concatenate([np.zeros(CHUNK), np.arange(1, ROWS)]).astype(np.int32)
    pos = np.concatenate([np.arange(context - CHUNK, context), np.full(ROWS - 1, context - 1)]).astype(np.int32)
    q = jnp.asarray(rng.normal(size=(len(seg), N, H)), jnp.float32)
    return q, k_pages, v_pages, tables, lengths, jnp.asarray(seg), jnp.asarray(pos)


def median_ms(window: int | None, args: tuple, reps: int) -> float:
    fn = jax.jit(lambda q, kp, vp, t, n, s, p: paged_attention(
        q, kp, vp, t, n, segment_ids=s, positions=p, sliding_window=window, implementation="xla"))
    fn(*args).block_until_ready()  # compile
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(*args).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--window", type=int, default=256)
    a = ap.parse_args()
    args = step_inputs(a.context)
    full = median_ms(None, args, a.reps)
    windowed = median_ms(a.window, args, a.reps)
    held = -(-a.context // S) - pages_behind_window(a.context, a.window, S)
    now = datetime.datetime.now(datetime.timezone.utc)
    print(f"{now:%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
          f"jax {jax.__version__} on {jax.default_backend()}")
    print(f"{ROWS - 1} decode rows + a {CHUNK}-token chunk, context {a.context}, pages of {S}, N={N} K={K} H={H}")
    print(f"full attention      {full:8.1f} ms")
    print(f"window {a.window:<12d} {windowed:8.1f} ms   ({full / windowed:.2f}x)")
    print(f"pages one sequence holds at context {a.context}: {-(-a.context // S)} full, {held} with the window")


if __name__ == "__main__":
    main()
