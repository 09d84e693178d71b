"""Whole-row loads into the tables a runner keeps per slot on the device.

A runner keeps some state per host slot on its devices between steps: page tables
(``batch.Buckets.page_slots``, filled by ``host_rows.HostRows``) and penalty counts
(``sampling.PenaltyTables``, slots from ``penalty_slots.PenaltySlots``). Steps change them
by deltas; only a row the host copies whole (a request that joins, or comes back after a
preemption) goes up, before the step that reads it.

Those uploads are one call per step, not one per row: ``chunks`` pads a step's rows to the
next of a few counts (``LOAD_SIZES``, at most ``MAX_LOAD_ROWS`` per call) and ``SlotLoader``
scatters each chunk in one jitted call (the table donated, so it is updated in place),
compiled at warm-up. Padding rows carry ``PAD_SLOT``, past any table: the scatter drops
them. Across processes the ``Controller`` broadcasts each chunk to every process first
(``parallel/controller.py``), and each one runs the same load on its own devices: the
chunk's shape is all a worker needs to know (``template``).

A slot is one index (a table ``[S, ...]``) or, for ``dp`` replicas stacked in one array,
a ``(replica, slot)`` pair (a table ``[dp, S, ...]``; ``slots [J, 2]``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

PAD_SLOT = 2**30  # past every table's slot axis: a padding row's write is dropped
MAX_LOAD_ROWS = 64  # rows one call writes; a step that loads more makes several calls
# Three sizes: each is compiled at every runner's warm-up (about 60 ms apiece on a CPU), and
# padding a few joining rows to 8 costs at most 7 rows of [M] ints (or [V] counts) per step.
LOAD_SIZES = (1, 8, MAX_LOAD_ROWS)


def chunks(slots: np.ndarray, rows: Any) -> list[tuple[np.ndarray, Any]]:
    """``(slots [J] or [J, 2], rows: a pytree of [J, ...])`` cut into calls of at most
    ``MAX_LOAD_ROWS`` rows, each padded to the next of ``LOAD_SIZES`` with ``PAD_SLOT`` rows."""
    slots = np.asarray(slots, np.int32)
    out = []
    for start in range(0, len(slots), MAX_LOAD_ROWS):
        end = min(len(slots), start + MAX_LOAD_ROWS)
        size = next(s for s in LOAD_SIZES if s >= end - start)
        s = np.full((size, *slots.shape[1:]), PAD_SLOT, np.int32)
        s[: end - start] = slots[start:end]
        out.append((s, jax.tree.map(lambda a: _pad_rows(np.asarray(a)[start:end], size), rows)))
    return out


def template(table: Any, size: int, slot_dims: int = 1) -> tuple[np.ndarray, Any]:
    """An all-padding chunk of ``size`` rows for ``table`` (what a worker hands the broadcast)."""
    slots = np.full((size, slot_dims) if slot_dims > 1 else (size,), PAD_SLOT, np.int32)
    rows = jax.tree.map(lambda t: np.zeros((size, *np.shape(t)[slot_dims:]), t.dtype), table)
    return slots, rows


def _pad_rows(a: np.ndarray, size: int) -> np.ndarray:
    out = np.zeros((size, *a.shape[1:]), a.dtype)
    out[: len(a)] = a
    return out


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None)),
                        tree)


def _load(table: Any, slots: jax.Array, rows: Any, *, slot_dims: int, sharding: Any) -> Any:
    index = slots if slot_dims == 1 else tuple(slots[:, d] for d in range(slot_dims))
    out = jax.tree.map(lambda t, r: t.at[index].set(r.astype(t.dtype), mode="drop"), table, rows)
    return jax.lax.with_sharding_constraint(out, sharding)


_jitted_load = jax.jit(_load, static_argnames=("slot_dims", "sharding"), donate_argnums=(0,))


@functools.lru_cache(maxsize=512)
def _compiled(slot_dims: int, sharding: Any, treedef: Any, leaves: tuple) -> Any:
    """One load executable per (table, chunk) shapes and placement, shared by every runner of
    the process: an engine (or a test) that builds several runners alike compiles it once."""
    table, slots, rows = jax.tree.unflatten(treedef, list(leaves))
    return _jitted_load.lower(table, slots, rows, slot_dims=slot_dims, sharding=sharding).compile()


class SlotLoader:
    """``table.at[slots].set(rows)`` for a table pytree whose leaves share their leading slot
    axes, kept on ``sharding``; one executable per chunk size, compiled by ``warmup`` (and shared
    with every other loader of the same shapes and placement).

    ``slot_dims``: 1 (``slots [J]``) or 2 (``slots [J, 2]``: replica, slot)."""

    def __init__(self, sharding: Any, *, slot_dims: int = 1) -> None:
        if slot_dims not in (1, 2):
            raise ValueError(f"{slot_dims=} must be 1 or 2")
        self.slot_dims = slot_dims
        self.sharding = sharding
        self.num_loads = 0  # calls made (instrumentation)
        self._executables: dict[Any, Any] = {}

    def warmup(self, table: Any, place: Callable[[Any], Any] = _abstract) -> None:
        """Compile the load for every chunk size; ``place`` gives the chunk's abstract form as
        it will arrive (numpy by default; replicated on the devices after a broadcast)."""
        for size in LOAD_SIZES:
            slots, rows = template(table, size, self.slot_dims)
            key = self._key(place(slots), place(rows))
            if key not in self._executables:
                leaves, treedef = jax.tree.flatten((_abstract(table), place(slots), place(rows)))
                self._executables[key] = _compiled(self.slot_dims, self.sharding, treedef, tuple(leaves))

    @staticmethod
    def _key(slots: Any, rows: Any) -> Any:
        return tuple((tuple(np.shape(x)), getattr(x, "sharding", None) is not None)
                     for x in jax.tree.leaves((slots, rows)))

    def __call__(self, table: Any, slots: Any, rows: Any) -> Any:
        """``table`` with one chunk's rows written (dispatched, not awaited)."""
        exe = self._executables.get(self._key(slots, rows))
        self.num_loads += 1
        if exe is None:  # a shape not warmed up (tests that skip warm-up)
            return _jitted_load(table, slots, rows, slot_dims=self.slot_dims, sharding=self.sharding)
        return exe(table, slots, rows)


class SlotTables:
    """The row-load side of a runner that keeps per-slot tables on its devices: it sets
    ``page_table`` and ``penalty_tables`` (each None when not kept) and ``_page_loader`` /
    ``_penalty_loader`` (``SlotLoader``\\ s on the tables' placement); the step loop and the
    ``Controller`` call these three."""

    page_table: Any
    penalty_tables: Any
    _page_loader: SlotLoader
    _penalty_loader: SlotLoader

    def write_page_rows(self, slots: Any, rows: Any) -> None:
        """Overwrite rows of the device page table (requests that join; one ``chunks`` chunk,
        numpy or broadcast); dispatched, not awaited."""
        self.page_table = self._page_loader(self.page_table, slots, rows)

    def write_penalty_rows(self, slots: Any, rows: Any) -> None:
        """Overwrite penalty slots (rows that join past position 0; one chunk); dispatched, not awaited."""
        self.penalty_tables = self._penalty_loader(self.penalty_tables, slots, rows)

    def warmup_loads(self, place: Callable[[Any], Any] | None = None) -> None:
        """Compile the row loads for every chunk size, inputs as ``place`` gives them (numpy by default)."""
        kw = {} if place is None else {"place": place}
        if self.page_table is not None:
            self._page_loader.warmup(self.page_table, **kw)
        if self.penalty_tables is not None:
            self._penalty_loader.warmup(self.penalty_tables, **kw)
