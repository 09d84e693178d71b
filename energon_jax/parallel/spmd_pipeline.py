"""Pipeline parallelism as one SPMD program: one engine step is one jitted pipeline tick.

The decoder's layers are stacked along a leading *slot* axis sharded over the mesh's
``pp`` axis: stage ``s`` owns slots ``[s * n, (s + 1) * n)`` (``n = ceil(L / pp)``),
filled with its layers ``layer_bounds(L, pp)[s]`` and, when ``L`` does not split
evenly, with identity slots at the end (``active`` false: the activations pass through
unchanged; the slot's own pages, which no layer reads, take its writes). The KV pages are
stacked the same way, ``[slots, P, S, K, H]`` sharded over ``pp`` (and over ``tp`` by
KV head), so each stage's pages live on its own devices. Parameters inside a stage keep
their tensor-parallel layout (``tp`` stays automatic: the ``shard_map`` is manual over
``pp`` only).

One ``tick(batch)`` is one call of one compiled function on every device::

    x0 = embed(batch.input_ids)                       # vocab split over tp
    ring = [batch, ring[0], ..., ring[pp - 2]]        # ring[s]: the plan that entered s ticks ago
    shard_map over pp, stage s:
        x = x0 if s == 0 else acts[s]                  # what stage s - 1 computed last tick
        x = scan over s's slots: layer(x, ring[s])     # writes s's KV pages
        rows[s] = x[ring[s].logits_indices]            # [B, D]
        acts = ppermute(x, s -> s + 1)                 # handed on for the next tick
    ids = sample(head(norm(rows[pp - 1])), ring[pp - 1].sampling, tables)

Penalties: the penalty counts (``sampling.PenaltyTables``) stay on the devices like the
ring; a micro-batch adds its tokens to its rows' slots as it enters and its rows read them
as it leaves. A slot rebuilt for a row joining past position 0, and a joining row's page
table, are loaded before the tick it enters (``slot_loads.py``; across processes the
``PipelineController`` broadcasts them, so every process does).

The ring of ``pp`` micro-batch plans (a ``StepBatch`` with a leading ``[pp]`` axis, small
and replicated, so shifting it is a local copy) and the activations in flight
(``acts [pp, T, D]``, sharded over ``pp``) stay on the devices from tick to tick: only
the new micro-batch's arrays are an input, so across
processes the controller broadcasts just that (``PipelineController``). The micro-batch
leaving the last stage comes back as a ``StepHandle`` ``pp - 1`` ticks after it
entered; nothing here waits on a device.

Shapes: every stage of one tick runs the same ``(T, B)`` bucket (the activations are one
array over ``pp``). The tick takes the smallest bucket that holds every micro-batch in
flight (their real tokens and rows are at the front of their arrays, ``batch.pack``), the
new one is padded to it on the host, and the ring and the activations are kept at the
largest bucket and cut to the tick's inside the tick (one compiled tick per bucket, as
``ModelRunner``; the carry never changes shape). So a decode-only pipeline runs
decode-sized ticks, and a prefill chunk widens the ticks only while it is inside.

The engine drives it with ``PipelineStepLoop`` (``pipeline.py``), unchanged: the
interface (``tick``, ``empty``, ``in_flight_tags``, ``stats``, ``step_async`` for
warm-up) is ``PipelineRunner``'s. Pages stay safe for the same reason as there:
micro-batches pass every stage in the order they entered.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from energon_jax.batch import dummy_batch, history_width
from energon_jax.parallel.mesh import ShardingRules, place
from energon_jax.parallel.pipeline import PipelineStats
from energon_jax.parallel.pipeline_layout import SlotLayout, outer_placed, stack_layers, stacked_placed
from energon_jax.parallel.replica_step import filled
from energon_jax.parallel.stages import DecoderParts, head_piece, rope_inv_freq, run_embed, run_head_rows
from energon_jax.runner import StepHandle, shape_key, with_page_tables
from energon_jax.sampling import PenaltyTables, update_penalty_tables
from energon_jax.slot_loads import SlotLoader, SlotTables
from pallas_kernels.page_layout import NULL_PAGE

logger = logging.getLogger(__name__)


def _fit(batch: Any, template: Any) -> Any:
    """``batch`` (numpy) cut or padded to ``template``'s bucket, padded with the template's values.
    Real tokens and rows sit at the front (``batch.pack``), so a fit that keeps them all changes
    nothing they compute."""

    def one(old, new):
        out = np.array(new)
        n = min(old.shape[0], new.shape[0])
        out[:n] = old[:n]
        return out

    return jax.tree.map(one, batch, template)


def _into_pad(a: jax.Array, pad: Any) -> jax.Array:
    """``a``'s rows over the carry-sized padding ``pad``; a zero-width history (a micro-batch
    without penalty rows, which uploads none) leaves the padding's -1s."""
    pad = jnp.asarray(pad)
    if a.shape[1:] != pad.shape[1:]:
        return pad
    return pad.at[: a.shape[0]].set(a)


def _context_mesh(mesh: Mesh) -> Any:
    """``mesh``, or inside an outer ``shard_map`` (``replica_pipeline``: manual over ``dp``) the
    abstract mesh it set, which a nested ``shard_map`` must be given instead."""
    inner = jax.sharding.get_abstract_mesh()
    return mesh if inner.empty else inner


def real_size(batch: Any) -> tuple[int, int]:
    """``(tokens, rows)`` a packed batch really holds (the rest is padding)."""
    return int(np.count_nonzero(np.asarray(batch.segment_ids) >= 0)), int(
        np.count_nonzero(np.asarray(batch.attn.context_lens) > 0))


@dataclasses.dataclass
class _Held:
    tag: Any
    tokens: int
    rows: int


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None)),
                        tree)


class SpmdPipelineRunner(SlotTables):
    """``pp`` stages in one jitted tick (module docstring); ``PipelineRunner``'s interface.
    ``ReplicaPipelineRunner`` stacks ``dp`` of them: it sets ``replica_axes`` and ``_device_tick``."""

    # Mesh axes of a leading axis on every piece of the carry (pages, activations, ring of plans)
    # and on the per-slot tables: none for one pipeline, ("dp",) for stacked replicas.
    replica_axes: tuple[str, ...] = ()

    def __init__(self, parts: DecoderParts, mesh: Mesh, rules: ShardingRules, *, num_pages: int, page_size: int,
                 buckets: Any, kv_dtype: Any = None, penalty_slots: int = 0, vocab: int = 0) -> None:
        self.pp = mesh.shape["pp"]
        self._check_mesh(mesh)
        if penalty_slots < 0 or (penalty_slots and vocab < 1):
            raise ValueError(f"{penalty_slots=} must be >= 0, with vocab >= 1 (got {vocab=})")
        self.parts, self.mesh, self.buckets = parts, mesh, buckets
        self.layout = SlotLayout(parts.num_layers, self.pp)
        self.bounds = self.layout.bounds
        self._dummy = functools.partial(dummy_batch, buckets)
        self._by_pp = NamedSharding(mesh, P("pp"))
        self._replicated = NamedSharding(mesh, P())
        # A replica's per-slot tables and ring of plans: whole on each of its devices (replicated
        # over the whole mesh for one pipeline, split by replica when stacked).
        self._per_replica = NamedSharding(mesh, P(*self.replica_axes))
        self._lead = tuple(mesh.shape[a] for a in self.replica_axes)  # () or (dp,)
        self.penalty_slots, self.vocab = penalty_slots, vocab
        self._place_weights(rules)
        self.kv = self._make_pages(rules.mesh_axis("kv_heads"), num_pages, page_size, kv_dtype)
        self._make_tables()
        self._make_carry()
        self._executables: dict[Any, Any] = {}
        self.num_compiles = 0
        self.warmed_up = False
        self.stats = PipelineStats(busy=[0] * self.pp)
        # What runs a fitted batch on the devices: this runner, or (across processes) a
        # PipelineController that broadcasts it to every process first.
        self.dispatch: Callable[[Any], Any] = self.run_tick
        kv_shardings = jax.tree.map(lambda a: a.sharding, self.kv)
        self._jitted = jax.jit(self._device_tick, donate_argnums=(2, 3, 4, 5, 6),
                               out_shardings=(kv_shardings, self._acts.sharding, self._per_replica,
                                              self._per_replica, self._per_replica, self._replicated))

    def _check_mesh(self, mesh: Mesh) -> None:
        if mesh.shape["dp"] != 1:
            raise ValueError(f"dp={mesh.shape['dp']}: give each data-parallel replica its own (1, pp, tp) mesh")
        if self.pp < 2:
            raise ValueError(f"pp={self.pp} must be >= 2 for a pipeline (pp=1 is the plain ModelRunner)")

    @property
    def slot_dims(self) -> int:
        """Indices that name a loaded row's slot: ``slot``, or ``(replica, slot)`` when stacked."""
        return 1 + len(self.replica_axes)

    def _place_weights(self, rules: ShardingRules) -> None:
        """The layers stacked over ``pp`` and the outer pieces by the ``tp`` rules; the rules never
        name a replica axis, so stacked replicas share one copy, replicated over ``dp``."""
        parts, mesh = self.parts, self.mesh
        self._graphdef, stacked = stack_layers(parts, self.layout)
        self._layers = stacked_placed(stacked, mesh, rules)
        self._active = place(np.array([i >= 0 for i in self.layout.layer_of_slot]), self._by_pp)  # [slots] bool
        self._embed = outer_placed(parts.embed[1], mesh, rules)
        self._norm = outer_placed(parts.norm[1], mesh, rules)
        self._head = outer_placed(head_piece(parts)[1], mesh, rules)

    def _make_pages(self, kv_axis: Any, num_pages: int, page_size: int, kv_dtype: Any) -> Any:
        """Every slot's pages, ``[*lead, slots, P, S, K, H]`` (int8 scales ``[..., K]``), over the
        replica axes, ``pp`` and ``kv_axis`` by KV head; filled as one layer's fresh pages are."""
        from pallas_kernels import make_kv_pages

        c, slots = self.parts.config, self.pp * self.layout.per_stage
        dtype = self.parts.dtype if kv_dtype is None else kv_dtype
        one = make_kv_pages(2, page_size, c.num_kv_heads, c.head_dim, dtype)

        def stacked(a):  # one layer's [P, S, K, ...] -> [*lead, slots, P, S, K, ...]
            spec = P(*self.replica_axes, "pp", None, None, kv_axis, *([None] * (a.ndim - 3)))
            fill = a.reshape(-1)[0]  # 0 for pages, 1 for int8 scales
            return jnp.full((*self._lead, slots, num_pages, *a.shape[1:]), fill, a.dtype,
                            device=NamedSharding(self.mesh, spec))

        return jax.tree.map(stacked, one)

    def _make_tables(self) -> None:
        """The per-slot tables, each replica's whole on its devices (like the head that samples),
        and their row loads. Penalty counts (``sampling.PenaltyTables``): a micro-batch adds its
        fed tokens as it enters (a pipeline has no placeholders) and reads its rows' slots as it
        leaves; the step loop never gives a slot still in flight to another request
        (``PenaltySlots.assign``'s busy). Page tables (``Buckets.page_slots``): ``ModelRunner``'s;
        a micro-batch gathers its rows' tables as it enters, and the ring holds them from then on."""
        buckets, sharding = self.buckets, self._per_replica
        self.penalty_tables = None
        if self.penalty_slots:
            shape = (*self._lead, self.penalty_slots, self.vocab)
            self.penalty_tables = PenaltyTables(filled(shape, 0, np.int32, sharding),
                                                filled(shape, False, np.bool_, sharding))
        self.page_table: jax.Array | None = None
        if buckets.page_slots:
            self.page_table = filled((*self._lead, buckets.page_slots + 1, buckets.max_pages_per_row), NULL_PAGE,
                                     np.int32, sharding)
        self._page_loader = SlotLoader(sharding, slot_dims=self.slot_dims)
        self._penalty_loader = SlotLoader(sharding, slot_dims=self.slot_dims)

    def _make_carry(self) -> None:
        """The carry, at the largest bucket (T_max, B_max) so that its shape never changes: the
        activations each stage takes next tick ``[*lead, pp, T_max, D]`` (over the replica axes and
        ``pp``), the plan each stage ran last tick (a StepBatch with a leading ``[*lead, pp]`` axis,
        padding where a plan is smaller); and the host clock."""
        buckets, c = self.buckets, self.parts.config
        t_max = buckets.max_tokens
        b_max = max(b for _, b in buckets.all_shapes())
        self._pad = self._dummy(t_max, b_max)  # what padding tokens and unused rows hold
        if buckets.page_slots:  # the ring holds each micro-batch's gathered [B, M] tables
            self._pad = dataclasses.replace(self._pad, attn=dataclasses.replace(
                self._pad.attn, page_tables=np.full((b_max, buckets.max_pages_per_row), NULL_PAGE, np.int32)))
        lead = (*self._lead, self.pp)
        self._acts = place(np.zeros((*lead, t_max, c.hidden_size), self.parts.dtype),
                           NamedSharding(self.mesh, P(*self.replica_axes, "pp")))
        self._ring = jax.tree.map(lambda a: place(np.broadcast_to(a, (*lead, *a.shape)), self._per_replica), self._pad)
        self._shape = (buckets.token_buckets[0], buckets.rows_bucket(buckets.token_buckets[0], 1))  # last tick's
        self._slots: list[_Held | None] = [None] * self.pp  # what each stage ran at the last tick

    # -- the jitted tick ------------------------------------------------------------------

    def _tick_fn(self, layers, active, kv, acts, ring, tables, page_table, embed, norm, head, batch):
        pp, parts = self.pp, self.parts
        t = batch.input_ids.shape[0]
        if page_table is not None:  # the entering micro-batch's appended pages, then its rows' tables
            page_table, batch = with_page_tables(page_table, batch)
        if tables is not None:  # the entering micro-batch's fed tokens (its joining slots zeroed first)
            tables = update_penalty_tables(tables, batch.input_ids, batch.segment_ids, batch.positions,
                                           batch.sampling)

        x0 = run_embed(parts, embed, batch.input_ids)  # [T, D]
        # This tick's plans: stage 0 takes the new one (padded to the carry's size), stage s the
        # one stage s - 1 ran last tick. The ring is small and replicated: shifting it is a local
        # copy, not a collective.
        new = jax.tree.map(_into_pad, batch, self._pad)
        ring = jax.tree.map(lambda a, old: jnp.concatenate([a[None], old[:-1]]), new, ring)
        # Every plan in flight fits this tick's bucket (tick() chose it so): cut the carry to it.
        now = jax.tree.map(lambda a, like: a[:, : like.shape[0]], ring, batch)
        perm = [(s, (s + 1) % pp) for s in range(pp)]

        def stage(layers, active, kv, acts, now, x0):
            s = jax.lax.axis_index("pp")
            meta = jax.tree.map(lambda a: a[s], now)
            x = jnp.where(s == 0, x0, acts[0])
            x, kv = self._run_slots(layers, active, kv, x, meta)
            rows = x[meta.logits_indices]  # [B, D]
            return kv, jax.lax.ppermute(x, "pp", perm)[None], rows[None]

        kv, acts_next, rows = jax.shard_map(
            stage, mesh=_context_mesh(self.mesh), in_specs=(P("pp"), P("pp"), P("pp"), P("pp"), P(), P()),
            out_specs=(P("pp"), P("pp"), P("pp")), axis_names=frozenset({"pp"}), check_vma=False,
        )(layers, active, kv, acts[:, :t], now, x0)
        # Past T the activations are stale; only padding tokens of a later, wider tick read them.
        acts = acts.at[:, :t].set(acts_next)
        # The last stage ran the plan that entered pp - 1 ticks ago.
        sampling = jax.tree.map(lambda a: a[pp - 1], now.sampling)
        out = run_head_rows(parts, norm, head, rows[pp - 1], sampling, tables)
        return kv, acts, ring, tables, page_table, out

    _device_tick = _tick_fn  # what __init__ jits (ReplicaPipelineRunner: every replica's tick at once)

    def _run_slots(self, layers, active, kv, x, meta):
        """This stage's slots over ``x [T, D]``. The stage's pages are one pool of ``n * P``
        pages (slot ``i``'s page ``p`` is ``i * P + p``), so a layer writes and reads its own
        pages through offset tables, in place, without slicing the pool."""
        n, num_pages, page_size = kv.k.shape[0], kv.k.shape[1], kv.k.shape[2]
        pool = jax.tree.map(lambda a: a.reshape(n * num_pages, *a.shape[2:]), kv)
        inv_freq = rope_inv_freq(self.parts)
        graphdef = self._graphdef

        def body(carry, xs):
            x, pool = carry
            state, on, i = xs
            attn = dataclasses.replace(meta.attn, slot_mapping=meta.attn.slot_mapping + i * num_pages * page_size,
                                       page_tables=meta.attn.page_tables + i * num_pages)

            layer = nnx.merge(graphdef, state)
            y, pool = layer(x, meta.positions, meta.segment_ids, inv_freq, pool, attn)
            # An identity slot (zero weights) computes too and writes only its own pages, which no
            # layer reads; lax.cond would skip it, but XLA copies the pool through the
            # conditional at every slot (a tick 5x slower on CPU).
            return (jnp.where(on, y, x), pool), None

        (x, pool), _ = jax.lax.scan(body, (x, pool), (layers, active, jnp.arange(n)))
        return x, jax.tree.map(lambda a, old: a.reshape(old.shape), pool, kv)

    # -- compiling --------------------------------------------------------------------------

    def _executable(self, batch: Any) -> Any:
        key = shape_key(batch)
        exe = self._executables.get(key)
        if exe is None:
            start = time.perf_counter()
            exe = self._jitted.lower(_abstract(self._layers), _abstract(self._active), _abstract(self.kv),
                                     _abstract(self._acts), _abstract(self._ring), _abstract(self.penalty_tables),
                                     _abstract(self.page_table), _abstract(self._embed), _abstract(self._norm), _abstract(self._head),
                                     _abstract(batch)).compile()
            self._executables[key] = exe
            self.num_compiles += 1
            log = logger.warning if self.warmed_up else logger.info
            log("compiled pipeline tick #%d for tokens=%d rows=%d in %.2fs%s", self.num_compiles,  # per replica
                np.shape(batch.input_ids)[-1], np.shape(batch.logits_indices)[-1], time.perf_counter() - start,
                " (after warm-up)" if self.warmed_up else "")
        return exe

    @property
    def compiled_shapes(self) -> list:
        return list(self._executables)

    def warmup(self, batches: Iterable[Any]) -> int:
        """Compile the tick for every batch shape given (nothing runs)."""
        for batch in batches:
            self._executable(batch)
        self.warmup_loads()
        self.warmed_up = True
        return self.num_compiles

    # -- the device side of a tick (every process) -------------------------------------------

    def run_tick(self, batch: Any, *, fetch: bool = True) -> tuple:
        """Run one tick of a batch already fitted to the tick's bucket; returns the sampled
        outputs of the stage that finished a micro-batch (ids, logprobs, top ids, top logprobs).
        ``fetch=False`` (a multi-process worker, which never reads them): no copy to the host."""
        self._shape = (np.shape(batch.input_ids)[0], np.shape(batch.logits_indices)[0])
        exe = self._executable(batch)
        self.kv, self._acts, self._ring, self.penalty_tables, self.page_table, out = exe(
            self._layers, self._active, self.kv, self._acts, self._ring, self.penalty_tables, self.page_table,
            self._embed, self._norm, self._head, batch)
        if fetch:
            for a in out:
                a.copy_to_host_async()
        return out

    # -- the clock (process 0) -------------------------------------------------------------

    @property
    def empty(self) -> bool:
        return all(slot is None for slot in self._slots)

    @property
    def in_flight_tags(self) -> list[Any]:
        """The tags of the micro-batches in the pipeline, the next to leave first."""
        return [slot.tag for slot in reversed(self._slots) if slot is not None and slot.tag is not None]

    def reset_stats(self) -> None:
        self.stats = PipelineStats(busy=[0] * self.pp, entered=self.stats.in_flight, completed=0)

    def tick(self, batch: Any | None = None, tag: Any = None) -> tuple[Any, StepHandle] | None:
        """Advance the clock once; ``batch`` enters stage 0. Returns ``(tag, handle)`` of the
        micro-batch leaving the last stage this tick, if any. Never blocks on a device."""
        entering = None if batch is None else _Held(tag, *real_size(batch))
        stages = [entering, *self._slots[:-1]]  # what each stage runs this tick
        held = [h for h in stages if h is not None]
        if held:
            t = self.buckets.token_bucket(max(1, *(h.tokens for h in held)))
            b = self.buckets.rows_bucket(t, max(1, *(h.rows for h in held)))
        else:  # nothing in flight: keep the current shape
            t, b = self._shape
        template = self._dummy(t, b, 0 if batch is None else history_width(batch))
        fitted = template if batch is None else _fit(batch, template)
        out = self.dispatch(fitted)
        if entering is not None:
            self.stats.entered += 1
        for s, h in enumerate(stages):
            self.stats.busy[s] += h is not None
        self.stats.max_in_flight = max(self.stats.max_in_flight, len(held))
        self.stats.ticks += 1
        leaving = stages[-1]
        self._slots = [*stages[:-1], None]
        if leaving is None:
            return None
        self.stats.completed += 1
        return leaving.tag, StepHandle(tuple(out))

    # -- the runner's interface ------------------------------------------------------------

    @property
    def weights(self) -> tuple[Any, Any, Any, Any]:
        """The placed states: stacked layers, embedding, final norm, head."""
        return self._layers, self._embed, self._norm, self._head

    @property
    def kv_cache(self) -> Any:
        """The stacked pages ``[slots, P, S, K, H]`` (slot axis over ``pp``)."""
        return self.kv

    def step_async(self, batch: Any) -> StepHandle:
        """One micro-batch alone through every stage (``pp`` ticks); needs an empty pipeline."""
        if not self.empty:
            raise RuntimeError("step_async() needs an empty pipeline (PipelineStepLoop drives tick())")
        out = self.tick(batch)
        while out is None:
            out = self.tick()
        return out[1]

    def step(self, batch: Any) -> Any:
        return self.step_async(batch).result()
