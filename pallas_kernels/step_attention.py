"""Attention of one serving step over the page pool: the one entry point models call.

A step packs its rows end to end (``energon_jax/batch.py``): row ``r``'s query tokens are
contiguous, rows in order from token 0, padding (segment -1) at the end, and each row's
tokens are the last ones of its context (``positions = context_len - q_len + i``). That is
exactly the ragged layout, so ``cu_q_lens`` follows from the segment ids by a count.

Which implementation runs (``implementation``, from the model config's
``attention_implementation``; ``"auto"`` resolves as in ``dispatch``):

- ``"pallas"``: ``ragged_paged_attention``, decode rows and prefill chunks in one kernel
  (Mosaic on TPU, Triton on GPU; interpret mode on CPU, for tests);
- ``"xla"``: ``paged_attention_xla``, the CPU default;
- ``"reference"``: ``paged_attention_reference``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.dispatch import resolve_implementation
from pallas_kernels.page_layout import KVPages, PagedAttentionMetadata
from pallas_kernels.paged_attention import paged_attention
from pallas_kernels.ragged_paged_attention import ragged_paged_attention


def ragged_rows(segment_ids: jax.Array, num_rows: int) -> tuple[jax.Array, jax.Array]:
    """``(cu_q_lens [B + 1], num_rows [1])`` of a step packed by ``batch.pack`` (rows end to end)."""
    valid = segment_ids >= 0
    counts = jnp.zeros(num_rows, jnp.int32).at[jnp.where(valid, segment_ids, num_rows)].add(1, mode="drop")
    cu = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(counts).astype(jnp.int32)])
    return cu, jnp.full((1,), num_rows, jnp.int32)


def step_attention(
    q: jax.Array,  # [T, N, H]
    pages: KVPages,
    meta: PagedAttentionMetadata,
    *,
    segment_ids: jax.Array,  # [T], -1 for padding
    positions: jax.Array,  # [T]
    sm_scale: float | None = None,
    sliding_window: int | None = None,
    implementation: str = "auto",
) -> jax.Array:
    """``[T, N, H]``: the step's queries over the pool (their own K/V already written);
    ``sliding_window=W`` limits each query to its ``W`` latest positions (None: all)."""
    impl = resolve_implementation(implementation, has_xla=True)
    if impl == "pallas":
        cu_q_lens, num_rows = ragged_rows(segment_ids, meta.context_lens.shape[0])
        return ragged_paged_attention(
            q, pages.k, pages.v, meta.page_tables, meta.context_lens, cu_q_lens, num_rows, sm_scale=sm_scale,
            sliding_window=sliding_window, k_scales=pages.k_scale, v_scales=pages.v_scale, implementation="pallas",
        )
    return paged_attention(
        q, pages.k, pages.v, meta.page_tables, meta.context_lens, segment_ids=segment_ids, positions=positions,
        sm_scale=sm_scale, k_scale=pages.k_scale, v_scale=pages.v_scale, sliding_window=sliding_window,
        implementation=impl,
    )
