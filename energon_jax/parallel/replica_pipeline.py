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
from jax.sharding import Mesh, PartitionSpec as P

from energon_jax.parallel.data_parallel import DataParallelRunner
from energon_jax.parallel.pipeline import PipelineStats
from energon_jax.parallel.pipeline_controller import TickDispatch
from energon_jax.parallel.replica_step import ReplicaTables, fit_batch, stack_batches
from energon_jax.parallel.spmd_pipeline import SpmdPipelineRunner, _Held, real_size
from energon_jax.runner import StepHandle
from energon_jax.sampling import SampledTokens

logger = logging.getLogger(__name__)


class ReplicaPipelineRunner(SpmdPipelineRunner):
    """``dp`` SPMD pipelines in one jitted tick over a ``(dp, pp, tp)`` mesh (module docstring).

    The tick of each replica is ``SpmdPipelineRunner``'s, run inside a ``shard_map`` manual
    over ``dp``; ``run_tick`` takes a stacked micro-batch (``stack_batches``: a ``[dp]`` axis in
    front of every leaf, already fitted to one bucket) and returns every replica's sampled
    outputs ``[dp, B]``. The clocks live on the host, in ``StackedPipelines`` (this runner's own
    ``_slots`` and ``stats`` stay unused). The weights, pages, tables and carry are
    ``SpmdPipelineRunner``'s, built with a leading ``[dp]`` axis (``replica_axes``)."""

    replica_axes = ("dp",)  # every piece of the carry and every per-slot table gets a leading [dp] over dp

    @property
    def dp(self) -> int:
        return self.mesh.shape["dp"]

    def _check_mesh(self, mesh: Mesh) -> None:
        if mesh.shape["dp"] < 2 or self.pp < 2:
            raise ValueError(f"dp={mesh.shape['dp']} and pp={self.pp} must both be >= 2 for stacked pipelines")

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

    _device_tick = _stacked_tick_fn

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

