"""Attention of packed query tokens over the paged KV cache (decode, chunked prefill).

Layout (see ``page_layout``): ``q [T, N, H]``; ``k_pages, v_pages [P, S, K, H]``;
``page_tables [B, M]``; ``lengths [B]`` (cached tokens of each row, this step's
tokens included). Query token ``t`` belongs to row ``segment_ids[t]`` (negative:
padding, output zeros) and sits at ``positions[t]``; it attends to cache positions
``j <= positions[t]`` with ``j < lengths[row]``. Without ``segment_ids`` there is one
query per row (``T == B``) at position ``lengths - 1``: plain decode.

int8 pages pass ``k_scale, v_scale [P, S, K]``.

Three implementations: the Pallas split-K kernel (Triton on GPU, Mosaic on TPU),
``paged_attention_reference`` (plain jnp, the numerical reference: it walks the page
table a block of pages at a time and gathers, for every query token, its own copy of its
row's context, so a prefill chunk of ``T`` tokens pays ``T x context`` of gather) and
``paged_attention_xla``, the CPU default, which gathers each row's context once into a
packed key list and runs ordinary masked attention over it (``flash_attention_reference``)
whenever the step's contexts fit a static budget, and falls back to the reference walk
otherwise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.block_sizes import PagedBlockSizes
from pallas_kernels.dispatch import backend, resolve_implementation, use_interpret
from pallas_kernels.flash_attention import flash_attention_reference

# Pages read per iteration of the reference loop. One page a step measured fastest on
# the CPU (the gathered block [T, S, K, H] stays in cache): against 8 pages, 16 decode
# rows at context 1000 took 11-13 ms instead of 17.5, and a 256-token chunk beside 15
# decode rows 68-76 ms instead of 220 (benchmarks/paged_attention_cpu.py).
REFERENCE_PAGES_PER_BLOCK = 1


def paged_attention(
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
    implementation: str = "auto",
    interpret: bool = False,
    block_sizes: PagedBlockSizes | None = None,
) -> jax.Array:
    """Returns ``[T, N, H]`` in ``q.dtype``.

    ``implementation="pallas"`` runs the split-K kernel: on TPU the Mosaic variant in
    ``_paged_attention_tpu``, elsewhere the Triton-style ``_paged_attention_pallas`` (one
    program per query token, KV head and split; ``interpret=True`` on CPU). Both take the
    general packed form with ``segment_ids``/``positions``, not only decode; ``block_sizes``
    tunes either.
    ``"xla"`` runs ``paged_attention_xla``; ``"reference"`` the jnp reference.
    """
    segment_ids, positions = _default_rows(q, lengths, segment_ids, positions)
    impl = resolve_implementation(implementation, interpret=interpret, has_xla=True)
    if impl == "pallas" and backend() == "tpu" and not interpret:
        from pallas_kernels._paged_attention_tpu import paged_attention_tpu

        return paged_attention_tpu(
            q, k_pages, v_pages, page_tables, lengths,
            segment_ids=segment_ids, positions=positions, sm_scale=sm_scale,
            k_scale=k_scale, v_scale=v_scale, block_sizes=block_sizes,
        )
    if impl == "xla":
        return paged_attention_xla(
            q, k_pages, v_pages, page_tables, lengths,
            segment_ids=segment_ids, positions=positions, sm_scale=sm_scale,
            k_scale=k_scale, v_scale=v_scale,
        )
    if impl == "pallas":
        from pallas_kernels import _paged_attention_pallas as kernel

        return kernel.paged_attention_pallas(
            q, k_pages, v_pages, page_tables, lengths,
            segment_ids=segment_ids, positions=positions, sm_scale=sm_scale,
            k_scale=k_scale, v_scale=v_scale, interpret=use_interpret(interpret), block_sizes=block_sizes,
        )
    return paged_attention_reference(
        q, k_pages, v_pages, page_tables, lengths,
        segment_ids=segment_ids, positions=positions, sm_scale=sm_scale,
        k_scale=k_scale, v_scale=v_scale,
    )


def _default_rows(q, lengths, segment_ids, positions):
    if segment_ids is None:
        if q.shape[0] != lengths.shape[0]:
            raise ValueError(
                f"without segment_ids there is one query per row: {q.shape[0]=} must equal {lengths.shape[0]=}"
            )
        segment_ids = jnp.arange(q.shape[0], dtype=jnp.int32)
        if positions is None:
            positions = lengths.astype(jnp.int32) - 1
    elif positions is None:
        raise ValueError("positions are required when segment_ids are given")
    return segment_ids, positions


def paged_attention_reference(
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
) -> jax.Array:
    """Plain jnp: walk the page table a block of pages at a time with an online softmax."""
    segment_ids, positions = _default_rows(q, lengths, segment_ids, positions)
    t, n, h = q.shape
    _, page_size, kh, _ = k_pages.shape
    g = n // kh
    max_pages = page_tables.shape[1]
    ppb = min(REFERENCE_PAGES_PER_BLOCK, max_pages)
    num_blocks = -(-max_pages // ppb)
    pad = num_blocks * ppb - max_pages
    tables = jnp.pad(page_tables, ((0, 0), (0, pad)))
    scale = h**-0.5 if sm_scale is None else sm_scale

    valid_tok = segment_ids >= 0
    rows = jnp.where(valid_tok, segment_ids, 0)
    tok_tables = tables[rows]  # [T, M']
    tok_len = jnp.minimum(lengths[rows], positions + 1)  # keys visible to each token
    tok_len = jnp.where(valid_tok, tok_len, 0)
    # Only walk as many blocks as the longest visible context needs.
    n_blocks = jnp.minimum(num_blocks, (jnp.max(tok_len) + ppb * page_size - 1) // (ppb * page_size))
    qg = q.reshape(t, kh, g, h).astype(jnp.float32) * scale

    def body(b, carry):
        m, l, acc = carry
        pages = jax.lax.dynamic_slice_in_dim(tok_tables, b * ppb, ppb, axis=1)  # [T, ppb]
        kb = k_pages[pages].astype(jnp.float32)  # [T, ppb, S, K, H]
        vb = v_pages[pages].astype(jnp.float32)
        if k_scale is not None:
            kb = kb * k_scale[pages][..., None]
            vb = vb * v_scale[pages][..., None]
        kb = kb.reshape(t, ppb * page_size, kh, h)
        vb = vb.reshape(t, ppb * page_size, kh, h)
        s = jnp.einsum("tkgh,tckh->tkgc", qg, kb)
        kpos = b * ppb * page_size + jnp.arange(ppb * page_size)
        mask = kpos[None, :] < tok_len[:, None]  # [T, C]
        s = jnp.where(mask[:, None, None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(s - m_safe[..., None])
        alpha = jnp.exp(jnp.where(jnp.isfinite(m), m, m_safe) - m_safe)
        l = l * alpha + jnp.sum(p, axis=-1)
        acc = acc * alpha[..., None] + jnp.einsum("tkgc,tckh->tkgh", p, vb)
        return m_new, l, acc

    init = (
        jnp.full((t, kh, g), -jnp.inf, jnp.float32),
        jnp.zeros((t, kh, g), jnp.float32),
        jnp.zeros((t, kh, g, h), jnp.float32),
    )
    _, l, acc = jax.lax.fori_loop(0, n_blocks, body, init)
    o = jnp.where(l[..., None] > 0, acc / jnp.where(l > 0, l, 1.0)[..., None], 0.0)
    return o.reshape(t, n, h).astype(q.dtype)


def packed_context_budgets(num_tokens: int, max_pages: int, page_size: int) -> tuple[int, ...]:
    """Static key budgets ``C`` of ``paged_attention_xla``'s packed path, smallest first.

    The largest is ``T + M * S``: a row never holds more than ``M * S`` cached tokens and
    a row's context beyond its query tokens is what it had cached before the step, so
    every step in which at most one row brings earlier context (a lone prefill chunk,
    any number of fresh prompts, a single decode row) fits. The packed path costs
    ``T x C``, so smaller budgets serve the common cheaper steps: ``T`` (fresh prompts
    only: no row has earlier context) and ``T`` plus a quarter of a row, page-aligned
    (a chunk resuming early in its prompt). Steps that fit none take the page walk.
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
) -> jax.Array:
    """Same contract as ``paged_attention_reference``; picks a path at run time.

    Row ``b`` needs the first ``need[b] = min(lengths[b], 1 + max position of its
    tokens)`` cache positions (0 for a row without tokens). When ``sum(need)`` fits one
    of ``packed_context_budgets`` (the smallest that does is used) the rows' contexts
    are gathered once, back to back, into ``[C, K, H]`` and attended with
    ``flash_attention_reference`` (key segment = row, key position = cache position,
    causal): cost ``T x C`` in dense matmuls instead of the walk's per-token gathers.
    Otherwise the reference page walk runs.
    """
    segment_ids, positions = _default_rows(q, lengths, segment_ids, positions)
    # The pages usually come straight from the step's KV scatter, whose result is also a
    # step output. Without this barrier XLA duplicates that in-place scatter into the
    # switch's operand and the output, copying the whole pool each layer (measured on
    # CPU: 47 ms instead of 0.3 ms per layer at one decode token, 1281 pages).
    k_pages, v_pages, k_scale, v_scale = jax.lax.optimization_barrier((k_pages, v_pages, k_scale, v_scale))
    t = q.shape[0]
    num_rows, max_pages = page_tables.shape
    num_pages, page_size, kh, h = k_pages.shape
    budgets = packed_context_budgets(t, max_pages, page_size)

    valid_tok = segment_ids >= 0
    rows = jnp.where(valid_tok, segment_ids, 0)
    # Highest cache position + 1 any token of each row looks at; 0 for rows without tokens.
    reach = jnp.zeros((num_rows,), jnp.int32).at[rows].max(jnp.where(valid_tok, positions + 1, 0))
    need = jnp.minimum(reach, lengths.astype(jnp.int32))  # [B]
    ends = jnp.cumsum(need)  # [B]
    total = ends[-1]

    def packed(budget: int):
        def run():
            c = jnp.arange(budget, dtype=jnp.int32)
            kv_row = jnp.minimum(jnp.searchsorted(ends, c, side="right"), num_rows - 1).astype(jnp.int32)  # [C]
            valid = c < total
            kv_pos = c - (ends[kv_row] - need[kv_row])  # position inside its row
            page_idx = jnp.clip(kv_pos // page_size, 0, max_pages - 1)
            slot = page_tables[kv_row, page_idx] * page_size + kv_pos % page_size
            slot = jnp.where(valid, slot, 0)  # invalid keys read the null page, masked below
            k_ctx = k_pages.reshape(num_pages * page_size, kh, h)[slot]  # [C, K, H]
            v_ctx = v_pages.reshape(num_pages * page_size, kh, h)[slot]
            if k_scale is not None:
                k_ctx = k_ctx.astype(jnp.float32) * k_scale.reshape(-1, kh)[slot][..., None]
                v_ctx = v_ctx.astype(jnp.float32) * v_scale.reshape(-1, kh)[slot][..., None]
            return flash_attention_reference(
                q, k_ctx, v_ctx, segment_ids=jnp.where(valid_tok, segment_ids, -1), positions=positions,
                causal=True, sm_scale=sm_scale, kv_segment_ids=jnp.where(valid, kv_row, -1), kv_positions=kv_pos,
            )

        return run

    def walk():
        return paged_attention_reference(
            q, k_pages, v_pages, page_tables, lengths, segment_ids=segment_ids, positions=positions,
            sm_scale=sm_scale, k_scale=k_scale, v_scale=v_scale,
        )

    # Branch i: the smallest budget that holds the step; len(budgets): none does.
    index = jnp.sum(total > jnp.asarray(budgets, jnp.int32))
    return jax.lax.switch(index, [*(packed(c) for c in budgets), walk])
