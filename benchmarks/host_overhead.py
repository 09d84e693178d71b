"""Host time per engine step (schedule + pack + update + detokenize) against the device step.

The Engine runs its normal step loop over ``R`` decode rows, with the model replaced by an
identity of the same shapes (``IdentityRunner``: a runner whose step returns ids at once,
computed from the batch it was handed), so every millisecond measured is host work:
the scheduler's plan, packing the bucketed batch, the scheduler's update with the ids,
and turning ids into text (the engine's per-delta callback). Each part is timed by
wrapping the function the step loop calls; "other" is the rest of the step loop.

For scale, the device step: the same decode batch through the real ``ModelRunner``
(compiled once, timed to completion), on whatever device JAX runs on. Model: a random
Llama-architecture checkpoint (``--layers``, ``--hidden``) with the demo model's tokenizer,
``max_position_embeddings`` 32768 so ``--max-model-len`` can be large.

Printed: one markdown table row per row count, with the stepping thread's CPU time per
step beside the wall time (on a shared machine the wall time also counts waiting for a
core; the CPU time does not). Target (issue 13): host <= 2 ms per step at 256 rows.
Run: ``JAX_PLATFORMS=cpu python benchmarks/host_overhead.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np


def make_checkpoint(out: Path, *, layers: int, hidden: int, max_len: int = 32768) -> Path:
    """A random Llama checkpoint with the demo model's tokenizer (vocab 4096)."""
    import torch
    import transformers as tf

    from energon_jax.engine import demo_model_path

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=4096, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
        max_position_embeddings=max_len, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )
    tf.LlamaForCausalLM(cfg).to(torch.float32).eval().save_pretrained(str(out))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo_model_path() / name, out / name)
    return out


class IdentityRunner:
    """The runner's interface with no model: ``step_async`` returns ids at once.

    The id of a row is its last fed token plus one (mod the vocabulary, never 0..2), so
    the text changes every step and detokenizing does real work."""

    supports_prev_ids = True

    def __init__(self, vocab: int, max_rows: int) -> None:
        self.vocab = vocab
        self.max_rows = max_rows
        self.penalty_slots = 0

    def write_penalty_rows(self, slots: np.ndarray, rows: Any) -> None:
        pass  # nothing on a device to write

    def write_page_rows(self, slots: np.ndarray, rows: np.ndarray) -> None:
        pass  # the same (device page tables: joining rows' tables)

    def step_async(self, batch: Any, prev: Any = None) -> Any:
        fed = np.asarray(batch.input_ids)
        idx = np.asarray(batch.prev_token_index)
        if prev is not None and (idx >= 0).any():  # placeholders: what the runner fills on device
            fed = np.where(idx >= 0, prev.ids_buffer[np.maximum(idx, 0)], fed)
        ids = (3 + (fed[np.asarray(batch.logits_indices)] + 1) % (self.vocab - 3)).astype(np.int32)
        b = ids.shape[0]
        outs = (ids, np.zeros(b, np.float32), np.zeros((b, 20), np.int32), np.zeros((b, 20), np.float32))
        buffer = np.zeros(max(b, self.max_rows), np.int32)
        buffer[:b] = ids
        return _Handle(outs, buffer)


@dataclasses.dataclass
class _Handle:
    outputs: tuple
    ids_buffer: Any

    def result(self) -> Any:
        from energon_jax.sampling import SampledTokens

        return SampledTokens(*self.outputs)


class PartTimer:
    """Wraps callables and sums the wall time spent in each (name -> seconds)."""

    def __init__(self) -> None:
        self.total: dict[str, float] = defaultdict(float)

    def wrap(self, name: str, fn: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.total[name] += time.perf_counter() - t

        return timed


@dataclasses.dataclass(frozen=True)
class HostResult:
    rows: int
    steps: int
    step_ms: float  # wall per step with the identity runner: all host
    parts_ms: dict[str, float]  # schedule / pack / update / detokenize per step
    # CPU time of the stepping thread per step: what the host work costs when the machine
    # is shared (wall time then includes waiting for a core; this does not)
    cpu_ms: float = 0.0


def build_engine(path: Path, rows: int, max_model_len: int, *, prompt_len: int, steps: int, warmup: bool) -> Any:
    from energon_jax import Engine

    page_size = 16
    # room for every row, and for one max_model_len sequence (the engine refuses less)
    pages = 1 + max(rows * -(-(prompt_len + steps + 64) // page_size), -(-max_model_len // page_size))
    return Engine.from_pretrained(
        path, dtype="float32", max_model_len=max_model_len, max_num_seqs=rows,
        max_num_batched_tokens=max(512, rows), page_size=page_size, kv_cache_pages=pages, warmup=warmup,
    )


def measure_host(engine: Any, rows: int, *, prompt_len: int, steps: int, penalty_fraction: float,
                 seed: int = 0, profile: Any = None) -> HostResult:
    """Fill ``rows`` decode rows, then time ``steps`` steps with the identity runner."""
    from energon_jax import SamplingParams

    loop = engine._loop
    stub = IdentityRunner(4096, max(rows, 16))
    loop.runner = stub
    timer = PartTimer()
    sched = engine.scheduler
    sched.schedule = timer.wrap("schedule", sched.schedule)
    sched.update = timer.wrap("update", sched.update)
    loop._pack_batch = timer.wrap("pack", loop._pack_batch)
    loop._process = timer.wrap("detokenize", loop._process)
    rng = np.random.default_rng(seed)
    for i in range(rows):
        penalty = 1.2 if i < penalty_fraction * rows else 1.0
        params = SamplingParams(max_tokens=steps + 64, temperature=0.0, ignore_eos=True, repetition_penalty=penalty)
        engine.add_request(rng.integers(3, 4096, prompt_len).tolist(), params)
    while any(r.num_computed_tokens < len(r.prompt_token_ids) for r in sched.running) or sched.waiting:
        engine.step()  # prefill (untimed)
    for _ in range(3):
        engine.step()
    timer.total.clear()
    if profile is not None:
        profile.enable()
    t, cpu = time.perf_counter(), time.thread_time()
    for _ in range(steps):
        engine.step()
    wall, cpu = time.perf_counter() - t, time.thread_time() - cpu
    if profile is not None:
        profile.disable()
    parts = {k: 1e3 * v / steps for k, v in timer.total.items()}
    return HostResult(rows, steps, 1e3 * wall / steps, parts, 1e3 * cpu / steps)


def measure_device_step(engine: Any, rows: int, reps: int = 5) -> float:
    """Milliseconds of one real decode step over ``rows`` rows (the step's shape, compiled first)."""
    import jax

    from energon_jax.batch import pack
    from energon_jax.scheduler import ScheduledRow, StepPlan

    reqs = [r for r in engine.scheduler.running][:rows]
    plan = StepPlan([ScheduledRow(r, [5], r.num_tokens - 1, True) for r in reqs])
    batch = pack(plan, engine._buckets)
    runner = engine.runner
    jax.block_until_ready(runner.step(batch))  # compile (counted as a warm-up compile) and first run
    t = time.perf_counter()
    for _ in range(reps):
        runner.step(batch)
    return 1e3 * (time.perf_counter() - t) / reps


def run(rows_list: list[int], *, max_model_len: int, prompt_len: int, steps: int, layers: int, hidden: int,
        penalty_fraction: float, device: bool, ckpt: Path | None = None,
        profile: Any = None) -> list[tuple[HostResult, float | None]]:
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        path = ckpt or make_checkpoint(Path(tmp) / "ckpt", layers=layers, hidden=hidden)
        for rows in rows_list:
            engine = build_engine(path, rows, max_model_len, prompt_len=prompt_len, steps=steps, warmup=False)
            dev = None
            if device:  # before the stub replaces the runner; the requests are added by measure_host
                real = engine.runner
                host = measure_host(engine, rows, prompt_len=prompt_len, steps=steps,
                                    penalty_fraction=penalty_fraction)
                engine._loop.runner = real
                dev = measure_device_step(engine, rows)
            else:
                host = measure_host(engine, rows, prompt_len=prompt_len, steps=steps,
                                    penalty_fraction=penalty_fraction, profile=profile)
            out.append((host, dev))
    return out


def long_tailed_mix(n: int, *, seed: int, vocab: int = 4096) -> tuple[list[list[int]], list[int]]:
    """Prompts long-tailed with mean about 56 up to 512 tokens, outputs mean about 30 up to 128
    (seed 4, n 48: prompts mean 54 up to 361, outputs mean 31 up to 128, 4,067 tokens in all)."""
    rng = np.random.default_rng(seed)
    plen = np.clip(rng.lognormal(np.log(38), 1.0, n), 4, 512).astype(int)
    olen = np.clip(rng.lognormal(np.log(24), 0.7, n), 4, 128).astype(int)
    return [rng.integers(3, vocab, int(p)).tolist() for p in plen], [int(o) for o in olen]


def model_len_sweep(path: Path, lens: list[int], *, n: int, rounds: int, max_num_seqs: int = 16,
                    max_num_batched_tokens: int = 256) -> dict[int, list[float]]:
    """Seconds for the same greedy workload at each ``max_model_len`` (same pool, same buckets
    otherwise), the lengths taking turns ``rounds`` times; the real model runs."""
    from energon_jax import Engine, SamplingParams

    prompts, outs = long_tailed_mix(n, seed=4)
    params = [SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True) for o in outs]
    page_size = 16
    pages = 1 + max(max(lens) // page_size, max_num_seqs * (512 + 128) // page_size)
    engines = {
        L: Engine.from_pretrained(path, dtype="float32", max_model_len=L, max_num_seqs=max_num_seqs,
                                  max_num_batched_tokens=max_num_batched_tokens, page_size=page_size,
                                  kv_cache_pages=pages, enable_prefix_caching=False)
        for L in lens
    }
    for e in engines.values():  # first touch of every step's memory, untimed
        e.generate(prompts[:4], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), use_tqdm=False)
    times: dict[int, list[float]] = {L: [] for L in lens}
    for r in range(rounds):
        for L in (lens if r % 2 == 0 else lens[::-1]):
            t = time.perf_counter()
            got = engines[L].generate(prompts, params, use_tqdm=False)
            times[L].append(time.perf_counter() - t)
            assert sum(len(o.token_ids) for o in got) == sum(outs)
    return times


def table(results: list[tuple[HostResult, float | None]]) -> str:
    lines = ["| decode rows | host ms/step | schedule | pack | update | detokenize | other | host CPU ms/step "
             "| device step ms |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for host, dev in results:
        p = host.parts_ms
        named = sum(p.get(k, 0.0) for k in ("schedule", "pack", "update", "detokenize"))
        lines.append(
            f"| {host.rows} | {host.step_ms:.2f} | {p.get('schedule', 0):.2f} | {p.get('pack', 0):.2f} | "
            f"{p.get('update', 0):.2f} | {p.get('detokenize', 0):.2f} | {host.step_ms - named:.2f} | "
            f"{host.cpu_ms:.2f} | "
            + ("-" if dev is None else f"{dev:.1f}") + " |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--penalty-fraction", type=float, default=0.25, help="share of rows with repetition_penalty")
    ap.add_argument("--no-device", action="store_true", help="skip the real device step")
    ap.add_argument("--profile", action="store_true", help="cProfile the host steps of the largest row count")
    ap.add_argument("--model-len-sweep", type=int, nargs="+", metavar="L",
                    help="instead: time one workload (48 long-tailed requests) at each max_model_len L")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if args.model_len_sweep:
        with tempfile.TemporaryDirectory() as tmp:
            path = make_checkpoint(Path(tmp) / "ckpt", layers=args.layers, hidden=args.hidden)
            times = model_len_sweep(path, args.model_len_sweep, n=48, rounds=args.rounds)
        base = min(times[args.model_len_sweep[0]])
        print(f"48 long-tailed requests, {args.layers} layers x {args.hidden}, best of {args.rounds} (all runs)")
        print("| max_model_len | seconds | vs first |\n|---:|---:|---:|")
        for L, ts in times.items():
            print(f"| {L} | {min(ts):.2f} ({', '.join(f'{x:.2f}' for x in ts)}) | {min(ts) / base:.2f}x |")
        return
    kw = dict(max_model_len=args.max_model_len, prompt_len=args.prompt_len, steps=args.steps, layers=args.layers,
              hidden=args.hidden, penalty_fraction=args.penalty_fraction)
    if args.profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        run(args.rows[-1:], device=False, profile=prof, **kw)
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)
        return
    results = run(args.rows, device=not args.no_device, **kw)
    print(f"max_model_len={args.max_model_len}, prompt {args.prompt_len} tokens, {args.steps} timed decode steps, "
          f"{args.penalty_fraction:.0%} of rows with a repetition penalty")
    print(table(results))


if __name__ == "__main__":
    main()
