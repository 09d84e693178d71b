"""A fake paged "model" and reference for the scheduler tests.

``PagedEcho`` keeps its own token store indexed by KV slot: every step it writes each fed
token to the slot ``batch.pack`` gave it, then, for every row, reads the row's whole
context back through the page table and answers ``next_token(context)``. So a request's
output equals ``reference(prompt)`` (the same rule applied without any cache) only if
chunking, preemption and recompute fed exactly the right tokens at the right positions
into pages that nobody else overwrote.
"""

from __future__ import annotations

import numpy as np

from energon_jax.batch import Buckets, StepBatch, pack
from energon_jax.request import Request, SamplingParams
from energon_jax.sampling import SampledTokens
from energon_jax.scheduler import Scheduler, SchedulerConfig

VOCAB = 97
EOS = 3


def next_token(context: list[int]) -> int:
    """The fake model's rule: depends on every token of the context and on its length."""
    h = len(context)
    for i, t in enumerate(context):
        h = (h * 31 + (i + 1) * t) % 1_000_003
    return 5 + h % (VOCAB - 5)  # never EOS or the small ids tests use as stop tokens


def reference(prompt: list[int], params: SamplingParams, stop: set[int] = frozenset()) -> tuple[list[int], str]:
    out: list[int] = []
    while True:
        t = next_token(prompt + out)
        out.append(t)
        if t in stop or t in params.stop_token_ids:
            return out, "stop"
        if len(out) == params.max_tokens:
            return out, "length"


class PagedEcho:
    """A fake model over a simulated page pool (see the module docstring)."""

    def __init__(self, num_pages: int, page_size: int) -> None:
        self.page_size = page_size
        self.tok = np.full(num_pages * page_size, -1, np.int64)  # token stored in each slot
        self.pos = np.full(num_pages * page_size, -1, np.int64)  # its position
        self.forced: dict[str, int] = {}  # request id -> token to emit next (for stop-token tests)

    def step(self, batch: StepBatch, plan) -> SampledTokens:
        s = self.page_size
        seg, slots = batch.segment_ids, batch.attn.slot_mapping
        real = seg >= 0
        assert np.all(slots[~real] == 0) and np.all(batch.positions[~real] == 0)
        self.tok[slots[real]] = batch.input_ids[real]
        self.pos[slots[real]] = batch.positions[real]
        b = batch.logits_indices.shape[0]
        ids = np.zeros(b, np.int32)
        for r in range(b):
            ctx = int(batch.attn.context_lens[r])
            if ctx == 0:
                continue
            p = np.arange(ctx)
            sl = batch.attn.page_tables[r][p // s] * s + p % s
            assert np.all(self.pos[sl] == p), "a page was overwritten or a position is wrong"
            assert batch.positions[batch.logits_indices[r]] == ctx - 1
            rid = plan.rows[r].request.request_id
            ids[r] = self.forced.pop(rid) if rid in self.forced and plan.rows[r].sample else next_token(list(self.tok[sl]))
        top = np.tile(np.arange(20, dtype=np.int32), (b, 1))
        return SampledTokens(ids, -ids.astype(np.float32) / 100, top, -top.astype(np.float32))


def make(cfg: SchedulerConfig, eos=(EOS,)) -> tuple[Scheduler, Buckets, PagedEcho]:
    buckets = Buckets.create(
        max_num_batched_tokens=cfg.max_num_batched_tokens,
        max_num_seqs=cfg.max_num_seqs,
        max_model_len=cfg.max_model_len,
        page_size=cfg.page_size,
        min_tokens=4,
    )
    return Scheduler(cfg, eos_token_ids=eos), buckets, PagedEcho(cfg.num_pages, cfg.page_size)


def run_step(sched: Scheduler, buckets: Buckets, model: PagedEcho):
    plan = sched.schedule()
    if plan is None:
        return None, []
    return plan, sched.update(plan, model.step(pack(plan, buckets), plan))


def summary(plan) -> list[tuple[str, int, int, bool]]:
    return [(r.request.request_id, r.start_pos, r.num_tokens, r.sample) for r in plan.rows]


GREEDY = dict(temperature=0.0, ignore_eos=True)


def req(rid: str, n: int, max_tokens: int, first: int = 10, **kw) -> Request:
    return Request(rid, list(range(first, first + n)), SamplingParams(max_tokens=max_tokens, **{**GREEDY, **kw}))
