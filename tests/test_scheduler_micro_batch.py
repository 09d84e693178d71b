"""Scheduler micro-batches for the non-blocking pipeline (``schedule_micro_batch``): even
groups, requests in flight never planned twice, preempted or re-paged; checked against
the fake paged model of ``scheduler_fakes``."""

from __future__ import annotations

import random
from collections import deque

import pytest

from energon_jax.batch import pack
from energon_jax.request import Request, RequestStatus, SamplingParams
from energon_jax.scheduler import SchedulerConfig
from scheduler_fakes import EOS, VOCAB, make, reference, req, summary


def test_micro_batches_form_even_groups_and_skip_requests_in_flight():
    sched, buckets, model = make(
        SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16, max_model_len=32, page_size=4, num_pages=20)
    )
    for rid in "abcde":
        sched.add(req(rid, 2, 3))
    first = sched.schedule_micro_batch(2)  # cap = ceil(min(4, 0 running + 5 waiting) / 2) = 2 rows
    second = sched.schedule_micro_batch(2)  # a and b are in flight: c and d join the next group
    assert [r[0] for r in summary(first)] == ["a", "b"] and [r[0] for r in summary(second)] == ["c", "d"]
    with pytest.raises(RuntimeError, match="2 plans in flight for num_groups=2"):
        sched.schedule_micro_batch(2)
    sched.update(first, model.step(pack(first, buckets), first))
    third = sched.schedule_micro_batch(2)  # e waits (max_num_seqs=4); a and b are back
    assert summary(third) == [("a", 2, 1, True), ("b", 2, 1, True)]
    with pytest.raises(ValueError, match="num_groups=0 must be an integer >= 1"):
        sched.schedule_micro_batch(0)


@pytest.mark.parametrize("seed", range(6))
def test_random_micro_batch_pipeline(seed):
    """pp micro-batches in flight (a plan leaves pp - 1 ticks after it entered, as in
    PipelineRunner.tick); aborts hit requests in flight; small pools preempt. Every output
    equals the reference, no request is planned twice at once, and nothing in flight is
    ever preempted or re-paged."""
    rng = random.Random(seed)
    pp = rng.choice([2, 3, 4])
    cfg = SchedulerConfig(max_num_seqs=rng.choice([4, 6, 8]), max_num_batched_tokens=rng.choice([8, 16, 32]),
                          max_model_len=48, page_size=rng.choice([2, 4]), num_pages=rng.choice([16, 24, 60]))
    sched, buckets, model = make(cfg)
    pipeline: deque = deque()  # (plan, sampled, tick it entered), oldest first
    requests: dict[str, Request] = {}
    aborted: set[str] = set()
    most_in_flight, tick = 0, 0
    while len(requests) < 30 or sched.has_work() or pipeline:
        for _ in range(rng.choice([0, 0, 1, 2]) if len(requests) < 30 else 0):
            n = rng.randint(1, 20)
            r = Request(f"r{len(requests)}", [rng.randrange(VOCAB) for _ in range(n)],
                        SamplingParams(max_tokens=rng.randint(1, 12), temperature=0.0, ignore_eos=rng.random() < 0.5))
            sched.add(r)
            requests[r.request_id] = r
        in_flight = {id(row.request): row.request for p, _, _ in pipeline for row in p.rows}
        if in_flight and rng.random() < 0.05:  # abort a request whose micro-batch is inside
            victim = rng.choice([r for r in in_flight.values() if not r.finished] or [None])
            if victim is not None:
                assert sched.abort(victim.request_id) is victim and not victim.pages
                aborted.add(victim.request_id)
        before = {k: (list(r.pages), r.num_computed_tokens, r.status) for k, r in in_flight.items() if not r.finished}
        plan = sched.schedule_micro_batch(pp)
        after = {k: (list(in_flight[k].pages), in_flight[k].num_computed_tokens, in_flight[k].status) for k in before}
        assert after == before  # requests in flight: untouched (no preemption, no new pages)
        if plan is not None:
            assert not any(id(row.request) in in_flight for row in plan.rows)
            cap = -(-min(cfg.max_num_seqs, sched.num_running + sched.num_waiting) // pp)
            assert plan.num_rows <= cap and plan.num_tokens <= cfg.max_num_batched_tokens
            pipeline.append((plan, model.step(pack(plan, buckets), plan), tick))
        most_in_flight = max(most_in_flight, len(pipeline))
        assert len(pipeline) <= pp
        if pipeline and tick - pipeline[0][2] == pp - 1:  # the oldest leaves the last stage
            done, sampled, _ = pipeline.popleft()
            sched.update(done, sampled)
        tick += 1
        assert tick < 5000
    assert most_in_flight == pp
    assert sched.num_preemptions > 0 or cfg.num_pages == 60  # the small pools must have preempted
    assert sched.allocator.num_free == cfg.num_pages - 1 and sched.pages_used == 0
    for rid, r in requests.items():
        assert r.status is RequestStatus.FINISHED and not r.pages
        want, reason = reference(r.prompt_token_ids, r.params, set() if r.params.ignore_eos else {EOS})
        if rid in aborted:
            assert r.finish_reason == "abort" and r.output_token_ids == want[: len(r.output_token_ids)]
        else:
            assert (r.output_token_ids, r.finish_reason) == (want, reason)
