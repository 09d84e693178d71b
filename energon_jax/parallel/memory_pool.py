"""Peer memory pooling: serve a model whose weights do not fit on the compute device.

Only ``resident_layers = k`` decoder layers' weights sit in the compute device's memory
at a time. The others live in a pool: host memory of the same device
(``offload="host"``, ``memory_kind="pinned_host"``, copied in by DMA) or another device
(``offload="peer"``, copied device to device). The embedding, final norm and head stay
resident (they are needed at every step and are not layers).

One step runs the layers one jitted call at a time, with a window of weights:

::

    window = layers 0 .. k-1 (fetched)
    for layer i:
        wait until layer i-1 has finished        # its weights are free again
        fetch layer i+k into the window           # async copy, overlaps layer i's compute
        run layer i with the window's first entry, drop it

So the copy of layer ``i + k`` runs while layer ``i`` computes, and the weight bytes on
the compute device never exceed ``k + 1`` layers: the ``k`` of the window plus the one
in transfer. The wait on layer ``i - 1`` is what makes the bound true on the device and
not only in Python: without it the host would run ahead, queueing copies of every
layer before the device had freed any.

``stats`` records the most layers and weight bytes ever resident (counted from the
live device copies, via weak references, at the moment each copy is made) and the
number of fetches. ``OffloadedRunner`` has the runner's interface (``step_async``,
``step``, ``warmup``, ``num_compiles``, ``kv_cache``), so the engine can use it in place of
``ModelRunner``. It runs on one compute device; combining it with ``tp`` is not done.

Like ``ModelRunner`` it keeps the penalty counts and, with ``page_slots``
(``batch.Buckets.page_slots``), the page tables on the compute device: a step first
writes the batch's appended pages into the table and gathers its rows' ``[B, M]`` tables
there (one small jitted call, the table donated), and every layer call reads that
gathered batch on the device, so no ``[B, M]`` table goes up with a step (and the batch
goes up once per step, not once per layer).
"""

from __future__ import annotations

import dataclasses
import weakref
from collections import deque
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np
from jax.sharding import SingleDeviceSharding

from energon_jax.parallel.stages import DecoderParts, head_piece, run_embed, run_head, run_layer
from energon_jax.runner import StepHandle, shape_key, with_page_tables
from energon_jax.sampling import make_penalty_tables, update_penalty_tables
from energon_jax.slot_loads import SlotLoader, SlotTables
from pallas_kernels.page_layout import NULL_PAGE

OFFLOAD_KINDS = ("host", "peer")


@dataclasses.dataclass(frozen=True)
class OffloadConfig:
    offload: str  # "host" | "peer"
    resident_layers: int  # k: layers whose weights sit on the compute device at once (plus one in transfer)

    def __post_init__(self) -> None:
        if self.offload not in OFFLOAD_KINDS:
            raise ValueError(f"offload={self.offload!r} must be one of {OFFLOAD_KINDS}")
        if not isinstance(self.resident_layers, int) or self.resident_layers < 1:
            raise ValueError(f"resident_layers={self.resident_layers!r} must be an integer >= 1")


@dataclasses.dataclass
class PoolStats:
    layer_bytes: list[int]  # weight bytes of each layer
    fetches: int = 0
    peak_resident_layers: int = 0
    peak_resident_bytes: int = 0

    @property
    def max_layer_bytes(self) -> int:
        return max(self.layer_bytes)


def _nbytes(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


class OffloadedRunner(SlotTables):
    """A decoder step with layer weights streamed from a memory pool (see the module docstring)."""

    def __init__(self, parts: DecoderParts, config: OffloadConfig, *, num_pages: int, page_size: int,
                 compute_device: jax.Device | None = None, peer_device: jax.Device | None = None,
                 penalty_slots: int = 0, vocab: int = 0, page_slots: int = 0, max_pages_per_row: int = 0) -> None:
        from pallas_kernels import make_kv_pages

        self.parts, self.config = parts, config
        devices = jax.local_devices()
        self.device = compute_device or devices[0]
        self._compute = SingleDeviceSharding(self.device)
        if config.offload == "host":
            kinds = {m.kind for m in self.device.addressable_memories()}
            if "pinned_host" not in kinds:
                raise ValueError(f"offload='host' needs pinned_host memory; {self.device} has {sorted(kinds)}")
            self._pool = SingleDeviceSharding(self.device, memory_kind="pinned_host")
        else:
            peers = [d for d in devices if d != self.device]
            if peer_device is None and not peers:
                raise ValueError("offload='peer' needs a second device to hold the weights; this process has one")
            self._pool = SingleDeviceSharding(peer_device or peers[0])
        n = parts.num_layers
        if config.resident_layers > n:
            raise ValueError(f"resident_layers={config.resident_layers} must be <= num_layers={n}")
        self._pooled = [jax.device_put(state, self._pool) for _, state in parts.layers]  # the weights' home
        self._embed = jax.device_put(parts.embed[1], self._compute)
        self._norm = jax.device_put(parts.norm[1], self._compute)
        self._head = jax.device_put(head_piece(parts)[1], self._compute)
        c = parts.config
        self.kv_cache = tuple(make_kv_pages(num_pages, page_size, c.num_kv_heads, c.head_dim, parts.dtype,
                                            sharding=self._compute) for _ in range(n))
        self.stats = PoolStats(layer_bytes=[_nbytes(state) for _, state in parts.layers])
        self._live: list[weakref.ref] = []  # the device copies of layer weights made so far
        self._shapes: set = set()
        self.warmed_up = False

        # One compiled function per piece and batch shape; every layer shares the layer function
        # (the graphdef is a static argument, equal for all layers of one family).
        self._embed_fn = jax.jit(lambda st, ids: run_embed(parts, st, ids))
        self._layer_fn = jax.jit(self._run_layer, static_argnums=(0,), donate_argnums=(2,))
        self._head_fn = jax.jit(self._run_head, donate_argnums=(4,))
        # Device penalty counts (``sampling.PenaltyTables``) on the compute device, updated by the
        # head call with the step's fed tokens: no history goes up with a batch.
        if penalty_slots < 0 or (penalty_slots and vocab < 1):
            raise ValueError(f"{penalty_slots=} must be >= 0, with vocab >= 1 (got {vocab=})")
        self.penalty_slots, self.vocab = penalty_slots, vocab
        self.penalty_tables = make_penalty_tables(penalty_slots, vocab, self._compute) if penalty_slots else None
        # Device page tables: one row per host slot (``HostRows``) and a last all-null row for
        # unused batch rows, as in ``ModelRunner``.
        if page_slots < 0 or (page_slots and max_pages_per_row < 1):
            raise ValueError(f"{page_slots=} must be >= 0, with max_pages_per_row >= 1 (got {max_pages_per_row=})")
        self.page_slots = page_slots
        self.page_table: jax.Array | None = None
        if page_slots:
            self.page_table = jax.device_put(np.full((page_slots + 1, max_pages_per_row), NULL_PAGE, np.int32),
                                             self._compute)
        self._tables_fn = jax.jit(with_page_tables, donate_argnums=(0,))
        # Whole rows (a joining request's page table, a rebuilt penalty slot), one call per chunk.
        self._page_loader, self._penalty_loader = SlotLoader(self._compute), SlotLoader(self._compute)

    def _run_head(self, norm_state: Any, head_state: Any, x: jax.Array, batch: Any, tables: Any):
        if tables is not None:
            tables = update_penalty_tables(tables, batch.input_ids, batch.segment_ids, batch.positions, batch.sampling)
        return run_head(self.parts, norm_state, head_state, x, batch, tables), tables

    def _run_layer(self, graphdef: Any, state: Any, pages: Any, x: jax.Array, batch: Any):
        x, pages = run_layer(self.parts, graphdef, state, pages, x, batch)
        return pages, x

    # -- the weight window -------------------------------------------------------------

    def _fetch(self, i: int) -> Any:
        state = jax.device_put(self._pooled[i], self._compute)  # async copy pool -> compute device
        self.stats.fetches += 1
        for leaf in jax.tree.leaves(state):
            self._live.append(weakref.ref(leaf))
        self._note_resident()
        return state

    def _note_resident(self) -> None:
        self._live = [r for r in self._live if r() is not None]
        live = [r() for r in self._live]
        nbytes = sum(a.nbytes for a in live if a is not None)
        layers = nbytes / self.stats.max_layer_bytes
        self.stats.peak_resident_bytes = max(self.stats.peak_resident_bytes, nbytes)
        self.stats.peak_resident_layers = max(self.stats.peak_resident_layers, int(np.ceil(layers - 1e-9)))

    # -- the runner's interface ----------------------------------------------------------

    @property
    def num_compiles(self) -> int:
        return len(self._shapes)

    def warmup(self, batches: Iterable[Any]) -> int:
        for batch in batches:
            self.step(batch)  # all-padding batches write only the null page
        self.warmup_loads()
        self.warmed_up = True
        return self.num_compiles

    def step_async(self, batch: Any) -> StepHandle:
        self._shapes.add(shape_key(batch))
        k, n = self.config.resident_layers, self.parts.num_layers
        # The batch goes up once, not with each layer call: with device page tables, through the
        # call that writes the step's appended pages and gathers its rows' [B, M] tables there.
        if self.page_table is not None:
            self.page_table, batch = self._tables_fn(self.page_table, batch)
        else:
            batch = jax.device_put(batch, self._compute)
        kv = list(self.kv_cache)
        self.kv_cache = ()  # the pages are donated layer by layer below
        x = self._embed_fn(self._embed, batch.input_ids)  # [T, D]
        window = deque(self._fetch(i) for i in range(k))
        for i in range(n):
            if i > 0:
                x.block_until_ready()  # layer i-1 done: its weights are no longer in use
            if i + k < n:
                window.append(self._fetch(i + k))  # overlaps layer i below
            state = window.popleft()
            kv[i], x = self._layer_fn(self.parts.layers[i][0], state, kv[i], x, batch)
            del state
        self.kv_cache = tuple(kv)
        outputs, self.penalty_tables = self._head_fn(self._norm, self._head, x, batch, self.penalty_tables)
        for a in outputs:
            a.copy_to_host_async()
        return StepHandle(outputs)

    def step(self, batch: Any):
        return self.step_async(batch).result()
