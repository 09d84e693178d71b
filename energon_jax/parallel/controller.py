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
    publish header "STEP shape prev N" -----> header = wait(N)          (a message, not a device sync)
    broadcast batch (that shape's arrays) ---> batch = receive(shape)   (stays on the devices)
    runner.step_async(batch, prev)            runner.step_async(batch, prev)
            \\_______ one SPMD step over the global mesh _______/
    ... plan and broadcast step N+1 ...       (waits for header N+1)
    sampled ids of step N -> scheduler        (process 0's one device sync)
    ...
    publish header "STOP" -----------------> returns from serve()

The header (what to do, which compiled shape, whether the previous step's ids fill
placeholders, the step number) goes through the coordination service's key-value store
(``HeaderChannel``: ``jax.distributed``'s own, served by process 0), so a worker waits for
a message, never for a device: it makes no device-to-host sync at all. The batch is one
jitted collective (``_Broadcast``): every process hands in one row per device of a
``[devices, ...]`` array, process 0 its batch on its first device and zeros elsewhere, and a
sum over that axis leaves the batch replicated over the global mesh, *on the devices*. The
step consumes it there: a worker never brings a batch back to its host, and process 0 never
waits for a broadcast. Process 0's one blocking sync per step is the fetch of the sampled
ids; a worker never fetches its copy (it asks the runner for no host copy). The batch's
shapes come from the fixed bucket list (``batch.warmup_batches``), which every process
builds from the same config, so a shape index is enough to know what arrives.

Planning ahead (``supports_prev_ids``, the engine's ``async_scheduling``): process 0
broadcasts step N+1 before fetching step N's ids; the header's ``prev`` flag tells each
worker to hand its own previous step's ids buffer (on its devices) to the step, as
process 0 does, so placeholders are filled on device everywhere.

Whole rows of the runner's per-slot device tables (a joining request's page table, a
penalty slot rebuilt on the host: ``slot_loads.py``) go up the same way, before the step
that reads them: process 0 publishes a ``LOAD_PAGES`` or ``LOAD_PENALTIES`` header with the
chunk's row count, broadcasts the chunk, and every process writes it into its own copy of
the table. Between joins nothing of size ``max_model_len`` crosses processes: a step's
batch carries only its rows' slots and the pages they gained.

``Controller`` has the runner's interface (``step_async``, ``step``, ``warmup``,
``num_compiles``, ``kv_cache``), so the engine swaps it in for its ``ModelRunner``
when ``jax.process_count() > 1``; workers call ``serve()`` instead of serving an API.
In a single process it broadcasts nothing: ``step_async`` is the runner's (counted).

``stats`` (``ControllerStats``) counts steps, the blocking device-to-host syncs (ids
fetched), the key-value waits (headers received), and the host time of each.

A dead process cannot be waited out: the collectives would block for ever. The
coordination service (short heartbeat, ``distributed.py``) ends the survivors, and
``energon launch`` stops every process as soon as one fails.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from energon_jax.parallel.header_channel import HeaderChannel
from energon_jax.protocols import CompiledRunner, StepRunner
from energon_jax.slot_loads import LOAD_SIZES, template

log = logging.getLogger(__name__)

STEP, STOP, LOAD_PAGES, LOAD_PENALTIES = 1, 2, 3, 4


def _shape_key(batch: Any) -> tuple:
    leaves, treedef = jax.tree.flatten(batch)
    return (treedef, tuple((np.shape(x), np.dtype(x.dtype).str) for x in leaves))


@dataclasses.dataclass
class ControllerStats:
    """What the controller cost this process: steps run, blocking waits of each kind, host time."""

    steps: int = 0
    loads: int = 0  # chunks of whole rows (page tables, penalty slots) broadcast before a step
    fetch_syncs: int = 0  # process 0: sampled ids fetched (each a device-to-host sync)
    kv_waits: int = 0  # worker: step headers waited for in the key-value store (a message, no device sync)
    broadcast_s: float = 0.0  # host time publishing the header and dispatching the batch broadcast
    fetch_s: float = 0.0  # host time blocked fetching the ids (process 0)
    kv_wait_s: float = 0.0  # host time blocked waiting for headers (workers)

    @property
    def device_syncs(self) -> int:
        """Blocking device-to-host syncs: only process 0's ids fetches (a worker's header is a message)."""
        return self.fetch_syncs

    def per_step(self) -> dict[str, float]:
        n = max(self.steps, 1)
        return {"device_syncs": self.device_syncs / n, "kv_waits": self.kv_waits / n,
                "broadcast_ms": 1e3 * self.broadcast_s / n, "fetch_ms": 1e3 * self.fetch_s / n,
                "kv_wait_ms": 1e3 * self.kv_wait_s / n}


def _sum_rows(tree: Any) -> Any:
    # Every row but one is zeros: the sum is that row, exact for any dtype (x + 0 == x).
    return jax.tree.map(lambda x: jnp.any(x, axis=0) if x.dtype == bool else jnp.sum(x, axis=0, dtype=x.dtype), tree)


class _Broadcast:
    """Process 0's pytree -> the same pytree replicated over ``devices``, on every process,
    without leaving the devices (a jitted sum over a ``[devices, ...]`` array whose only
    non-zero row is process 0's). ``devices``: the runner's mesh, flat, in its order (a jitted
    step takes arrays of one device assignment only)."""

    def __init__(self, devices: Sequence[Any], is_source: bool) -> None:
        self.devices = list(devices)
        self.is_source = is_source
        mesh = Mesh(np.array(self.devices), ("all",))
        self.by_device = NamedSharding(mesh, P("all"))
        self.replicated = NamedSharding(mesh, P())
        pid = jax.process_index()
        self.local = [d for d in self.devices if d.process_index == pid]
        self._zeros: dict[tuple, list[jax.Array]] = {}  # (shape, dtype) -> a zero row per local device
        self._sum = jax.jit(_sum_rows, out_shardings=self.replicated)

    def abstract(self, tree: Any) -> Any:
        """``tree``'s leaves as they arrive: shapes and dtypes, replicated over ``devices``."""
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=self.replicated), tree)

    def _rows(self, shape: tuple, dtype: Any) -> list[jax.Array]:
        key = (shape, np.dtype(dtype).str)
        rows = self._zeros.get(key)
        if rows is None:  # built once per shape: a worker sends nothing from its host per step
            rows = [jax.device_put(np.zeros((1, *shape), dtype), d) for d in self.local]
            self._zeros[key] = rows
        return rows

    def __call__(self, tree: Any) -> Any:
        leaves, treedef = jax.tree.flatten(tree)
        rows = [list(self._rows(np.shape(x), x.dtype)) for x in leaves]
        if self.is_source:  # the real rows on process 0's first device, in one transfer
            real = jax.device_put([np.asarray(x)[None] for x in leaves], self.local[0])
            for r, a in zip(rows, real):
                r[0] = a
        arrays = [jax.make_array_from_single_device_arrays((len(self.devices), *np.shape(x)), self.by_device, r)
                  for x, r in zip(leaves, rows)]
        return self._sum(jax.tree.unflatten(treedef, arrays))


def _runner_devices(runner: Any) -> list[Any]:
    """The runner's mesh, flat, in its order (from its KV pages' sharding)."""
    sharding = jax.tree.leaves(runner.kv_cache)[0].sharding
    mesh = getattr(sharding, "mesh", None)
    return list(mesh.devices.flat) if mesh is not None else list(sharding._device_assignment)


class _CountedHandle:
    """A step's handle; ``result()`` (the ids' fetch, process 0's one sync) is counted and timed,
    and tells the header channel that every worker has read the step's header (``step``)."""

    def __init__(self, handle: Any, stats: ControllerStats, channel: HeaderChannel | None = None,
                 step: int = -1) -> None:
        self.inner, self._stats = handle, stats
        self._channel, self._step = channel, step

    @property
    def ids_buffer(self) -> Any:
        return getattr(self.inner, "ids_buffer", None)

    def result(self) -> Any:
        start = time.perf_counter()
        out = self.inner.result()
        self._stats.fetch_s += time.perf_counter() - start
        self._stats.fetch_syncs += 1
        if self._channel is not None:
            self._channel.acked(self._step)
        return out


class Controller:
    """Runs each step on every process of the mesh; process 0 decides what the step is.

    ``runner``: a ``ModelRunner`` (or anything with its interface) whose parameters and
    KV pages live on the global mesh. ``templates``: one batch per shape the runner may
    see (``batch.warmup_batches(buckets)``), in the same order on every process.
    ``devices``: the runner's mesh, flat (default: read from its KV pages' sharding).
    ``headers``: the header channel (default: one over ``jax.distributed``'s key-value store).
    """

    def __init__(self, runner: StepRunner, templates: Sequence[Any], *, process_index: int | None = None,
                 process_count: int | None = None, devices: Sequence[Any] | None = None,
                 headers: HeaderChannel | None = None) -> None:
        self.runner = runner
        self.templates = list(templates)
        if not self.templates:
            raise ValueError("templates is empty: give one batch per step shape (batch.warmup_batches)")
        self._index = {_shape_key(b): i for i, b in enumerate(self.templates)}
        if len(self._index) != len(self.templates):
            raise ValueError("templates has two batches of the same shape")
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        self.supports_prev_ids = bool(getattr(runner, "supports_prev_ids", False))
        self.controller_stats = ControllerStats()
        self._devices = None if devices is None else list(devices)
        self._bcast: _Broadcast | None = None  # built on first use (needs the global devices)
        self._headers = headers  # built on first use (needs jax.distributed)
        self._last_step = -1  # the step number of process 0's last published header
        self._stopped = False

    @property
    def stats(self) -> ControllerStats:
        """Steps, blocking host syncs and host time of this process (``ControllerStats``)."""
        return self.controller_stats

    @property
    def steps(self) -> int:
        return self.controller_stats.steps

    @property
    def is_controller(self) -> bool:
        return self.process_index == 0

    @property
    def multi_process(self) -> bool:
        return self.process_count > 1

    @property
    def broadcast(self) -> _Broadcast:
        if self._bcast is None:
            devices = self._devices if self._devices is not None else _runner_devices(self.runner)
            self._bcast = _Broadcast(devices, self.is_controller)
        return self._bcast

    @property
    def headers(self) -> HeaderChannel:
        if self._headers is None:
            from energon_jax.parallel.distributed import key_value_client

            self._headers = HeaderChannel(key_value_client(), process_index=self.process_index)
        return self._headers

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

    @property
    def penalty_slots(self) -> int:
        """The runner's device penalty slots (0: none); the step loop assigns them."""
        return getattr(self.runner, "penalty_slots", 0)

    @property
    def vocab(self) -> int:
        return getattr(self.runner, "vocab", 0)

    @property
    def page_table(self) -> Any:
        return getattr(self.runner, "page_table", None)

    @property
    def penalty_tables(self) -> Any:
        return getattr(self.runner, "penalty_tables", None)

    def write_page_rows(self, slots: np.ndarray, rows: np.ndarray) -> None:
        """One ``slot_loads.chunks`` chunk of page-table rows (requests that join), written on
        every process: process 0 announces it and broadcasts it, as it does a step."""
        self._load(LOAD_PAGES, slots, rows)

    def write_penalty_rows(self, slots: np.ndarray, rows: Any) -> None:
        """One chunk of penalty slots (``sampling.PenaltyTables`` rows) rebuilt on the host, written on every process."""
        self._load(LOAD_PENALTIES, slots, rows)

    def _writer(self, command: int) -> Any:
        return self.runner.write_page_rows if command == LOAD_PAGES else self.runner.write_penalty_rows

    def _load(self, command: int, slots: np.ndarray, rows: Any) -> None:
        if not self.multi_process:
            self._writer(command)(slots, rows)
            return
        if not self.is_controller:
            raise RuntimeError(f"process {self.process_index} is a worker: it runs serve(), not loads")
        if self._stopped:
            raise RuntimeError("the controller was shut down; the workers are gone")
        if len(slots) not in LOAD_SIZES:
            raise ValueError(f"a load of {len(slots)} rows is not one of {LOAD_SIZES} (use slot_loads.chunks)")
        start = time.perf_counter()
        self.headers.publish(command, len(slots), False)
        slots, rows = self.broadcast((slots, rows))
        self.controller_stats.broadcast_s += time.perf_counter() - start
        self.controller_stats.loads += 1
        self._writer(command)(slots, rows)

    def _receive_load(self, command: int, size: int) -> None:
        """A worker's side of ``_load``: the chunk's shape comes from the runner's table."""
        table = self.page_table if command == LOAD_PAGES else self.penalty_tables
        if table is None or size not in LOAD_SIZES:
            raise RuntimeError(f"process {self.process_index}: bad load header {command=} {size=} from process 0")
        slots, rows = self.broadcast(template(table, size, getattr(self.runner, "slot_dims", 1)))
        self._writer(command)(slots, rows)
        self.controller_stats.loads += 1

    def warmup(self, batches: Sequence[Any]) -> int:
        """Every process compiles the same shapes (compiles are local; nothing to broadcast).
        Across processes the step is compiled for batches as the broadcast leaves them:
        replicated over the mesh, on the devices."""
        if not self.multi_process:
            return self.runner.warmup(batches)
        n = self.runner.warmup(self.broadcast.abstract(b) for b in batches)  # lazily: a progress bar ticks
        if hasattr(self.runner, "warmup_loads"):  # row loads as they arrive: broadcast, on the devices
            self.runner.warmup_loads(self.broadcast.abstract)
        return n

    def step_async(self, batch: Any, prev: Any = None):
        inner_prev = getattr(prev, "inner", prev)
        if not self.multi_process:
            self.controller_stats.steps += 1
            handle = self.runner.step_async(batch) if prev is None else self.runner.step_async(batch, inner_prev)
            return self._counted(handle)
        if not self.is_controller:
            raise RuntimeError(f"process {self.process_index} is a worker: it runs serve(), not step_async()")
        if self._stopped:
            raise RuntimeError("the controller was shut down; the workers are gone")
        shape = self._index.get(_shape_key(batch))
        if shape is None:
            raise ValueError("batch shape is not one of the templates' shapes (buckets differ from the workers'?)")
        start = time.perf_counter()
        self._last_step = self.headers.publish(STEP, shape, prev is not None)
        batch = self.broadcast(batch)
        self.controller_stats.broadcast_s += time.perf_counter() - start
        self.controller_stats.steps += 1
        handle = self.runner.step_async(batch) if prev is None else self.runner.step_async(batch, inner_prev)
        return self._counted(handle)

    def _counted(self, handle: Any) -> Any:
        """``handle`` (of the step last dispatched) with its fetch counted."""
        if not hasattr(handle, "result"):
            return handle
        channel = self._headers if self.multi_process else None
        return _CountedHandle(handle, self.controller_stats, channel, self._last_step)

    def step(self, batch: Any):
        return self.step_async(batch).result()

    def shutdown(self) -> None:
        """Process 0: tell every worker to return from ``serve()``. Idempotent."""
        if self.multi_process and self.is_controller and not self._stopped:
            self._stopped = True
            self.headers.publish(STOP, 0, False)

    # -- workers ----------------------------------------------------------------------------

    def serve(self) -> int:
        """Process i > 0: run every step process 0 broadcasts until it says stop; returns the step count.

        Per step one wait for a message (the header, from the key-value store) and no device
        sync: the batch, the previous step's ids and the sampled outputs stay on the devices."""
        if not self.multi_process or self.is_controller:
            raise RuntimeError("serve() is for worker processes (process_index > 0 of a multi-process run)")
        bcast, headers, last = self.broadcast, self.headers, None
        stats = self.controller_stats
        while True:
            start = time.perf_counter()
            cmd, shape, prev = headers.receive()
            stats.kv_wait_s += time.perf_counter() - start
            stats.kv_waits += 1
            if cmd == STOP:
                log.info("process %d: stop after %d steps", self.process_index, self.steps)
                return self.steps
            if cmd in (LOAD_PAGES, LOAD_PENALTIES):
                self._receive_load(cmd, shape)
                continue
            if cmd != STEP or not 0 <= shape < len(self.templates) or (prev and last is None):
                raise RuntimeError(f"process {self.process_index}: bad header {cmd=} {shape=} {prev=} from process 0")
            start = time.perf_counter()
            batch = bcast(self.templates[shape])  # zeros in; process 0's batch out, on the devices
            stats.broadcast_s += time.perf_counter() - start
            # Outputs stay on device (process 0 reads the ids): no host copy is started.
            last = (self.runner.step_async(batch, last, fetch=False) if prev
                    else self.runner.step_async(batch, fetch=False))
            stats.steps += 1


def serve_if_worker(runner: CompiledRunner | None) -> bool:
    """For commands (``energon serve``, ``generate``) after building the engine:

    ``if serve_if_worker(engine.runner): return 0``. A worker process runs every step
    process 0 broadcasts and returns ``True`` when process 0 shuts down; process 0 (or a
    single process) returns ``False`` at once and goes on to serve the API.
    """
    controller = _controller_of(runner)
    if controller is not None and controller.multi_process and not controller.is_controller:
        controller.serve()
        return True
    return False


def shutdown_workers(runner: CompiledRunner | None) -> None:
    """For process 0 when it stops serving: the workers return from ``serve()``."""
    controller = _controller_of(runner)
    if controller is not None:
        controller.shutdown()


def _controller_of(runner: CompiledRunner | None) -> Controller | None:
    """The ``Controller`` that is ``runner`` or that drives its steps (``dp`` replicas across
    processes: ``replica_step.StackedReplicas.step_runner``), else None."""
    inner = getattr(runner, "step_runner", runner)
    return inner if isinstance(inner, Controller) else None
