"""Running one scheduled step as two device calls: decode rows, then prefill rows.

Why: attention over the page pool costs, in the jnp reference that CPUs run
(``paged_attention_reference``), about ``tokens of the step x longest context in the
step``: every query token gathers its own copy of the context blocks. A step that mixes
a long prefill chunk (many tokens, short context) with decode rows (one token each,
long contexts) then pays the product of the two. Split in two calls, the decode part
costs ``rows x their contexts`` and the prefill part ``chunk x its context``; the price
is one more pass over the weights, small next to the saving. The Pallas kernels give
each query token its own programs, which read only that token's visible context: a
mixed step costs the sum of the tokens' contexts, not the product, so on GPU/TPU one
fused call is better and the engine does not split (``Engine(split_prefill_decode=...)``
overrides the choice).

Rows stay independent, so each row's tokens are the same either way; the scheduler
sees one ``SampledTokens`` in the plan's row order, as if the step had been one call.
A split step's ids sit in two device buffers, so the engine does not plan ahead of it
(placeholders index one buffer in the plan's row order); it may plan ahead of a step
whose plan is then split: the placeholders are all in the decode part.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from energon_jax.sampling import SampledTokens


def split_plan(plan) -> list[tuple[object, list[int]]]:
    """``[(sub_plan, row indices in plan)]``: one part, or decode rows then prefill rows."""
    if plan.num_tokens == plan.num_rows:  # one token per row: decode only (every steady step)
        return [(plan, list(range(len(plan.rows))))]
    decode = [i for i, row in enumerate(plan.rows) if len(row.token_ids) == 1]
    if not decode:
        return [(plan, list(range(len(plan.rows))))]
    prefill = [i for i, row in enumerate(plan.rows) if len(row.token_ids) > 1]
    return [
        (dataclasses.replace(plan, rows=[plan.rows[i] for i in idx], preempted=[]), idx)
        for idx in (decode, prefill)
    ]


def merge_sampled(parts: list[tuple[list[int], SampledTokens]], num_rows: int) -> SampledTokens:
    """One ``SampledTokens`` in the full plan's row order from the parts' results."""
    if len(parts) == 1:
        return parts[0][1]
    first = parts[0][1]
    token_ids = np.zeros(num_rows, first.token_ids.dtype)
    logprobs = np.zeros(num_rows, first.logprobs.dtype)
    top_ids = np.zeros((num_rows, first.top_ids.shape[1]), first.top_ids.dtype)
    top_logprobs = np.zeros((num_rows, first.top_logprobs.shape[1]), first.top_logprobs.dtype)
    for idx, s in parts:
        n = len(idx)
        token_ids[idx] = s.token_ids[:n]
        logprobs[idx] = s.logprobs[:n]
        top_ids[idx] = s.top_ids[:n]
        top_logprobs[idx] = s.top_logprobs[:n]
    return SampledTokens(token_ids, logprobs, top_ids, top_logprobs)
