"""Stable slots in the runner's device penalty tables, one per running request that uses a penalty.

The runner keeps, per slot, how often each token id was generated and which ids the
prompt holds (``sampling.PenaltyTables``); each step adds the tokens it feeds. This
module (host side, owned by the step loop) decides which slot a row uses and when the
slot's contents cannot be trusted:

- a request that uses a penalty gets a slot the first time it is scheduled and keeps it
  until it finishes (or aborts); a slot whose request is neither in the step nor in a
  step still on the device that reads it later (``busy``) may be taken by another
  request when none is free, and is then rebuilt when its request comes back;
- the slot remembers up to which position its request's tokens were fed. A row that
  starts anywhere else (a new request, a recompute after preemption, a prompt whose
  prefix came from the prefix cache) rebuilds it: zeroed by the step when it starts at
  position 0 (``reset``), else loaded once from the host's copy of the tokens before
  the row's start (the step loop gathers a step's loads into ``runner.write_penalty_rows``
  calls, ``slot_loads.py``: one ``[V]`` row per slot; across processes the ``Controller``
  broadcasts them). Nothing else goes up.

A plan made ahead feeds a placeholder for the token the step in flight samples: it
continues the row exactly where that step left it, so the slot stays valid and the
placeholder's id is counted on device when the runner fills it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np



class PenaltySlots:
    """Slot bookkeeping for ``num_slots`` slots over a vocabulary of ``vocab`` ids."""

    def __init__(self, num_slots: int, vocab: int) -> None:
        if num_slots < 1:
            raise ValueError(f"{num_slots=} must be >= 1")
        self.num_slots = num_slots
        self.vocab = vocab
        self._owner: list[Any] = [None] * num_slots  # the Request holding each slot
        self._fed = [0] * num_slots  # positions of the owner's tokens counted so far
        self._slot_of: dict[int, int] = {}  # id(request) -> slot
        self.rebuilds = 0  # rows that joined at a position > 0 and loaded their counts (instrumentation)

    def assign(self, rows: list[Any], load_row: Callable[[int, np.ndarray, np.ndarray], Any],
               busy: Iterable[Any] = ()) -> tuple[np.ndarray, np.ndarray] | None:
        """``(slot [R] int32, reset [R] int32 0/1)`` for a plan's rows, or None when no row uses a penalty.

        ``load_row(slot, counts [V] int32, seen [V] bool)`` is called for each row that starts
        past position 0 on an unfamiliar slot: the slot's counts rebuilt on the host, which the
        caller writes on the device before the step (the step loop gathers them into
        ``runner.write_penalty_rows`` calls).
        ``busy``: requests of steps still on the device that read their slots after this
        step writes its own (a pipeline's micro-batches in flight): their slots are never taken."""
        users = [r for r, row in enumerate(rows) if row.request.params.uses_penalties]
        if not users:
            return None
        slot = [-1] * len(rows)
        reset = [0] * len(rows)
        in_step = {id(rows[r].request) for r in users} | {id(req) for req in busy}
        for r in users:
            row = rows[r]
            req = row.request
            s = self._slot_of.get(id(req))
            if s is None:
                s = self._take(in_step)
                self._owner[s] = req
                self._slot_of[id(req)] = s
                self._fed[s] = -1  # nothing of this request is counted yet
            if self._fed[s] != row.start_pos:
                if row.start_pos == 0:
                    reset[r] = 1
                else:
                    load_row(s, *self._counts(req, row.start_pos))
                    self.rebuilds += 1
            slot[r] = s
            self._fed[s] = row.start_pos + row.num_tokens
        return np.array(slot, np.int32), np.array(reset, np.int32)

    def _take(self, in_step: set[int]) -> int:
        """A free slot: one without an owner, or whose owner finished; else one whose owner is not in this step."""
        spare = -1
        for s, owner in enumerate(self._owner):
            if owner is None or owner.finished:
                self._release(s)
                return s
            if spare < 0 and id(owner) not in in_step:
                spare = s
        if spare < 0:  # more penalty rows in one step than slots: the tables were sized too small
            raise RuntimeError(f"all {self.num_slots} penalty slots are held by rows of this step")
        self._release(spare)  # its owner (preempted or waiting) rebuilds when it runs again
        return spare

    def _release(self, s: int) -> None:
        owner = self._owner[s]
        if owner is not None:
            self._slot_of.pop(id(owner), None)
        self._owner[s] = None

    def _counts(self, req: Any, end: int) -> tuple[np.ndarray, np.ndarray]:
        """Host counts of ``req``'s tokens before position ``end``: (output counts, prompt presence)."""
        tokens = np.asarray(req.tokens(0, end), np.int64)
        prompt_len = len(req.prompt_token_ids)
        seen = np.zeros(self.vocab, bool)
        seen[tokens[:prompt_len]] = True
        counts = np.bincount(tokens[prompt_len:], minlength=self.vocab).astype(np.int32)
        return counts, seen
