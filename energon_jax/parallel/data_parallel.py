"""Data parallelism: ``dp`` independent replicas inside one engine, each serving its own requests.

``Engine(..., dp=N, pp=P, tp=T)`` on ``N * P * T`` devices builds ``N`` replicas.
Replica ``r`` owns the sub-mesh ``mesh[r, :, :]`` (its own ``P * T`` devices), a copy
of the weights placed there (sharded over its ``tp`` devices; with ``pp > 1`` split
into stages, stage ``s`` on ``mesh[r, s, :]``), its own KV page pool of
``kv_cache_pages`` pages on those devices, its own ``Scheduler`` and its own step loop
(``StepLoop``, or ``PipelineStepLoop`` for a pipeline replica; ``runtime.build_executor``
builds them).
``max_num_seqs``, ``max_num_batched_tokens`` and the KV pool are per replica: ``dp=N``
serves up to ``N * max_num_seqs`` rows at once.

- Admission (``DataParallelScheduler.add``): a new request goes to the replica with the
  least outstanding work (fewest unfinished requests, then the longest cached prefix of
  the request, then fewest tokens still to feed or generate, then the lowest index) and
  stays there until it finishes: its KV pages live on that replica's devices, and so
  does each replica's prefix cache.
- One engine step (``DataParallelStepLoop.step``) is one step of every replica with
  work: every replica's ``start`` (plan, pack, dispatch; JAX dispatch is asynchronous,
  so nothing waits) runs before any replica's ``finish`` (fetch the sampled ids,
  update its scheduler). The replicas therefore compute at the same time, each on its
  own devices, and the host plans replica ``r + 1`` while replica ``r`` computes. With
  ``async_scheduling`` each non-pipeline replica also plans one step ahead, as one
  engine does. For a pipeline replica a step is one tick: ``start`` plans a
  micro-batch and ticks (every stage's work dispatched), ``finish`` collects the
  micro-batch that left its last stage; up to ``pp`` micro-batches are in flight in
  each replica.
- The engine sees the replicas through two small views with the single replica's
  interface: ``DataParallelScheduler`` (add, abort, finish, ``has_work``, and the
  accounting summed over replicas: waiting, running, pages used and total, preemptions)
  and ``DataParallelRunner`` (warm-up and compile counts of every replica). So
  ``has_unfinished``, ``abort``, ``stream``, ``generate`` and ``AsyncEngine`` work as
  they do on one replica.

Greedy tokens equal the single-device engine's: a request's rows are the same
computation whichever replica runs them and whatever else shares its steps.

Across processes every process must run the same jitted step, so there the replicas
share one: ``replica_step.StackedReplicas`` (a ``DataParallelRunner`` whose replicas hold
their batches until ``flush``) stacks every replica's batch along a ``dp`` axis and runs
them in one SPMD step (``replica_step.ReplicaStepRunner``), each replica on its own
devices with its own pages; the schedulers and step loops here are the same.

Instrumentation: ``DataParallelRunner.stats`` counts engine steps with work, each
replica's device batches, rows and tokens, and the most replicas that had a step on
their devices at once (after the dispatch half of an engine step; a pipeline replica
counts while a micro-batch is inside it); a pipeline replica's own ``stats``
(``PipelineStats``) count its ticks, busy stages and micro-batches in flight;
``DataParallelScheduler.assigned`` counts the requests each replica was given.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any

from energon_jax.request import Request, StreamDelta
from energon_jax.step_loop import DispatchCounts, StepLoop

if TYPE_CHECKING:
    from energon_jax.scheduler import Scheduler


@dataclasses.dataclass
class DataParallelStats:
    engine_steps: int = 0  # engine steps in which some replica had a step on its devices
    replicas: list[DispatchCounts] = dataclasses.field(default_factory=list)  # per replica
    max_on_device: int = 0  # the most replicas with a step dispatched and not yet collected, at once

    @property
    def total(self) -> DispatchCounts:
        return sum(self.replicas, DispatchCounts())


class DataParallelRunner:
    """``dp`` replica runners, each on its own devices (see the module docstring)."""

    def __init__(self, replicas: Sequence[Any]) -> None:
        if len(replicas) < 2:
            raise ValueError(f"len(replicas)={len(replicas)} must be >= 2 (dp=1 is a plain runner)")
        self.replicas = list(replicas)
        self.stats = DataParallelStats(replicas=[DispatchCounts() for _ in self.replicas])

    @property
    def dp(self) -> int:
        return len(self.replicas)

    @property
    def num_compiles(self) -> int:
        """Compiles of every replica (each compiles for its own devices)."""
        return sum(r.num_compiles for r in self.replicas)

    @property
    def kv_caches(self) -> list[Any]:
        """Every replica's KV cache (one tuple of per-layer pages each)."""
        return [r.kv_cache for r in self.replicas]

    def warmup(self, batches: Sequence[Any]) -> int:
        for r in self.replicas:  # a Sequence: walked once per replica
            r.warmup(batches)
        return self.num_compiles

    def flush(self) -> None:
        """Called after every replica's ``start``: nothing here (each replica dispatched its own
        step); ``replica_step.StackedReplicas`` dispatches its one stacked step."""

    def reset_stats(self) -> None:
        """Zero these counters and every replica's own (a pipeline's ``PipelineStats``)."""
        self.stats = DataParallelStats(replicas=[DispatchCounts() for _ in self.replicas])
        for r in self.replicas:
            if hasattr(r, "reset_stats"):
                r.reset_stats()


def _outstanding(scheduler: Scheduler) -> tuple[int, int]:
    """A replica's load: unfinished requests, and the tokens they still have to feed or generate."""
    reqs = (*scheduler.running, *scheduler.waiting)
    return len(reqs), sum(r.max_num_tokens - r.num_computed_tokens for r in reqs)


class DataParallelScheduler:
    """The engine's view of the replicas' schedulers: routes requests, sums the accounting."""

    def __init__(self, replicas: Sequence[Any]) -> None:
        if len(replicas) < 2:
            raise ValueError(f"len(replicas)={len(replicas)} must be >= 2 (dp=1 is a plain scheduler)")
        self.replicas = list(replicas)
        self.config = self.replicas[0].config  # every replica has the same (per-replica) limits
        self.assigned = [0] * len(self.replicas)  # requests given to each replica

    def add(self, request: Request) -> int:
        """Queue ``request`` on the least loaded replica; returns its index. ValueError as ``Scheduler.add``.

        Among replicas with as few unfinished requests, the one holding the longest cached
        prefix of the request wins (its pages live there only)."""
        loads = [_outstanding(s) for s in self.replicas]
        cached = self._cached_pages(request)
        r = min(range(len(self.replicas)), key=lambda i: (loads[i][0], -cached[i], loads[i][1], i))
        self.replicas[r].add(request)
        self.assigned[r] += 1
        return r

    def _cached_pages(self, request: Request) -> list[int]:
        """Pages of ``request``'s prefix cached on each replica (all 0 unless every replica caches
        with the same hash root, so that the request's block hashes mean the same everywhere)."""
        caches = [getattr(s, "prefix_cache", None) for s in self.replicas]
        if any(c is None for c in caches) or len({c.root for c in caches}) != 1:
            return [0] * len(self.replicas)
        return [len(c.match(request)) for c in caches]

    def replica_of(self, request_id: str) -> int | None:
        """The replica that holds an unfinished request (None when unknown or finished)."""
        return next((i for i, s in enumerate(self.replicas) if s.get(request_id) is not None), None)

    def get(self, request_id: str) -> Request | None:
        r = self.replica_of(request_id)
        return None if r is None else self.replicas[r].get(request_id)

    def abort(self, request_id: str) -> Request | None:
        return self.finish(request_id, "abort")

    def finish(self, request_id: str, reason: str) -> Request | None:
        r = self.replica_of(request_id)
        return None if r is None else self.replicas[r].finish(request_id, reason)

    def has_work(self) -> bool:
        return any(s.has_work() for s in self.replicas)

    def _sum(self, attr: str) -> int:
        return sum(getattr(s, attr) for s in self.replicas)

    @property
    def num_waiting(self) -> int:
        return self._sum("num_waiting")

    @property
    def num_running(self) -> int:
        return self._sum("num_running")

    @property
    def pages_used(self) -> int:
        return self._sum("pages_used")

    @property
    def pages_total(self) -> int:
        return self._sum("pages_total")

    @property
    def num_preemptions(self) -> int:
        return self._sum("num_preemptions")

    @property
    def pages_cached(self) -> int:
        return self._sum("pages_cached")

    @property
    def prefix_cache_queries(self) -> int:
        return self._sum("prefix_cache_queries")

    @property
    def prefix_cache_hits(self) -> int:
        return self._sum("prefix_cache_hits")

    @property
    def num_planned_ahead(self) -> int:
        return self._sum("num_planned_ahead")


class DataParallelStepLoop:
    """The engine's step loop for ``dp > 1``: one ``StepLoop`` per replica, started together."""

    def __init__(
        self,
        scheduler: DataParallelScheduler,
        runner: DataParallelRunner,
        *,
        make_loop: Callable[[Any, Any], StepLoop],
    ) -> None:
        """``make_loop(scheduler, runner)``: one replica's step loop (``runtime._loop_for``)."""
        if len(scheduler.replicas) != runner.dp:
            raise ValueError(f"{len(scheduler.replicas)} schedulers for {runner.dp} replica runners")
        self.scheduler = scheduler
        self.runner = runner
        self.loops = [make_loop(s, r) for s, r in zip(scheduler.replicas, runner.replicas)]

    @property
    def num_planned_ahead(self) -> int:
        return sum(loop.num_planned_ahead for loop in self.loops)

    @property
    def counts(self) -> DispatchCounts:
        return sum((loop.counts for loop in self.loops), DispatchCounts())

    def busy(self) -> bool:
        return any(loop.busy() for loop in self.loops)

    def step(self, live: Collection[str]) -> list[StreamDelta]:
        """Every replica's ``start``, then every replica's ``finish``; deltas of all replicas.

        ``live``: the engine's unfinished request ids, checked only when no replica ran
        anything (as ``StepLoop.check_progress`` does for one)."""
        before = [loop.counts for loop in self.loops]
        out: list[StreamDelta] = []
        for loop in self.loops:  # dispatch everywhere first: the replicas compute at once
            out.extend(loop.start(()))  # each replica's own live set is its scheduler's
        self.runner.flush()  # replicas sharing one stacked step (replica_step.py): it goes now
        on_device = sum(loop.on_device for loop in self.loops)
        for loop in self.loops:
            out.extend(loop.finish())
        st = self.runner.stats
        st.max_on_device = max(st.max_on_device, on_device)
        if on_device:
            st.engine_steps += 1
        st.replicas = [c + (loop.counts - b) for c, loop, b in zip(st.replicas, self.loops, before)]
        if not out and not on_device and live and not self.scheduler.has_work():
            raise RuntimeError(f"schedulers have no work but requests {sorted(live)} are unfinished")
        return out
