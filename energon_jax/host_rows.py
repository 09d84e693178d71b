"""Per-request step inputs kept on the host between steps, so packing a step costs numpy gathers.

``HostRows`` (owned by the step loop, passed to ``batch.pack``) keeps what changes only by
deltas between steps: each running request's sampling parameters (written once, when it
joins) and its page table (the pages it gained since the last step are appended, those a
sliding window released are nulled), so packing a step gathers its rows' slots with numpy
instead of re-reading every request's fields and every page of every row.
``HostRows.pack_into`` fills the same batch fields as ``batch.pack``'s plain path (``pack``
adds the penalty fields after either); tests/test_host_rows.py checks the two field by field.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from energon_jax.batch import MIN_TOKENS_BAN_WIDTH, Buckets, StepBatch, check_rows, fill_positions
from energon_jax.request import Request
from pallas_kernels.page_layout import NULL_PAGE


class HostRows:
    """Per-request step inputs kept on the host between steps, changed by deltas.

    A request gets a slot the first time ``slots`` sees it; the slot holds its sampling
    parameters and its page table row, and the number of its pages copied so far. Each
    step: pages the request gained are appended (the scheduler only ever extends a page
    list, or hands the request a new list: admission, preemption, finish), and a list
    that is new, or shorter than what was copied (a plan made ahead that gave pages back),
    is copied whole. A sliding window also overwrites pages in place: those behind the
    window become ``NULL_PAGE``, always a prefix of the list (``sliding_window.py``). So the
    slot remembers how many leading entries it knows are released, and a step looks at the
    first entry past them only: when it became ``NULL_PAGE``, the scan goes on from there
    and those columns are nulled (O(1) per row in a step that releases nothing).

    A slot whose request finished is reused; when none is free, one whose request is not
    in the current step is (its request, if it comes back, is written again).

    With device page tables (``buckets.page_slots``: the runner's table has one row per slot
    here), the batch carries each row's slot and the pages appended this step
    (``StepBatch.page_deltas``: pages appended and columns released this step, each as
    ``(slot, column, page)``), and a row copied whole (a request that joins or comes back, or,
    when a step's entries do not fit in ``page_deltas``, the rows with the most of them, as a
    long prompt's chunk beside its first release) goes up once through ``take_loads`` ->
    ``runner.write_page_rows`` (``slot_loads.py``), before the step.
    """

    def __init__(self, buckets: Buckets, num_slots: int) -> None:
        if num_slots < 1:
            raise ValueError(f"{num_slots=} must be >= 1")
        self.max_pages_per_row = buckets.max_pages_per_row
        self.tables = np.full((num_slots, buckets.max_pages_per_row), NULL_PAGE, np.int32)  # [S, M]
        self.num_pages = np.zeros(num_slots, np.int64)  # [S] pages of the row copied into tables
        # [S, 6] temperature, top_p, min_p, repetition, presence, frequency penalty
        self.floats = np.zeros((num_slots, 6), np.float32)
        self.ints = np.zeros((num_slots, 3), np.int64)  # [S, 3] top_k, prompt length, logprobs asked
        self.seed = np.zeros(num_slots, np.uint32)  # [S]
        self.min_tokens = np.zeros(num_slots, np.int64)  # [S] 0 unless the request bans ids until then
        self.ban_ids = np.full((num_slots, MIN_TOKENS_BAN_WIDTH), -1, np.int32)  # [S, W]
        self._owner: list[Request | None] = [None] * num_slots
        self._pages: list[list[int] | None] = [None] * num_slots  # the page list object copied from
        self._counts = [0] * num_slots  # num_pages as Python ints (read per row per step)
        self._released = [0] * num_slots  # leading NULL_PAGE entries (a window's releases) copied so far
        self._slot_of: dict[int, int] = {}  # id(request) -> slot
        self._free = list(range(num_slots - 1, -1, -1))
        self.device_tables = buckets.page_slots > 0
        if self.device_tables and num_slots != buckets.page_slots:
            raise ValueError(f"{num_slots=} must equal buckets.page_slots={buckets.page_slots} (the device table's rows)")
        # (slot, first, end) columns appended or released since the last pack
        self._appends: list[tuple[int, int, int]] = []
        self._loads: set[int] = set()  # slots whose whole row goes up before the next step

    def take_loads(self) -> list[tuple[int, np.ndarray]]:
        """``(slot, row [M])`` of every slot copied whole since the last call (device page tables)."""
        loads, self._loads = sorted(self._loads), set()
        return [(slot, self.tables[slot].copy()) for slot in loads]

    def slots(self, reqs: Sequence[Request]) -> np.ndarray:
        """``[R]`` slot of each request (distinct), its row brought up to date first."""
        out = []
        slot_of, owner, copied, counts = self._slot_of, self._owner, self._pages, self._counts
        released = self._released
        for req in reqs:
            s = slot_of.get(id(req), -1)
            if s < 0 or owner[s] is not req:
                s = self._join(req, reqs)
            pages, k = req.pages, released[s]
            # else nothing changed (most steps): same list, same length, no new release behind a window
            if pages is not copied[s] or len(pages) != counts[s] or (k < len(pages) and pages[k] == NULL_PAGE):
                self._sync(s, pages)
            out.append(s)
        return np.array(out, np.intp)

    def _sync(self, s: int, pages: list[int]) -> None:
        """Bring slot ``s``'s table row to ``pages``: null what a window released, append what is
        new, or copy it whole."""
        n, had, m = len(pages), self._counts[s], self.max_pages_per_row  # more than m: pack's check reports it
        top = min(n, m)
        if pages is not self._pages[s] or n < had:
            self.tables[s, :top] = pages[:m]
            self.tables[s, top:had] = NULL_PAGE
            self._pages[s] = pages
            self._released[s] = _leading_nulls(pages, 0, top)
            if self.device_tables:
                self._loads.add(s)
        else:
            # Released behind a window since the last copy (in place, a prefix): the columns
            # already copied are nulled here; those past ``had`` are copied as they are below.
            k = self._released[s]
            end = self._released[s] = _leading_nulls(pages, k, top)
            if min(end, had) > k:
                self.tables[s, k : min(end, had)] = NULL_PAGE
                if self.device_tables:
                    self._appends.append((s, k, min(end, had)))
            self.tables[s, had:top] = pages[had:m]
            if self.device_tables and top > had:
                self._appends.append((s, had, top))
        self._counts[s] = n
        self.num_pages[s] = n

    def _join(self, req: Request, step: Sequence[Request]) -> int:
        """A slot for ``req``, its parameters written and its table row empty."""
        if not self._free:
            self._reclaim(step)
        s = self._free.pop()
        self._owner[s] = req
        self._slot_of[id(req)] = s
        self._pages[s] = None
        self.tables[s, : self._counts[s]] = NULL_PAGE
        self._counts[s] = 0
        self._released[s] = 0
        self.num_pages[s] = 0
        p = req.params
        self.floats[s] = (p.temperature, p.top_p, p.min_p, p.repetition_penalty, p.presence_penalty,
                          p.frequency_penalty)
        self.ints[s] = (p.top_k, len(req.prompt_token_ids), p.logprobs or 0)
        self.seed[s] = req.seed_key
        self.min_tokens[s] = p.min_tokens if req.min_tokens_ban else 0
        self.ban_ids[s] = -1
        self.ban_ids[s, : len(req.min_tokens_ban)] = req.min_tokens_ban
        return s

    def _reclaim(self, step: Sequence[Request]) -> None:
        """Free the slots of finished requests; if none, of one request not in ``step``."""
        for s, owner in enumerate(self._owner):
            if owner is not None and owner.finished:
                self._release(s)
        if self._free:
            return
        in_step = {id(r) for r in step}
        for s, owner in enumerate(self._owner):
            if owner is not None and id(owner) not in in_step:
                self._release(s)
                return
        raise ValueError(f"a step has more rows than the {len(self._owner)} host row slots")

    def _release(self, s: int) -> None:
        owner = self._owner[s]
        if self._slot_of.get(id(owner)) == s:
            del self._slot_of[id(owner)]
        self._owner[s] = None
        self._pages[s] = None
        self._free.append(s)

    def pack_into(self, out: StepBatch, rows: list, reqs: list[Request], buckets: Buckets, num_tokens: int) -> None:
        """``pack``'s body with ``HostRows``: per row only the step's own numbers are read."""
        nr, attn, s, size = len(rows), out.attn, out.sampling, buckets.page_size
        slots = self.slots(reqs)  # [R]
        lens = np.array([len(row.token_ids) for row in rows], np.int64)  # [R]
        decode = num_tokens == nr and bool((lens == 1).all())  # one token per row
        starts = np.array([row.start_pos for row in rows], np.int64)  # [R]
        prev_rows = np.array([row.prev_row for row in rows], np.int64)  # [R] placeholder's row in the step before
        num_out = np.array([len(r.output_token_ids) for r in reqs], np.int64)  # [R] outputs known so far
        num_pages = self.num_pages[slots]
        check_rows(rows, lens, starts, num_pages, buckets)
        total = int(lens.sum())
        ends = np.cumsum(lens)  # [R] offset just past each row
        if total == nr:  # every row feeds one token (a decode step)
            seg, pos = np.arange(nr), starts
        else:
            seg = np.repeat(np.arange(nr), lens)  # [total]
            pos = np.arange(total) - np.repeat(ends - lens, lens) + np.repeat(starts, lens)  # [total]
        page_of = None
        if self.device_tables:
            out.row_slot[:nr] = slots
            self._fill_deltas(out.page_deltas)
            page_of = self.tables[slots[seg], pos // size]
        else:
            width = int(num_pages.max())  # columns past every row's pages stay NULL_PAGE (as in tables)
            attn.page_tables[:nr, :width] = self.tables[slots, :width]
        if decode:
            out.input_ids[:nr] = [row.token_ids[0] for row in rows]
        else:
            out.input_ids[:total] = np.fromiter(itertools.chain.from_iterable(row.token_ids for row in rows), np.int32,
                                                total)
        placeholder = prev_rows >= 0
        fill_positions(out, prev_rows, lens, starts, ends, seg, pos, size, page_of)
        f, ints = self.floats[slots], self.ints[slots]
        s.temperature[:nr], s.top_p[:nr], s.min_p[:nr] = f[:, 0], f[:, 1], f[:, 2]
        s.repetition_penalty[:nr], s.presence_penalty[:nr], s.frequency_penalty[:nr] = f[:, 3], f[:, 4], f[:, 5]
        s.top_k[:nr], s.prompt_len[:nr], s.num_logprobs[:nr] = ints[:, 0], ints[:, 1], ints[:, 2]
        # A placeholder row's request owes one token: it has generated one more than the host knows.
        step = num_out + placeholder
        s.step[:nr] = step
        s.seed[:nr] = self.seed[slots]
        min_tokens = self.min_tokens[slots]
        banned = np.flatnonzero(step < min_tokens)  # rows still holding back their stop ids
        if banned.size:
            s.min_tokens[banned] = min_tokens[banned]
            s.ban_ids[banned] = self.ban_ids[slots[banned]]

    def _fill_deltas(self, deltas: np.ndarray) -> None:
        """The appended pages and released columns as ``(slot, column, page)`` entries of ``deltas
        [K, 3]``; rows that will be loaded whole are skipped, and when the rest do not fit, the
        rows with the most entries are loaded whole too, until they do."""
        appends = [(s, a, e) for s, a, e in self._appends if s not in self._loads]
        self._appends = []
        if not appends:
            return
        total = sum(e - a for _, a, e in appends)
        if total > len(deltas):  # rare: a long prompt's first release behind a window, or its chunks'
            per_slot: dict[int, int] = {}
            for s, a, e in appends:
                per_slot[s] = per_slot.get(s, 0) + e - a
            for s, n in sorted(per_slot.items(), key=lambda item: (-item[1], item[0])):
                if total <= len(deltas):
                    break
                self._loads.add(s)
                total -= n
            appends = [(s, a, e) for s, a, e in appends if s not in self._loads]
            if not appends:
                return
        slot = np.concatenate([np.full(e - a, s, np.int32) for s, a, e in appends])
        col = np.concatenate([np.arange(a, e, dtype=np.int32) for _, a, e in appends])
        n = len(slot)
        deltas[:n, 0], deltas[:n, 1], deltas[:n, 2] = slot, col, self.tables[slot, col]


def _leading_nulls(pages: list[int], start: int, stop: int) -> int:
    """The first index ``>= start`` (at most ``stop``) whose entry is not ``NULL_PAGE``; the
    entries before ``start`` are known to be ``NULL_PAGE`` (a window's released prefix)."""
    i = start
    while i < stop and pages[i] == NULL_PAGE:
        i += 1
    return i
