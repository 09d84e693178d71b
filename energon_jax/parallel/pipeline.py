"""Non-blocking pipeline parallelism: ``pp`` stages, each owning a contiguous range of layers.

Two runners share this clock. ``Engine(pp=N)`` runs ``spmd_pipeline.SpmdPipelineRunner``:
every stage in one jitted tick (layers stacked over the ``pp`` axis, ``shard_map`` +
``ppermute``), the same program in one process and across processes. ``PipelineRunner``
below (one jitted call per stage, activations copied between stages) is the tests'
reference for it; it cannot cross a process boundary. ``PipelineStepLoop`` drives either.

Stage ``s`` lives on the mesh slice ``mesh[:, s, :]`` (its own ``tp`` devices, so
pipeline and tensor parallelism combine: ``pp=2, tp=4`` on 8 devices; with data
parallelism each replica is a pipeline of its own over its slice ``mesh[r, :, :]``, see
below) and owns layers
``layer_bounds(L, pp)[s]`` together with the KV pages of those layers. Stage 0 also
embeds the tokens; the last stage applies the final norm, the head and the sampler.

The pipeline moves on a clock. At every ``tick(batch)``:

- stage 0 takes the new micro-batch (if one is given);
- every other stage takes what the stage before it produced at the previous tick
  (the activations ``[T, D]`` are copied to its devices);
- the micro-batch leaving the last stage comes back as a ``StepHandle`` (its sampled
  ids), ``pp - 1`` ticks after it entered.

Nothing here waits on a device: each stage's work is a jitted call dispatched
asynchronously to that stage's devices, so all stages compute at once.

The controller side is ``PipelineStepLoop``, the engine's step loop for ``pp > 1``
(``Engine(..., pp=N)``): one ``Engine.step()`` is one tick, split like every step loop
into ``start`` and ``finish``. ``start``: the engine's one scheduler (one page pool
shared by every stage's layers) plans a micro-batch from the running requests that have
no row in the pipeline (``Scheduler.schedule_micro_batch``), and the tick hands it to
stage 0 and dispatches every stage's work. ``finish``: the micro-batch that left the
last stage is collected (its ids fetched, the scheduler updated) before the next tick
plans. A request whose micro-batch entered at
tick ``t`` is known again when tick ``t + pp`` plans, exactly when the clock comes round
to its group again; rows per micro-batch are capped at about ``running / pp``, so
the running requests settle into ``pp`` groups of even size, one per stage. In steady
state every stage is busy at every tick (no bubbles); the only bubbles are the
``pp - 1`` ticks of filling and draining. Greedy tokens equal ``pp=1``: every row is
the same computation, only the order of micro-batches differs.

Data parallelism combines with it (``Engine(dp=2, pp=2)``): each of the ``dp`` replicas
is a pipeline runner over its own ``(1, pp, tp)`` slice with its own scheduler, page
pool and ``PipelineStepLoop``; ``DataParallelStepLoop`` runs every replica's ``start``
(tick) before any replica's ``finish``, so the ``dp`` pipelines compute at once.

Pages stay safe without any locking: micro-batches pass every stage in the order they
entered (the stage's KV buffers are threaded from call to call), so when a request is
aborted while its micro-batch is in the pipeline and its pages go to a new request at
once, the stale micro-batch's writes to a stage's layers land before the new request's
first write there; and preemption only ever takes requests with nothing in flight.

Instrumentation: ``stats`` counts ticks, busy ticks per stage, micro-batches in flight
(entered and not yet out) and the most ever in flight at once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from energon_jax.parallel.mesh import MESH_AXES, ShardingRules, kv_pages_sharding, state_shardings, place
from energon_jax.parallel.stages import DecoderParts, head_piece, layer_bounds, run_embed, run_head, run_layers
from energon_jax.request import StreamDelta
from energon_jax.runner import StepHandle, shape_key
from energon_jax.step_loop import ProcessFn, StepLoop

if TYPE_CHECKING:
    from energon_jax.scheduler import Scheduler


def stage_meshes(mesh: Mesh) -> list[Mesh]:
    """One ``(dp, 1, tp)`` mesh per pipeline stage: the slice ``mesh[:, s, :]``."""
    pp = mesh.shape["pp"]
    return [Mesh(mesh.devices[:, s : s + 1, :], MESH_AXES, axis_types=mesh.axis_types) for s in range(pp)]


def _place_tree(tree: Any, mesh: Mesh, rules: ShardingRules) -> Any:
    shardings = state_shardings(tree, mesh, rules)
    return jax.tree.map(
        lambda var, sh: var.replace(place(var.get_value(), sh)) if hasattr(var, "replace") else place(var, sh),
        tree, shardings, is_leaf=lambda x: hasattr(x, "get_metadata"),
    )


@dataclasses.dataclass
class PipelineStats:
    ticks: int = 0
    busy: list[int] = dataclasses.field(default_factory=list)  # busy ticks per stage
    entered: int = 0
    completed: int = 0
    max_in_flight: int = 0

    @property
    def in_flight(self) -> int:
        return self.entered - self.completed

    def utilisation(self) -> list[float]:
        """Busy ticks over all ticks, per stage."""
        return [b / self.ticks if self.ticks else 0.0 for b in self.busy]


@dataclasses.dataclass
class _Slot:
    batch: Any  # the micro-batch's StepBatch (numpy)
    x: jax.Array | None  # activations [T, D] entering this stage (None at stage 0)
    tag: Any


class PipelineRunner:
    """Runs micro-batches through ``pp`` stages (see the module docstring)."""

    def __init__(self, parts: DecoderParts, mesh: Mesh, rules: ShardingRules, *, num_pages: int, page_size: int,
                 kv_dtype: Any = None) -> None:
        from pallas_kernels import make_kv_pages

        self.parts = parts
        self.pp = mesh.shape["pp"]
        self.meshes = stage_meshes(mesh)
        self.bounds = layer_bounds(parts.num_layers, self.pp)
        c = parts.config
        dtype = parts.dtype if kv_dtype is None else kv_dtype
        self._layer_states, self.kv = [], []
        for s, (m, (a, b)) in enumerate(zip(self.meshes, self.bounds)):
            self._layer_states.append(tuple(_place_tree(parts.layers[i][1], m, rules) for i in range(a, b)))
            ps = kv_pages_sharding(m, rules)
            self.kv.append(tuple(make_kv_pages(num_pages, page_size, c.num_kv_heads, c.head_dim, dtype, sharding=ps)
                                 for _ in range(a, b)))
        self._embed_state = _place_tree(parts.embed[1], self.meshes[0], rules)
        self._norm_state = _place_tree(parts.norm[1], self.meshes[-1], rules)
        self._head_state = _place_tree(head_piece(parts)[1], self.meshes[-1], rules)
        self._act_sharding = [NamedSharding(m, PartitionSpec()) for m in self.meshes]
        self._fns = [self._stage_fn(s) for s in range(self.pp)]
        self._slots: list[_Slot | None] = [None] * self.pp
        self._shapes: set = set()
        self.stats = PipelineStats(busy=[0] * self.pp)

    def _stage_fn(self, s: int):
        parts, first = self.parts, self.bounds[s][0]
        is_first, is_last = s == 0, s == self.pp - 1

        def fn(layer_states, kv, x, batch, embed_state, norm_state, head_state):
            if is_first:
                x = run_embed(parts, embed_state, batch.input_ids)
            x, kv = run_layers(parts, first, layer_states, kv, x, batch)
            if is_last:
                return kv, run_head(parts, norm_state, head_state, x, batch)
            return kv, x

        return jax.jit(fn, donate_argnums=(1,))

    def reset_stats(self) -> None:
        self.stats = PipelineStats(busy=[0] * self.pp, entered=self.stats.in_flight, completed=0)

    @property
    def empty(self) -> bool:
        return all(slot is None for slot in self._slots)

    @property
    def in_flight_tags(self) -> list[Any]:
        """The tags of the micro-batches in the pipeline, the next to leave first."""
        return [slot.tag for slot in reversed(self._slots) if slot is not None and slot.tag is not None]

    def tick(self, batch: Any | None = None, tag: Any = None) -> tuple[Any, StepHandle] | None:
        """Advance the clock once; ``batch`` enters stage 0. Returns ``(tag, handle)`` of the
        micro-batch leaving the last stage this tick, if any. Never blocks on a device."""
        if batch is not None:
            if self._slots[0] is not None:
                raise RuntimeError("stage 0 is still occupied: tick() moves the pipeline before a new micro-batch")
            self._shapes.add(shape_key(batch))
            self._slots[0] = _Slot(batch, None, tag)
            self.stats.entered += 1
        self.stats.max_in_flight = max(self.stats.max_in_flight, self.stats.in_flight)
        out, moved = None, [None] * self.pp
        for s in range(self.pp):
            slot = self._slots[s]
            if slot is None:
                continue
            self.stats.busy[s] += 1
            extra = (self._embed_state if s == 0 else None, self._norm_state if s == self.pp - 1 else None,
                     self._head_state if s == self.pp - 1 else None)
            self.kv[s], y = self._fns[s](self._layer_states[s], self.kv[s], slot.x, slot.batch, *extra)
            if s == self.pp - 1:
                for a in y:
                    a.copy_to_host_async()
                out = (slot.tag, StepHandle(y))
                self.stats.completed += 1
            else:
                moved[s + 1] = _Slot(slot.batch, jax.device_put(y, self._act_sharding[s + 1]), slot.tag)
        self._slots = moved
        self.stats.ticks += 1
        return out

    # -- the runner's interface, for an engine that keeps one step in flight ---------------

    @property
    def kv_cache(self) -> tuple:
        """Every layer's pages, in layer order (each on its stage's devices)."""
        return tuple(pages for stage in self.kv for pages in stage)

    @property
    def num_compiles(self) -> int:
        return len(self._shapes)

    def warmup(self, batches: Any) -> int:
        for batch in batches:
            self.step(batch)  # all-padding batches write only the null page
        self.reset_stats()  # the counters describe the load, not the warm-up
        return self.num_compiles

    def step_async(self, batch: Any) -> StepHandle:
        """One micro-batch alone through every stage (warm-up): the stages take turns.

        The non-blocking schedule is ``PipelineStepLoop`` driving ``tick()``.
        """
        if not self.empty:
            raise RuntimeError("step_async() needs an empty pipeline (PipelineStepLoop drives tick())")
        out = self.tick(batch)
        while out is None:
            out = self.tick()
        return out[1]

    def step(self, batch: Any) -> Any:
        return self.step_async(batch).result()


class PipelineStepLoop(StepLoop):
    """The engine's step loop for ``pp > 1``: one pipeline tick per ``step()`` (module docstring).

    ``step`` is ``start`` (plan a micro-batch, tick: every stage's work dispatched) then
    ``finish`` (fetch the ids of the micro-batch that left the last stage, update the
    scheduler), as for ``StepLoop``; data parallelism (``data_parallel.py``) runs every
    replica's ``start`` before any ``finish``, so ``dp`` pipelines compute at once."""

    def __init__(self, scheduler: Scheduler, runner: PipelineRunner, buckets: Any, process: ProcessFn) -> None:
        super().__init__(scheduler, runner, buckets, process)
        self.pp = runner.pp
        # The micro-batch that left the last stage at start()'s tick: (its plan, its StepHandle).
        self._left: tuple[Any, StepHandle] | None = None

    def busy(self) -> bool:
        # A micro-batch whose requests have all finished (aborted) is no work: it is
        # dropped when it leaves, at a later tick.
        plans = [*self.runner.in_flight_tags, *([] if self._left is None else [self._left[0]])]
        in_flight = any(not row.request.finished for plan in plans for row in plan.rows)
        return bool(self._deferred) or in_flight

    @property
    def on_device(self) -> bool:
        """A micro-batch inside a stage, or one that left and whose ids are not fetched yet."""
        return self._left is not None or not self.runner.empty

    def step(self, live: Collection[str]) -> list[StreamDelta]:
        """Plan a micro-batch for stage 0 (if any request is idle), tick, collect what leaves.

        ``start`` then ``finish``. A micro-batch is one call per stage: no prefill/decode
        split (``step_split.py``) and no planning ahead; the ``pp`` micro-batches in flight
        are the overlap."""
        out = self.start(live)
        out.extend(self.finish())
        return out

    def start(self, live: Collection[str]) -> list[StreamDelta]:
        """Plan a micro-batch from the idle running requests, tick (stage 0 takes it, every
        stage's work is dispatched), emit deferred text; never blocks on a device.

        The micro-batch leaving the last stage at this tick is left for ``finish``. With
        nothing to plan and nothing in the pipeline, ``live`` is checked for lost requests."""
        if self._left is not None:
            raise RuntimeError("start() called twice: finish() collects the micro-batch that left first")
        out: list[StreamDelta] = []
        plan = self.scheduler.schedule_micro_batch(self.pp) if self.scheduler.has_work() else None
        if plan is None and self.runner.empty:
            out.extend(self._drain_deferred())
            if not out:
                self.check_progress(live)
            return out
        batch = None if plan is None else self._pack(plan, self.buckets)
        self._left = self.runner.tick(batch, tag=plan)
        out.extend(self._drain_deferred())  # host work overlapping the stages
        return out

    def finish(self) -> list[StreamDelta]:
        """Fetch the ids of the micro-batch that left the last stage at ``start``'s tick (the
        only wait on the device) and update the scheduler; nothing when none left."""
        left, self._left = self._left, None
        if left is None:
            return []
        done, handle = left
        return self._collect(done, handle.result())
