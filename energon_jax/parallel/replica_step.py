"""Data parallelism as one SPMD step: every ``dp`` replica's rows in one jitted call.

Across processes (``jax.distributed``) every process must launch the same jitted step,
so ``dp`` replicas cannot each run their own step as they do in one process
(``data_parallel.DataParallelRunner``). Here the replicas share one step instead:

::

    process 0: replica r's StepLoop plans and packs its own batch (its own Scheduler,
               its own page pool), StackedReplicas.replicas[r].step_async(batch) only
               holds it; once every replica has had its turn (DataParallelStepLoop's
               start phase) flush() fits the held batches to one (T, B) bucket and
               stacks them: a StepBatch with a leading [dp] axis, idle replicas all
               padding
    Controller: broadcasts that batch (one template per bucket, stacked alike)
    every process: ReplicaStepRunner.step_async(stacked):
        shard_map over dp, replica r on mesh[r, :, :]:
            logits, kv[r] = model(batch[r], kv[r])    # tp stays automatic inside
            ids[r] = sample(logits, batch[r].sampling, tables[r])
        -> ids [dp, B] (gathered to every process: process 0 reads them)
    process 0: each replica's handle reads its row of the ids

The weights are sharded over ``tp`` and replicated over ``dp`` (the rules never name
``dp``); the KV pages are one array per layer ``[dp, P, S, K, H]`` sharded over ``dp`` (and
over ``tp`` by KV head), so replica ``r``'s pool lives on its own devices only and its
page ids mean the same as in its ``Scheduler``.

Greedy tokens equal one device's: each replica computes exactly what a lone runner
would on its rows (padding rows and tokens change nothing real, ``batch.pack``).

Each replica keeps its penalty counts and page tables on its own devices, as a lone
``ModelRunner`` does: ``[dp, ...]`` tables over ``dp``, the step updating replica ``r``'s
slice from its rows; a replica view's row loads (``slot_loads.py``) address
``(replica, slot)`` and first dispatch any batch the replica holds.

Limit: no planning ahead (a replica's next batch would need this step's ids on the
device, slice by slice: ``supports_prev_ids`` is False, so ``async_scheduling`` logs that
it is off).
``pp > 1``: ``replica_pipeline.py`` stacks the replicas' pipeline ticks the same way. In
one process ``runtime`` keeps the independent ``DataParallelRunner``: its replicas overlap
with each other's host work.
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
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from energon_jax.parallel.data_parallel import DataParallelRunner
from energon_jax.parallel.mesh import ShardingRules
from energon_jax.runner import StepHandle, shape_key, with_page_tables
from energon_jax.sampling import PenaltyTables, SampledTokens, sample, update_penalty_tables
from energon_jax.slot_loads import PAD_SLOT, SlotLoader, SlotTables
from pallas_kernels.page_layout import NULL_PAGE

logger = logging.getLogger(__name__)


def stack_batches(batches: Sequence[Any]) -> Any:
    """One batch per replica (same bucket) -> one batch whose every leaf has a leading ``[dp]`` axis."""
    return jax.tree.map(lambda *a: np.stack([np.asarray(x) for x in a]), *batches)


def fit_batch(batch: Any, template: Any) -> Any:
    """``batch`` (numpy) fitted to ``template``'s bucket, padded with the template's values.
    Real tokens and rows sit at the front (``batch.pack``) and fit the template's bucket
    (``StackedReplicas.flush`` picks it so), so the fit changes nothing they compute."""

    def one(old, new):
        out = np.array(new)
        if old.shape[1:] != new.shape[1:]:  # a zero-width history (no penalty row): the template's -1s
            return out
        n = min(old.shape[0], new.shape[0])  # a wider row bucket of a smaller token bucket: only padding cut
        out[:n] = old[:n]
        return out

    return jax.tree.map(one, batch, template)


def filled(shape: tuple, value: Any, dtype: Any, sharding: Any) -> jax.Array:
    """``np.full(shape, value)`` on ``sharding``, built shard by shard (it may span processes)."""
    full = np.broadcast_to(np.asarray(value, dtype), shape)  # a view: no host copy of the whole
    return jax.make_array_from_callback(shape, sharding, lambda index: np.ascontiguousarray(full[index]))


def stacked_penalty_tables(dp: int, slots: int, vocab: int, sharding: Any) -> PenaltyTables:
    """Zeroed ``sampling.PenaltyTables`` with a leading ``[dp]`` axis (one set per replica) on ``sharding``."""
    return PenaltyTables(filled((dp, slots, vocab), 0, np.int32, sharding),
                         filled((dp, slots, vocab), False, np.bool_, sharding))


def replica_slots(r: int, slots: np.ndarray) -> np.ndarray:
    """A replica's chunk of slots ``[J]`` as the stacked tables' ``(replica, slot)`` pairs ``[J, 2]``
    (padding stays padding)."""
    slots = np.asarray(slots, np.int32)
    return np.stack([np.where(slots == PAD_SLOT, PAD_SLOT, r), slots], axis=1).astype(np.int32)


def write_replica_rows(group: Any, r: int, method: str, slots: np.ndarray, rows: Any) -> None:
    """Replica ``r``'s chunk of whole rows into ``group``'s stacked tables (``method``:
    ``write_page_rows`` or ``write_penalty_rows`` of its step runner). A batch ``r`` holds is
    dispatched first: it reads the rows as they were when it was packed."""
    if r in group._held:
        group.flush()
    getattr(group.step_runner, method)(replica_slots(r, slots), rows)


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None)),
                        tree)


class ReplicaStepRunner(SlotTables):
    """``dp`` replicas of one model in one jitted step over a ``(dp, 1, tp)`` mesh (module docstring).

    ``model``: parameters already placed on ``mesh`` by ``rules`` (``mesh.shard_model``), so
    sharded over ``tp`` and replicated over ``dp``. ``step_async`` takes a stacked batch
    (``stack_batches``: a ``[dp]`` axis in front of every leaf) and returns one handle whose
    ``result()`` holds every replica's ids, ``[dp, B]``."""

    def __init__(self, model: nnx.Module, mesh: Mesh, rules: ShardingRules, *, num_pages: int, page_size: int,
                 num_kv_heads: int, head_dim: int, num_layers: int, kv_dtype: Any, penalty_slots: int = 0,
                 vocab: int = 0, page_slots: int = 0, max_pages_per_row: int = 0) -> None:
        from pallas_kernels import make_kv_pages

        if mesh.shape["pp"] != 1:
            raise ValueError(f"pp={mesh.shape['pp']}: the replica step runs pp=1 replicas only")
        if penalty_slots < 0 or (penalty_slots and vocab < 1):
            raise ValueError(f"{penalty_slots=} must be >= 0, with vocab >= 1 (got {vocab=})")
        if page_slots < 0 or (page_slots and max_pages_per_row < 1):
            raise ValueError(f"{page_slots=} must be >= 0, with max_pages_per_row >= 1 (got {max_pages_per_row=})")
        self.mesh = mesh
        self.dp = mesh.shape["dp"]
        graphdef, self._state = nnx.split(model)
        kv_axis = rules.mesh_axis("kv_heads")
        one = make_kv_pages(2, page_size, num_kv_heads, head_dim, kv_dtype)  # the structure and fill values

        def stacked(a):  # one layer's [P, S, K, H] (int8 scales [P, S, K]) -> [dp, P, S, K, ...] over dp
            spec = P("dp", None, None, kv_axis, *([None] * (a.ndim - 3)))
            fill = a.reshape(-1)[0]  # 0 for pages, 1 for int8 scales
            return jnp.full((self.dp, num_pages, *a.shape[1:]), fill, a.dtype, device=NamedSharding(mesh, spec))

        self.kv = tuple(jax.tree.map(stacked, one) for _ in range(num_layers))
        replicated, by_dp = NamedSharding(mesh, P()), NamedSharding(mesh, P("dp"))
        # Each replica's per-slot tables, a leading [dp] axis over dp (replica r's on its own
        # devices): penalty counts and page tables, as one ModelRunner keeps them.
        self.penalty_slots, self.vocab = penalty_slots, vocab
        self.penalty_tables = stacked_penalty_tables(self.dp, penalty_slots, vocab, by_dp) if penalty_slots else None
        self.page_slots = page_slots
        self.page_table = None
        if page_slots:
            self.page_table = filled((self.dp, page_slots + 1, max_pages_per_row), NULL_PAGE, np.int32, by_dp)
        self.slot_dims = 2  # a loaded row's slot is (replica, slot)
        self._page_loader = SlotLoader(by_dp, slot_dims=2)
        self._penalty_loader = SlotLoader(by_dp, slot_dims=2)
        self._executables: dict[Any, Any] = {}
        self.num_compiles = 0
        self.warmed_up = False

        def replica(state, kv, tables, page_table, batch):  # one replica's block: a leading axis of 1
            kv, tables, page_table, batch = jax.tree.map(lambda a: a[0], (kv, tables, page_table, batch))
            if page_table is not None:
                page_table, batch = with_page_tables(page_table, batch)
            if tables is not None:
                tables = update_penalty_tables(tables, batch.input_ids, batch.segment_ids, batch.positions,
                                               batch.sampling)
            model = nnx.merge(graphdef, state)
            logits, kv = model(batch.input_ids, batch.positions, batch.segment_ids, kv_cache=kv,
                               attn_meta=batch.attn, logits_indices=batch.logits_indices)  # logits [B, V]
            out = sample(logits, batch.sampling, tables)
            return jax.tree.map(lambda a: a[None], (kv, tables, page_table, tuple(out)))

        def step_fn(state, kv, tables, page_table, batch):
            # Manual over dp only: inside, each replica's model runs with tp automatic, as alone.
            return jax.shard_map(replica, mesh=mesh, in_specs=(P(),) + (P("dp"),) * 4, out_specs=(P("dp"),) * 4,
                                 axis_names=frozenset({"dp"}), check_vma=False)(state, kv, tables, page_table, batch)

        kv_shardings = jax.tree.map(lambda a: a.sharding, self.kv)
        tables_sharding = None if self.penalty_tables is None else jax.tree.map(lambda a: by_dp, self.penalty_tables)
        pages_sharding = None if self.page_table is None else by_dp
        # The sampled outputs are gathered to every device: process 0 fetches them whole.
        self._jitted = jax.jit(step_fn, donate_argnums=(1, 2, 3),
                               out_shardings=(kv_shardings, tables_sharding, pages_sharding, replicated))

    @property
    def kv_cache(self) -> Any:
        """Per layer, the pages of every replica ``[dp, P, S, K, H]`` (replica axis over ``dp``)."""
        return self.kv

    @property
    def compiled_shapes(self) -> list:
        return list(self._executables)

    def _executable(self, batch: Any) -> Any:
        key = shape_key(batch)
        exe = self._executables.get(key)
        if exe is None:
            start = time.perf_counter()
            # The batch as it comes: numpy (one process), or replicated over the mesh on the devices
            # (the Controller's broadcast); the shard_map hands each replica its slice, a local cut.
            exe = self._jitted.lower(_abstract(self._state), _abstract(self.kv), _abstract(self.penalty_tables),
                                     _abstract(self.page_table), _abstract(batch)).compile()
            self._executables[key] = exe
            self.num_compiles += 1
            log = logger.warning if self.warmed_up else logger.info
            log("compiled replica step #%d for dp=%d tokens=%d rows=%d in %.2fs%s", self.num_compiles, self.dp,
                np.shape(batch.input_ids)[1], np.shape(batch.logits_indices)[1], time.perf_counter() - start,
                " (after warm-up)" if self.warmed_up else "")
        return exe

    def warmup(self, batches: Sequence[Any]) -> int:
        """Compile the step for every stacked batch shape given (nothing runs)."""
        for batch in batches:
            self._executable(batch)
        self.warmup_loads()
        self.warmed_up = True
        return self.num_compiles

    def step_async(self, batch: Any, *, fetch: bool = True) -> StepHandle:
        """Dispatch one stacked step; ``fetch=False`` (a worker): start no copy to the host."""
        exe = self._executable(batch)
        self.kv, self.penalty_tables, self.page_table, out = exe(self._state, self.kv, self.penalty_tables,
                                                                 self.page_table, batch)
        if fetch:
            for a in out:
                a.copy_to_host_async()
        return StepHandle(out)

    def step(self, batch: Any) -> SampledTokens:
        return self.step_async(batch).result()


@dataclasses.dataclass
class _Dispatched:
    handle: Any  # the stacked step's StepHandle
    sampled: SampledTokens | None = None  # fetched once, by the first replica that asks


class _ReplicaHandle:
    """Replica ``r``'s part of a stacked step; ``result()`` dispatches what is held if need be."""

    def __init__(self, group: StackedReplicas, r: int, ticket: int) -> None:
        self._group, self._r, self._ticket = group, r, ticket

    def result(self) -> SampledTokens:
        s = self._group.sampled(self._ticket)
        r = self._r
        return SampledTokens(s.token_ids[r], s.logprobs[r], s.top_ids[r], s.top_logprobs[r])


class ReplicaTables:
    """A replica view's part of the stacked per-slot tables (``penalty_slots``, row loads), for
    ``_ReplicaView`` and ``replica_pipeline.PipelineView``: ``self._group`` holds the stacked
    runner (``step_runner``) and the batches held for its next call (``_held``, ``flush``)."""

    _group: Any
    index: int

    @property
    def penalty_slots(self) -> int:
        """Slots in this replica's device penalty table (its ``[index]`` slice of the stacked one)."""
        return getattr(self._group.step_runner, "penalty_slots", 0)

    @property
    def vocab(self) -> int:
        return getattr(self._group.step_runner, "vocab", 0)

    def write_page_rows(self, slots: np.ndarray, rows: np.ndarray) -> None:
        """This replica's rows of the stacked page table (a batch it holds goes first: it reads the old rows)."""
        write_replica_rows(self._group, self.index, "write_page_rows", slots, rows)

    def write_penalty_rows(self, slots: np.ndarray, rows: Any) -> None:
        write_replica_rows(self._group, self.index, "write_penalty_rows", slots, rows)


class _ReplicaView(ReplicaTables):
    """What replica ``r``'s ``StepLoop`` drives: ``step_async`` holds its batch for the stacked step."""

    supports_prev_ids = False  # a held batch cannot read ids of a step not yet dispatched

    def __init__(self, group: StackedReplicas, r: int) -> None:
        self._group, self.index = group, r

    def step_async(self, batch: Any) -> _ReplicaHandle:
        return self._group.hold(self.index, batch)

    def step(self, batch: Any) -> SampledTokens:
        return self.step_async(batch).result()

    def warmup(self, batches: Sequence[Any]) -> int:
        return self._group.warmup(batches)

    @property
    def num_compiles(self) -> int:
        return self._group.num_compiles

    @property
    def kv_cache(self) -> Any:
        """The stacked pool every replica shares (``[dp, P, S, K, H]`` per layer): this replica's
        pages are its ``[index]`` slice, on its own devices."""
        return self._group.step_runner.kv_cache


class StackedReplicas(DataParallelRunner):
    """``dp`` replica views over one ``ReplicaStepRunner`` (or the ``Controller`` wrapping it).

    The engine sees a ``DataParallelRunner``: ``DataParallelStepLoop`` drives one ``StepLoop``
    per view, then calls ``flush()`` after every replica's ``start``, which dispatches the
    stacked step once for all replicas."""

    def __init__(self, step_runner: Any, dp: int, buckets: Any) -> None:
        from energon_jax.batch import dummy_batch

        self.step_runner = step_runner  # ReplicaStepRunner, or a Controller over it across processes
        self.buckets = buckets
        self._dummy = lambda t, b, h: dummy_batch(buckets, t, b, h)
        super().__init__([_ReplicaView(self, r) for r in range(dp)])
        self._held: dict[int, Any] = {}  # replica -> batch for the next stacked step
        self._ticket = 0  # the stacked step the held batches will join
        self._done: dict[int, _Dispatched] = {}  # dispatched stacked steps not fully read yet
        self._readers: dict[int, int] = {}  # replicas still to read each dispatched step
        self.steps = 0  # stacked steps dispatched
        self.shared_steps = 0  # ... of which more than one replica had rows in

    @property
    def num_compiles(self) -> int:
        return self.step_runner.num_compiles

    @property
    def kv_caches(self) -> list[Any]:
        """One entry: the stacked pool of every replica (replica ``r``'s pages are its ``[r]`` slice)."""
        return [self.step_runner.kv_cache]

    def warmup(self, batches: Sequence[Any]) -> int:
        """Compile the stacked step for every shape of ``batches`` (one replica's warm-up batches).

        Walked once per replica (``runtime.warm_up_with_progress`` counts ``dp`` passes); only
        the first compiles."""
        for _ in range(self.dp):  # lazily: the progress bar ticks per compile, then through the other passes
            self.step_runner.warmup(stack_batches([b] * self.dp) for b in batches)
        return self.num_compiles

    def hold(self, r: int, batch: Any) -> _ReplicaHandle:
        if r in self._held:  # a step split into decode and prefill calls: its second one goes next
            self.flush()
        self._held[r] = batch
        return _ReplicaHandle(self, r, self._ticket)

    def flush(self) -> None:
        """Dispatch the held batches as one stacked step (nothing when none is held)."""
        if not self._held:
            return
        from energon_jax.batch import history_width
        from energon_jax.parallel.spmd_pipeline import real_size

        sizes = [real_size(b) for b in self._held.values()]
        t = self.buckets.token_bucket(max(1, *(n for n, _ in sizes)))
        rows = self.buckets.rows_bucket(t, max(1, *(m for _, m in sizes)))
        # One history width for all: the widest held (a replica with a penalty row uploads it).
        template = self._dummy(t, rows, max(history_width(b) for b in self._held.values()))
        batches = [template if r not in self._held else fit_batch(self._held[r], template) for r in range(self.dp)]
        self._done[self._ticket] = _Dispatched(self.step_runner.step_async(stack_batches(batches)))
        self._readers[self._ticket] = len(self._held)
        self.steps += 1
        self.shared_steps += len(self._held) > 1
        self._held = {}
        self._ticket += 1

    def reset_stats(self) -> None:
        super().reset_stats()
        self.steps = self.shared_steps = 0

    def sampled(self, ticket: int) -> SampledTokens:
        """The stacked step ``ticket``'s outputs (dispatching it first if it is still held)."""
        if ticket == self._ticket:
            self.flush()
        done = self._done[ticket]
        if done.sampled is None:
            done.sampled = done.handle.result()
        self._readers[ticket] -= 1
        if not self._readers[ticket]:  # every replica that took part has read it
            del self._done[ticket], self._readers[ticket]
        return done.sampled
