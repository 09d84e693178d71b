"""The seams between the engine and what executes its steps, as small ``Protocol``\\ s.

``parallel/runtime.py`` turns one ``ParallelOptions`` into an ``Executor`` whose parts
meet these: the engine holds only them and its request bookkeeping, so a new layout
(another runner, another step loop) needs no change in ``engine.py``.

- ``CompiledRunner``: what the engine asks of any runner (warm-up, compile count); a
  ``DataParallelRunner`` (a group of replica runners) is one.
- ``StepRunner``: what a step loop drives (``ModelRunner``, ``PipelineRunner``,
  ``OffloadedRunner``, the multi-process ``Controller``).
- ``SchedulerView``: what the engine and the async engine ask of the scheduler
  (a ``Scheduler``, or ``DataParallelScheduler`` over several).
- ``EngineLoop``: one engine step (``StepLoop``, ``PipelineStepLoop``,
  ``DataParallelStepLoop``).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any, Protocol, runtime_checkable

from energon_jax.request import Request, StreamDelta


@runtime_checkable
class CompiledRunner(Protocol):
    @property
    def num_compiles(self) -> int: ...

    def warmup(self, batches: Sequence[Any]) -> int: ...


@runtime_checkable
class StepRunner(CompiledRunner, Protocol):
    @property
    def kv_cache(self) -> Any: ...  # per-layer KV pages, on this runner's devices

    def step_async(self, batch: Any) -> Any: ...  # a handle whose result() is the SampledTokens

    def step(self, batch: Any) -> Any: ...


@runtime_checkable
class SchedulerView(Protocol):
    config: Any  # SchedulerConfig: per-replica limits

    def add(self, request: Request) -> Any: ...

    def abort(self, request_id: str) -> Request | None: ...

    def finish(self, request_id: str, reason: str) -> Request | None: ...

    def get(self, request_id: str) -> Request | None: ...

    def has_work(self) -> bool: ...

    @property
    def num_waiting(self) -> int: ...

    @property
    def num_running(self) -> int: ...

    @property
    def pages_used(self) -> int: ...

    @property
    def pages_total(self) -> int: ...


@runtime_checkable
class EngineLoop(Protocol):
    num_planned_ahead: int
    counts: Any  # DispatchCounts

    def step(self, live: Collection[str]) -> list[StreamDelta]: ...

    def busy(self) -> bool: ...
