"""What the scheduler hands out and takes back: its config, a step's plan and rows, a request's delta.

Kept apart from ``scheduler.py`` (which decides the rows) because the step loop, the
packer (``batch.py``), the runners and the disaggregated engine read these types without
needing the scheduling logic.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

from energon_jax.request import Request

PLACEHOLDER = -1  # a fed token that the previous, still running step samples (see ``prev_row``)


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int  # rows (requests) in one step
    max_num_batched_tokens: int  # token budget of one step
    max_model_len: int  # prompt + output tokens of one request
    page_size: int  # tokens per KV page
    num_pages: int  # pages in the pool, the null page 0 included
    static_batching: bool = False  # benchmark baseline: admit a batch, run it to completion
    enable_prefix_caching: bool = False  # reuse published KV pages of identical prefixes (kv_cache.py)
    prefix_cache_seed: int | None = None  # pins the hash chain's root (None: random per scheduler)
    # Every layer attends within this many latest positions (ModelConfig.kv_window): pages
    # behind every future query's window are released in update (sliding_window.py). None: keep all.
    attention_window: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "page_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len={self.max_model_len} must be >= 2")
        if self.num_pages < 2:
            raise ValueError(f"num_pages={self.num_pages} must be >= 2 (page 0 is the reserved null page)")
        if self.attention_window is not None and self.attention_window < 1:
            raise ValueError(f"attention_window={self.attention_window} must be >= 1 (or None)")
        if self.max_num_batched_tokens < self.max_num_seqs:  # every running request must decode each step
            raise ValueError(
                f"max_num_batched_tokens={self.max_num_batched_tokens} must be >= max_num_seqs={self.max_num_seqs}"
            )


class ScheduledRow(NamedTuple):
    """One request's share of a step: feed ``token_ids`` at positions ``start_pos, start_pos + 1, ...``.

    (A NamedTuple rather than a frozen dataclass: one is built per row per step, and a
    frozen dataclass costs about 3x more to construct, which 256 rows feel.)"""

    request: Request
    token_ids: list[int]
    start_pos: int  # == request.num_computed_tokens before the step
    sample: bool  # the last fed token is the last known one: sample the next token from its logits
    # Planned ahead: the one fed token is PLACEHOLDER, sampled by row ``prev_row`` of the
    # plan still in flight; -1 when every fed token is known.
    prev_row: int = -1

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


def feed_row(req: Request, n: int) -> ScheduledRow:
    """The row that feeds ``req``'s next ``n`` known tokens (a running one's, or one just admitted)."""
    start = req.num_computed_tokens
    req.num_computed_tokens = start + n  # advanced now, so that a plan made ahead starts after it
    return ScheduledRow(req, req.tokens(start, start + n), start, start + n == req.num_tokens)


@dataclasses.dataclass(frozen=True)
class StepPlan:
    rows: list[ScheduledRow]  # row order of the packed batch
    preempted: list[Request] = dataclasses.field(default_factory=list)  # taken off the running set this step
    ahead: bool = False  # planned while the previous plan was in flight (it may hold placeholders)

    @functools.cached_property
    def num_tokens(self) -> int:
        return sum(map(len, (r.token_ids for r in self.rows)))

    @property
    def num_rows(self) -> int:
        return len(self.rows)


class RequestDelta(NamedTuple):
    """What one step did to one request (only rows that sampled, or requests that finished).

    (A NamedTuple for the same reason as ``ScheduledRow``: one per row per step.)"""

    request: Request
    new_token_ids: list[int]
    new_logprobs: list[dict[int, float]] | None  # one dict per new token, when the request asked
    finished: bool
    finish_reason: str | None
