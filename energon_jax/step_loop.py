"""The engine's step loop: plan, pack, dispatch, collect; one call of ``step()`` at a time.

What flows in: the engine's ``Scheduler`` (requests already queued), a runner
(``ModelRunner`` or anything with its interface) and the bucket table. What flows out:
``StreamDelta`` objects, produced by the engine's ``process`` callback from the
scheduler's ``RequestDelta`` (text, stop strings and request bookkeeping stay in the
engine). Which thread: whichever calls ``Engine.step``; nothing here is shared.

One step::

    plan = scheduler.schedule()           # host: who decodes, who prefills (a chunk), pages
    batch = pack(plan, buckets)           # host: one flat, bucketed, padding-free batch
    handle = runner.step_async(batch)     # device: forward + sampling, dispatched async
    ... emit the previous step's text ... # host work while the device runs
    sampled = handle.result()             # the only device -> host transfer: ids, logprobs
    deltas = scheduler.update(plan, sampled)   # host: append tokens, eos/length, free pages

With ``plans_ahead`` (the engine's ``async_scheduling``) ``step()`` schedules, packs and
dispatches step N+1 while step N runs, then fetches N's ids and updates N; one step stays
in flight between calls (see ``scheduler.py`` for the placeholders).

Deferred text: a delta of a request without stop strings that did not finish is turned
into text during the next device step (``_drain_deferred``), so detokenizing overlaps
the device; requests with stop strings are processed at once, so that a match finishes
them before the next step is planned.

``PipelineStepLoop`` (``parallel/pipeline.py``) is this loop for ``pp > 1``: one pipeline
tick per ``step()``, up to ``pp`` micro-batches in flight. ``DataParallelStepLoop``
(``parallel/data_parallel.py``) drives one of these loops per ``dp`` replica, through
``start`` (everything up to the first wait on the device) and ``finish`` (the wait and
the update), every replica's ``start`` first.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any

import numpy as np

from energon_jax import slot_loads
from energon_jax.penalty_slots import PenaltySlots
from energon_jax.protocols import StepRunner
from energon_jax.request import StreamDelta
from energon_jax.sampling import PenaltyTables
from energon_jax.step_split import merge_sampled, split_plan

if TYPE_CHECKING:
    from energon_jax.scheduler import Scheduler, StepPlan

# The engine's callback: scheduler RequestDeltas, each request at most once -> the user's
# StreamDeltas (maybe fewer). One call per step and kind, so text is decoded in one batch.
ProcessFn = Callable[[list[Any]], list[StreamDelta]]


@dataclasses.dataclass(frozen=True)
class DispatchCounts:
    """Instrumentation: device batches packed and the scheduled rows and tokens in them."""

    batches: int = 0  # a step split into decode and prefill calls counts two
    rows: int = 0
    tokens: int = 0

    def __add__(self, other: DispatchCounts) -> DispatchCounts:
        return DispatchCounts(self.batches + other.batches, self.rows + other.rows, self.tokens + other.tokens)

    def __sub__(self, other: DispatchCounts) -> DispatchCounts:
        return DispatchCounts(self.batches - other.batches, self.rows - other.rows, self.tokens - other.tokens)


@dataclasses.dataclass
class InFlight:
    """A dispatched step: its plan and one ``(row indices in plan, StepHandle)`` per device call."""

    plan: StepPlan
    handles: list[tuple[list[int], Any]]


class StepLoop:
    """Drives ``scheduler`` and ``runner`` one step per ``step()`` call (see the module docstring)."""

    def __init__(
        self,
        scheduler: Scheduler,
        runner: StepRunner,
        buckets: Any,
        process: ProcessFn,
        *,
        split_prefill_decode: bool = False,
        plans_ahead: bool = False,
    ) -> None:
        from energon_jax import batch as batch_lib
        from energon_jax.host_rows import HostRows

        self.scheduler = scheduler
        self.runner = runner
        self.buckets = buckets
        self.split_prefill_decode = split_prefill_decode
        self.plans_ahead = plans_ahead
        self._pack_batch = batch_lib.pack
        # Per-request step inputs kept between steps (host_rows.HostRows), a sliding window's
        # released pages included (for the engine's Scheduler: a stand-in without a config packs plainly).
        config = getattr(scheduler, "config", None)
        self._host_rows = (HostRows(buckets, buckets.page_slots or 2 * buckets.max_num_seqs)
                           if config is not None else None)
        if buckets.page_slots and self._host_rows is None:
            raise ValueError("device page tables (Buckets.page_slots) need HostRows: a scheduler with a config")
        # Slots in the runner's device penalty tables (when it keeps them; else batches carry histories).
        slots = getattr(runner, "penalty_slots", 0)
        self._penalty = PenaltySlots(slots, runner.vocab) if slots else None
        # A row joining past position 0 has its slot's counts rebuilt on the host and loaded before
        # the step (one call per chunk, slot_loads.py; across processes the Controller broadcasts them).
        if slots and not hasattr(runner, "write_penalty_rows"):
            raise ValueError(f"{type(runner).__name__} keeps penalty_slots={slots} but has no write_penalty_rows "
                             "to load a rebuilt slot")
        self._process = process
        self._deferred: list[Any] = []  # scheduler deltas whose text is produced during the next step
        self._deferred_steps = 0  # updates those deltas come from (one: each request at most once)
        self._in_flight: InFlight | None = None  # dispatched step whose ids are not fetched yet
        self._to_collect: InFlight | None = None  # dispatched by start(), collected by finish()
        # Steps planned and dispatched while the previous step's ids were still on the device.
        self.num_planned_ahead = 0
        self.counts = DispatchCounts()  # what this loop has sent to the device

    def _pack(self, plan: StepPlan, buckets: Any) -> Any:
        """``batch.pack``, counted: every device batch goes through here (subclasses too).

        With device penalty tables, the rows' slots are assigned here, in dispatch order
        (a slot rebuilt from the host is written before the step that reads it)."""
        self.counts += DispatchCounts(1, plan.num_rows, plan.num_tokens)
        penalty = None
        if self._penalty is not None:
            # A pipeline's micro-batches in flight read their slots when they leave, after this
            # one has entered and written its own: theirs must not be taken (penalty_slots.py).
            busy = [row.request for tag in getattr(self.runner, "in_flight_tags", ()) for row in tag.rows]
            loads: list[tuple[int, np.ndarray, np.ndarray]] = []
            penalty = self._penalty.assign(plan.rows, lambda *row: loads.append(row), busy)
            if loads:  # rebuilt slots go up before the step that reads them
                counts = np.stack([c for _, c, _ in loads])
                seen = np.stack([v for _, _, v in loads])
                for s, r in slot_loads.chunks(np.array([s for s, _, _ in loads]), PenaltyTables(counts, seen)):
                    self.runner.write_penalty_rows(s, r)
        batch = self._pack_batch(plan, buckets, penalty, self._host_rows)
        if buckets.page_slots:  # rows copied whole (joins) go up before the step that reads them
            joined = self._host_rows.take_loads()
            if joined:
                rows = np.stack([row for _, row in joined])
                for s, r in slot_loads.chunks(np.array([s for s, _ in joined]), rows):
                    self.runner.write_page_rows(s, r)
        return batch

    def busy(self) -> bool:
        """Deferred text to emit, or a step in flight that still has an unfinished request."""
        # A step in flight whose requests have all finished (it was planned before they did) is
        # no work: its results are dropped whenever the next step() collects it.
        in_flight = self._in_flight is not None and any(not r.request.finished for r in self._in_flight.plan.rows)
        return bool(self._deferred) or in_flight

    def step(self, live: Collection[str]) -> list[StreamDelta]:
        """Run one engine step; returns the deltas ready now (any request, any order).

        ``live``: the ids of the engine's unfinished requests (nothing to plan while
        there are some is a bug, reported as RuntimeError). With ``plans_ahead`` one step stays in
        flight across calls: the next step is planned, packed and dispatched before the
        previous one's ids are fetched (its placeholders are filled on device), and only
        then is the previous step updated. A step run as two device calls (step_split)
        is not planned past: its ids are fetched first.

        ``step`` is ``start`` then ``finish``; data parallelism (``parallel/data_parallel.py``)
        calls every replica's ``start`` before any ``finish``, so the replicas compute at once.
        """
        out = self.start(live)
        out.extend(self.finish())
        return out

    def start(self, live: Collection[str]) -> list[StreamDelta]:
        """The step up to its first wait on the device: plan, pack, dispatch, emit deferred text.

        Leaves the step to wait for (if any) for ``finish``; never blocks on a device."""
        out: list[StreamDelta] = []
        prev, self._in_flight = self._in_flight, None
        if prev is not None:
            if len(prev.handles) == 1:  # its ids sit in one device buffer, in plan row order
                plan = self.scheduler.schedule()  # planned ahead; None when that would need a preemption
                if plan is not None:
                    self._in_flight = self._dispatch(plan, prev.handles[0][1])
                    self.num_planned_ahead += 1
            out.extend(self._drain_deferred())  # host work overlapping the device step
            self._to_collect = prev
            return out
        plan = self.scheduler.schedule()
        if plan is None:
            out.extend(self._drain_deferred())
            if not out:
                self.check_progress(live)
            return out
        current = self._dispatch(plan, None)
        out.extend(self._drain_deferred())  # host work overlapping the device step
        if self.plans_ahead:
            self._in_flight = current
        else:
            self._to_collect = current
        return out

    def finish(self) -> list[StreamDelta]:
        """Wait for the step ``start`` left to collect, update the scheduler with its ids.

        With ``plans_ahead``, when nothing could be planned ahead in ``start`` (it would
        have needed a preemption, or the previous step was split), the next step is
        planned and dispatched now, after the update, and stays in flight."""
        done, self._to_collect = self._to_collect, None
        if done is None:
            return []
        out = self._collect(done.plan, merge_sampled([(idx, h.result()) for idx, h in done.handles],
                                                     done.plan.num_rows))
        if not self.plans_ahead or self._in_flight is not None:
            return out
        plan = self.scheduler.schedule()
        if plan is not None:
            self._in_flight = self._dispatch(plan, None)
        out.extend(self._drain_deferred())  # host work overlapping the device step
        return out

    @property
    def on_device(self) -> bool:
        """A dispatched step whose ids are not fetched yet."""
        return self._in_flight is not None or self._to_collect is not None

    def check_progress(self, live: Collection[str]) -> None:
        """Nothing ran and nothing came out: an unfinished request the scheduler no longer has is a bug."""
        if live and not self.scheduler.has_work():
            raise RuntimeError(f"scheduler has no work but requests {sorted(live)} are unfinished")

    def _dispatch(self, plan: StepPlan, prev: Any) -> InFlight:
        """Pack and dispatch a plan (two device calls when split); ``prev``: the handle its placeholders read."""
        parts = split_plan(plan) if self.split_prefill_decode else [(plan, list(range(plan.num_rows)))]
        handles = []
        for sub, idx in parts:
            batch = self._pack(sub, self.buckets)
            handle = self.runner.step_async(batch) if prev is None else self.runner.step_async(batch, prev)
            handles.append((idx, handle))
        return InFlight(plan, handles)

    def _collect(self, plan: StepPlan, sampled: Any) -> list[StreamDelta]:
        """Update the scheduler with a step's sampled ids; deltas of stop-string/finished requests now."""
        deltas = self.scheduler.update(plan, sampled)  # (it stamps each request's first_token_time)
        now = [d for d in deltas if d.finished or d.request.params.stop]
        self._deferred.extend(deltas if not now else [d for d in deltas if not (d.finished or d.request.params.stop)])
        self._deferred_steps += 1
        return self._process(now) if now else []  # one plan: each request once

    def _drain_deferred(self) -> list[StreamDelta]:
        deferred, self._deferred = self._deferred, []
        steps, self._deferred_steps = self._deferred_steps, 0
        if not deferred:
            return []
        return self._process(deferred) if steps == 1 else self._process_all(deferred)

    def _process_all(self, deltas: list[Any]) -> list[StreamDelta]:
        """``process`` over ``deltas`` (several steps') in order, in runs where no request appears twice."""
        out: list[StreamDelta] = []
        start, seen = 0, set()
        for i, delta in enumerate(deltas):
            key = id(delta.request)
            if key in seen:  # a later step's delta of the same request: after this run's
                out.extend(self._process(deltas[start:i]))
                start, seen = i, set()
            seen.add(key)
        out.extend(self._process(deltas[start:]))
        return out
