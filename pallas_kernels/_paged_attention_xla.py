"""``paged_attention_xla``: paged attention in plain XLA ops, the CPU default.

Same contract and layout as ``paged_attention.paged_attention_reference`` (``q [T, N, H]``,
pages ``[P, S, K, H]``, page tables ``[B, M]``, packed ``segment_ids`` / ``positions``).
The reference walks the page table with every query token in step, which on a CPU
pays ``tokens x longest context`` of gathers. This path splits the step instead:

- decode rows (one query token) walk the (row, page) pairs they need, one query each
  (``_decode_rows``), instead of beside every token of a chunk, so a decode step costs
  the sum of its rows' contexts, not rows x the longest;
- rows with several tokens (prefill chunks) have their contexts gathered once, back to
  back, and attended block by block, visiting only the key blocks a query block can see
  (``_blocked_attention``): a causal chunk costs about half of ``T x C``.

Every choice is made at run time inside one compiled function (``lax.switch``), so the
step's shape bucket alone decides what is compiled.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.paged_attention import (
    _default_rows,
    online_softmax_init,
    online_softmax_result,
    online_softmax_step,
    paged_attention_reference,
)

# Query and key tile of ``_blocked_attention``: on the CPU 64 beat 32, 128 and 256 on a
# 512-token prefill and a 512-token chunk resuming at 512 (benchmarks/paged_attention_cpu.py).
ATTENTION_BLOCK = 64
# (row, page) pairs per iteration of the decode walk (``_decode_rows``).
DECODE_PAIRS_PER_BLOCK = 32


def packed_context_budgets(num_tokens: int, max_pages: int, page_size: int) -> tuple[int, ...]:
    """Static key budgets ``C`` of ``paged_attention_xla``'s packed path (the contexts of
    the step's multi-token rows, gathered back to back), smallest first.

    The largest is ``T + M * S``: a row never holds more than ``M * S`` cached tokens and
    a row's context beyond its query tokens is what it had cached before the step, so
    every step in which at most one multi-token row brings earlier context (a lone
    prefill chunk, any number of fresh prompts) fits. The gather costs ``C`` and the
    budget's empty tail is skipped by the blocked attention, so smaller budgets serve
    the common cheaper steps: ``T`` (fresh prompts only: no row has earlier context) and
    ``T`` plus a quarter of a row, page-aligned (a chunk resuming early in its prompt).
    Steps that fit none take the page walk.
    """
    row = max_pages * page_size
    quarter = -(-row // (4 * page_size)) * page_size
    return tuple(sorted({num_tokens, num_tokens + min(quarter, row), num_tokens + row}))


def paged_attention_xla(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    page_tables: jax.Array,
    lengths: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    positions: jax.Array | None = None,
    sm_scale: float | None = None,
    k_scale: jax.Array | None = None,
    v_scale: jax.Array | None = None,
    sliding_window: int | None = None,
) -> jax.Array:
    """Same contract as ``paged_attention_reference``; picks paths at run time.

    Row ``b`` needs the first ``need[b] = min(lengths[b], 1 + max position of its
    tokens)`` cache positions (0 for a row without tokens). Rows are served in two parts:

    - rows with exactly one query token (decode) walk their own (row, page) pairs
      (``_decode_rows``): a chunk's tokens no longer ride along on every page of the
      longest decode row, nor do short decode rows;
    - rows with several tokens (prefill chunks): when their ``sum(need)`` fits one of
      ``packed_context_budgets`` (the smallest that does is used) their contexts are
      gathered once, back to back, into ``[C, K, H]`` and attended with
      ``_blocked_attention`` (key segment = row, key position = cache position, causal),
      which skips the key blocks a query block cannot see. Otherwise the reference page
      walk serves them.

    A one-token step (batch-1 decode) goes straight to the reference walk. With
    ``sliding_window=W`` every part masks keys at or below ``position - W``; the walks start
    at the window's first page and the packed path gathers each row from its first token's
    window start (``need`` above then counts from there).
    """
    segment_ids, positions = _default_rows(q, lengths, segment_ids, positions)
    if q.shape[0] == 1:
        return paged_attention_reference(
            q, k_pages, v_pages, page_tables, lengths, segment_ids=segment_ids, positions=positions,
            sm_scale=sm_scale, k_scale=k_scale, v_scale=v_scale, sliding_window=sliding_window,
        )
    # The pages usually come straight from the step's KV scatter, whose result is also a
    # step output. Without this barrier XLA duplicates that in-place scatter into the
    # switch's operand and the output, copying the whole pool each layer (measured on
    # CPU: 47 ms instead of 0.3 ms per layer at one decode token, 1281 pages).
    k_pages, v_pages, k_scale, v_scale = jax.lax.optimization_barrier((k_pages, v_pages, k_scale, v_scale))
    t, n, h = q.shape
    num_rows, max_pages = page_tables.shape
    num_pages, page_size, kh, _ = k_pages.shape
    budgets = packed_context_budgets(t, max_pages, page_size)

    valid_tok = segment_ids >= 0
    rows = jnp.where(valid_tok, segment_ids, 0)
    # Highest cache position + 1 any token of each row looks at; 0 for rows without tokens.
    reach = jnp.zeros((num_rows,), jnp.int32).at[rows].max(jnp.where(valid_tok, positions + 1, 0))
    need = jnp.minimum(reach, lengths.astype(jnp.int32))  # [B]
    count = jnp.zeros((num_rows,), jnp.int32).at[rows].add(valid_tok.astype(jnp.int32))
    single_row = count == 1
    single_tok = valid_tok & single_row[rows]  # [T]
    multi_seg = jnp.where(valid_tok & ~single_tok, segment_ids, -1)

    # Decode rows: each row's one query token, over its own pages (see _decode_rows).
    tok_of_row = jnp.zeros((num_rows,), jnp.int32).at[jnp.where(single_tok, rows, num_rows)].set(
        jnp.arange(t, dtype=jnp.int32), mode="drop")
    out_rows = _decode_rows(q[tok_of_row], k_pages, v_pages, page_tables, jnp.where(single_row, need, 0),
                            sm_scale=sm_scale, k_scale=k_scale, v_scale=v_scale,
                            sliding_window=sliding_window)  # [B, N, H]
    out_single = out_rows[rows]  # [T, N, H]

    need_multi = jnp.where(single_row, 0, need)
    # Each row's keys are gathered from row_lo: 0, or with a sliding window the window start
    # of its first token, so a chunk's gather follows the window rather than its whole context.
    if sliding_window is None:
        row_lo = jnp.zeros_like(need_multi)
    else:
        big = jnp.iinfo(jnp.int32).max
        first_key = jnp.where(multi_seg >= 0, jnp.maximum(positions - sliding_window + 1, 0), big)
        row_lo = jnp.minimum(jnp.full((num_rows,), big, jnp.int32).at[rows].min(first_key), need_multi)
    span = need_multi - row_lo  # [B] keys of each row in the packed list
    ends = jnp.cumsum(span)  # [B]
    row_start = ends - span  # [B] where each row's keys (from position row_lo) begin in the packed list
    total = ends[-1]
    # Keys of token t: its row's span of the packed list, from its window start up to its own position.
    own_lo = 0 if sliding_window is None else jnp.maximum(positions - sliding_window + 1, 0)
    key_lo = row_start[rows] + jnp.clip(own_lo - row_lo[rows], 0, span[rows])
    key_hi = jnp.where(multi_seg >= 0,
                       row_start[rows] + jnp.clip(jnp.minimum(positions + 1, need_multi[rows]) - row_lo[rows], 0,
                                                  span[rows]), 0)

    def packed(budget: int):
        def run():
            c = jnp.arange(budget, dtype=jnp.int32)
            kv_row = jnp.minimum(jnp.searchsorted(ends, c, side="right"), num_rows - 1).astype(jnp.int32)  # [C]
            valid = c < total
            kv_pos = c - row_start[kv_row] + row_lo[kv_row]  # position inside its row
            page_idx = jnp.clip(kv_pos // page_size, 0, max_pages - 1)
            slot = page_tables[kv_row, page_idx] * page_size + kv_pos % page_size
            slot = jnp.where(valid, slot, 0)  # invalid keys read the null page, masked below
            k_ctx = k_pages.reshape(num_pages * page_size, kh, h)[slot]  # [C, K, H]
            v_ctx = v_pages.reshape(num_pages * page_size, kh, h)[slot]
            if k_scale is not None:
                k_ctx = k_ctx.astype(jnp.float32) * k_scale.reshape(-1, kh)[slot][..., None]
                v_ctx = v_ctx.astype(jnp.float32) * v_scale.reshape(-1, kh)[slot][..., None]
            return _blocked_attention(
                q, k_ctx, v_ctx, segment_ids=multi_seg, positions=positions,
                kv_segment_ids=jnp.where(valid, kv_row, -1), kv_positions=kv_pos,
                key_lo=key_lo, key_hi=key_hi, sm_scale=sm_scale, sliding_window=sliding_window,
            )

        return run

    def walk():
        return paged_attention_reference(
            q, k_pages, v_pages, page_tables, lengths, segment_ids=multi_seg, positions=positions,
            sm_scale=sm_scale, k_scale=k_scale, v_scale=v_scale, sliding_window=sliding_window,
        )

    # Branch 0: no multi-token row; i: the smallest budget that holds them; last: none does.
    index = jnp.where(total == 0, 0, 1 + jnp.sum(total > jnp.asarray(budgets, jnp.int32)))
    out_multi = jax.lax.switch(index, [lambda: jnp.zeros_like(q), *(packed(c) for c in budgets), walk])
    return jnp.where(single_tok[:, None, None], out_single, out_multi)


def _decode_rows(
    q_rows: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    page_tables: jax.Array,
    need: jax.Array,
    *,
    sm_scale: float | None,
    k_scale: jax.Array | None,
    v_scale: jax.Array | None,
    sliding_window: int | None = None,
) -> jax.Array:
    """One query per row, ``q_rows [B, N, H]``, over the first ``need[b]`` cache positions
    of its row; ``[B, N, H]`` in ``q_rows.dtype``, zeros where ``need`` is 0.

    A walk over the (row, page) pairs the rows need, ``DECODE_PAIRS_PER_BLOCK`` pairs per
    iteration, with an online softmax per row: the cost follows ``sum(need)``. Walking
    the page table with the rows in step (the reference) costs ``B x max(need)``
    whatever the other rows need, and in continuous batching one long row beside short
    ones is the usual case: on a 16-row, 26M-parameter decode step whose contexts ranged
    up to 490 tokens the lane walk was most of the step (``benchmarks/RESULTS.md``).
    With ``sliding_window=W`` a row's pairs start at its window's first page.
    """
    b, n, h = q_rows.shape
    _, s, kh, _ = k_pages.shape
    g = n // kh
    max_pages = page_tables.shape[1]
    scale = h**-0.5 if sm_scale is None else sm_scale
    qg = q_rows.reshape(b, kh, g, h).astype(jnp.float32) * scale  # [B, K, G, H]
    need = need.astype(jnp.int32)
    # Keys of row r: cache positions [lo[r], need[r]) (its one query sits at need - 1).
    lo = jnp.zeros_like(need) if sliding_window is None else jnp.maximum(need - sliding_window, 0)
    first_page = lo // s
    count = jnp.where(need > 0, (need + s - 1) // s - first_page, 0)  # [B] pages of each row
    ends = jnp.cumsum(count)
    starts = ends - count
    total = ends[-1]
    block = min(DECODE_PAIRS_PER_BLOCK, b * max_pages)

    def body(i, carry):
        j = i * block + jnp.arange(block, dtype=jnp.int32)  # [P] pair index
        row = jnp.minimum(jnp.searchsorted(ends, j, side="right"), b - 1).astype(jnp.int32)
        valid = j < total
        page_idx = jnp.where(valid, first_page[row] + j - starts[row], 0)
        page = jnp.where(valid, page_tables[row, jnp.clip(page_idx, 0, max_pages - 1)], 0)
        kb = k_pages[page].astype(jnp.float32)  # [P, S, K, H]
        vb = v_pages[page].astype(jnp.float32)
        if k_scale is not None:
            kb = kb * k_scale[page][..., None]
            vb = vb * v_scale[page][..., None]
        scores = jnp.einsum("pkgh,pskh->pkgs", qg[row], kb)
        kpos = page_idx[:, None] * s + jnp.arange(s, dtype=jnp.int32)  # [P, S]
        ok = valid[:, None] & (kpos < need[row][:, None]) & (kpos >= lo[row][:, None])
        scores = jnp.where(ok[:, None, None, :], scores, -jnp.inf)  # [P, K, G, S]
        m, l, acc = carry  # [B, K, G], [B, K, G], [B, K, G, H]
        m_new = jnp.maximum(m, jnp.full_like(m, -jnp.inf).at[row].max(jnp.max(scores, axis=-1)))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(scores - m_safe[row][..., None])
        alpha = jnp.exp(jnp.where(jnp.isfinite(m), m, m_safe) - m_safe)
        l = l * alpha + jnp.zeros_like(l).at[row].add(jnp.sum(p, axis=-1))
        acc = acc * alpha[..., None] + jnp.zeros_like(acc).at[row].add(jnp.einsum("pkgs,pskh->pkgh", p, vb))
        return m_new, l, acc

    _, l, acc = jax.lax.fori_loop(0, (total + block - 1) // block, body, online_softmax_init((b, kh, g), h))
    return online_softmax_result(l, acc).reshape(b, n, h).astype(q_rows.dtype)


def _blocked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array,
    positions: jax.Array,
    kv_segment_ids: jax.Array,
    kv_positions: jax.Array,
    key_lo: jax.Array,
    key_hi: jax.Array,
    sm_scale: float | None,
    sliding_window: int | None = None,
) -> jax.Array:
    """Causal packed attention (``flash_attention_reference``'s contract, ``k, v [C, K, H]``)
    in tiles of ``ATTENTION_BLOCK``: each query tile visits only the key tiles that
    overlap ``[min key_lo, max key_hi)`` of its tokens, with an online softmax.

    ``key_lo / key_hi [T]`` bound the keys token ``t`` may see (the mask still decides
    which it does), so any bounds that hold give the exact result; tight ones make a
    causal prefill chunk cost about half of ``T x C`` and skip the budget's empty tail.
    """
    t, n, h = q.shape
    c, kh, _ = k.shape
    g = n // kh
    scale = h**-0.5 if sm_scale is None else sm_scale
    bq = min(ATTENTION_BLOCK, t)
    bk = min(ATTENTION_BLOCK, c)
    tq, ck = -(-t // bq) * bq, -(-c // bk) * bk
    pad_q, pad_k = tq - t, ck - c
    qg = jnp.pad(q.reshape(t, kh, g, h).astype(jnp.float32) * scale, ((0, pad_q), (0, 0), (0, 0), (0, 0)))
    q_seg = jnp.pad(segment_ids, (0, pad_q), constant_values=-1)
    q_pos = jnp.pad(positions, (0, pad_q))
    kf = jnp.pad(k.astype(jnp.float32), ((0, pad_k), (0, 0), (0, 0)))
    vf = jnp.pad(v.astype(jnp.float32), ((0, pad_k), (0, 0), (0, 0)))
    k_seg = jnp.pad(kv_segment_ids, (0, pad_k), constant_values=-1)
    k_pos = jnp.pad(kv_positions, (0, pad_k))
    valid = q_seg >= 0
    lo = jnp.where(valid, jnp.pad(key_lo, (0, pad_q)).clip(0, ck), ck)
    hi = jnp.where(valid, jnp.pad(key_hi, (0, pad_q)).clip(0, ck), 0)
    first = jnp.min(lo.reshape(-1, bq), axis=1) // bk  # [tiles]
    last = (jnp.max(hi.reshape(-1, bq), axis=1) + bk - 1) // bk

    def query_tile(i, out):
        qs = jax.lax.dynamic_slice_in_dim(qg, i * bq, bq)  # [bq, K, G, H]
        seg = jax.lax.dynamic_slice_in_dim(q_seg, i * bq, bq)
        pos = jax.lax.dynamic_slice_in_dim(q_pos, i * bq, bq)

        def key_tile(j, carry):
            ks = jax.lax.dynamic_slice_in_dim(kf, j * bk, bk)  # [bk, K, H]
            vs = jax.lax.dynamic_slice_in_dim(vf, j * bk, bk)
            kseg = jax.lax.dynamic_slice_in_dim(k_seg, j * bk, bk)
            kpos = jax.lax.dynamic_slice_in_dim(k_pos, j * bk, bk)
            mask = (seg[:, None] == kseg[None, :]) & (seg[:, None] >= 0) & (kpos[None, :] <= pos[:, None])
            if sliding_window is not None:
                mask &= kpos[None, :] > pos[:, None] - sliding_window
            s = jnp.einsum("qkgh,ckh->kgqc", qs, ks)
            s = jnp.where(mask[None, None], s, -jnp.inf)
            return online_softmax_step(carry, s, lambda p: jnp.einsum("kgqc,ckh->kgqh", p, vs))

        init = online_softmax_init((kh, g, bq), h)
        _, l, acc = jax.lax.fori_loop(first[i], jnp.maximum(first[i], last[i]), key_tile, init)
        o = online_softmax_result(l, acc)  # [K, G, bq, H]
        return jax.lax.dynamic_update_slice_in_dim(out, jnp.transpose(o, (2, 0, 1, 3)), i * bq, axis=0)

    out = jax.lax.fori_loop(0, tq // bq, query_tile, jnp.zeros((tq, kh, g, h), jnp.float32))
    return out[:t].reshape(t, n, h).astype(q.dtype)
