"""The model runner: one jitted step per shape bucket, the KV cache donated through it.

Flow (called from the engine's step-loop thread): ``step_async(batch)`` takes a packed
``StepBatch`` (numpy, bucketed shapes, built by ``batch.pack``), runs the model forward
over the page pool and samples every row on device, and returns at once with a
``StepHandle``: JAX dispatch is asynchronous, so the host goes on (streams the last
step's text, plans the next one) while the device works. ``handle.result()`` waits and
fetches the few sampled ids and logprobs as ``SampledTokens``.

Planning ahead: a batch planned while the previous step ran holds placeholders
(``batch.prev_token_index``). ``step_async(batch, prev=handle)`` passes the previous
step's sampled ids as a device array (``handle.ids_buffer``, ``[max_rows]``, never
fetched) and the jitted step fills the placeholders (and their penalty-history entries)
before the forward, so the host can fetch step N's ids after dispatching N+1.

The KV cache lives here, as a field that every step replaces: the old buffers are
donated to the jitted step, so a step updates the cache in place instead of copying
it. So do the penalty tables (``penalty_slots > 0``): per-slot token counts that each
step updates with the tokens it feeds (``sampling.update_penalty_tables``), so that no
``[B, max_model_len]`` history goes up per step; ``penalty_slots.PenaltySlots`` (in the
step loop) assigns the slots. The model's parameters are split once (``nnx.split``) and passed as a pytree.

Compiles are explicit: each distinct batch shape is lowered and compiled once
(ahead of time) and the executable kept in a table. ``num_compiles`` counts them and
every compile is logged, so a test can assert that after ``warmup`` no request mix
compiles again; a compile after warm-up is logged as a warning.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from energon_jax.sampling import PenaltyTables, SampledTokens, make_penalty_tables, sample, update_penalty_tables
from energon_jax.slot_loads import SlotLoader, SlotTables
from pallas_kernels import KVCache
from pallas_kernels.page_layout import NULL_PAGE

logger = logging.getLogger(__name__)

ShapeKey = tuple[Any, ...]


def shape_key(batch: Any) -> ShapeKey:
    """What decides the compiled function: the batch's tree structure and leaf shapes/dtypes."""
    leaves, treedef = jax.tree.flatten(batch)
    return (treedef, tuple((np.shape(x), np.dtype(x.dtype).str) for x in leaves))


def _abstract(tree: Any) -> Any:
    # Keep a placed array's sharding (parameters and pages split over a mesh by
    # parallel/mesh.py); numpy leaves have none and the compiler places them.
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None)), tree
    )


@dataclasses.dataclass
class StepHandle:
    """A dispatched step; ``result()`` blocks until the device is done and fetches the ids."""

    _outputs: tuple[jax.Array, jax.Array, jax.Array, jax.Array]
    ids_buffer: jax.Array | None = None  # [max_rows] int32: the sampled ids, 0 padded, left on device

    def result(self) -> SampledTokens:
        ids, logprobs, top_ids, top_logprobs = jax.device_get(self._outputs)
        return SampledTokens(
            token_ids=np.asarray(ids),
            logprobs=np.asarray(logprobs),
            top_ids=np.asarray(top_ids),
            top_logprobs=np.asarray(top_logprobs),
        )


class ModelRunner(SlotTables):
    """Runs decoder steps: ``(KV cache, StepBatch) -> (KV cache, sampled tokens)`` on device."""

    supports_prev_ids = True  # step_async(batch, prev=...) fills placeholders on device

    def __init__(
        self, model: nnx.Module, kv_cache: KVCache, *, max_rows: int = 256, penalty_slots: int = 0, vocab: int = 0,
        page_slots: int = 0, max_pages_per_row: int = 0,
    ) -> None:
        if max_rows < 1:
            raise ValueError(f"{max_rows=} must be >= 1")
        if page_slots < 0 or (page_slots and max_pages_per_row < 1):
            raise ValueError(f"{page_slots=} must be >= 0, with max_pages_per_row >= 1 (got {max_pages_per_row=})")
        if penalty_slots < 0 or (penalty_slots and vocab < 1):
            raise ValueError(f"{penalty_slots=} must be >= 0, with vocab >= 1 (got {vocab=})")
        # Device penalty counts, one row per slot (None: batches carry the history instead).
        self.penalty_slots = penalty_slots
        self.vocab = vocab
        self.penalty_tables: PenaltyTables | None = None
        # Beside the KV pages: on their device, or whole on each device of their mesh (tp, a dp
        # replica); the step keeps them so (XLA would otherwise split them like the logits).
        tables_sharding = _replicated_like(kv_cache)
        if penalty_slots:
            self.penalty_tables = make_penalty_tables(penalty_slots, vocab, tables_sharding)
        # Device page tables (``batch.Buckets.page_slots``): one row per host slot (``HostRows``)
        # and a last all-null row for unused batch rows; steps append pages, joins load rows.
        self.page_slots = page_slots
        self.page_table: jax.Array | None = None
        if page_slots:
            empty = np.full((page_slots + 1, max_pages_per_row), NULL_PAGE, np.int32)
            # shard by shard: the sharding may span several processes' devices
            self.page_table = jax.make_array_from_callback(empty.shape, tables_sharding, lambda index: empty[index])
        self.max_rows = max_rows  # rows of the sampled-ids buffer one step hands the next
        self._no_prev = np.zeros(max_rows, np.int32)  # numpy: placed like the batch (no device of its own)
        graphdef, state = nnx.split(model)
        self._state = state
        self.kv_cache: KVCache = kv_cache
        self._executables: dict[ShapeKey, Any] = {}
        self.num_compiles = 0
        self.warmed_up = False

        def step_fn(state, kv_cache, tables, page_table, batch, prev_ids):  # prev_ids [max_rows] int32
            batch = _fill_placeholders(batch, prev_ids)
            if page_table is not None:
                page_table, batch = with_page_tables(page_table, batch)
                page_table = jax.lax.with_sharding_constraint(page_table, tables_sharding)
            if tables is not None:
                tables = update_penalty_tables(tables, batch.input_ids, batch.segment_ids, batch.positions,
                                               batch.sampling)
                tables = jax.lax.with_sharding_constraint(tables, tables_sharding)
            model = nnx.merge(graphdef, state)
            logits, kv_cache = model(  # logits [B, V]
                batch.input_ids,
                batch.positions,
                batch.segment_ids,
                kv_cache=kv_cache,
                attn_meta=batch.attn,
                logits_indices=batch.logits_indices,
            )
            out = sample(logits, batch.sampling, tables)
            rows = out[0].shape[0]  # a batch wider than max_rows keeps every id (it cannot be a prev then)
            ids_buffer = jnp.zeros(max(max_rows, rows), jnp.int32).at[:rows].set(out[0].astype(jnp.int32))
            return kv_cache, tables, page_table, out, ids_buffer

        self._jitted = jax.jit(step_fn, donate_argnums=(1, 2, 3))

        # Whole rows (a joining request's page table, a rebuilt penalty slot), one call per chunk.
        self._page_loader = SlotLoader(tables_sharding)
        self._penalty_loader = SlotLoader(tables_sharding)

    @property
    def compiled_shapes(self) -> list[ShapeKey]:
        return list(self._executables)

    def _executable(self, batch: Any) -> Any:
        key = shape_key(batch)
        exe = self._executables.get(key)
        if exe is None:
            exe = self._compile(batch, key)
        return exe

    def _compile(self, batch: Any, key: ShapeKey) -> Any:
        start = time.perf_counter()
        exe = self._jitted.lower(
            _abstract(self._state), _abstract(self.kv_cache), _abstract(self.penalty_tables),
            _abstract(self.page_table), _abstract(batch), _abstract(self._no_prev),
        ).compile()
        self._executables[key] = exe
        self.num_compiles += 1
        tokens = np.shape(batch.input_ids)[0]
        rows = np.shape(batch.logits_indices)[0]
        log = logger.warning if self.warmed_up else logger.info
        log(
            "compiled step #%d for tokens=%d rows=%d in %.2fs%s",
            self.num_compiles, tokens, rows, time.perf_counter() - start,
            " (after warm-up: a shape outside the buckets)" if self.warmed_up else "",
        )
        return exe

    def warmup(self, batches: Iterable[Any]) -> int:
        """Compile the step for every batch shape given (nothing runs); returns the compile count."""
        for batch in batches:
            self._executable(batch)
        self.warmup_loads()
        self.warmed_up = True
        return self.num_compiles

    def step_async(self, batch: Any, prev: StepHandle | None = None, *, fetch: bool = True) -> StepHandle:
        """Dispatch one step; returns before the device finishes.

        ``prev``: the step dispatched just before, whose sampled ids fill this batch's
        placeholders (needed when ``batch.prev_token_index`` has any entry >= 0).
        ``fetch=False``: nobody will read this step's outputs on this host (a multi-process
        worker), so no copy to the host is started.
        """
        prev_ids = self._no_prev if prev is None or prev.ids_buffer is None else prev.ids_buffer
        exe = self._executable(batch)
        self.kv_cache, self.penalty_tables, self.page_table, outputs, ids_buffer = exe(
            self._state, self.kv_cache, self.penalty_tables, self.page_table, batch, prev_ids
        )
        if fetch:
            for x in outputs:
                x.copy_to_host_async()
        return StepHandle(outputs, ids_buffer)

    def step(self, batch: Any) -> SampledTokens:
        return self.step_async(batch).result()


def _fill_placeholders(batch: Any, prev_ids: jax.Array) -> Any:
    """Put the previous step's sampled ids where the batch holds placeholders (on device)."""
    if not hasattr(batch, "prev_token_index"):  # a batch type without plan-ahead fields
        return batch
    idx = batch.prev_token_index  # [T]
    input_ids = jnp.where(idx >= 0, prev_ids[jnp.maximum(idx, 0)], batch.input_ids)
    hrow, hpos = batch.prev_history_row, batch.prev_history_pos  # [B], [B]
    history = batch.sampling.history  # [B, H]
    if history.shape[1] == 0:  # penalty counts live on the device: the fed ids are counted there
        return dataclasses.replace(batch, input_ids=input_ids)
    b = jnp.arange(history.shape[0])
    filled = jnp.where(hrow >= 0, prev_ids[jnp.maximum(hrow, 0)], history[b, hpos])
    sampling = dataclasses.replace(batch.sampling, history=history.at[b, hpos].set(filled))
    return dataclasses.replace(batch, input_ids=input_ids, sampling=sampling)


def with_page_tables(page_table: jax.Array, batch: Any) -> tuple[jax.Array, Any]:
    """Write the step's appended pages into the device table, then give the batch its rows'
    page tables ``[B, M]`` (an unused row, slot -1, reads the table's last, all-null row)."""
    d = batch.page_deltas  # [K, 3] (slot, column, page); padding slots are past the table: dropped
    page_table = page_table.at[d[:, 0], d[:, 1]].set(d[:, 2], mode="drop")
    null_row = page_table.shape[0] - 1
    rows = page_table[jnp.where(batch.row_slot >= 0, batch.row_slot, null_row)]
    return page_table, dataclasses.replace(batch, attn=dataclasses.replace(batch.attn, page_tables=rows))


def _replicated_like(tree: Any) -> Any:
    """A sharding holding a whole array on every device ``tree``'s first array lives on."""
    sharding = jax.tree.leaves(tree)[0].sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    return sharding
