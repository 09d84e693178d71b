"""paged_attention on CPU: the jnp reference against the XLA path (``paged_attention_xla``).

    python benchmarks/paged_attention_cpu.py [--reps 3]

One layer's attention with the shapes of ``benchmarks/offline.py``'s model (8 query and
8 KV heads of 64, float32, pages of 16, max_model_len 1280 so M = 80 pages per row).
Cases: (a) one 512-token prefill at context 512; (b) 16 decode rows at context 1000;
(c1) a mixed step that fits the packed budget (a 256-token chunk resuming at position
256 plus one decode row at context 700); (c2) a mixed step that does not (the same
chunk plus 15 decode rows at contexts 200..900), which takes the page walk. Prints the
median time of each and the ratio reference / xla measured in the same run.
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

from pallas_kernels.paged_attention import packed_context_budgets, paged_attention_reference, paged_attention_xla

N, K, H, S, M = 8, 8, 64, 16, 80


def timeit(fn, *args, reps: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_case(rng, rows: list[tuple[int, int]]):
    """``rows``: (context length, query tokens at its end) per row."""
    b = len(rows)
    num_pages = 1 + b * M
    k = jnp.asarray(rng.standard_normal((num_pages, S, K, H)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((num_pages, S, K, H)), jnp.float32)
    tables = jnp.asarray(1 + rng.permutation(b * M).reshape(b, M), jnp.int32)
    lengths = jnp.asarray([n for n, _ in rows], jnp.int32)
    seg = np.concatenate([np.full(t, r) for r, (_, t) in enumerate(rows)]).astype(np.int32)
    pos = np.concatenate([np.arange(n - t, n) for n, t in rows]).astype(np.int32)
    q = jnp.asarray(rng.standard_normal((len(seg), N, H)), jnp.float32)
    budgets = packed_context_budgets(len(seg), M, S)
    total = sum(n for n, _ in rows)
    path = next((f"packed C={c}" for c in budgets if total <= c), "page walk")
    return (q, k, v, tables, lengths, jnp.asarray(seg), jnp.asarray(pos)), path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    cases = {
        "(a) prefill T=512 ctx=512": [(512, 512)],
        "(b) decode 16 rows ctx=1000": [(1000, 1)] * 16,
        "(c1) chunk 256@256 + 1 decode ctx=700": [(512, 256), (700, 1)],
        "(c2) chunk 256@256 + 15 decode ctx 200..900": [(512, 256)] + [(int(n), 1) for n in np.linspace(200, 900, 15)],
    }

    def call(impl):
        return jax.jit(lambda q, k, v, t, n, s, p: impl(q, k, v, t, n, segment_ids=s, positions=p))

    ref_fn, xla_fn = call(paged_attention_reference), call(paged_attention_xla)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"machine: {platform.machine()}, {jax.local_device_count()} {jax.default_backend()} device(s), "
          f"jax {jax.__version__}; {now}; N={N} K={K} H={H} S={S} M={M} float32, median of {args.reps}")
    print("| case | xla path | reference ms | xla ms | reference / xla | max abs diff |")
    print("|---|---|---|---|---|---|")
    for name, rows in cases.items():
        case_args, path = make_case(rng, rows)
        out_ref, out_xla = ref_fn(*case_args), xla_fn(*case_args)
        err = float(jnp.max(jnp.abs(out_ref - out_xla)))
        t_ref = timeit(ref_fn, *case_args, reps=args.reps)
        t_xla = timeit(xla_fn, *case_args, reps=args.reps)
        print(f"| {name} | {path} | {t_ref * 1e3:.1f} | {t_xla * 1e3:.1f} | {t_ref / t_xla:.2f}x | {err:.1e} |")


if __name__ == "__main__":
    main()
