"""Ragged paged attention: one kernel for a step's decode rows and prefill chunks together.

Glossary (``page_layout``): ``T`` packed query tokens, ``N`` query heads, ``K`` KV heads,
``G = N // K``, ``H`` head dim, ``P`` pages, ``S`` page size, ``B`` rows, ``M`` pages per row.

Inputs::

    q            [T, N, H]     the step's query tokens, rows end to end (row r owns
                               q[cu_q_lens[r]:cu_q_lens[r+1]]); tokens past
                               cu_q_lens[num_rows] are padding and come out as zeros
    k_pages      [P, S, K, H]  one layer's pool (float32, bfloat16 or int8)
    v_pages      [P, S, K, H]
    page_tables  [B, M] int32  pages of each row
    context_lens [B] int32     tokens of each row in the cache, this step's included
    cu_q_lens    [B + 1] int32 row r's query tokens are cu_q_lens[r]:cu_q_lens[r+1]
    num_rows     [] or [1] int32: rows in use (later rows are ignored)
    k_scales, v_scales [P, S, K] float32: per-token, per-head scales of int8 pages

Returns ``[T, N, H]`` in ``q.dtype``.

A row's ``q_len`` query tokens are the *last* ``q_len`` tokens of its context: query ``i``
sits at position ``context_len - q_len + i`` and attends to keys ``j <= position``
(causal inside a chunk), and with ``sliding_window=W`` only to ``j > position - W``.
``soft_cap=c`` maps scores ``s -> c * tanh(s / c)`` before the softmax.

How the work is cut (``ragged_schedule``, a few small integer arrays computed in jnp on
device): each row's query tokens are cut into blocks of ``block_q`` tokens; every block
is one *work item*. The item list has a static length (``max_work_items``) so the step
compiles once per shape bucket; items past the step's real work do nothing (no loads,
no compute). A work item takes all ``G`` query heads of one KV head as one tile of
``block_q * G`` rows (K/V read once per group), and walks only the KV blocks
(``pages_per_block`` pages each) its queries can see: from the sliding window's start
(or 0) to its last query's position. Decode rows are items with one query token.

Implementations: ``_ragged_paged_attention_tpu`` (Mosaic: manual double-buffered page
DMAs), ``_ragged_paged_attention_pallas`` (Triton lowering: gathered page loads, split-K),
and ``ragged_paged_attention_reference`` (plain jnp, one query token at a time over its
row's pages; the numerical reference).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.block_sizes import RaggedBlockSizes
from pallas_kernels.dispatch import backend, resolve_implementation, use_interpret
from pallas_kernels.paged_attention import online_softmax_init, online_softmax_result, online_softmax_step


def ragged_paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    page_tables: jax.Array,
    context_lens: jax.Array,
    cu_q_lens: jax.Array,
    num_rows: jax.Array,
    *,
    sm_scale: float | None = None,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    k_scales: jax.Array | None = None,
    v_scales: jax.Array | None = None,
    block_sizes: RaggedBlockSizes | None = None,
    implementation: str = "auto",
    interpret: bool = False,
) -> jax.Array:
    """Attention of ragged query rows over the paged cache (see the module docstring for shapes).

    ``implementation``: ``"pallas"`` (the Mosaic kernel on TPU, the Triton-style kernel
    elsewhere, interpreted on CPU), ``"reference"``, or ``"auto"`` (the kernel on GPU/TPU,
    the reference on CPU; the CPU serving path uses ``paged_attention_xla`` instead).
    ``sm_scale`` defaults to ``H ** -0.5``.
    """
    check_inputs(q, k_pages, v_pages, page_tables, context_lens, cu_q_lens, k_scales, v_scales,
                 sliding_window=sliding_window, soft_cap=soft_cap)
    kw = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
              k_scales=k_scales, v_scales=v_scales)
    impl = resolve_implementation(implementation, interpret=interpret)
    if impl == "pallas" and backend() == "tpu" and not interpret:
        from pallas_kernels._ragged_paged_attention_tpu import ragged_paged_attention_tpu

        return ragged_paged_attention_tpu(q, k_pages, v_pages, page_tables, context_lens, cu_q_lens, num_rows,
                                          **kw, block_sizes=block_sizes)
    if impl == "pallas":
        from pallas_kernels._ragged_paged_attention_pallas import ragged_paged_attention_pallas

        return ragged_paged_attention_pallas(q, k_pages, v_pages, page_tables, context_lens, cu_q_lens, num_rows,
                                             **kw, block_sizes=block_sizes, interpret=use_interpret(interpret))
    return ragged_paged_attention_reference(q, k_pages, v_pages, page_tables, context_lens, cu_q_lens, num_rows,
                                            **kw)


def check_inputs(q, k_pages, v_pages, page_tables, context_lens, cu_q_lens, k_scales, v_scales, *,
                 sliding_window, soft_cap) -> None:
    """Static checks (shapes, options); raises ValueError naming the field."""
    if q.ndim != 3 or k_pages.ndim != 4 or v_pages.shape != k_pages.shape:
        raise ValueError(f"expected q [T, N, H], pages [P, S, K, H]; got {q.shape=}, {k_pages.shape=}, "
                         f"{v_pages.shape=}")
    if q.shape[2] != k_pages.shape[3]:
        raise ValueError(f"head dims differ: {q.shape[2]=} vs {k_pages.shape[3]=}")
    if q.shape[1] % k_pages.shape[2]:
        raise ValueError(f"query heads {q.shape[1]} must be a multiple of KV heads {k_pages.shape[2]}")
    b = page_tables.shape[0]
    if context_lens.shape != (b,) or cu_q_lens.shape != (b + 1,):
        raise ValueError(f"expected context_lens [B] and cu_q_lens [B + 1] for B={b}; got "
                         f"{context_lens.shape=}, {cu_q_lens.shape=}")
    if (k_scales is None) != (v_scales is None) or (k_scales is None) == (k_pages.dtype == jnp.int8):
        raise ValueError(f"k_scales and v_scales are required for int8 pages and only then "
                         f"(pages {k_pages.dtype}, k_scales given: {k_scales is not None})")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"{sliding_window=} must be >= 1 (or None)")
    if soft_cap is not None and not soft_cap > 0:
        raise ValueError(f"{soft_cap=} must be > 0 (or None)")


# --- the work list shared by both kernels ---------------------------------------------------


def default_block_sizes(*, num_tokens: int, num_rows: int, page_size: int, group: int, tpu: bool) -> RaggedBlockSizes:
    """Untuned defaults (no device run has measured better ones yet).

    ``block_q`` follows the step's mean tokens per row (a decode bucket gets 1-token items,
    a prefill bucket 16-token ones), but a tile keeps at least 16 rows on a GPU (``tl.dot``)
    and whole 8-row tiles on a TPU. A KV block is ~64 keys on a GPU (two bf16 ``[64, 128]``
    tiles per stage in shared memory) and ~128 on a TPU (lane-dense ``[rows, 128]`` scores).
    """
    mean = -(-num_tokens // max(1, num_rows))
    block_q = 1
    while block_q < min(mean, 16):
        block_q *= 2
    if tpu:
        while (block_q * group) % 8:
            block_q *= 2
        return RaggedBlockSizes(block_q=block_q, pages_per_block=max(1, 128 // page_size))
    while block_q * group < 16 and block_q < 16:
        block_q *= 2
    return RaggedBlockSizes(block_q=block_q, pages_per_block=max(1, 64 // page_size))



def max_work_items(num_tokens: int, num_rows: int, block_q: int) -> int:
    """Static bound on work items: whole blocks of all tokens plus one partial block per row."""
    return max(1, min(num_tokens, -(-num_tokens // block_q) + num_rows))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RaggedSchedule:
    """The step's work items (query blocks) and the way back from items to tokens."""

    item_row: jax.Array  # [W] int32: row of each item (0 for items past the real work)
    item_start: jax.Array  # [W] int32: packed index of the item's first query token
    item_len: jax.Array  # [W] int32: query tokens in the item, 0 for items past the real work
    item_pos: jax.Array  # [W] int32: cache position of the item's first query token
    token_item: jax.Array  # [T] int32: item of each query token (0 for padding tokens)
    token_slot: jax.Array  # [T] int32: the token's place inside its item
    token_valid: jax.Array  # [T] bool: the token belongs to a row in use


def ragged_schedule(cu_q_lens: jax.Array, num_rows: jax.Array, context_lens: jax.Array, *,
                    num_tokens: int, block_q: int) -> RaggedSchedule:
    """Cut each row's query tokens into ``block_q`` blocks; a row of 0 tokens has no item."""
    b = context_lens.shape[0]
    w = max_work_items(num_tokens, b, block_q)
    cu = cu_q_lens.astype(jnp.int32)
    in_use = jnp.arange(b) < jnp.reshape(num_rows, (-1,))[0]
    q_lens = jnp.where(in_use, cu[1:] - cu[:-1], 0)  # [B]
    blocks = -(-q_lens // block_q)  # [B]
    ends = jnp.cumsum(blocks)  # [B] items up to and including row r
    first = ends - blocks  # [B] first item of each row
    items = jnp.arange(w, dtype=jnp.int32)
    row = jnp.minimum(jnp.searchsorted(ends, items, side="right"), b - 1).astype(jnp.int32)
    offset = (items - first[row]) * block_q  # [W] first query of the item within its row
    real = items < ends[-1]
    item_len = jnp.where(real, jnp.clip(q_lens[row] - offset, 0, block_q), 0)
    item_pos = context_lens[row].astype(jnp.int32) - q_lens[row] + offset

    t = jnp.arange(num_tokens, dtype=jnp.int32)
    t_row = jnp.minimum(jnp.searchsorted(cu[1:], t, side="right"), b - 1).astype(jnp.int32)
    t_valid = (t < cu[0] + jnp.sum(q_lens)) & (t >= cu[0]) & in_use[t_row]
    in_row = t - cu[t_row]
    token_item = jnp.where(t_valid, first[t_row] + in_row // block_q, 0)
    return RaggedSchedule(
        item_row=jnp.where(real, row, 0), item_start=jnp.where(real, cu[row] + offset, 0),
        item_len=item_len.astype(jnp.int32), item_pos=jnp.where(real, item_pos, 0).astype(jnp.int32),
        token_item=token_item.astype(jnp.int32), token_slot=jnp.where(t_valid, in_row % block_q, 0),
        token_valid=t_valid,
    )


def gather_query_blocks(q: jax.Array, sched: RaggedSchedule, *, block_q: int, num_kv_heads: int,
                        rows: int, head_dim: int) -> jax.Array:
    """``q [T, N, H] -> [W, K, rows, head_dim]``: each item's ``block_q x G`` query tile
    (token-major: row ``i * G + g``), zero past the item's tokens and padded to ``rows``
    rows and ``head_dim`` columns."""
    t, n, h = q.shape
    g = n // num_kv_heads
    idx = sched.item_start[:, None] + jnp.arange(block_q)[None, :]  # [W, bq]
    ok = jnp.arange(block_q)[None, :] < sched.item_len[:, None]
    qb = jnp.where(ok[..., None, None], q[jnp.clip(idx, 0, t - 1)], 0)  # [W, bq, N, H]
    w = qb.shape[0]
    qb = qb.reshape(w, block_q, num_kv_heads, g, h).transpose(0, 2, 1, 3, 4).reshape(w, num_kv_heads, block_q * g, h)
    return jnp.pad(qb, ((0, 0), (0, 0), (0, rows - block_q * g), (0, head_dim - h)))


def scatter_query_blocks(out: jax.Array, sched: RaggedSchedule, *, block_q: int, num_heads: int,
                         head_dim: int) -> jax.Array:
    """``[W, K, rows, Hp] -> [T, N, H]``: each token's rows back in packed order, zeros for padding."""
    w, kh = out.shape[:2]
    g = num_heads // kh
    blocks = out[:, :, : block_q * g, :head_dim].reshape(w, kh, block_q, g, head_dim)
    tok = blocks[sched.token_item, :, sched.token_slot]  # [T, K, G, H]
    tok = jnp.where(sched.token_valid[:, None, None, None], tok, 0)
    return tok.reshape(-1, num_heads, head_dim)


# --- reference ------------------------------------------------------------------------------


def ragged_paged_attention_reference(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    page_tables: jax.Array,
    context_lens: jax.Array,
    cu_q_lens: jax.Array,
    num_rows: jax.Array,
    *,
    sm_scale: float | None = None,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    k_scales: jax.Array | None = None,
    v_scales: jax.Array | None = None,
) -> jax.Array:
    """Plain jnp: every query token walks its row's pages one at a time (online softmax)."""
    t, n, h = q.shape
    _, page_size, kh, _ = k_pages.shape
    g = n // kh
    b, max_pages = page_tables.shape
    scale = h**-0.5 if sm_scale is None else sm_scale
    cu = cu_q_lens.astype(jnp.int32)
    in_use = jnp.arange(b) < jnp.reshape(num_rows, (-1,))[0]
    q_lens = jnp.where(in_use, cu[1:] - cu[:-1], 0)
    tok = jnp.arange(t)
    row = jnp.minimum(jnp.searchsorted(cu[1:], tok, side="right"), b - 1)
    valid = (tok >= cu[0]) & (tok < cu[0] + jnp.sum(q_lens)) & in_use[row]
    pos = context_lens[row] - q_lens[row] + (tok - cu[row])  # [T]
    lo = jnp.zeros_like(pos) if sliding_window is None else pos - sliding_window + 1
    tables = page_tables[row]  # [T, M]
    qg = q.reshape(t, kh, g, h).astype(jnp.float32) * scale

    def body(p, carry):
        pages = tables[:, p]  # [T]
        kb = k_pages[pages].astype(jnp.float32)  # [T, S, K, H]
        vb = v_pages[pages].astype(jnp.float32)
        if k_scales is not None:
            kb = kb * k_scales[pages][..., None]
            vb = vb * v_scales[pages][..., None]
        s = jnp.einsum("tkgh,tskh->tkgs", qg, kb)
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        kpos = p * page_size + jnp.arange(page_size)
        mask = valid[:, None] & (kpos[None, :] <= pos[:, None]) & (kpos[None, :] >= lo[:, None])  # [T, S]
        s = jnp.where(mask[:, None, None, :], s, -jnp.inf)
        return online_softmax_step(carry, s, lambda w: jnp.einsum("tkgs,tskh->tkgh", w, vb))

    _, l, acc = jax.lax.fori_loop(0, max_pages, body, online_softmax_init((t, kh, g), h))
    return online_softmax_result(l, acc).reshape(t, n, h).astype(q.dtype)
