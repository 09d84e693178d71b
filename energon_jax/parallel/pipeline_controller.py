"""``PipelineController``: the SPMD pipeline (``spmd_pipeline.SpmdPipelineRunner``) across processes.

Process 0 runs the pipeline's clock and broadcasts each tick's new micro-batch through the
``Controller``; every process runs the same jitted tick on its own devices. Only the new
micro-batch crosses processes: the ring of plans, the activations and the penalty tables
stay on the devices.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from energon_jax.parallel.controller import Controller
from energon_jax.parallel.pipeline import PipelineStats

if TYPE_CHECKING:
    from energon_jax.parallel.spmd_pipeline import SpmdPipelineRunner


class TickDispatch:
    """What ``Controller`` drives for a pipeline: ``step_async`` runs one fitted tick on this
    process. Everything else the controller asks of its runner (the device tables and their
    row loads, warm-up, compile counts) is the pipeline's own, passed through."""

    def __init__(self, runner: SpmdPipelineRunner) -> None:
        self.pipeline = runner

    def step_async(self, batch: Any, *, fetch: bool = True) -> Any:
        return self.pipeline.run_tick(batch, fetch=fetch)

    @property
    def kv_cache(self) -> Any:
        return self.pipeline.kv

    def __getattr__(self, name: str) -> Any:
        if name == "pipeline":  # not set yet (copying, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.pipeline, name)


class PipelineController(Controller):
    """The ``Controller`` for an ``SpmdPipelineRunner``: process 0 runs the clock and
    broadcasts each tick's (fitted) micro-batch; every process runs the same tick.

    Only the new micro-batch crosses processes: the ring of plans and the activations stay on
    the devices. Workers call ``serve()`` as for any ``Controller``. It has the pipeline's
    interface (``tick``, ``empty``, ``in_flight_tags``, ``stats``), so ``PipelineStepLoop``
    drives it as it drives the runner."""

    def __init__(self, runner: SpmdPipelineRunner, templates: Sequence[Any], **kwargs: Any) -> None:
        super().__init__(TickDispatch(runner), templates, **kwargs)
        self.pipeline = runner
        self.pp = runner.pp
        runner.dispatch = self.step_async

    def tick(self, batch: Any | None = None, tag: Any = None):
        left = self.pipeline.tick(batch, tag)
        return None if left is None else (left[0], self._counted(left[1]))  # its fetch counted (controller_stats)

    @property
    def empty(self) -> bool:
        return self.pipeline.empty

    @property
    def in_flight_tags(self) -> list[Any]:
        return self.pipeline.in_flight_tags

    @property
    def stats(self) -> PipelineStats:
        return self.pipeline.stats  # the schedule's; the controller's own: ``controller_stats``

    def reset_stats(self) -> None:
        self.pipeline.reset_stats()

    def step(self, batch: Any) -> Any:
        return self.pipeline.step(batch)
