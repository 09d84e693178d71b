"""Iteration-level scheduling over the paged KV cache: who runs in the next step, and how much.

What flows in: ``Request`` objects (``add``), aborts and stop-string finishes from the
engine (``abort``, ``finish``), and after every step the sampled ids (``update``).
What flows out: a ``StepPlan`` per step (``schedule``), which ``batch.pack`` turns into
one padding-free device batch, and ``RequestDelta`` objects (``update``): the new tokens
of each request and whether it finished.

Which thread: the engine's step loop, and only it. The scheduler is plain Python (no
JAX, no locks); the async engine hands aborts over to the step thread before calling in.
The calls alternate: ``schedule -> (device step) -> update -> schedule -> ...``, except that
one plan may be in flight: ``schedule`` of step N+1 may come before ``update`` of step N
(the host plans while the device runs), and then ``update`` takes the plans in order.
With pipeline parallelism (``schedule_micro_batch``) up to ``pp`` plans are in flight,
each over requests that no other plan in flight holds.

Planning ahead (``schedule`` with plan N in flight): a request that samples in N owes one
token the host does not know yet. Its N+1 row feeds a placeholder (``PLACEHOLDER``) whose
``prev_row`` says which row of N samples the real token; the device fills it in before
the forward. Positions and pages are computed as if the token exists:
``num_computed_tokens`` always advances when a row is scheduled, not at ``update``. A
request that surely finishes in N by length gets no N+1 row (``max_tokens`` stays exact);
one that finishes in N by eos/stop is dropped from N+1 by ``update(N)`` marking it
finished, its N+1 token ignored. Planning ahead never preempts: when a row cannot get
pages, ``schedule`` returns ``None`` and the engine updates N before planning again.

One step, in order (``schedule``):

1. Running requests, oldest admission first, get all the tokens they have not fed yet,
   bounded by the token budget (``max_num_batched_tokens``): one token for a request that
   is decoding, the next chunk for one whose prompt is being prefilled in chunks. A
   request whose pages cannot grow preempts the most recently admitted running request
   (possibly itself): its pages go back to the pool, it returns to the front of the
   waiting queue with ``num_computed_tokens = 0``, and when readmitted it recomputes
   prompt + generated tokens at the same positions before sampling again.
2. If nothing was preempted, waiting requests (preempted ones first, then arrival order)
   are admitted while the budget, ``max_num_seqs`` and the free pages allow; each feeds
   the first chunk of its known tokens. Admission is first come, first served: a request
   that does not fit blocks those behind it, so large requests are not starved
   (``waiting_queue.py``: the queue, its order and admission).

Prefix caching (``enable_prefix_caching``; ``kv_cache.py`` has the hashes and the LRU):
a request's known tokens are hashed page by page when it is queued. Admission reuses every
published page of its longest cached prefix, up to ``num_tokens - 1`` tokens (the last
known token is always fed, for its logits), and starts feeding after them. A page is
published in ``update``, once the step that wrote it is done and every one of its
positions is written, never at ``schedule``: a plan made ahead must not read a page that
the plan still in flight is writing. Pages filled by decoding are published the same way.
A short queue is admitted longest cached prefix first, and a request whose next page a
running request is still computing waits for it (``waiting_queue.py``); static batching
keeps plain FCFS admission.

Pages are allocated for exactly the tokens fed this step; a request that finishes or is
aborted drops its references in that same call (a shared page stays with its other
users). ``static_batching=True`` is the benchmark's baseline: a batch of up to ``max_num_seqs`` requests is admitted only when
the previous batch has completely finished, and no request joins it while it runs.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from energon_jax.kv_cache import PageAllocator
from energon_jax.prefix_cache import PrefixCache
from energon_jax.sliding_window import live_pages, pages_held_at_once, release_pages_behind_window

from energon_jax.request import Request, RequestStatus
from energon_jax.step_plan import PLACEHOLDER, RequestDelta, ScheduledRow, SchedulerConfig, StepPlan, feed_row
from energon_jax.waiting_queue import WaitingQueue

__all__ = ["PLACEHOLDER", "RequestDelta", "ScheduledRow", "Scheduler", "SchedulerConfig", "StepPlan"]

if TYPE_CHECKING:  # SampledTokens lives with the device-side sampler; only its arrays are read here
    from energon_jax.sampling import SampledTokens


class Scheduler:
    """Decides every step's rows; owns the page allocator and the waiting/running queues."""

    def __init__(self, config: SchedulerConfig, *, eos_token_ids: Iterable[int] = ()) -> None:
        self.config = config
        self.allocator = PageAllocator(config.num_pages, config.page_size)
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self._running: list[Request] = []  # admission order: the most recently admitted is last
        self._requests: dict[str, Request] = {}  # every request not finished yet
        # Scheduled, not yet updated, oldest first: at most two (planning ahead), or one per
        # pipeline stage (schedule_micro_batch).
        self._in_flight: list[StepPlan] = []
        self.num_planned_ahead = 0  # plans made while the previous one was in flight
        self.num_preemptions = 0
        self.prefix_cache = (
            PrefixCache(self.allocator, seed=config.prefix_cache_seed) if config.enable_prefix_caching else None
        )
        # Preempted at the front, then arrival order; admission takes them into _running.
        self._waiting = WaitingQueue(config, self.allocator, self.prefix_cache)
        self._num_schedules = 0  # the waiting queue's clock

    # -- what the engine asks -------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def pages_used(self) -> int:
        return self.allocator.num_used

    @property
    def pages_total(self) -> int:
        return self.allocator.num_usable

    @property
    def pages_cached(self) -> int:
        """Published prefix-cache pages, referenced or free."""
        return self.allocator.num_cached

    @property
    def prefix_cache_queries(self) -> int:
        """Tokens of admitted requests looked up in the prefix cache (0 when it is off)."""
        return 0 if self.prefix_cache is None else self.prefix_cache.query_tokens

    @property
    def prefix_cache_hits(self) -> int:
        """Of ``prefix_cache_queries``, the tokens whose pages were reused."""
        return 0 if self.prefix_cache is None else self.prefix_cache.hit_tokens

    @property
    def running(self) -> tuple[Request, ...]:
        """Running requests in admission order (the next preemption victim is last)."""
        return tuple(self._running)

    @property
    def waiting(self) -> tuple[Request, ...]:
        """Waiting requests in admission order (preempted ones first)."""
        return tuple(self._waiting)

    def has_work(self) -> bool:
        return bool(self._waiting or self._running)

    def get(self, request_id: str) -> Request | None:
        return self._requests.get(request_id)

    # -- requests in and out --------------------------------------------------------------
    def add(self, request: Request) -> None:
        """Queue a request; ``ValueError`` if it could never run (too long, or more pages than the pool)."""
        cfg = self.config
        rid = request.request_id
        if rid in self._requests:
            raise ValueError(f"request_id={rid!r} is already in use by an unfinished request")
        if request.status is not RequestStatus.WAITING or request.pages or request.num_computed_tokens:
            raise ValueError(f"request_id={rid!r} has status={request.status.value}; only new requests can be added")
        if not request.prompt_token_ids:
            raise ValueError(f"request_id={rid!r}: prompt_token_ids=[] must not be empty")
        total = request.max_num_tokens
        if total > cfg.max_model_len:
            raise ValueError(
                f"request_id={rid!r}: prompt length {len(request.prompt_token_ids)} + "
                f"max_tokens={request.params.max_tokens} = {total} must be <= max_model_len={cfg.max_model_len}"
            )
        # The last sampled token is never fed, so at most total - 1 tokens ever sit in the cache.
        need = self.allocator.pages_needed(total - 1)
        if cfg.attention_window is not None:  # it never holds more than its window's pages at once
            need = min(need, pages_held_at_once(cfg.max_model_len, cfg.page_size, cfg.attention_window,
                                                cfg.max_num_batched_tokens))
        if need > self.allocator.num_usable:
            raise ValueError(
                f"request_id={rid!r} needs {need} KV pages ({total - 1} tokens, page_size={cfg.page_size}) "
                f"but the pool holds {self.allocator.num_usable} (num_pages={cfg.num_pages}, page 0 reserved)"
            )
        self._requests[rid] = request
        self._waiting.append(request, self._num_schedules)
        if self.prefix_cache is not None:
            self.prefix_cache.hash_prompt(request)

    def abort(self, request_id: str) -> Request | None:
        """Finish with reason "abort" and free its pages now; ``None`` if unknown or already finished."""
        return self.finish(request_id, "abort")

    def finish(self, request_id: str, reason: str) -> Request | None:
        """Finish a request for a reason the engine found (a stop string, an abort); frees its pages now."""
        req = self._requests.get(request_id)
        if req is None:
            return None
        if req in self._running:
            self._running.remove(req)
        else:
            self._waiting.remove(req)
        self._finish(req, reason)
        return req

    def _finish(self, req: Request, reason: str) -> None:
        self.allocator.free(live_pages(req.pages))  # without the ones a sliding window released
        req.pages = []
        if self.prefix_cache is not None:
            self.prefix_cache.forget(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        req.finish_time = time.monotonic()
        self._requests.pop(req.request_id, None)
        self._waiting.leave_batch(req.request_id)

    # -- handing a running request to another pool (disagg.py: prefill group -> decode group) --
    def detach(self, request_id: str) -> Request:
        """Take a running request off this scheduler, its pages still referenced in ``allocator``:
        the caller copies them elsewhere, then ``allocator.free(live_pages(req.pages))``.

        ``RuntimeError`` when it is not running here or a plan in flight still holds it."""
        req = self._requests.get(request_id)
        if req is None or req not in self._running:
            raise RuntimeError(f"detach: request_id={request_id!r} is not running here")
        if any(row.request is req for plan in self._in_flight for row in plan.rows):
            raise RuntimeError(f"detach: request_id={request_id!r} has a row in a plan in flight")
        self._running.remove(req)
        if self.prefix_cache is not None:  # its published pages stay hits after the caller frees them
            self.prefix_cache.forget(req)
        self._requests.pop(request_id)
        self._waiting.leave_batch(request_id)
        return req

    def attach(self, request: Request) -> None:
        """Adopt a running request whose ``pages`` this scheduler's ``allocator`` handed out and
        whose first ``num_computed_tokens`` K/V they already hold; it decodes from the next plan."""
        rid = request.request_id
        if rid in self._requests:
            raise RuntimeError(f"attach: request_id={rid!r} is already in use here")
        if request.status is not RequestStatus.RUNNING or self.prefix_cache is not None:
            raise RuntimeError(f"attach: request_id={rid!r} has status={request.status.value} "
                               f"(must be running) or this scheduler caches prefixes (it must not)")
        self._requests[rid] = request
        self._running.append(request)

    # -- one step ---------------------------------------------------------------------------
    def schedule(self) -> StepPlan | None:
        """The next step's rows, or ``None`` when there is nothing to run."""
        if len(self._in_flight) > 1:
            raise RuntimeError("schedule() called with two plans in flight: update() the oldest first")
        self._num_schedules += 1
        if self._in_flight:
            return self._schedule_ahead(self._in_flight[0])
        budget = self.config.max_num_batched_tokens
        rows, preempted, budget = self._fill_rows(list(self._running), budget, cap=None)
        if not preempted:
            self._waiting.admit(rows, budget, self._running, now=self._num_schedules)
        return self._new_plan(rows, preempted)

    def _schedule_ahead(self, prev: StepPlan) -> StepPlan | None:
        """Plan the step after ``prev`` before its tokens are known; ``None`` if that needs a preemption."""
        cfg = self.config
        owed = {id(row.request): i for i, row in enumerate(prev.rows) if row.sample}
        budget = cfg.max_num_batched_tokens
        page_size, max_len = cfg.page_size, cfg.max_model_len
        rows: list[ScheduledRow] = []
        had: list[tuple[Request, int]] = []  # pages each request that grew held before, to undo
        for req in self._running:
            if budget <= 0:
                break
            prev_row = owed.get(id(req), -1)
            if prev_row >= 0:
                # After prev, it holds one more output token; if that one ends it by length, stop here.
                num_out = len(req.output_token_ids) + 1
                if num_out >= req.params.max_tokens or len(req.prompt_token_ids) + num_out >= max_len:
                    continue
                n = 1
            else:
                n = min(req.num_tokens - req.num_computed_tokens, budget)
                if n <= 0:
                    continue
            start = req.num_computed_tokens
            if -(-(start + n) // page_size) > len(req.pages):  # a page more (allocator.pages_needed)
                had.append((req, len(req.pages)))
                if not self._grow_pages(req, start + n):
                    # Undo this attempt: pages hold exactly what was fed, positions only what is planned.
                    for r, k in had:
                        self.allocator.free(r.pages[k:])
                        del r.pages[k:]
                    for row in rows:
                        row.request.num_computed_tokens = row.start_pos
                    return None
            if prev_row >= 0:
                req.num_computed_tokens = start + 1
                rows.append(ScheduledRow(req, [PLACEHOLDER], start, True, prev_row))
            else:
                rows.append(feed_row(req, n))
            budget -= n
        self._waiting.admit(rows, budget, self._running, now=self._num_schedules)
        if not rows:
            return None
        plan = StepPlan(rows, [], ahead=True)
        self._in_flight.append(plan)
        self.num_planned_ahead += 1
        return plan

    def schedule_micro_batch(self, num_groups: int) -> StepPlan | None:
        """Pipeline parallelism: the next micro-batch, from requests with no row in flight.

        Up to ``num_groups`` plans may be in flight at once (one per pipeline stage), and
        ``update`` still takes them oldest first. A request with a row in a plan in flight
        is not planned again until that plan is updated, so its tokens are always known
        (no placeholders). Rows are capped at ``ceil(min(max_num_seqs, running + waiting)
        / num_groups)``: the running requests settle into ``num_groups`` groups of even
        size, and new requests join the micro-batch being planned. A request whose pages
        cannot grow preempts the most recently admitted request that is neither in flight
        nor in this plan (possibly itself); a request in flight is never touched.
        ``None``: nothing can be planned now (everything running is in flight).
        """
        if not isinstance(num_groups, int) or num_groups < 1:
            raise ValueError(f"{num_groups=} must be an integer >= 1")
        if len(self._in_flight) >= num_groups:
            raise RuntimeError(f"{len(self._in_flight)} plans in flight for {num_groups=}: update() the oldest first")
        cfg = self.config
        self._num_schedules += 1
        busy = {id(row.request) for plan in self._in_flight for row in plan.rows}
        idle = [req for req in self._running if id(req) not in busy]  # admission order
        cap = -(-min(cfg.max_num_seqs, len(self._running) + len(self._waiting)) // num_groups)
        budget = cfg.max_num_batched_tokens
        rows, preempted, budget = self._fill_rows(idle, budget, cap=cap)
        if not preempted:
            self._waiting.admit(rows, budget, self._running, now=self._num_schedules, max_rows=cap)
        return self._new_plan(rows, preempted)

    def _new_plan(self, rows: list[ScheduledRow], preempted: list[Request]) -> StepPlan | None:
        """Record ``rows`` as a plan in flight; ``None`` when empty. With nothing in flight and
        work left an empty plan is a bug: everything fits an empty pool (checked in add)."""
        if not rows:
            if not self._in_flight and self.has_work():
                raise RuntimeError(
                    f"nothing schedulable with {self.num_waiting} waiting, {self.num_running} running, "
                    f"{self.allocator.num_free} free pages"
                )
            return None
        plan = StepPlan(rows, preempted)
        self._in_flight.append(plan)
        return plan

    def reset_prefix_cache(self) -> int:
        """Forget every cached page no request references; returns how many were dropped."""
        return self.allocator.reset_prefix_cache()

    def _grow_pages(self, req: Request, num_tokens: int) -> bool:
        """Make ``req.pages`` hold ``num_tokens`` tokens; ``False`` if the pool is short."""
        need = self.allocator.pages_needed(num_tokens) - len(req.pages)
        if need <= 0:
            return True
        if not self.allocator.can_allocate(need):
            return False
        req.pages.extend(self.allocator.allocate(need))
        return True

    def _fill_rows(
        self, candidates: list[Request], budget: int, *, cap: int | None
    ) -> tuple[list[ScheduledRow], list[Request], int]:
        """One row per running candidate (in admission order) while tokens and ``cap`` rows last.

        A candidate whose pages cannot grow preempts the newest candidate (possibly
        itself) until they can; ``candidates`` (a list of running requests the caller
        owns) shrinks from its tail as that happens. Returns ``(rows, preempted, budget left)``.
        """
        rows: list[ScheduledRow] = []
        preempted: list[Request] = []
        i = 0
        while i < len(candidates) and budget > 0 and (cap is None or len(rows) < cap):
            req = candidates[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self._grow_pages(req, req.num_computed_tokens + n):
                victim = candidates.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim is req:
                    break
            if req.status is RequestStatus.PREEMPTED:
                break  # it was the last candidate
            rows.append(feed_row(req, n))
            budget -= n
            i += 1
        return rows, preempted, budget

    def _preempt(self, req: Request) -> None:
        self._running.remove(req)
        self.allocator.free(live_pages(req.pages))  # a page shared with another request stays with it
        req.pages = []
        if self.prefix_cache is not None:
            self.prefix_cache.forget(req)
        req.num_computed_tokens = 0  # recompute prompt + generated tokens when readmitted
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self._waiting.appendleft(req, self._num_schedules)  # victims come newest first: the oldest leads

    def update(self, plan: StepPlan, sampled: SampledTokens) -> list[RequestDelta]:
        """Record a step's results: advance each row, append sampled ids, finish and free as needed.

        One pass over the rows with the per-row work kept to list appends and a few
        comparisons (it runs for every decode row of every step: host time per step)."""
        if not self._in_flight or plan is not self._in_flight[0]:
            raise RuntimeError("update() got a plan that is not the oldest one in flight")
        self._in_flight.pop(0)
        now = time.monotonic()
        cfg = self.config
        cache, window, max_len, page_size = self.prefix_cache, cfg.attention_window, cfg.max_model_len, cfg.page_size
        eos, running = self.eos_token_ids, RequestStatus.RUNNING
        tokens = sampled.token_ids[: len(plan.rows)].tolist()  # Python ints, one per plan row
        deltas: list[RequestDelta] = []
        for i, row in enumerate(plan.rows):
            req = row.request
            if req.status is not running:
                continue  # aborted, or finished by the engine or by the previous step, while it ran
            written = row.start_pos + len(row.token_ids)
            # This step's K/V is written: its full pages can be hits. Pages before start_pos were
            # published by the row's previous step (or are hits of its admission), so only a row
            # that fills a page has any to publish.
            if cache is not None and written // page_size > row.start_pos // page_size:
                cache.publish(req, written)
            if window is not None:
                # Sliding window: every later query (a plan in flight included) sits at or after
                # the tokens written so far; pages behind all their windows go back to the pool
                # (after publish, so a released page stays a prefix-cache hit for others).
                release_pages_behind_window(req.pages, self.allocator, written, window)
            if not row.sample:
                continue  # a prefill chunk that does not reach the end of the prompt
            token = tokens[i]
            out = req.output_token_ids
            out.append(token)
            if req.first_token_time is None:
                req.first_token_time = now
            params = req.params
            logprobs = None
            if params.logprobs is not None:
                top = {int(t): float(lp) for t, lp in zip(sampled.top_ids[i], sampled.top_logprobs[i], strict=True)}
                logprobs = dict(list(top.items())[: params.logprobs])
                logprobs[token] = float(sampled.logprobs[i])
                req.output_logprobs.append(logprobs)
            # Why it ends, if it does: a stop id (eos unless ignored), or its length.
            reason = None
            if token in params.stop_token_ids or (token in eos and not params.ignore_eos):
                reason = "stop"
            elif len(out) >= params.max_tokens or len(req.prompt_token_ids) + len(out) >= max_len:
                reason = "length"
            if reason is not None:
                self._running.remove(req)
                self._finish(req, reason)
                deltas.append(RequestDelta(req, [token], None if logprobs is None else [logprobs], True, reason))
            else:
                deltas.append(RequestDelta(req, [token], None if logprobs is None else [logprobs], False, None))
        return deltas
