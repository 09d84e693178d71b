"""On-device, batched sampling with per-row parameters.

One call turns a step's logits ``[B, V]`` (one row per sequence of the step) into the
next token of every row, inside the same jitted function as the model forward, so the
only thing that crosses back to the host is ``B`` ids (and their logprobs).

Per row, in this order (vLLM's):

1. penalties on the raw logits: ``repetition_penalty`` over prompt and output tokens
   (divide positive logits, multiply negative ones), ``presence_penalty`` and
   ``frequency_penalty`` over output tokens only; the counts come from the runner's
   ``PenaltyTables`` (kept on the device, updated by each step's fed tokens) or, for
   runners without them, from the batch's ``history``;
2. temperature 0 rows take the argmax (greedy);
3. other rows, in the order of transformers' logits warpers (``TemperatureLogitsWarper``,
   ``TopKLogitsWarper``, ``TopPLogitsWarper``, ``MinPLogitsWarper``, as ``generate``
   chains them; vLLM's ``apply_top_k_top_p`` also renormalises after top-k, and v0 applied
   min-p last too; v1 applies min-p before top-k/top-p, which differs only when top-p and
   min-p are combined: top-k and min-p both keep a most-likely prefix, so they commute):
   a. divide the logits by the temperature;
   b. top-k: keep the ``top_k`` largest (every token tied with the k-th stays);
   c. top-p on the distribution *renormalised over the top-k set*: keep a token when the
      probability of the tokens more likely than it is below ``top_p`` (the smallest set
      whose mass reaches ``top_p``);
   d. min-p: keep tokens whose probability is at least ``min_p`` times the most likely
      one's (a ratio, so the renormalisation after b/c does not change it);
   the most likely token always stays (transformers' ``min_tokens_to_keep=1``). The token
   is the argmax of the kept logits plus Gumbel noise drawn from ``fold_in(key(seed),
   step)``. The key depends only on the row's own seed and on how many tokens it has
   generated, so a seeded request samples the same tokens whatever else shares its batch.

b and c need no sort: each finds its cut-off logit by a 32-step bisection over the logits'
float32 bit patterns (exact: the cut-off is one of the row's own logits), each step one
compare-and-reduce over ``[B, V]``; on the CPU a sort of 16 x 32000 logits took ~300 ms,
the bisections take a few ms. Ties at a top-p cut-off are kept or dropped together
(transformers keeps whichever its sort puts first). Each of b, c and the whole random path
is skipped at run time (``lax.cond``) when no row of the step asks for it.

Logprobs are those of the model's distribution (``log_softmax`` of the raw logits),
for the sampled token and the ``MAX_LOGPROBS`` most likely ones. The top ones need a
top-k over the vocabulary, which runs only when a row of the step asked for logprobs
(zeros otherwise); the sampled token's logprob is always returned.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:  # the batch layout is owned by batch.py; sampling only reads its fields
    from energon_jax.batch import SamplingBatch

MAX_LOGPROBS = 20


@dataclasses.dataclass(frozen=True)
class SampledTokens:
    """One step's sampled tokens, fetched to the host (numpy)."""

    token_ids: np.ndarray  # [B] int32
    logprobs: np.ndarray  # [B] float32: logprob of the sampled token
    top_ids: np.ndarray  # [B, MAX_LOGPROBS] int32, most likely first
    top_logprobs: np.ndarray  # [B, MAX_LOGPROBS] float32


def _token_counts(history: jax.Array, mask: jax.Array, vocab: int) -> jax.Array:
    """How often each token id occurs in ``history [B, H]`` where ``mask [B, H]``: ``[B, V]``."""
    b = history.shape[0]
    ids = jnp.where(mask & (history >= 0), history, vocab)  # out-of-range ids are dropped
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], history.shape)
    counts = jnp.zeros((b, vocab), jnp.int32)
    return counts.at[rows, ids].add(1, mode="drop")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PenaltyTables:
    """Per-slot token counts for penalties, kept on the device between steps.

    A request that uses a penalty holds one slot (``SamplingBatch.penalty_slot``) while it
    runs; each step adds the tokens it feeds (``update_penalty_tables``), so nothing of
    size ``max_model_len`` is uploaded per step. Counting the fed tokens is counting the
    history: a step feeds a row every token up to the one it samples after.
    """

    output_counts: jax.Array  # [S, V] int32: generated tokens (positions >= prompt_len)
    prompt_seen: jax.Array  # [S, V] bool: prompt tokens


def make_penalty_tables(slots: int, vocab: int, sharding: Any = None) -> PenaltyTables:
    """Zeroed tables; on ``sharding`` when given (built shard by shard on each process, so a
    sharding over several processes' devices works as well as one device)."""
    if sharding is None:
        return PenaltyTables(jnp.zeros((slots, vocab), jnp.int32), jnp.zeros((slots, vocab), bool))

    def zeros(dtype: Any) -> jax.Array:
        return jax.make_array_from_callback((slots, vocab), sharding,
                                            lambda index: np.zeros((slots, vocab), dtype)[index])

    return PenaltyTables(zeros(np.int32), zeros(np.bool_))


def update_penalty_tables(
    tables: PenaltyTables, input_ids: jax.Array, segment_ids: jax.Array, positions: jax.Array, s: SamplingBatch
) -> PenaltyTables:
    """``add_step_tokens``, skipped (``lax.cond``) in a step where no row holds a slot.

    With the tables donated (as the runners' steps donate them) XLA aliases them through the
    conditional: the compiled step copies neither ``[S, V]`` array, and a step without penalty
    rows is as fast with the tables as without (``benchmarks/penalty_tables.py``). Running the
    update every step instead, its scatters dropping every index, measured slower."""
    return jax.lax.cond(jnp.any(s.penalty_slot >= 0),
                        lambda t: add_step_tokens(t, input_ids, segment_ids, positions, s), lambda t: t, tables)


def add_step_tokens(
    tables: PenaltyTables, input_ids: jax.Array, segment_ids: jax.Array, positions: jax.Array, s: SamplingBatch
) -> PenaltyTables:
    """Zero the slots of rows that join (``s.penalty_reset``), then add the step's fed tokens.

    ``input_ids/segment_ids/positions [T]`` are the step's (placeholders already filled), so
    a token sampled by the previous step and fed now is counted on device. A row joining past
    position 0 had its slot loaded from the host before the step (``slot_loads.py``). Rows
    without a slot change nothing."""
    slots, vocab = tables.output_counts.shape
    reset = jnp.where((s.penalty_reset > 0) & (s.penalty_slot >= 0), s.penalty_slot, slots)  # [B]
    counts = tables.output_counts.at[reset].set(0, mode="drop")
    seen = tables.prompt_seen.at[reset].set(False, mode="drop")
    row = jnp.maximum(segment_ids, 0)  # [T]
    slot = jnp.where(segment_ids >= 0, s.penalty_slot[row], -1)
    slot = jnp.where((slot >= 0) & (input_ids >= 0) & (input_ids < vocab), slot, slots)  # slots: dropped
    is_output = positions >= s.prompt_len[row]
    counts = counts.at[jnp.where(is_output, slot, slots), input_ids].add(1, mode="drop")
    seen = seen.at[jnp.where(is_output, slots, slot), input_ids].set(True, mode="drop")
    return PenaltyTables(counts, seen)


def apply_penalties(logits: jax.Array, s: SamplingBatch, tables: PenaltyTables | None = None) -> jax.Array:
    """Repetition (prompt + output), presence and frequency (output only) penalties.

    Counts come from ``tables`` (rows' ``penalty_slot``) when given, else from ``s.history``."""
    vocab = logits.shape[-1]
    if tables is None:
        hist = s.history  # [B, H]
        valid = hist >= 0
        out_mask = valid & (jnp.arange(hist.shape[1])[None, :] >= s.prompt_len[:, None])
        seen = _token_counts(hist, valid, vocab) > 0  # [B, V]
        out_counts = _token_counts(hist, out_mask, vocab).astype(jnp.float32)  # [B, V]
    else:
        if tables.output_counts.shape[-1] != vocab:
            raise ValueError(f"penalty tables hold {tables.output_counts.shape[-1]} ids but the logits {vocab}")
        has = (s.penalty_slot >= 0)[:, None]  # [B, 1]: rows without a slot have neutral penalties
        slot = jnp.maximum(s.penalty_slot, 0)
        counts = jnp.where(has, tables.output_counts[slot], 0)  # [B, V]
        seen = has & (tables.prompt_seen[slot] | (counts > 0))
        out_counts = counts.astype(jnp.float32)
    rp = s.repetition_penalty[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rp, logits * rp), logits)
    logits = logits - s.frequency_penalty[:, None] * out_counts
    logits = logits - s.presence_penalty[:, None] * (out_counts > 0).astype(jnp.float32)
    return logits


def _any_penalty(s: SamplingBatch) -> jax.Array:
    return (
        jnp.any(s.repetition_penalty != 1.0) | jnp.any(s.presence_penalty != 0.0) | jnp.any(s.frequency_penalty != 0.0)
    )


def _sort_keys(x: jax.Array) -> jax.Array:
    """float32 -> uint32 with the same order (``x < y`` iff ``key(x) < key(y)``; NaNs aside)."""
    u = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.where(u >> 31 == 1, ~u, u | jnp.uint32(0x80000000))


def _largest_key(pred, batch: int) -> jax.Array:
    """Per row, the largest ``K`` in ``[0, 2^32)`` with ``pred(K)`` true: ``[B]`` uint32.

    ``pred(K [B]) -> [B] bool`` must be monotone (true up to some ``K``, false above); 32
    halvings of the key range make the answer exact. When ``pred`` is false everywhere
    the answer is 0, which is no float's key but NaN's.
    """

    def halve(_, bounds):
        lo, hi = bounds
        open_ = lo < hi
        mid = lo + ((hi - lo) >> 1) + open_.astype(jnp.uint32)  # upper middle: lo < mid <= hi
        ok = pred(mid)
        return jnp.where(open_ & ok, mid, lo), jnp.where(open_ & ~ok, mid - 1, hi)

    lo = jnp.zeros((batch,), jnp.uint32)
    hi = jnp.full((batch,), 0xFFFFFFFF, jnp.uint32)
    return jax.lax.fori_loop(0, 32, halve, (lo, hi))[0]


def _top_k_mask(keys: jax.Array, top_k: jax.Array) -> jax.Array:
    """``[B, V]`` bool: logits at least the row's k-th largest (0 = off keeps all)."""
    vocab = keys.shape[-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)[:, None]  # [B, 1]
    # The k-th largest key is the largest K with at least k keys >= K.
    kth = _largest_key(lambda cut: jnp.sum(keys >= cut[:, None], axis=-1) >= k[:, 0], keys.shape[0])
    return keys >= kth[:, None]


def _top_p_mask(keys: jax.Array, probs: jax.Array, top_p: jax.Array) -> jax.Array:
    """``[B, V]`` bool: tokens whose more likely tokens weigh less than ``top_p`` (rows at 1: all).

    ``probs`` is the distribution to cut (zero outside the top-k set). The mass above a
    key only falls as the key rises, so the kept tokens are those above the largest key
    whose mass above still reaches ``top_p``.
    """

    def mass_above_reaches_p(cut: jax.Array) -> jax.Array:
        return jnp.sum(jnp.where(keys > cut[:, None], probs, 0.0), axis=-1) >= top_p

    cut = _largest_key(mass_above_reaches_p, keys.shape[0])
    return (keys > cut[:, None]) | (top_p >= 1.0)[:, None]


def _truncate(logits: jax.Array, s: SamplingBatch) -> jax.Array:
    """Top-k, then top-p on the renormalised top-k set, then min-p: dropped logits -> -inf.

    ``logits [B, V]`` are already divided by the temperature (see the module docstring).
    """
    keys = _sort_keys(logits)  # [B, V] uint32
    keep = jax.lax.cond(
        jnp.any(s.top_k > 0), lambda: _top_k_mask(keys, s.top_k), lambda: jnp.ones(logits.shape, bool)
    )
    kept = jnp.where(keep, logits, -jnp.inf)
    keep = jax.lax.cond(
        jnp.any(s.top_p < 1.0),
        lambda: keep & _top_p_mask(keys, jax.nn.softmax(kept, axis=-1), s.top_p),
        lambda: keep,
    )
    # min-p: p_i >= min_p * p_max is exp(x_i - x_max) >= min_p, whatever the normalisation.
    ratio = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    keep &= ratio >= s.min_p[:, None]
    return jnp.where(keep, logits, -jnp.inf)


def _needs_truncation(s: SamplingBatch) -> jax.Array:
    active = s.temperature > 0
    return jnp.any(active & ((s.top_k > 0) | (s.top_p < 1.0) | (s.min_p > 0.0)))


def warp(logits: jax.Array, s: SamplingBatch) -> jax.Array:
    """Temperature, then top-k / top-p / min-p: ``[B, V]`` logits whose softmax a sampling row
    draws from (-inf where dropped). Greedy rows (temperature 0) come out unscaled and unused."""
    temp = jnp.where(s.temperature > 0, s.temperature, 1.0)[:, None]
    scaled = logits / temp
    return jax.lax.cond(_needs_truncation(s), _truncate, lambda x, _: x, scaled, s)


def _random_ids(logits: jax.Array, s: SamplingBatch) -> jax.Array:
    scaled = warp(logits, s)
    keys = jax.vmap(lambda seed, step: jax.random.fold_in(jax.random.key(seed), step))(s.seed, s.step)
    gumbel = jax.vmap(lambda k: jax.random.gumbel(k, (logits.shape[-1],), jnp.float32))(keys)  # [B, V]
    return jnp.argmax(scaled + gumbel, axis=-1).astype(jnp.int32)


def ban_stop_ids(logits: jax.Array, s: SamplingBatch) -> jax.Array:
    """``min_tokens``: rows that have generated fewer than that may not sample their ban ids."""
    b, v = logits.shape
    active = (s.step < s.min_tokens)[:, None] & (s.ban_ids >= 0)  # [B, S]
    cols = jnp.where(active, s.ban_ids, v)  # column v is out of range: dropped
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], cols.shape)
    return logits.at[rows, cols].set(-jnp.inf, mode="drop")


def _argmax(x: jax.Array) -> jax.Array:
    """First index of the row maximum, ``[B, V] -> [B]`` int32: ``jnp.argmax`` without NaNs,
    as two plain reductions (on the CPU 0.64 ms instead of 0.92 at 16 x 32000)."""
    vocab = x.shape[-1]
    hit = x == jnp.max(x, axis=-1, keepdims=True)
    return jnp.min(jnp.where(hit, jnp.arange(vocab, dtype=jnp.int32), vocab), axis=-1).clip(0, vocab - 1)


def _top_logprobs(logits: jax.Array, lse: jax.Array) -> tuple[jax.Array, jax.Array]:
    top_logits, top_ids = jax.lax.top_k(logits, MAX_LOGPROBS)
    return top_ids.astype(jnp.int32), top_logits - lse[:, None]


def sample(
    logits: jax.Array, s: SamplingBatch, tables: PenaltyTables | None = None
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``logits [B, V]`` -> ``(ids [B], logprobs [B], top_ids [B, 20], top_logprobs [B, 20])``.

    Traced inside the runner's jitted step; ``s`` is the step's ``SamplingBatch``; penalty
    counts come from ``tables`` (already updated with this step's tokens) when given.
    ``top_ids`` / ``top_logprobs`` are zeros unless some row asked for logprobs.
    """
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)  # [B]
    penalized = jax.lax.cond(_any_penalty(s), lambda x: apply_penalties(x, s, tables), lambda x: x, logits)
    penalized = jax.lax.cond(jnp.any(s.step < s.min_tokens), ban_stop_ids, lambda x, _: x, penalized, s)
    greedy_ids = _argmax(penalized)
    any_random = jnp.any(s.temperature > 0)
    random_ids = jax.lax.cond(any_random, _random_ids, lambda x, _: greedy_ids, penalized, s)
    ids = jnp.where(s.temperature > 0, random_ids, greedy_ids)
    logprobs = jnp.take_along_axis(logits, ids[:, None], axis=-1)[:, 0] - lse
    b = logits.shape[0]
    top_ids, top_logprobs = jax.lax.cond(
        jnp.any(s.num_logprobs > 0), _top_logprobs,
        lambda *_: (jnp.zeros((b, MAX_LOGPROBS), jnp.int32), jnp.zeros((b, MAX_LOGPROBS), jnp.float32)),
        logits, lse,
    )
    return ids, logprobs, top_ids, top_logprobs
