"""paged_attention on CPU: the jnp reference against the XLA path (``paged_attention_xla``).

    python benchmarks/paged_attention_cpu.py [--reps 3]

One layer's attention step as the model runs it (the step's new K/V scattered into the
pool, then attention over the result, pool donated) with the shapes of ``benchmarks/offline.py``'s model (8 query and
8 KV heads of 64, float32, pages of 16, max_model_len 1280 so M = 80 pages per row).
Page tables are padded with the null page past each row's length, as the engine's are.
Cases: (a) one 512-token prefill at context 512; (a2) a 512-token chunk resuming at 512;
(b) 16 decode rows at context 1000; (b2) 16 decode rows of uneven contexts (one at 482,
fifteen at 170); (c1) a 256-token chunk resuming at position 256 plus one decode row at
context 700; (c2) the same chunk plus 15 decode rows at contexts 200..900; (d) one decode
row at context 40 in a pool sized for 16 rows (the engine's batch-1 decode). The path
column says how ``paged_attention_xla`` serves the step: its decode rows by a page walk
(lanes or (row, page) pairs, chosen at run time), its multi-token rows by blocked
attention over a packed budget ``C``. Prints the median time of each and the ratio
reference / xla measured in the same run.
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

from pallas_kernels.page_layout import KVPages, write_kv
from pallas_kernels.paged_attention import paged_attention_reference
from pallas_kernels._paged_attention_xla import packed_context_budgets, paged_attention_xla

N, K, H, S, M = 8, 8, 64, 16, 80


def timeit(fn, args: tuple, *, reps: int) -> tuple[float, jax.Array]:
    """Median seconds of ``fn``, which donates the pool (``args[:2]``) and returns
    ``(out, k_pages, v_pages)``: each call feeds the next the pool it returned."""
    k, v, *rest = args
    k, v = jnp.copy(k), jnp.copy(v)  # the caller's pool stays intact
    out, k, v = jax.block_until_ready(fn(k, v, *rest))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        out, k, v = jax.block_until_ready(fn(k, v, *rest))
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def make_case(rng, rows: list[tuple[int, int]], pool_rows: int | None = None):
    """``rows``: (context length, query tokens at its end) per row; the pool holds
    ``pool_rows`` (default: as many as there are rows) rows at full length."""
    b = len(rows)
    num_pages = 1 + max(b, pool_rows or b) * M
    k = jnp.asarray(rng.standard_normal((num_pages, S, K, H)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((num_pages, S, K, H)), jnp.float32)
    tables = 1 + rng.permutation(b * M).reshape(b, M)
    for r, (n, _) in enumerate(rows):
        tables[r, -(-n // S):] = 0  # the engine pads page tables with the null page
    tables = jnp.asarray(tables, jnp.int32)
    lengths = jnp.asarray([n for n, _ in rows], jnp.int32)
    seg = np.concatenate([np.full(t, r) for r, (_, t) in enumerate(rows)]).astype(np.int32)
    pos = np.concatenate([np.arange(n - t, n) for n, t in rows]).astype(np.int32)
    q = jnp.asarray(rng.standard_normal((len(seg), N, H)), jnp.float32)
    new_k = jnp.asarray(rng.standard_normal((len(seg), K, H)), jnp.float32)
    new_v = jnp.asarray(rng.standard_normal((len(seg), K, H)), jnp.float32)
    slots = jnp.asarray(np.asarray(tables)[seg, pos // S] * S + pos % S, jnp.int32)
    budgets = packed_context_budgets(len(seg), M, S)
    total = sum(n for n, t in rows if t > 1)
    decode = sum(1 for _, t in rows if t == 1)
    parts = [f"{decode} decode rows: walk"] if decode else []
    if total:
        parts.append(next((f"blocked C={c}" for c in budgets if total <= c), "reference walk"))
    path = " + ".join(parts)
    return (k, v, q, new_k, new_v, slots, tables, lengths, jnp.asarray(seg), jnp.asarray(pos)), path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    cases = {
        "(a) prefill T=512 ctx=512": [(512, 512)],
        "(a2) chunk 512@512": [(1024, 512)],
        "(b) decode 16 rows ctx=1000": [(1000, 1)] * 16,
        "(b2) decode 16 rows ctx 482 + 15x170": [(482, 1)] + [(170, 1)] * 15,
        "(c1) chunk 256@256 + 1 decode ctx=700": [(512, 256), (700, 1)],
        "(c2) chunk 256@256 + 15 decode ctx 200..900": [(512, 256)] + [(int(n), 1) for n in np.linspace(200, 900, 15)],
        "(d) batch-1 decode ctx=40, pool for 16 rows": [(40, 1)],
    }
    pool_rows = {"(d) batch-1 decode ctx=40, pool for 16 rows": 16}

    def call(impl):
        def step(k_pages, v_pages, q, new_k, new_v, slots, tables, lengths, seg, pos):
            pages = write_kv(KVPages(k_pages, v_pages), new_k, new_v, slots)
            out = impl(q, pages.k, pages.v, tables, lengths, segment_ids=seg, positions=pos)
            return out, pages.k, pages.v

        return jax.jit(step, donate_argnums=(0, 1))

    ref_fn, xla_fn = call(paged_attention_reference), call(paged_attention_xla)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"machine: {platform.machine()}, {jax.local_device_count()} {jax.default_backend()} device(s), "
          f"jax {jax.__version__}; {now}; N={N} K={K} H={H} S={S} M={M} float32, median of {args.reps}")
    print("| case | xla path | reference ms | xla ms | reference / xla | max abs diff |")
    print("|---|---|---|---|---|---|")
    for name, rows in cases.items():
        case_args, path = make_case(rng, rows, pool_rows.get(name))
        t_ref, out_ref = timeit(ref_fn, case_args, reps=args.reps)
        t_xla, out_xla = timeit(xla_fn, case_args, reps=args.reps)
        err = float(jnp.max(jnp.abs(out_ref - out_xla)))
        print(f"| {name} | {path} | {t_ref * 1e3:.1f} | {t_xla * 1e3:.1f} | {t_ref / t_xla:.2f}x | {err:.1e} |")


if __name__ == "__main__":
    main()
