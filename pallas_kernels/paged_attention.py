"""Attention of packed query tokens over the paged KV cache (decode, chunked prefill).

Layout (see ``page_layout``): ``q [T, N, H]``; ``k_pages, v_pages [P, S, K, H]``;
``page_tables [B, M]``; ``lengths [B]`` (cached tokens of each row, this step's
tokens included). Query token ``t`` belongs to row ``segment_ids[t]`` (negative:
padding, output zeros) and sits at ``positions[t]``; it attends to cache positions
``j <= positions[t]`` with ``j < lengths[row]``, and with ``sliding_window=W`` only to
``j > positions[t] - W`` (pages wholly below every query's window may hold anything, e.g.
the null page once the scheduler released them). Without ``segment_ids`` there is one
query per row (``T == B``) at position ``lengths - 1``: plain decode.

int8 pages pass ``k_scale, v_scale [P, S, K]``.

Three implementations: the Pallas split-K kernel (Triton on GPU, Mosaic on TPU),
``paged_attention_reference`` (plain jnp, the numerical reference: it walks the page
table a block of pages at a time and gathers, for every query token, its own copy of its
row's context, so a prefill chunk of ``T`` tokens pays ``T x context`` of gather) and
``paged_attention_xla`` (in ``_paged_attention_xla.py``), the CPU default, which walks a
step's decode rows together (one query each) and attends its prefill chunks block by
block over their gathered contexts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.block_sizes import PagedBlockSizes
from pallas_kernels.dispatch import backend, resolve_implementation, use_interpret
from pallas_kernels.flash_attention import check_sliding_window

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
    sliding_window: int | None = None,
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
    ``"xla"`` runs ``paged_attention_xla``; ``"reference"`` the jnp reference. The split-K
    kernels take no ``sliding_window`` (models reach windowed attention on accelerators
    through ``step_attention``'s ragged kernel); asking them for one is an error.
    """
    segment_ids, positions = _default_rows(q, lengths, segment_ids, positions)
    check_sliding_window(sliding_window)
    impl = resolve_implementation(implementation, interpret=interpret, has_xla=True)
    if impl == "pallas" and sliding_window is not None:
        raise ValueError(f"{sliding_window=} is not supported by the split-K paged kernel (implementation="
                         f"{implementation!r}); use step_attention's ragged kernel, or 'xla' / 'reference'")
    if impl == "pallas" and backend() == "tpu" and not interpret:
        from pallas_kernels._paged_attention_tpu import paged_attention_tpu

        return paged_attention_tpu(
            q, k_pages, v_pages, page_tables, lengths,
            segment_ids=segment_ids, positions=positions, sm_scale=sm_scale,
            k_scale=k_scale, v_scale=v_scale, block_sizes=block_sizes,
        )
    if impl == "xla":
        from pallas_kernels._paged_attention_xla import paged_attention_xla

        return paged_attention_xla(
            q, k_pages, v_pages, page_tables, lengths,
            segment_ids=segment_ids, positions=positions, sm_scale=sm_scale,
            k_scale=k_scale, v_scale=v_scale, sliding_window=sliding_window,
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
        k_scale=k_scale, v_scale=v_scale, sliding_window=sliding_window,
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
    sliding_window: int | None = None,
) -> jax.Array:
    """Plain jnp: walk the page table a block of pages at a time with an online softmax
    (with a window, from the first block any token's window reaches)."""
    segment_ids, positions = _default_rows(q, lengths, segment_ids, positions)
    check_sliding_window(sliding_window)
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
    # First key each token sees: 0, or the start of its window.
    tok_lo = jnp.zeros_like(tok_len) if sliding_window is None else jnp.maximum(positions - sliding_window + 1, 0)
    first_block = jnp.min(jnp.where(tok_len > 0, tok_lo, jnp.iinfo(jnp.int32).max)) // (ppb * page_size)
    qg = q.reshape(t, kh, g, h).astype(jnp.float32) * scale

    def body(b, carry):
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
        mask = (kpos[None, :] < tok_len[:, None]) & (kpos[None, :] >= tok_lo[:, None])  # [T, C]
        s = jnp.where(mask[:, None, None, :], s, -jnp.inf)
        return online_softmax_step(carry, s, lambda p: jnp.einsum("tkgc,tckh->tkgh", p, vb))

    _, l, acc = jax.lax.fori_loop(jnp.minimum(first_block, n_blocks), n_blocks, body,
                                  online_softmax_init((t, kh, g), h))
    return online_softmax_result(l, acc).reshape(t, n, h).astype(q.dtype)


def online_softmax_init(shape: tuple[int, ...], head_dim: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Running max, sum and output ``(m, l, acc)`` of an online softmax over key blocks."""
    return (
        jnp.full(shape, -jnp.inf, jnp.float32),
        jnp.zeros(shape, jnp.float32),
        jnp.zeros((*shape, head_dim), jnp.float32),
    )


def online_softmax_step(carry, s: jax.Array, weighted_values) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Fold one block of masked scores ``s [..., C]`` (-inf where masked) into ``carry``;
    ``weighted_values(p)`` maps the block's weights ``p [..., C]`` to ``[..., H]``."""
    m, l, acc = carry
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    p = jnp.exp(s - m_safe[..., None])
    alpha = jnp.exp(jnp.where(jnp.isfinite(m), m, m_safe) - m_safe)
    return m_new, l * alpha + jnp.sum(p, axis=-1), acc * alpha[..., None] + weighted_values(p)


def online_softmax_result(l: jax.Array, acc: jax.Array) -> jax.Array:
    """``acc / l``, zeros where nothing was attended."""
    return jnp.where(l[..., None] > 0, acc / jnp.where(l > 0, l, 1.0)[..., None], 0.0)
