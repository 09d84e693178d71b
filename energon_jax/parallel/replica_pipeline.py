"""``dp x pp`` as one SPMD program: every replica's pipeline tick in one jitted call.

Across processes every process must launch the same jitted function, so ``dp`` pipeline
replicas cannot each tick on their own as they do in one process (a
``DataParallelRunner`` of ``SpmdPipelineRunner``\\ s). Here they share one tick, as the
``dp x tp`` replicas share one step (``replica_step.py``):

::

    process 0: replica r's PipelineStepLoop plans a micro-batch from its own Scheduler and
               calls its view's tick(batch, tag): the view advances replica r's clock (which
               micro-batch each stage holds, host only) and holds the batch; once every
               replica has had its turn (DataParallelStepLoop's start phase) flush() fits the
               held micro-batches to one (T, B) bucket and stacks them on a leading [dp] axis
               (a replica with nothing to enter gets padding)
    Controller: broadcasts that stacked micro-batch (one template per bucket, stacked alike)
    every process: ReplicaPipelineRunner.run_tick(stacked):
        shard_map over dp, replica r on mesh[r, :, :]:
            SpmdPipelineRunner's tick on replica r's carry    # shard_map over pp inside,
                (its ring of plans, activations, KV pages)     # tp automatic
        -> the sampled outputs [dp, B] of every replica's last stage (gathered: process 0
           reads them; a replica's handle reads its row)

The weights are stacked over ``pp`` and sharded over ``tp`` as in ``SpmdPipelineRunner``,
replicated over ``dp``; every piece of the carry gets a leading ``[dp]`` axis sharded over
``dp``: the KV pages ``[dp, slots, P, S, K, H]`` (over ``dp``, ``pp`` and ``tp`` by KV head),
the activations ``[dp, pp, T, D]``, the ring of plans ``[dp, pp, ...]``. So replica ``r``'s
pages and micro-batches live on its own ``pp * tp`` devices, and its page ids mean the same
as in its ``Scheduler``.

Every replica ticks at every stacked tick (the carry moves for all of them); a replica
whose loop had nothing to tick (an empty pipeline) takes an empty tick, which changes
nothing it holds. Greedy tokens equal one device's: each replica's rows are exactly what a
lone pipeline computes on them. Each replica keeps its penalty counts and page tables on its
own devices, as one pipeline does (a leading ``[dp]`` axis over ``dp``; a replica view's row
loads address ``(replica, slot)``). Limit: no planning ahead (a pipeline's overlap is its
micro-batches in flight).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from energon_jax.parallel.data_parallel import DataParallelRunner
from energon_jax.parallel.mesh import ShardingRules, place
from energon_jax.parallel.pipeline import PipelineStats
from energon_jax.parallel.pipeline_controller import TickDispatch
from energon_jax.parallel.replica_step import ReplicaTables, filled, fit_batch, stack_batches, stacked_penalty_tables
from energon_jax.parallel.spmd_pipeline import (
    SlotLayout, SpmdPipelineRunner, _Held, _outer_placed, _stacked_placed, real_size, stack_layers,
)
from energon_jax.parallel.stages import DecoderParts, head_piece
from energon_jax.runner import StepHandle
from energon_jax.sampling import SampledTokens
from energon_jax.slot_loads import SlotLoader
from pallas_kernels.page_layout import NULL_PAGE

logger = logging.getLogger(__name__)


class ReplicaPipelineRunner(SpmdPipelineRunner):
    """``dp`` SPMD pipelines in one jitted tick over a ``(dp, pp, tp)`` mesh (module docstring).

    The tick of each replica is ``SpmdPipelineRunner``'s, run inside a ``shard_map`` manual
    over ``dp``; ``run_tick`` takes a stacked micro-batch (``stack_batches``: a ``[dp]`` axis in
    front of every leaf, already fitted to one bucket) and returns every replica's sampled
    outputs ``[dp, B]``. The clocks live on the host, in ``StackedPipelines``."""

    def __init__(self, parts: DecoderParts, mesh: Mesh, rules: ShardingRules, *, num_pages: int, page_size: int,
                 buckets: Any, kv_dtype: Any = None, penalty_slots: int = 0, vocab: int = 0) -> None:
        from energon_jax.batch import dummy_batch
        from pallas_kernels import make_kv_pages

        self.dp, self.pp = mesh.shape["dp"], mesh.shape["pp"]
        if self.dp < 2 or self.pp < 2:
            raise ValueError(f"dp={self.dp} and pp={self.pp} must both be >= 2 for stacked pipelines")
        self.parts, self.mesh, self.buckets = parts, mesh, buckets
        self.layout = SlotLayout(parts.num_layers, self.pp)
        self.bounds = self.layout.bounds
        self._dummy = functools.partial(dummy_batch, buckets)
        c = parts.config
        # Weights exactly as one pipeline places them: the rules never name dp, so replicated over it.
        self._graphdef, stacked = stack_layers(parts, self.layout)
        self._layers = _stacked_placed(stacked, mesh, rules)
        self._by_pp = NamedSharding(mesh, P("pp"))
        self._active = place(np.array([i >= 0 for i in self.layout.layer_of_slot]), self._by_pp)  # [slots]
        self._embed = _outer_placed(parts.embed[1], mesh, rules)
        self._norm = _outer_placed(parts.norm[1], mesh, rules)
        self._head = _outer_placed(head_piece(parts)[1], mesh, rules)
        slots = self.pp * self.layout.per_stage
        kv_axis = rules.mesh_axis("kv_heads")
        one = make_kv_pages(2, page_size, c.num_kv_heads, c.head_dim, parts.dtype if kv_dtype is None else kv_dtype)

        def stacked_pages(a):  # one layer's [P, S, K, H] (int8 scales [P, S, K]) -> [dp, slots, P, S, K, ...]
            spec = P("dp", "pp", None, None, kv_axis, *([None] * (a.ndim - 3)))
            fill = a.reshape(-1)[0]  # 0 for pages, 1 for int8 scales
            return jnp.full((self.dp, slots, num_pages, *a.shape[1:]), fill, a.dtype,
                            device=NamedSharding(mesh, spec))

        self.kv = jax.tree.map(stacked_pages, one)
        self._replicated = NamedSharding(mesh, P())
        by_dp, acts_sharding = NamedSharding(mesh, P("dp")), NamedSharding(mesh, P("dp", "pp"))
        # Each replica's per-slot tables, as one pipeline keeps them, with a leading [dp] axis over dp.
        if penalty_slots < 0 or (penalty_slots and vocab < 1):
            raise ValueError(f"{penalty_slots=} must be >= 0, with vocab >= 1 (got {vocab=})")
        self.penalty_slots, self.vocab = penalty_slots, vocab
        self.penalty_tables = stacked_penalty_tables(self.dp, penalty_slots, vocab, by_dp) if penalty_slots else None
        # Each replica's carry at the largest bucket, as one pipeline's, with a leading [dp] axis.
        t_max = buckets.max_tokens
        b_max = max(b for _, b in buckets.all_shapes())
        self._pad = self._dummy(t_max, b_max)
        self.page_table = None
        if buckets.page_slots:  # the ring holds each micro-batch's gathered [B, M] tables
            m = buckets.max_pages_per_row
            self.page_table = filled((self.dp, buckets.page_slots + 1, m), NULL_PAGE, np.int32, by_dp)
            self._pad = dataclasses.replace(self._pad, attn=dataclasses.replace(
                self._pad.attn, page_tables=np.full((b_max, m), NULL_PAGE, np.int32)))
        self.slot_dims = 2  # a loaded row's slot is (replica, slot)
        self._page_loader, self._penalty_loader = SlotLoader(by_dp, slot_dims=2), SlotLoader(by_dp, slot_dims=2)
        self._acts = place(np.zeros((self.dp, self.pp, t_max, c.hidden_size), parts.dtype), acts_sharding)
        self._ring = jax.tree.map(lambda a: place(np.broadcast_to(a, (self.dp, self.pp, *a.shape)), by_dp), self._pad)
        self._shape = (buckets.token_buckets[0], buckets.rows_bucket(buckets.token_buckets[0], 1))
        self._slots = [None] * self.pp  # unused: every replica's clock is in StackedPipelines
        self._executables: dict[Any, Any] = {}
        self.num_compiles = 0
        self.warmed_up = False
        self.stats = PipelineStats(busy=[0] * self.pp)
        self.dispatch = self.run_tick
        kv_shardings = jax.tree.map(lambda a: a.sharding, self.kv)
        tables_sharding = None if self.penalty_tables is None else jax.tree.map(lambda a: by_dp, self.penalty_tables)
        self._jitted = jax.jit(self._stacked_tick_fn, donate_argnums=(2, 3, 4, 5, 6),
                               out_shardings=(kv_shardings, acts_sharding, by_dp, tables_sharding,
                                              None if self.page_table is None else by_dp, self._replicated))

    def _stacked_tick_fn(self, layers, active, kv, acts, ring, tables, page_table, embed, norm, head, batch):
        """Every replica's tick at once: ``SpmdPipelineRunner._tick_fn`` on replica ``r``'s block."""

        def replica(layers, active, embed, norm, head, kv, acts, ring, tables, page_table, batch):
            carry = jax.tree.map(lambda a: a[0], (kv, acts, ring, tables, page_table, batch))  # a leading axis of 1
            kv, acts, ring, tables, page_table, batch = carry
            out = self._tick_fn(layers, active, kv, acts, ring, tables, page_table, embed, norm, head, batch)
            return jax.tree.map(lambda a: a[None], (*out[:5], tuple(out[5])))

        # Manual over dp only: inside, the pipeline's own shard_map is manual over pp, tp automatic.
        return jax.shard_map(
            replica, mesh=self.mesh, in_specs=(P(),) * 5 + (P("dp"),) * 6, out_specs=P("dp"),
            axis_names=frozenset({"dp"}), check_vma=False,
        )(layers, active, embed, norm, head, kv, acts, ring, tables, page_table, batch)

    @property
    def kv_cache(self) -> Any:
        """The pages of every replica, ``[dp, slots, P, S, K, H]`` (over ``dp``, ``pp`` and ``tp``)."""
        return self.kv

    def tick(self, batch: Any | None = None, tag: Any = None):
        raise RuntimeError("stacked pipelines tick through StackedPipelines (one clock per replica)")


class StackedTickDispatch(TickDispatch):
    """What a ``Controller`` drives: ``step_async`` runs one stacked tick and returns a
    ``StepHandle`` (so the controller counts its fetch); the rest is the pipeline's."""

    def step_async(self, batch: Any, *, fetch: bool = True) -> StepHandle:
        return StepHandle(tuple(self.pipeline.run_tick(batch, fetch=fetch)))

    def step(self, batch: Any) -> SampledTokens:
        return self.step_async(batch).result()


@dataclasses.dataclass
class _Tick:
    handle: Any  # the stacked tick's StepHandle (counted by the Controller)
    readers: int  # replicas whose micro-batch left at this tick and has not read it yet
    sampled: SampledTokens | None = None  # fetched once, by the first reader


class _Clock:
    """One replica's pipeline clock (host only): what each stage holds, and its ``PipelineStats``."""

    def __init__(self, pp: int) -> None:
        self.pp = pp
        self.slots: list[_Held | None] = [None] * pp
        self.stats = PipelineStats(busy=[0] * pp)

    def stages(self, entering: _Held | None) -> list[_Held | None]:
        """What each stage runs at the next tick, ``entering`` at stage 0."""
        return [entering, *self.slots[:-1]]

    def advance(self, stages: list[_Held | None]) -> None:
        held = [h for h in stages if h is not None]
        self.stats.entered += stages[0] is not None
        for s, h in enumerate(stages):
            self.stats.busy[s] += h is not None
        self.stats.max_in_flight = max(self.stats.max_in_flight, len(held))
        self.stats.ticks += 1
        self.stats.completed += stages[-1] is not None
        self.slots = [*stages[:-1], None]


class PipelineView(ReplicaTables):
    """What replica ``r``'s ``PipelineStepLoop`` drives: the pipeline interface (``tick``,
    ``empty``, ``in_flight_tags``, ``stats``), its ticks held for the stacked one."""

    supports_prev_ids = False

    def __init__(self, group: StackedPipelines, r: int) -> None:
        self._group, self.index = group, r
        self.pp = group.pp

    @property
    def _clock(self) -> _Clock:
        return self._group.clocks[self.index]

    def tick(self, batch: Any | None = None, tag: Any = None):
        return self._group.hold(self.index, batch, tag)

    @property
    def empty(self) -> bool:
        return all(h is None for h in self._clock.slots)

    @property
    def in_flight_tags(self) -> list[Any]:
        return [h.tag for h in reversed(self._clock.slots) if h is not None and h.tag is not None]

    @property
    def stats(self) -> PipelineStats:
        return self._clock.stats

    def reset_stats(self) -> None:
        st = self._clock.stats
        self._clock.stats = PipelineStats(busy=[0] * self.pp, entered=st.in_flight, completed=0)

    def step_async(self, batch: Any) -> Any:
        """One micro-batch alone through every stage (``pp`` stacked ticks); needs an empty pipeline."""
        if not self.empty:
            raise RuntimeError("step_async() needs an empty pipeline (PipelineStepLoop drives tick())")
        out = self.tick(batch)
        self._group.flush()
        while out is None:
            out = self.tick()
            self._group.flush()
        return out[1]

    def step(self, batch: Any) -> SampledTokens:
        return self.step_async(batch).result()

    def warmup(self, batches: Sequence[Any]) -> int:
        return self._group.warmup(batches)

    @property
    def num_compiles(self) -> int:
        return self._group.num_compiles

    @property
    def kv_cache(self) -> Any:
        """The stacked pool every replica shares; this replica's pages are its ``[index]`` slice."""
        return self._group.step_runner.kv_cache


class _ReplicaHandle:
    def __init__(self, group: StackedPipelines, r: int, ticket: int) -> None:
        self._group, self._r, self._ticket = group, r, ticket

    def result(self) -> SampledTokens:
        s, r = self._group.sampled(self._ticket), self._r
        return SampledTokens(s.token_ids[r], s.logprobs[r], s.top_ids[r], s.top_logprobs[r])


class StackedPipelines(DataParallelRunner):
    """``dp`` pipeline views over one ``ReplicaPipelineRunner`` tick (or the ``Controller``
    broadcasting it). The engine sees a ``DataParallelRunner``: ``DataParallelStepLoop``
    drives one ``PipelineStepLoop`` per view and calls ``flush()`` after every replica's
    ``start``, which dispatches the one stacked tick."""

    def __init__(self, step_runner: Any, dp: int, pp: int, buckets: Any) -> None:
        from energon_jax.batch import dummy_batch

        self.step_runner = step_runner  # StackedTickDispatch, or a Controller over it across processes
        self.pp, self.buckets = pp, buckets
        self._dummy = functools.partial(dummy_batch, buckets)
        self.clocks = [_Clock(pp) for _ in range(dp)]
        super().__init__([PipelineView(self, r) for r in range(dp)])
        self._held: dict[int, tuple[Any, list[_Held | None]]] = {}  # replica -> (batch, its stages)
        self._ticket = 0  # the stacked tick the held micro-batches will join
        self._done: dict[int, _Tick] = {}  # dispatched ticks some replica still has to read
        self.steps = 0  # stacked ticks dispatched
        self.shared_ticks = 0  # ... in which more than one replica had a micro-batch inside

    @property
    def num_compiles(self) -> int:
        return self.step_runner.num_compiles

    @property
    def kv_caches(self) -> list[Any]:
        return [self.step_runner.kv_cache]

    def warmup(self, batches: Sequence[Any]) -> int:
        """Compile the stacked tick for every shape of ``batches`` (one replica's warm-up
        batches); walked once per replica (``runtime.warm_up_with_progress``), only the first compiles."""
        for _ in range(self.dp):  # lazily: the progress bar ticks per compile, then through the other passes
            self.step_runner.warmup(stack_batches([b] * self.dp) for b in batches)
        return self.num_compiles

    def hold(self, r: int, batch: Any | None, tag: Any) -> tuple[Any, _ReplicaHandle] | None:
        """Replica ``r``'s tick: its clock's stages for the coming stacked tick; returns the
        micro-batch that leaves its last stage then (its handle reads it once dispatched)."""
        if r in self._held:  # a second tick of one replica before the flush: the first goes now
            self.flush()
        entering = None if batch is None else _Held(tag, *real_size(batch))
        stages = self.clocks[r].stages(entering)
        self._held[r] = (batch, stages)
        leaving = stages[-1]
        return None if leaving is None else (leaving.tag, _ReplicaHandle(self, r, self._ticket))

    def flush(self) -> None:
        """Dispatch one stacked tick for the held micro-batches (nothing when none is held).
        Every replica ticks: one that held nothing takes an empty tick."""
        from energon_jax.batch import history_width

        if not self._held:
            return
        ticks = {r: self._held.get(r, (None, self.clocks[r].stages(None))) for r in range(self.dp)}
        for r, (_, stages) in ticks.items():
            if r not in self._held and stages[-1] is not None:
                raise RuntimeError(f"replica {r} has a micro-batch leaving but did not tick")
        running = [h for _, stages in ticks.values() for h in stages if h is not None]
        t = self.buckets.token_bucket(max([1, *(h.tokens for h in running)]))
        b = self.buckets.rows_bucket(t, max([1, *(h.rows for h in running)]))
        entering = [batch for batch, _ in ticks.values() if batch is not None]
        template = self._dummy(t, b, max([0, *(history_width(x) for x in entering)]))
        batches = [template if batch is None else fit_batch(batch, template) for batch, _ in ticks.values()]
        handle = self.step_runner.step_async(stack_batches(batches))
        self.shared_ticks += sum(any(h is not None for h in stages) for _, stages in ticks.values()) > 1
        readers = 0
        for r, (_, stages) in ticks.items():
            readers += stages[-1] is not None
            self.clocks[r].advance(stages)
        if readers:
            self._done[self._ticket] = _Tick(handle, readers)
        self.steps += 1
        self._held = {}
        self._ticket += 1

    def reset_stats(self) -> None:
        super().reset_stats()  # every view's clock stats too
        self.steps = self.shared_ticks = 0

    def sampled(self, ticket: int) -> SampledTokens:
        """The stacked tick ``ticket``'s outputs (dispatching it first if it is still held)."""
        if ticket == self._ticket:
            self.flush()
        done = self._done[ticket]
        if done.sampled is None:
            done.sampled = done.handle.result()
        done.readers -= 1
        if not done.readers:
            del self._done[ticket]
        return done.sampled

