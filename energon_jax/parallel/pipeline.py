"""Non-blocking pipeline parallelism: ``pp`` stages, each owning a contiguous range of layers.

Stage ``s`` lives on the mesh slice ``mesh[:, s, :]`` (its own ``dp x tp`` devices, so
pipeline and tensor parallelism combine: ``pp=2, tp=4`` on 8 devices) and owns layers
``layer_bounds(L, pp)[s]`` together with the KV pages of those layers. Stage 0 also
embeds the tokens; the last stage applies the final norm, the head and the sampler.

The pipeline moves on a clock. At every ``tick(batch)``:

- stage 0 takes the new micro-batch (if one is given);
- every other stage takes what the stage before it produced at the previous tick
  (the activations ``[T, D]`` are copied to its devices);
- the micro-batch leaving the last stage comes back as a ``StepHandle`` (its sampled
  ids), ``pp - 1`` ticks after it entered.

Nothing here waits on a device: each stage's work is a jitted call dispatched
asynchronously to that stage's devices, so all stages compute at once. The controller
(``PipelinedGeneration`` below) splits the running sequences into ``pp`` groups and
hands stage 0 the next group's micro-batch at every tick, without waiting for earlier
micro-batches to leave the last stage. A group's next step needs its sampled token, which
it gets exactly when its turn at stage 0 comes round again, ``pp`` ticks later: in
steady state every stage is busy at every tick (no bubbles), and the only bubbles are
the ``pp - 1`` ticks of filling and draining.

Instrumentation: ``stats`` counts ticks, busy ticks per stage, micro-batches in flight
(entered and not yet out) and the most ever in flight at once.

Each group has its own ``Scheduler`` over a disjoint range of the shared page pool, so
the groups never share a page; packing shifts the group's page ids into its range.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from energon_jax.parallel.mesh import MESH_AXES, ShardingRules, kv_pages_sharding, state_shardings, place
from energon_jax.parallel.stages import DecoderParts, head_piece, layer_bounds, run_embed, run_head, run_layers
from energon_jax.runner import StepHandle, shape_key


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

    def tick(self, batch: Any | None = None, tag: Any = None) -> tuple[Any, StepHandle] | None:
        """Advance the clock once; ``batch`` enters stage 0. Returns ``(tag, handle)`` of the
        micro-batch leaving the last stage this tick, if any. Never blocks on a device."""
        if batch is not None:
            if self._slots[0] is not None:
                raise RuntimeError("stage 0 is still occupied: tick() moves the pipeline before a new micro-batch")
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
        return self.num_compiles

    def step_async(self, batch: Any) -> StepHandle:
        """One micro-batch through every stage: dispatched stage after stage, nothing waited on.

        With a single step in flight the stages take turns; the non-blocking schedule
        needs ``pp`` groups in flight (``PipelinedGeneration``).
        """
        if not self.empty:
            raise RuntimeError("step_async() needs an empty pipeline (PipelinedGeneration drives tick())")
        self._shapes.add(shape_key(batch))
        out = self.tick(batch)
        while out is None:
            out = self.tick()
        return out[1]

    def step(self, batch: Any) -> Any:
        return self.step_async(batch).result()


def shift_pages(batch: Any, offset: int, page_size: int) -> Any:
    """Move a packed batch's pages from a group's local ids ``1..`` to the shared pool ``1 + offset ..``.

    Page 0 (null) and padding tokens' slot 0 stay where they are.
    """
    if offset == 0:
        return batch
    attn = batch.attn
    tables = np.where(attn.page_tables > 0, attn.page_tables + offset, 0).astype(np.int32)
    real = np.asarray(batch.segment_ids) >= 0
    slots = np.where(real, attn.slot_mapping + offset * page_size, 0).astype(np.int32)
    new_attn = dataclasses.replace(attn, page_tables=tables, slot_mapping=slots)
    return dataclasses.replace(batch, attn=new_attn)


class PipelinedGeneration:
    """The controller side: ``pp`` sequence groups kept in flight through a ``PipelineRunner``.

    ``schedulers``: one per group, each over its own ``pages_per_group`` pages (page 0 of
    each is its local null page and is never used). The runner's pool must hold
    ``1 + pp * (pages_per_group - 1)`` pages.
    """

    def __init__(self, runner: PipelineRunner, schedulers: Sequence[Any], buckets: Any, pages_per_group: int) -> None:
        from energon_jax.batch import pack

        if len(schedulers) != runner.pp:
            raise ValueError(f"{len(schedulers)} schedulers for pp={runner.pp}: give one per stage")
        self.runner = runner
        self.schedulers = list(schedulers)
        self.buckets = buckets
        self.offsets = [g * (pages_per_group - 1) for g in range(runner.pp)]
        self._pack = pack
        self._in_flight: dict[int, tuple[Any, StepHandle]] = {}  # group -> (plan, handle)

    def run(self) -> list[Any]:
        """Tick until every group's scheduler is done; returns every ``RequestDelta`` in order."""
        deltas: list[Any] = []
        pp, tick, idle_ticks = self.runner.pp, 0, 0
        while True:
            g = tick % pp
            # The group whose turn it is: its previous micro-batch left the pipeline last tick.
            if g in self._in_flight:
                plan, handle = self._in_flight.pop(g)
                deltas.extend(self.schedulers[g].update(plan, handle.result()))
            plan = self.schedulers[g].schedule() if self.schedulers[g].has_work() else None
            batch = None
            if plan is not None:
                batch = shift_pages(self._pack(plan, self.buckets), self.offsets[g], self.buckets.page_size)
                self._in_flight[g] = (plan, None)
            out = self.runner.tick(batch, tag=g)
            if out is not None:
                done_group, handle = out
                self._in_flight[done_group] = (self._in_flight[done_group][0], handle)
            tick += 1
            if self._in_flight or not self.runner.empty:
                idle_ticks = 0
                continue
            if not any(s.has_work() for s in self.schedulers):
                return deltas
            idle_ticks += 1
            if idle_ticks > pp:  # a whole round in which no group could plan anything
                raise RuntimeError("pipeline idle while schedulers hold requests they cannot schedule")
