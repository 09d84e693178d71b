"""Bytes one decode step uploads to the device, with and without penalty rows (issue 13, point 3).

Packs one decode step of ``--rows`` rows (each with a ``--prompt-len`` prompt and a few
outputs, its pages allocated) with ``batch.pack`` and the step loop's ``HostRows``, and
reports the batch's bytes (every leaf goes up with the step: on one process as the step's
input, across processes through the controller's broadcast) and the packing time, for:

- ``device tables + page tables``: what every layout now uploads, in one process and across
  processes (tp, pp x tp, the stacked dp replicas): penalty counts and page tables stay on the
  device (``Buckets.page_slots``): a decode step carries each row's slot and the pages it
  appended, not ``[B, max_model_len / page_size]`` (the step measured repeats the last one,
  so it appends nothing; a row's whole table goes up once, when it joins, as a separate load:
  ``slot_loads.py``, broadcast by the controller across processes);
- ``device tables``: penalty counts on the device, ``[B, M]`` page tables in every batch (what
  offloading and every multi-process layout uploaded before this session);
- ``history in batch``: a runner built without penalty tables (the stacked dp replicas across
  processes before this session), whose batches carry each penalty row's history.

Each with no penalty row and with one.

``--window W`` adds a sliding-window run: ``--rows`` requests in lock step (one prefill
step, then decode, planning ahead as the engine does) on the real scheduler, which releases
the pages behind the window in place; it reports what goes up per decode step, the batch
plus the rows loaded whole (``HostRows.take_loads``), with device page tables and with
``[B, M]`` tables in every batch. Before the history width became a per-step shape,
every batch of the second kind (and, before device tables for the pipeline and offloading,
every step of those layouts) carried ``[B, max_model_len]`` int32 whatever its rows: run
the script on an older commit for the "before" numbers. The pipeline's tick uploads exactly
this batch (fitted to the tick's bucket, which a decode-only pipeline keeps at the step's).

    python benchmarks/history_upload.py --rows 256 --max-model-len 8192
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import jax
import numpy as np

from energon_jax.batch import Buckets, pack
from energon_jax.host_rows import HostRows
from energon_jax.request import Request, RequestStatus, SamplingParams
from energon_jax.scheduler import ScheduledRow, StepPlan


def decode_plan(rows: int, prompt_len: int, page_size: int, penalty_rows: int, seed: int = 0) -> StepPlan:
    rng = np.random.default_rng(seed)
    plan_rows = []
    for i in range(rows):
        params = SamplingParams(max_tokens=64, repetition_penalty=1.2 if i < penalty_rows else 1.0)
        r = Request(f"r{i}", rng.integers(3, 30000, prompt_len).tolist(), params)
        r.output_token_ids = rng.integers(3, 30000, 8).tolist()
        n = prompt_len + len(r.output_token_ids)
        r.pages = list(range(1 + i * (n // page_size + 1), 1 + (i + 1) * (n // page_size + 1)))
        r.num_computed_tokens = n - 1
        r.status = RequestStatus.RUNNING
        plan_rows.append(ScheduledRow(r, [r.output_token_ids[-1]], n - 1, True))
    return StepPlan(plan_rows)


def measure(buckets: Buckets, plan: StepPlan, reps: int, penalty: Any = None) -> tuple[float, float]:
    """(MB of the packed batch, best ms of pack with HostRows); ``penalty``: the rows' (slot, reset)."""
    host = HostRows(buckets, 2 * buckets.max_num_seqs)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        batch = pack(plan, buckets, penalty, host_rows=host)
        best = min(best, time.perf_counter() - start)
    nbytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(batch))
    return nbytes / 2**20, best * 1e3


def window_run(rows: int, window: int, max_model_len: int, page_size: int, device_pages: bool,
               seed: int = 0) -> tuple[list[float], int]:
    """(MiB up per decode step: the batch and the rows loaded whole; rows reloaded after their
    join) for ``rows`` requests decoding in lock step with a sliding window."""
    from energon_jax.sampling import SampledTokens
    from energon_jax.scheduler import Scheduler, SchedulerConfig

    prompt_len, budget = 8, max(2048, rows * 8)  # every prompt in the first step: rows in lock step
    steps = 4 * page_size  # a few pages' worth of decode
    cfg = SchedulerConfig(max_num_seqs=rows, max_num_batched_tokens=budget, max_model_len=max_model_len,
                          page_size=page_size, num_pages=rows * (-(-(window + 2 * budget) // page_size) + 2) + 1,
                          attention_window=window)
    sched = Scheduler(cfg)
    buckets = Buckets.create(max_num_batched_tokens=budget, max_num_seqs=rows, max_model_len=max_model_len,
                             page_size=page_size, penalty_tables=True, page_slots=2 * rows if device_pages else 0)
    host = HostRows(buckets, 2 * rows)
    rng = np.random.default_rng(seed)
    for i in range(rows):
        sched.add(Request(f"r{i}", rng.integers(3, 30000, prompt_len).tolist(),
                          SamplingParams(max_tokens=window + steps, ignore_eos=True)))
    per_step, reloads, joined, in_flight = [], 0, set(), []
    while sched.has_work() or in_flight:
        plan = sched.schedule() if len(in_flight) < 2 else None
        if plan is not None:
            batch = pack(plan, buckets, host_rows=host)
            loads = host.take_loads() if device_pages else []
            reloads += sum(slot in joined for slot, _ in loads)
            joined.update(slot for slot, _ in loads)
            nbytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(batch)) + sum(r.nbytes for _, r in loads)
            first = plan.rows[0]
            if len(first.token_ids) == 1 and first.start_pos >= window:  # decode, past the window's first release
                per_step.append(nbytes / 2**20)
            in_flight.append(plan)
        if in_flight and (plan is None or len(in_flight) == 2):
            done = in_flight.pop(0)
            n = done.num_rows
            sched.update(done, SampledTokens(rng.integers(3, 30000, n).astype(np.int32), np.zeros(n, np.float32),
                                             np.zeros((n, 1), np.int32), np.zeros((n, 1), np.float32)))
    return per_step, reloads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--window", type=int, default=0, help="also a sliding-window decode run (0: none)")
    args = ap.parse_args()
    print(f"one decode step, B={args.rows}, max_model_len={args.max_model_len}, page_size={args.page_size}")
    print("| buckets | penalty rows | batch MiB | pack ms (best) |")
    print("|---|---|---|---|")
    kw = dict(max_num_batched_tokens=max(2048, args.rows), max_num_seqs=args.rows,
              max_model_len=args.max_model_len, page_size=args.page_size)
    layouts = (("device tables + page tables", True), ("device tables", True), ("history in batch", False))
    for name, tables in layouts:
        pages = {"page_slots": 2 * args.rows} if name.endswith("page tables") else {}
        try:
            buckets = Buckets.create(**kw, penalty_tables=tables, **pages)
        except TypeError:  # a commit before device tables (or device page tables)
            if pages:
                continue
            buckets = Buckets.create(**kw)
        for penalty_rows in (0, 1):
            plan = decode_plan(args.rows, args.prompt_len, args.page_size, penalty_rows)
            penalty = None
            if tables and penalty_rows:  # what PenaltySlots.assign gives the step loop
                penalty = (np.where(np.arange(args.rows) < penalty_rows, 0, -1).astype(np.int32),
                           np.zeros(args.rows, np.int32))
            mb, ms = measure(buckets, plan, args.reps, penalty)
            print(f"| {name} | {penalty_rows} | {mb:.2f} | {ms:.2f} |")
    if args.window:
        print(f"\nsliding window {args.window}: {args.rows} rows decoding in lock step, planned ahead")
        print("| page tables | MiB up per decode step (mean) | max | rows reloaded whole |")
        print("|---|---|---|---|")
        for device_pages in (True, False):
            per_step, reloads = window_run(args.rows, args.window, args.max_model_len, args.page_size, device_pages)
            name = "on the device" if device_pages else "[B, M] in the batch"
            print(f"| {name} | {np.mean(per_step):.3f} | {max(per_step):.3f} | {reloads} |")


if __name__ == "__main__":
    main()
