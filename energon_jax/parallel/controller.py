"""The hierarchical controller: one process schedules, every process computes.

In a multi-process run (``parallel/distributed.py``) every process holds the same
model, sharded over one global mesh, and must launch the *same* jitted step at the
same time, or the collectives inside it never meet. Only process 0 owns the
scheduler and the API, so it tells the others what to run:

::

    process 0 (controller)                    process i > 0 (worker)
    ----------------------                    ----------------------
    plan = scheduler.schedule()
    batch = pack(plan, buckets)
    broadcast header [STEP, shape index] ---> header = receive()
    broadcast batch (that shape's arrays) ---> batch = receive(template[shape index])
    runner.step_async(batch)                  runner.step_async(batch)
            \\_______ one SPMD step over the global mesh _______/
    sampled ids (replicated) -> scheduler     (drops its copy, waits for the next header)
    ...
    broadcast header [STOP, 0]  -----------> returns from serve()

The broadcast goes through ``jax.experimental.multihost_utils.broadcast_one_to_all``:
a collective over all devices of all processes, so it needs fixed shapes known to
every process. The header is always two int32; the batch's shapes come from the
fixed bucket list (``batch.warmup_batches``), which every process builds from the
same config, so a shape index is enough to know what arrives.

``Controller`` has the runner's interface (``step_async``, ``step``, ``warmup``,
``num_compiles``, ``kv_cache``), so the engine swaps it in for its ``ModelRunner``
when ``jax.process_count() > 1``; workers call ``serve()`` instead of serving an API.
In a single process it adds nothing: ``step_async`` is the runner's.

A dead process cannot be waited out: the collectives would block for ever. The
coordination service (short heartbeat, ``distributed.py``) ends the survivors, and
``energon launch`` stops every process as soon as one fails.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from energon_jax.protocols import CompiledRunner, StepRunner

log = logging.getLogger(__name__)

STEP, STOP = 1, 2


def _shape_key(batch: Any) -> tuple:
    leaves, treedef = jax.tree.flatten(batch)
    return (treedef, tuple((np.shape(x), np.dtype(x.dtype).str) for x in leaves))


class Controller:
    """Runs each step on every process of the mesh; process 0 decides what the step is.

    ``runner``: a ``ModelRunner`` (or anything with its interface) whose parameters and
    KV pages live on the global mesh. ``templates``: one batch per shape the runner may
    see (``batch.warmup_batches(buckets)``), in the same order on every process.
    """

    def __init__(self, runner: StepRunner, templates: Sequence[Any], *, process_index: int | None = None,
                 process_count: int | None = None) -> None:
        self.runner = runner
        self.templates = list(templates)
        if not self.templates:
            raise ValueError("templates is empty: give one batch per step shape (batch.warmup_batches)")
        self._index = {_shape_key(b): i for i, b in enumerate(self.templates)}
        if len(self._index) != len(self.templates):
            raise ValueError("templates has two batches of the same shape")
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        self.steps = 0
        self._stopped = False

    @property
    def is_controller(self) -> bool:
        return self.process_index == 0

    @property
    def multi_process(self) -> bool:
        return self.process_count > 1

    # -- the runner's interface (process 0, or any process when alone) -------------------

    @property
    def kv_cache(self):
        return self.runner.kv_cache

    @property
    def num_compiles(self) -> int:
        return self.runner.num_compiles

    @property
    def compiled_shapes(self):
        return self.runner.compiled_shapes

    def warmup(self, batches: Sequence[Any]) -> int:
        """Every process compiles the same shapes (compiles are local; nothing to broadcast)."""
        return self.runner.warmup(batches)

    def step_async(self, batch: Any):
        if not self.multi_process:
            return self.runner.step_async(batch)
        if not self.is_controller:
            raise RuntimeError(f"process {self.process_index} is a worker: it runs serve(), not step_async()")
        if self._stopped:
            raise RuntimeError("the controller was shut down; the workers are gone")
        shape = self._index.get(_shape_key(batch))
        if shape is None:
            raise ValueError("batch shape is not one of the templates' shapes (buckets differ from the workers'?)")
        self._broadcast(np.array([STEP, shape], np.int32))
        batch = self._broadcast(batch)
        self.steps += 1
        return self.runner.step_async(batch)

    def step(self, batch: Any):
        return self.step_async(batch).result()

    def shutdown(self) -> None:
        """Process 0: tell every worker to return from ``serve()``. Idempotent."""
        if self.multi_process and self.is_controller and not self._stopped:
            self._stopped = True
            self._broadcast(np.array([STOP, 0], np.int32))

    # -- workers ----------------------------------------------------------------------------

    def serve(self) -> int:
        """Process i > 0: run every step process 0 broadcasts until it says stop; returns the step count."""
        if not self.multi_process or self.is_controller:
            raise RuntimeError("serve() is for worker processes (process_index > 0 of a multi-process run)")
        while True:
            cmd, shape = (int(v) for v in self._broadcast(np.zeros(2, np.int32)))
            if cmd == STOP:
                log.info("process %d: stop after %d steps", self.process_index, self.steps)
                return self.steps
            if cmd != STEP or not 0 <= shape < len(self.templates):
                raise RuntimeError(f"process {self.process_index}: bad header {cmd=} {shape=} from process 0")
            batch = self._broadcast(self.templates[shape])
            self.runner.step_async(batch)  # outputs stay on device; process 0 reads the ids
            self.steps += 1

    def _broadcast(self, tree: Any) -> Any:
        from jax.experimental import multihost_utils

        out = multihost_utils.broadcast_one_to_all(tree, is_source=self.is_controller)
        return jax.tree.map(np.asarray, out)


def serve_if_worker(runner: CompiledRunner | None) -> bool:
    """For commands (``energon serve``, ``generate``) after building the engine:

    ``if serve_if_worker(engine.runner): return 0``. A worker process runs every step
    process 0 broadcasts and returns ``True`` when process 0 shuts down; process 0 (or a
    single process) returns ``False`` at once and goes on to serve the API.
    """
    if isinstance(runner, Controller) and runner.multi_process and not runner.is_controller:
        runner.serve()
        return True
    return False


def shutdown_workers(runner: CompiledRunner | None) -> None:
    """For process 0 when it stops serving: the workers return from ``serve()``."""
    if isinstance(runner, Controller):
        runner.shutdown()
