"""Packing a ``StepPlan`` into one padding-free, bucketed ``StepBatch`` of numpy arrays.

Every row's fed tokens are laid end to end in one flat array ``[T]`` (no padding between
rows, none to the longest row); ``segment_ids`` say which row each token belongs to and
``positions`` where it sits in its sequence. The only padding is at the end, to reach
the token bucket ``T``: padding tokens have segment -1, position 0 and write their K/V
to slot 0 of the null page. Rows are padded to the row bucket ``B`` with unused rows
(``context_lens`` 0, temperature 0, ``logits_indices`` 0).

Shapes come from a small fixed set (``Buckets``): ``T`` is the smallest token bucket
that holds the step, ``B`` the smallest of that bucket's few row buckets that holds its
rows (``Buckets.row_split``), and every other dimension (``M`` pages per row) is static,
but the penalty history's width ``H``: ``max_model_len`` in a step where a row uses a
penalty, 0 in every other step and always 0 when the runner keeps penalty counts on the
device (``Buckets.history_widths``), so a penalty-free step uploads no ``[B,
max_model_len]`` array. So the runner compiles one function per ``(T, B, H)``, and
``Buckets.all_shapes`` / ``warmup_batches`` list them all up front.

A plan made ahead (while the previous step runs) feeds placeholders for tokens the
previous step samples: ``prev_token_index`` names, per token, the row of the previous
step's sampled ids to take it from, and ``prev_history_row``/``prev_history_pos`` the
same for the one penalty-history entry it adds; the runner fills them on device.

``host_rows.HostRows`` (owned by the step loop, passed to ``pack``) keeps what changes
only by deltas between steps, so packing a step gathers its rows' slots with numpy instead
of re-reading every request's fields and every page of every row. With device page tables
(``Buckets.page_slots``: every layout, across processes, offloading and sliding windows
included) the page tables stay on the device too: a batch carries each row's slot and the
pages appended this step (and the columns a window released, as null pages), so what goes
up per step does not grow with ``max_model_len`` (0.05 MiB for 256 decode rows at 8k and at
128k, against 0.5 and 8 MiB of ``[B, M]`` tables: ``benchmarks/history_upload.py``).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import TYPE_CHECKING

import jax
import numpy as np

from energon_jax.request import MAX_LOGPROBS, Request
from energon_jax.scheduler import StepPlan
from pallas_kernels.page_layout import NULL_PAGE, PagedAttentionMetadata

if TYPE_CHECKING:  # host_rows imports this module
    from energon_jax import host_rows as host_rows_lib


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


# Token count from which ``Buckets.create`` adds half-steps between powers of two.
HALF_STEPS_FROM = 64
# Row buckets split (``Buckets.row_split``) only from ``SPLIT_ROWS_FROM`` rows (where a step's
# LM head and sampler over unused rows cost most; every split adds compiled shapes), and
# never into fewer than ``MIN_ROW_BUCKET`` rows.
SPLIT_ROWS_FROM = 64
MIN_ROW_BUCKET = 4


@dataclasses.dataclass(frozen=True)
class Buckets:
    """The fixed set of step shapes: token buckets, and the static dimensions beside them."""

    token_buckets: tuple[int, ...]  # ascending; the last one is the step's token budget
    max_num_seqs: int
    page_size: int  # S: tokens per KV page (slot = page * S + offset)
    max_pages_per_row: int  # M = ceil(max_model_len / page_size)
    # H = max_model_len: the history width of a step with a penalty row; 0 when the runner keeps
    # penalty counts on the device (no history upload in any step)
    history_len: int
    max_logprobs: int = MAX_LOGPROBS
    # S: rows of the runner's device page table (``runner.ModelRunner``'s ``page_slots``): a
    # batch then carries each row's slot and the step's appended pages (``page_deltas``), and
    # no ``[B, M]`` page tables; 0: batches carry the page tables.
    page_slots: int = 0
    # Row buckets per token bucket: the full one (``row_bucket``), then, when it has at least
    # ``SPLIT_ROWS_FROM`` rows, each ``row_split``-th of it down to ``MIN_ROW_BUCKET`` rows;
    # 1 keeps one row bucket per token bucket. A step
    # takes the smallest that holds its rows, so a one-row prefill chunk runs the LM head and
    # the sampler on a few rows, not on ``next_pow2(max_num_seqs)``.
    row_split: int = 1

    def __post_init__(self) -> None:
        tb = self.token_buckets
        if not tb or any(b < 1 for b in tb) or list(tb) != sorted(set(tb)):
            raise ValueError(f"token_buckets={tb} must be non-empty, positive and strictly ascending")
        for name in ("max_num_seqs", "page_size", "max_pages_per_row"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.row_split < 1:
            raise ValueError(f"row_split={self.row_split} must be >= 1")
        if self.history_len < 0:
            raise ValueError(f"history_len={self.history_len} must be >= 0")
        if self.page_slots < 0:
            raise ValueError(f"page_slots={self.page_slots} must be >= 0")

    @classmethod
    def create(
        cls,
        *,
        max_num_batched_tokens: int,
        max_num_seqs: int,
        max_model_len: int,
        page_size: int,
        min_tokens: int = 16,
        penalty_tables: bool = False,
        row_split: int = 1,
        page_slots: int = 0,
    ) -> Buckets:
        """Powers of two from ``min_tokens`` up to the budget, the last one exactly the budget;
        from ``HALF_STEPS_FROM`` tokens on, also the half-steps ``1.5 x 2^k`` between them.

        Half-steps cap a step's padding at a third instead of a half where padding costs
        most (prefill chunks): on the offline workload they cut padded token slots from
        18.8% to 11.9%, for one more compiled shape per doubling.

        ``penalty_tables``: the runner keeps penalty counts on the device
        (``sampling.PenaltyTables``), so batches carry no ``[B, max_model_len]`` history.
        ``page_slots``: the runner keeps the page tables on the device, in this many slots.
        """
        if min_tokens < 1:
            raise ValueError(f"{min_tokens=} must be >= 1")
        buckets = []
        b = _next_pow2(min_tokens)
        while b < max_num_batched_tokens:
            buckets.append(b)
            if b >= HALF_STEPS_FROM and b + b // 2 < max_num_batched_tokens:
                buckets.append(b + b // 2)
            b *= 2
        buckets.append(max_num_batched_tokens)
        history_len = 0 if penalty_tables else max_model_len
        return cls(tuple(buckets), max_num_seqs, page_size, -(-max_model_len // page_size), history_len,
                   row_split=row_split, page_slots=page_slots)

    @property
    def max_tokens(self) -> int:
        return self.token_buckets[-1]

    def token_bucket(self, num_tokens: int) -> int:
        """The smallest bucket that holds ``num_tokens``."""
        for b in self.token_buckets:
            if num_tokens <= b:
                return b
        raise ValueError(f"{num_tokens=} exceeds the largest token bucket {self.max_tokens}")

    def row_bucket(self, tokens_bucket: int) -> int:
        """Rows of a step with ``tokens_bucket`` tokens: no more rows than tokens, nor than max_num_seqs allows."""
        return min(tokens_bucket, _next_pow2(self.max_num_seqs))

    def row_buckets(self, tokens_bucket: int) -> tuple[int, ...]:
        """The row buckets of a token bucket, ascending; the last is ``row_bucket(tokens_bucket)``."""
        b = self.row_bucket(tokens_bucket)
        out = [b]
        while self.row_split > 1 and b >= SPLIT_ROWS_FROM and out[-1] // self.row_split >= MIN_ROW_BUCKET:
            out.append(out[-1] // self.row_split)
        return tuple(reversed(out))

    def rows_bucket(self, tokens_bucket: int, num_rows: int) -> int:
        """The smallest row bucket of ``tokens_bucket`` that holds ``num_rows`` (else the largest)."""
        options = self.row_buckets(tokens_bucket)
        return next((b for b in options if num_rows <= b), options[-1])

    def all_shapes(self) -> list[tuple[int, int]]:
        """Every ``(T, B)`` the runner can see."""
        return [(t, b) for t in self.token_buckets for b in self.row_buckets(t)]

    def page_deltas_len(self) -> int:
        """K: entries a step carries with device page tables (0 without), the same for every
        shape (a pipeline fits a batch into a wider tick): each row gains at most one page more
        than its tokens fill, and with a sliding window a decode row also releases at most one
        (rows in lock step append and release in the same step); more goes up as whole rows."""
        if not self.page_slots:
            return 0
        return 2 * max(b for _, b in self.all_shapes()) + self.max_tokens // self.page_size + 1

    def history_widths(self) -> tuple[int, ...]:
        """The history widths a step can have, widest first: ``(H, 0)``, or ``(0,)`` with device tables."""
        return (self.history_len, 0) if self.history_len else (0,)

    def history_width(self, uses_penalty: bool) -> int:
        """A step's history width: ``H`` when one of its rows uses a penalty, else 0 (nothing to upload)."""
        return self.history_len if uses_penalty else 0


MIN_TOKENS_BAN_WIDTH = 16  # most ids one row's min_tokens can hold back (eos + stop_token_ids)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingBatch:
    """Per-row sampling parameters of one step (unused rows: temperature 0, neutral penalties)."""

    temperature: np.ndarray  # [B] float32, 0 = greedy
    top_k: np.ndarray  # [B] int32, 0 = off
    top_p: np.ndarray  # [B] float32
    min_p: np.ndarray  # [B] float32
    repetition_penalty: np.ndarray  # [B] float32
    presence_penalty: np.ndarray  # [B] float32
    frequency_penalty: np.ndarray  # [B] float32
    seed: np.ndarray  # [B] uint32
    step: np.ndarray  # [B] int32: tokens the row's request has generated so far (PRNG fold-in)
    # [B, H] int32: prompt + generated ids, -1 padded. Filled only for rows that use a penalty
    # (the others are -1): rows with neutral penalties never read it, and copying every
    # row's whole history each step would cost O(B * max_model_len) host work. H is 0 in a
    # step where no row uses a penalty (``Buckets.history_width``), and with device tables.
    history: np.ndarray
    prompt_len: np.ndarray  # [B] int32: history[:prompt_len] is the prompt
    # [B] int32: top-N logprobs the row's request asked for (0: none). The sampler skips its
    # top-k over the vocabulary (a sort on the CPU) when no row of the step asks.
    num_logprobs: np.ndarray
    min_tokens: np.ndarray  # [B] int32: while step < min_tokens the row may not sample its ban ids
    ban_ids: np.ndarray  # [B, MIN_TOKENS_BAN_WIDTH] int32: eos / stop_token_ids, -1 padded
    # Device-kept penalty counts (``history_len`` 0): the row's slot in the runner's
    # ``PenaltyTables`` (-1: no penalty), and whether the step zeroes it first (the row joins).
    penalty_slot: np.ndarray  # [B] int32
    penalty_reset: np.ndarray  # [B] int32: 1 = zero the slot first


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepBatch:
    """One step's device inputs; every leaf is a numpy array of a bucketed shape."""

    input_ids: np.ndarray  # [T] int32, rows end to end, 0 for padding
    positions: np.ndarray  # [T] int32, position in the token's sequence, 0 for padding
    segment_ids: np.ndarray  # [T] int32, row of each token, -1 for padding
    attn: PagedAttentionMetadata  # slot_mapping [T], page_tables [B, M], context_lens [B]
    logits_indices: np.ndarray  # [B] int32: index in [T] of each row's last fed token, 0 for unused rows
    sampling: SamplingBatch
    # [T] int32: row of the previous step's sampled ids that this token is (a placeholder), else -1
    prev_token_index: np.ndarray
    prev_history_row: np.ndarray  # [B] int32: like prev_token_index, for history[b, prev_history_pos[b]]
    prev_history_pos: np.ndarray  # [B] int32
    # Device page tables (``Buckets.page_slots``; else [B] -1 and [0, 3]): each row's slot in the
    # runner's table (-1: unused row), and (slot, column, page) entries the step writes into it
    # before reading it (slot >= page_slots: padding, dropped). ``attn.page_tables`` is [B, 0].
    row_slot: np.ndarray  # [B] int32
    page_deltas: np.ndarray  # [K, 3] int32

    @property
    def num_tokens_bucket(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_rows_bucket(self) -> int:
        return int(self.logits_indices.shape[0])


def dummy_batch(buckets: Buckets, t: int, b: int, history_len: int | None = None) -> StepBatch:
    """An all-padding batch of shape ``(T, B)``: what unused tokens and rows hold.

    ``history_len``: the history width ``H`` (default ``buckets.history_len``, the widest)."""
    h = buckets.history_len if history_len is None else history_len
    f32, i32 = np.float32, np.int32
    sampling = SamplingBatch(
        temperature=np.zeros(b, f32),
        top_k=np.zeros(b, i32),
        top_p=np.ones(b, f32),
        min_p=np.zeros(b, f32),
        repetition_penalty=np.ones(b, f32),
        presence_penalty=np.zeros(b, f32),
        frequency_penalty=np.zeros(b, f32),
        seed=np.zeros(b, np.uint32),
        step=np.zeros(b, i32),
        history=np.full((b, h), -1, i32),
        prompt_len=np.zeros(b, i32),
        num_logprobs=np.zeros(b, i32),
        min_tokens=np.zeros(b, i32),
        ban_ids=np.full((b, MIN_TOKENS_BAN_WIDTH), -1, i32),
        penalty_slot=np.full(b, -1, i32),
        penalty_reset=np.zeros(b, i32),
    )
    attn = PagedAttentionMetadata(
        slot_mapping=np.zeros(t, i32),  # slot 0 of the null page
        page_tables=np.full((b, 0 if buckets.page_slots else buckets.max_pages_per_row), NULL_PAGE, i32),
        context_lens=np.zeros(b, i32),
    )
    return StepBatch(
        input_ids=np.zeros(t, i32),
        positions=np.zeros(t, i32),
        segment_ids=np.full(t, -1, i32),
        attn=attn,
        logits_indices=np.zeros(b, i32),
        sampling=sampling,
        prev_token_index=np.full(t, -1, i32),
        prev_history_row=np.full(b, -1, i32),
        prev_history_pos=np.zeros(b, i32),
        row_slot=np.full(b, -1, i32),
        page_deltas=np.full((buckets.page_deltas_len(), 3), (NO_SLOT, 0, NULL_PAGE), i32),
    )


# A ``page_deltas`` slot past every table: the entry is dropped.
NO_SLOT = 2**30


def warmup_batches(buckets: Buckets) -> list[StepBatch]:
    """One all-padding batch per shape in ``buckets.all_shapes()`` and history width in
    ``buckets.history_widths()`` (widest first), for ``ModelRunner.warmup``."""
    return [dummy_batch(buckets, t, b, h) for t, b in buckets.all_shapes() for h in buckets.history_widths()]


def history_width(batch: StepBatch) -> int:
    """The batch's history width ``H`` (0: no history uploaded)."""
    return int(np.shape(batch.sampling.history)[1])


def pack(plan: StepPlan, buckets: Buckets, penalty: tuple[np.ndarray, np.ndarray] | None = None,
         host_rows: host_rows_lib.HostRows | None = None) -> StepBatch:
    """Lay the plan's rows end to end in the smallest bucket that holds them.

    ``penalty``: ``(slot [R], reset [R])`` per plan row from ``PenaltySlots.assign`` when the
    runner keeps penalty counts on the device (then the history is 0 wide).
    ``host_rows``: the step loop's ``HostRows``; the same batch, with the per-request
    fields and page tables gathered from it instead of read from every request.

    Per-token fields are computed with whole-array numpy ops and per-row fields are
    gathered into one list each, so packing 256 decode rows costs well under a millisecond.
    """
    t = buckets.token_bucket(plan.num_tokens)
    rows = plan.rows
    nr = len(rows)
    b = buckets.rows_bucket(t, nr)
    if nr > b:
        raise ValueError(f"plan has {nr} rows but the ({t=}) bucket holds {b}; max_num_seqs too small?")
    reqs = [row.request for row in rows]
    # Without device tables the history goes up only in a step where a row uses a penalty.
    needs = penalty is None and bool(buckets.history_len) and any(r.params.uses_penalties for r in reqs)
    width = buckets.history_width(needs)
    out = dummy_batch(buckets, t, b, width)
    attn, size = out.attn, buckets.page_size
    if nr == 0:
        return out
    if buckets.page_slots and host_rows is None:
        raise ValueError(f"buckets with page_slots={buckets.page_slots} (device page tables) need the step "
                         "loop's host_rows to pack")
    if host_rows is not None:
        host_rows.pack_into(out, rows, reqs, buckets, plan.num_tokens)
        _fill_penalties(out, rows, reqs, penalty)
        return out
    # One pass over the rows for every per-row integer: [R, 4] (tokens, start, pages, prev row).
    per_row = np.array([(row.num_tokens, row.start_pos, len(r.pages), row.prev_row) for row, r in zip(rows, reqs)],
                       np.int64).reshape(nr, 4)
    lens, starts, num_pages = per_row[:, 0], per_row[:, 1], per_row[:, 2]
    check_rows(rows, lens, starts, num_pages, buckets)
    total = int(lens.sum())
    ends = np.cumsum(lens)  # [R] offset just past each row
    seg = np.repeat(np.arange(nr), lens)  # [total]
    pos = np.arange(total) - np.repeat(ends - lens, lens) + np.repeat(starts, lens)  # [total]
    # Page tables in one scatter: row r's pages go to columns 0..num_pages[r]-1.
    n_pages = int(num_pages.sum())
    flat_pages = np.fromiter(itertools.chain.from_iterable(r.pages for r in reqs), np.int32, n_pages)
    page_rows = np.repeat(np.arange(nr), num_pages)
    page_cols = np.arange(n_pages) - np.repeat(np.cumsum(num_pages) - num_pages, num_pages)
    attn.page_tables[page_rows, page_cols] = flat_pages
    out.input_ids[:total] = np.fromiter(itertools.chain.from_iterable(row.token_ids for row in rows), np.int32, total)
    prev_rows = per_row[:, 3]
    fill_positions(out, prev_rows, lens, starts, ends, seg, pos, size)
    _fill_sampling(out, reqs, prev_rows.tolist())
    _fill_penalties(out, rows, reqs, penalty)
    return out


def fill_positions(out: StepBatch, prev_rows: np.ndarray, lens: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                    seg: np.ndarray, pos: np.ndarray, size: int, page_of: np.ndarray | None = None) -> None:
    """Both packers' common tail: placeholders, positions, segments, slots, lengths, logits rows
    (``input_ids`` and the page tables already written). ``page_of``: each token's page ``[total]``
    when the batch carries no page tables (device page tables); default read from the batch's."""
    nr, attn = len(lens), out.attn
    total = int(ends[-1]) if nr else 0
    if (prev_rows >= 0).any():  # placeholders (a plan made ahead): one fed token each
        out.prev_token_index[:total] = np.repeat(prev_rows, lens)
        out.input_ids[:total] = np.where(out.prev_token_index[:total] >= 0, 0, out.input_ids[:total])
    out.positions[:total] = pos
    out.segment_ids[:total] = seg
    if page_of is None:
        page_of = attn.page_tables[seg, pos // size]
    attn.slot_mapping[:total] = page_of * size + pos % size
    attn.context_lens[:nr] = starts + lens
    out.logits_indices[:nr] = ends - 1


def check_rows(rows: list, lens: np.ndarray, starts: np.ndarray, num_pages: np.ndarray, buckets: Buckets) -> None:
    """The scheduler's promises, checked once per step: cheap, and a broken one would corrupt the cache."""
    last = starts + lens - 1  # [R] position of each row's last fed token
    bad = np.flatnonzero((lens < 1) | (num_pages > buckets.max_pages_per_row) | (last // buckets.page_size >= num_pages))
    if bad.size:
        r = int(bad[0])
        req = rows[r].request
        raise ValueError(
            f"row {r} (request {req.request_id!r}) feeds {int(lens[r])} tokens up to position {int(last[r])}, "
            f"which needs page {int(last[r] // buckets.page_size)}, but holds {int(num_pages[r])} pages "
            f"(max_pages_per_row={buckets.max_pages_per_row})"
        )


def _fill_sampling(out: StepBatch, reqs: list[Request], prev_rows: list[int]) -> None:
    s = out.sampling
    n = len(reqs)
    params = [r.params for r in reqs]
    # One pass per dtype: [R, 6] floats and [R, 4] ints, then a column per field.
    floats = np.array([(p.temperature, p.top_p, p.min_p, p.repetition_penalty, p.presence_penalty,
                        p.frequency_penalty) for p in params], np.float32).reshape(n, 6)
    # A placeholder row's request owes one token: it has generated one more than the host knows.
    ints = np.array([(p.top_k, len(r.output_token_ids) + (prev >= 0), len(r.prompt_token_ids), p.logprobs or 0)
                     for r, p, prev in zip(reqs, params, prev_rows, strict=True)], np.int64).reshape(n, 4)
    s.temperature[:n], s.top_p[:n], s.min_p[:n] = floats[:, 0], floats[:, 1], floats[:, 2]
    s.repetition_penalty[:n], s.presence_penalty[:n], s.frequency_penalty[:n] = floats[:, 3], floats[:, 4], floats[:, 5]
    s.top_k[:n], s.step[:n], s.prompt_len[:n], s.num_logprobs[:n] = ints[:, 0], ints[:, 1], ints[:, 2], ints[:, 3]
    s.seed[:n] = [r.seed_key for r in reqs]
    for i, r in enumerate(reqs):
        if r.min_tokens_ban and s.step[i] < r.params.min_tokens:  # rare: host work only for such rows
            s.min_tokens[i] = r.params.min_tokens
            s.ban_ids[i, : len(r.min_tokens_ban)] = r.min_tokens_ban


def _fill_penalties(out: StepBatch, rows: list, reqs: list[Request], penalty: tuple[np.ndarray, np.ndarray] | None
                    ) -> None:
    """Device tables (``penalty``): the rows' slots and resets. Else: each penalty row's history
    (when the step has one)."""
    s = out.sampling
    if penalty is not None:
        slot, reset = penalty
        s.penalty_slot[: len(rows)], s.penalty_reset[: len(rows)] = slot, reset
        return
    if s.history.shape[1]:
        for i, r in enumerate(reqs):
            if r.params.uses_penalties:
                fill_history(out, r, i, rows[i].prev_row)


def fill_history(out: StepBatch, r: Request, i: int, prev_row: int) -> None:
    """Row ``i``'s penalty history (prompt + outputs), and where its placeholder's id goes."""
    hist = r.tokens(0, r.num_tokens)
    out.sampling.history[i, : len(hist)] = hist
    if prev_row >= 0:
        out.prev_history_row[i] = prev_row
        out.prev_history_pos[i] = len(hist)
