"""The scheduler's waiting queue, and admission: which waiting requests join a step's rows.

What flows in: new requests (``append``), preempted ones (``appendleft``), and from each
``Scheduler.schedule`` call the rows planned so far, the token budget left and the
running list (``admit``). What flows out: the admitted requests, moved onto the running
list with their pages and first row. Which thread: the scheduler's (plain Python).

Admission is first come, first served: a request that does not fit (tokens,
``max_num_seqs``, free pages) blocks those behind it, so large requests are not starved.
With the prefix cache on (not under static batching) two things change:

- Order: when at most ``PREFER_CACHED_MAX_WAITING`` requests wait and some pages are
  cached, the ones with the longest cached prefix are tried first; preempted ones still
  lead, and one passed over for ``MAX_BYPASSED_STEPS`` schedule calls goes first again.
- Deferral: a request whose next page is one that a running request is still computing
  waits (SGLang's in-batch prefix sharing: the page is a hit a step later instead of
  being computed twice); the requests behind it are still tried.

An admitted request reuses every published page of its longest cached prefix (``match``,
at most ``num_tokens - 1`` tokens) and starts feeding after them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

from energon_jax.kv_cache import PageAllocator
from energon_jax.prefix_cache import PrefixCache
from energon_jax.request import Request, RequestStatus
from energon_jax.sliding_window import pages_behind_window
from energon_jax.step_plan import ScheduledRow, SchedulerConfig, feed_row
from pallas_kernels.page_layout import NULL_PAGE

# Prefix-aware admission order applies when at most this many requests wait (sorting costs a
# cache lookup per waiting request, each step)...
PREFER_CACHED_MAX_WAITING = 32
# ...and a request passed over for this many schedule calls is tried first again (no starvation).
MAX_BYPASSED_STEPS = 16


class WaitingQueue:
    """Requests waiting for pages (preempted at the front, then arrival order), for one scheduler.

    ``now`` arguments count the scheduler's schedule calls: the clock that tells how long a
    request has been passed over."""

    def __init__(self, config: SchedulerConfig, allocator: PageAllocator, prefix_cache: PrefixCache | None) -> None:
        self.config = config
        self.allocator = allocator
        self.prefix_cache = prefix_cache
        self._queue: deque[Request] = deque()
        self._queued_at: dict[str, int] = {}  # request id -> ``now`` when it was queued; one per queued request
        self._static_batch: set[str] = set()  # static_batching: the batch now being run

    def __len__(self) -> int:
        return len(self._queue)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._queue)

    def append(self, req: Request, now: int) -> None:
        """Queue a new request behind the others."""
        self._queue.append(req)
        self._queued_at[req.request_id] = now

    def appendleft(self, req: Request, now: int) -> None:
        """Queue a preempted request in front (victims come newest first, so the oldest ends up first)."""
        self._queue.appendleft(req)
        self._queued_at[req.request_id] = now

    def remove(self, req: Request) -> None:
        """Take ``req`` off the queue (``ValueError`` when it is not queued)."""
        self._queue.remove(req)
        self._queued_at.pop(req.request_id, None)

    def leave_batch(self, request_id: str) -> None:
        """``request_id`` left the running batch (finished, or handed elsewhere)."""
        self._static_batch.discard(request_id)

    def admit(
        self, rows: list[ScheduledRow], budget: int, running: list[Request], *, now: int, max_rows: int | None = None
    ) -> int:
        """Admit waiting requests into ``rows`` and onto ``running`` (at most ``max_rows`` rows in all
        when given) while ``budget`` tokens last; returns the budget left.

        A request that does not fit blocks those behind it (first come, first served in the
        admission order); one deferred for a prefix being computed is skipped."""
        cfg = self.config
        if cfg.static_batching and not self._static_batch and not running:
            # The previous batch is over: the next one is the head of the queue.
            self._static_batch = {r.request_id for r in list(self._queue)[: cfg.max_num_seqs]}
        cache = self.prefix_cache
        smart = cache is not None and not cfg.static_batching  # prefix-aware order and deferral
        pending = cache.pending(running) if smart and self._queue else None
        for req in self.order(now) if smart else list(self._queue):
            if budget <= 0 or len(running) >= cfg.max_num_seqs:
                break
            if max_rows is not None and len(rows) >= max_rows:
                break
            if cfg.static_batching and req.request_id not in self._static_batch:
                break  # batch members are always a prefix of the queue
            hits = [] if cache is None else cache.match(req)
            if pending is not None and cache.waits_for(req, len(hits), pending):
                continue  # hits the cache a step later instead of computing the same pages twice
            cached = len(hits) * cfg.page_size
            # Sliding window: cached pages behind the first fed token's window are never read.
            behind = 0 if cfg.attention_window is None else pages_behind_window(cached, cfg.attention_window,
                                                                                cfg.page_size)
            n = min(req.num_tokens - cached, budget)
            need = self.allocator.pages_needed(cached + n) - len(hits)
            if not self.allocator.can_allocate(need + self.allocator.num_unreferenced(hits[behind:])):
                break
            self.remove(req)
            self.allocator.acquire(hits[behind:])
            req.pages = [NULL_PAGE] * behind + hits[behind:] + self.allocator.allocate(need)
            req.num_computed_tokens = cached
            if cache is not None:
                cache.admitted(req, len(hits), first=req.status is RequestStatus.WAITING)
                if pending is not None:
                    pending.update(req.block_hashes[len(hits):])
            req.status = RequestStatus.RUNNING
            running.append(req)
            rows.append(feed_row(req, n))
            budget -= n
        return budget

    def order(self, now: int) -> list[Request]:
        """The queue in the order admission tries it: as queued, or, when it is short and pages
        are cached, longest cached prefix first (preempted and long-bypassed requests lead)."""
        waiting = list(self._queue)
        if len(waiting) > PREFER_CACHED_MAX_WAITING or len(waiting) < 2 or not self.allocator.num_cached:
            return waiting

        def key(req: Request) -> tuple[int, int]:
            if req.status is RequestStatus.PREEMPTED:
                return (0, 0)
            if now - self._queued_at.get(req.request_id, now) > MAX_BYPASSED_STEPS:
                return (1, 0)
            return (2, -len(self.prefix_cache.match(req)))

        return sorted(waiting, key=key)
