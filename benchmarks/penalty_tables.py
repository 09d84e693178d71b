"""What the persistent device batch costs a step in which no row uses a penalty.

The runner keeps penalty counts (``sampling.PenaltyTables``: ``[S, V]`` int32 + bool, S =
``max_num_seqs``) and page tables on the device; every step updates them. This script
times, in one process, on the same model and batches, the runner's jitted step
(``ModelRunner``, one per variant, over the same parameters, each with its own KV pages):

- ``persistent``: as the engine runs it: penalty tables (``penalty_slots = max_num_seqs``)
  updated behind ``lax.cond(any row has a slot)``, and device page tables;
- ``no tables``: ``penalty_slots = 0`` (the same batches: their history is 0 wide either way);
- ``host pages``: penalty tables, but no device page tables: the batch uploads ``[B, M]``
  page tables instead of gathering its rows from the device table and scattering the
  step's ``page_deltas`` into it;
- ``neither``: no penalty tables and no device page tables (the layout before the
  persistent batch);
- ``unconditional``: ``persistent`` with the tables' update run every step without the
  ``lax.cond``, its scatters dropping every index when no row has a slot (the candidate
  fix, in case the conditional made XLA copy the tables).

and, on its own, the sampler's part of the step (``jit`` of the tables' update and
``sampling.sample`` on ``[B, V]`` logits, the tables donated) where a copy of the 5 MiB
tables would stand out: ``cond`` (as the runner does), ``unconditional``, ``apply every
step`` (the penalties applied without ``sample``'s ``lax.cond``: the ``[B, V]`` gather of
the rows' counts every step) and ``no tables``.

Two step shapes: ``decode`` (``--rows`` rows, one token each at context ``--context``) and
``mixed`` (``--max-num-batched-tokens`` tokens: ``--chunks`` prompt chunks plus decode
rows). Runs alternate between the variants (the order rotates each repeat), ``--steps``
steps a run (its median is the run's time), ``--repeats`` runs each. Printed (markdown,
for ``benchmarks/RESULTS.md``): each variant's best and median run, their ratios to ``no
tables`` (best to best, and run by run: median and range), the load average, and
(``--hlo``) the copies of a table in each compiled step and whether the step's table
outputs alias its donated inputs. On a shared machine the best runs are the ones others
disturbed least; a copy of the tables would show in every run.

Default model: the 26M-parameter Llama (float32, 12 layers, hidden 256, vocab 32000) of
``offline.py --mix long-tail``, random weights. Run on the CPU:
``JAX_PLATFORMS=cpu python benchmarks/penalty_tables.py`` (about 6 minutes, most of it
compiling; ``--variants`` picks fewer step variants).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import platform
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the repository

PAGE_SIZE = 16


@dataclasses.dataclass(frozen=True)
class Row:
    tokens: int  # fed this step
    start: int  # position of the first fed token (tokens cached before the step)


def step_rows(args: argparse.Namespace) -> dict[str, list[Row]]:
    """The two timed steps: ``decode`` (every row one token at ``--context``) and ``mixed``
    (``--chunks`` prompt chunks from position 0 filling the token budget beside decode rows)."""
    decode = [Row(1, args.context - 1) for _ in range(args.rows)]
    n_decode = args.rows - args.chunks
    chunk = (args.max_num_batched_tokens - n_decode) // args.chunks
    mixed = [Row(chunk, 0) for _ in range(args.chunks)] + [Row(1, args.context - 1) for _ in range(n_decode)]
    return dict(decode=decode, mixed=mixed)


def build_model(args: argparse.Namespace):
    from flax import nnx

    from models.llama import LlamaForCausalLM, config_from_hf

    heads = args.hidden // 64
    config = config_from_hf(dict(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.75),
        num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=args.max_model_len,
    ))
    return config, LlamaForCausalLM(config, rngs=nnx.Rngs(0))


def make_buckets(args: argparse.Namespace, page_slots: int):
    from energon_jax.batch import Buckets
    from energon_jax.parallel.runtime import ROW_SPLIT

    return Buckets.create(max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.rows,
                          max_model_len=args.max_model_len, page_size=PAGE_SIZE, min_tokens=1,
                          penalty_tables=True, row_split=ROW_SPLIT, page_slots=page_slots)


def row_pages(rows: list[Row]) -> list[np.ndarray]:
    """Each row's pages, numbered consecutively from page 1 (page 0 is the null page)."""
    out, nxt = [], 1
    for r in rows:
        n = -(-(r.start + r.tokens) // PAGE_SIZE)
        out.append(np.arange(nxt, nxt + n, dtype=np.int32))
        nxt += n
    return out


def pack_rows(rows: list[Row], buckets, vocab: int, seed: int, first_slot: int = 0):
    """``(StepBatch, page tables [R, M])`` of ``rows`` (row r in page-table slot ``first_slot + r``),
    every row greedy, no penalty."""
    from energon_jax.batch import dummy_batch, fill_positions

    lens = np.array([r.tokens for r in rows], np.int64)
    starts = np.array([r.start for r in rows], np.int64)
    total, nr = int(lens.sum()), len(rows)
    t = buckets.token_bucket(total)
    out = dummy_batch(buckets, t, buckets.rows_bucket(t, nr), 0)
    ends = np.cumsum(lens)
    seg = np.repeat(np.arange(nr), lens)
    pos = np.arange(total) - np.repeat(ends - lens, lens) + np.repeat(starts, lens)
    pages = row_pages(rows)
    table = np.zeros((nr, buckets.max_pages_per_row), np.int32)
    for r, p in enumerate(pages):
        table[r, : len(p)] = p
    if buckets.page_slots:
        out.row_slot[:nr] = first_slot + np.arange(nr)
    else:
        out.attn.page_tables[:nr] = table
    out.input_ids[:total] = np.random.default_rng(seed).integers(3, vocab, total)
    fill_positions(out, np.full(nr, -1), lens, starts, ends, seg, pos, PAGE_SIZE, table[seg, pos // PAGE_SIZE])
    out.sampling.prompt_len[:nr] = starts
    return out, table


def update_every_step(tables, input_ids, segment_ids, positions, s):
    """The candidate: the tables' update without ``update_penalty_tables``'s ``lax.cond``."""
    from energon_jax.sampling import add_step_tokens

    return add_step_tokens(tables, input_ids, segment_ids, positions, s)


@contextlib.contextmanager
def traced_with(update: Callable | None) -> Iterator[None]:
    """Trace (compile) runner steps with ``update`` in place of ``update_penalty_tables``."""
    from energon_jax import runner as runner_lib

    saved = runner_lib.update_penalty_tables
    if update is not None:
        runner_lib.update_penalty_tables = update
    try:
        yield
    finally:
        runner_lib.update_penalty_tables = saved


# step variant -> (penalty tables, device page tables, the tables' update traced in the step)
STEP_VARIANTS: dict[str, tuple[bool, bool, Callable | None]] = {
    "persistent": (True, True, None),
    "no tables": (False, True, None),
    "host pages": (True, False, None),
    "neither": (False, False, None),
    "unconditional": (True, True, update_every_step),
}


@dataclasses.dataclass
class Variant:
    name: str
    runner: object
    batches: dict  # step name -> StepBatch


def build_variants(args: argparse.Namespace, names: list[str]) -> list[Variant]:
    import jax

    from energon_jax.runner import ModelRunner
    from pallas_kernels import make_kv_pages

    config, model = build_model(args)
    shapes = step_rows(args)
    num_pages = 1 + max(sum(len(p) for p in row_pages(rows)) for rows in shapes.values())
    out = []
    for name in names:
        tables, device_pages, update = STEP_VARIANTS[name]
        slots = args.rows if tables else 0
        buckets = make_buckets(args, 2 * args.rows if device_pages else 0)
        kv = tuple(make_kv_pages(num_pages, PAGE_SIZE, config.num_kv_heads, config.head_dim)
                   for _ in range(config.num_layers))
        pages = dict(page_slots=buckets.page_slots, max_pages_per_row=buckets.max_pages_per_row) if device_pages else {}
        runner = ModelRunner(model, kv, max_rows=args.rows, penalty_slots=slots, vocab=config.vocab_size, **pages)
        batches = {}
        for i, (step, rows) in enumerate(shapes.items()):  # step i's rows in slots i * rows ..
            batches[step], table = pack_rows(rows, buckets, config.vocab_size, seed=i, first_slot=i * args.rows)
            if device_pages:
                full = np.array(runner.page_table)
                full[i * args.rows : i * args.rows + len(rows)] = table
                runner.page_table = jax.device_put(full, runner.page_table.sharding)
        with traced_with(update):
            runner.warmup(batches.values())
        out.append(Variant(name, runner, batches))
    return out


def table_copies(variant: Variant, step: str, rows: int, vocab: int) -> tuple[int, bool]:
    """``(copies, aliased)``: instructions of the compiled step that copy a whole ``[S, V]``
    table, and whether the tables' outputs alias their donated inputs."""
    text = variant.runner._executable(variant.batches[step]).as_text()  # private: a benchmark's look inside
    shapes = (f"s32[{rows},{vocab}]", f"pred[{rows},{vocab}]")
    copies = sum(1 for m in re.finditer(r"%(\S+) = ((?:s32|pred)\[\d+,\d+\])\S* (\S+?)\(", text)
                 if m.group(2) in shapes and ("copy" in m.group(3) or "copy" in m.group(1)))
    entry = text[text.index("\nENTRY "):]
    index = [int(m.group(2)) for m in re.finditer(r"= (s32|pred)\[\d+,\d+\]\S* parameter\((\d+)\)", entry)
             if any(sh in m.group(0) for sh in shapes)]
    header = text.splitlines()[0]
    aliased = bool(index) and all(re.search(rf"\({i}, \{{\}}, (may|must)-alias\)", header) for i in index)
    return copies, aliased


def time_steps(v: Variant, step: str, n: int) -> float:
    """Median wall time of ``n`` steps, each dispatched and awaited (ids fetched)."""
    times = []
    for _ in range(n):
        t = time.perf_counter()
        v.runner.step(v.batches[step])
        times.append(time.perf_counter() - t)
    return float(np.median(times))


# sampler variants (the module docstring says what each one runs)
SAMPLER_VARIANTS = ("cond", "unconditional", "apply every step", "no tables")


def sampler_fn(name: str):
    """``jit((tables, logits [B, V], batch) -> (tables, ids))``, the tables donated."""
    import jax

    from energon_jax import sampling

    def fn(tables, logits, batch):
        s = batch.sampling
        if tables is not None:
            update = sampling.add_step_tokens if name == "unconditional" else sampling.update_penalty_tables
            tables = update(tables, batch.input_ids, batch.segment_ids, batch.positions, s)
        if name == "apply every step":
            logits = sampling.apply_penalties(logits, s, tables)
        return tables, sampling.sample(logits, s, tables)[0]

    return jax.jit(fn, donate_argnums=(0,))


def time_sampler(args: argparse.Namespace, batches: dict, repeats: int, calls: int) -> dict:
    """Per-call seconds of each sampler variant and step: ``{(variant, step): [median of a run]}``."""
    import jax.numpy as jnp

    from energon_jax.sampling import make_penalty_tables

    logits = jnp.asarray(np.random.default_rng(0).standard_normal((args.rows, args.vocab)), jnp.float32)
    fns = {n: sampler_fn(n) for n in SAMPLER_VARIANTS}
    tables = {n: None if n == "no tables" else make_penalty_tables(args.rows, args.vocab) for n in SAMPLER_VARIANTS}

    def run(name: str, step: str, n: int) -> float:
        times = []
        for _ in range(n):
            t = time.perf_counter()
            tables[name], ids = fns[name](tables[name], logits, batches[step])
            ids.block_until_ready()
            times.append(time.perf_counter() - t)
        return float(np.median(times))

    for name in SAMPLER_VARIANTS:  # compile, first touches
        for step in batches:
            run(name, step, 3)
    times = {(n, s): [] for n in SAMPLER_VARIANTS for s in batches}
    for rep in range(repeats):
        k = rep % len(SAMPLER_VARIANTS)
        for name in SAMPLER_VARIANTS[k:] + SAMPLER_VARIANTS[:k]:
            for step in batches:
                times[name, step].append(run(name, step, calls))
    return times


def load_average() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def table(times: dict, names, steps, baseline: str) -> list[str]:
    """Markdown rows per variant and step: the fastest run and the median run (ms), and their
    ratios to ``baseline``'s: best to best, and the median of the run-by-run ratios with their
    range. On a shared machine the best run is the one least disturbed by others."""
    lines = []
    for name in names:
        for s in steps:
            t, base = np.array(times[name, s]), np.array(times[baseline, s])
            paired = t / base
            lines.append(f"| {name} | {s} | {t.min() * 1e3:.3f} | {np.median(t) * 1e3:.3f} | "
                         f"{t.min() / base.min():.3f} | {np.median(paired):.3f} "
                         f"({paired.min():.2f}-{paired.max():.2f}) |")
    return lines


TABLE_HEADER = ("| variant | step | best run, ms | median run, ms | best vs best no tables | run by run vs no tables: "
                "median (range) |\n|---|---|---|---|---|---|")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--rows", type=int, default=32, help="max_num_seqs: penalty slots and rows of both steps")
    ap.add_argument("--max-num-batched-tokens", type=int, default=512, help="the mixed step's tokens")
    ap.add_argument("--max-model-len", type=int, default=640)
    ap.add_argument("--context", type=int, default=112, help="decode rows' context length")
    ap.add_argument("--chunks", type=int, default=4, help="prompt chunks in the mixed step")
    ap.add_argument("--variants", default=",".join(STEP_VARIANTS),
                    help=f"step variants, comma-separated, from: {', '.join(STEP_VARIANTS)} ('no tables' always runs)")
    ap.add_argument("--repeats", type=int, default=20, help="alternating runs of each step variant")
    ap.add_argument("--steps", type=int, default=3, help="steps per run (its median is the run's time)")
    ap.add_argument("--sampler-repeats", type=int, default=40, help="alternating runs of each sampler variant")
    ap.add_argument("--sampler-calls", type=int, default=20, help="calls per sampler run")
    ap.add_argument("--hlo", action="store_true", help="count copies of the tables in each compiled step")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in STEP_VARIANTS]
    if unknown:
        raise ValueError(f"variants={args.variants!r}: unknown {unknown}; known: {list(STEP_VARIANTS)}")
    args.names = names if "no tables" in names else ["no tables", *names]
    if not 1 <= args.chunks < args.rows:
        raise ValueError(f"chunks={args.chunks} must be in [1, rows={args.rows})")
    if args.context + 1 > args.max_model_len:
        raise ValueError(f"context={args.context} must be below max_model_len={args.max_model_len}")
    for name in ("repeats", "steps", "sampler_repeats", "sampler_calls"):
        if getattr(args, name) < 1:
            raise ValueError(f"{name}={getattr(args, name)} must be >= 1")
    return args


def main() -> None:
    args = parse_args()
    import jax

    loads = [load_average()]
    t0 = time.perf_counter()
    variants = build_variants(args, args.names)
    print(f"built and compiled {len(variants)} step variants in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    steps = list(variants[0].batches)
    for v in variants:  # one untimed run each: first executions touch fresh memory
        for s in steps:
            time_steps(v, s, 2)
    times = {(v.name, s): [] for v in variants for s in steps}
    loads.append(load_average())
    for rep in range(args.repeats):
        k = rep % len(variants)
        for v in variants[k:] + variants[:k]:
            for s in steps:
                times[v.name, s].append(time_steps(v, s, args.steps))
    loads.append(load_average())
    sampler = time_sampler(args, variants[0].batches, args.sampler_repeats, args.sampler_calls)
    loads.append(load_average())
    b = variants[0].batches
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU threads, jax {jax.__version__} "
          f"({jax.default_backend()}); load average (1/5/15 min) at start, before the steps, after them, after "
          f"the sampler runs: {', '.join(loads)}")
    print(f"model: Llama {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, float32, random weights; "
          f"penalty tables [{args.rows}, {args.vocab}] int32 + bool ({args.rows * args.vocab * 5 / 2**20:.1f} MiB); "
          "steps: " + ", ".join(f"{s} (T={b[s].input_ids.shape[0]}, B={b[s].logits_indices.shape[0]})" for s in steps)
          + f", decode rows at context {args.context}, {args.chunks} prompt chunks in the mixed step; no row uses a "
          "penalty")
    if args.hlo:
        for v in variants:
            if STEP_VARIANTS[v.name][0]:
                for s in steps:
                    copies, aliased = table_copies(v, s, args.rows, args.vocab)
                    print(f"compiled step {v.name} / {s}: {copies} copies of a table, outputs alias the donated "
                          f"tables: {aliased}")
    print()
    print(f"whole step ({args.repeats} alternating runs x {args.steps} steps):")
    print()
    print(TABLE_HEADER)
    print("\n".join(table(times, [v.name for v in variants], steps, "no tables")))
    print()
    print(f"sampler only: update + sample, [{args.rows}, {args.vocab}] logits ({args.sampler_repeats} alternating "
          f"runs x {args.sampler_calls} calls):")
    print()
    print(TABLE_HEADER)
    print("\n".join(table(sampler, SAMPLER_VARIANTS, steps, "no tables")))


if __name__ == "__main__":
    main()
