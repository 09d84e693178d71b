"""Scheduler: hand-checkable steps, then a randomized run against a fake paged "model"
(``scheduler_fakes.PagedEcho``: a request's output equals the cache-free reference only
if chunking, preemption and recompute fed the right tokens into the right pages).
Pipeline micro-batches are in ``test_scheduler_micro_batch.py``.
"""

from __future__ import annotations

import random
import re

import numpy as np
import pytest

from energon_jax.batch import pack
from energon_jax.request import Request, RequestStatus, SamplingParams
from energon_jax.scheduler import Scheduler, SchedulerConfig
from scheduler_fakes import EOS, VOCAB, make, next_token, reference, req, run_step, summary


# -- hand-checkable steps -------------------------------------------------------------------
def test_mixed_prefill_and_decode_with_chunking():
    cfg = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=8, max_model_len=32, page_size=4, num_pages=20)
    sched, buckets, model = make(cfg)
    a, b = req("a", 3, 3), req("b", 10, 2, first=40)
    sched.add(a)
    sched.add(b)
    plan, deltas = run_step(sched, buckets, model)
    assert summary(plan) == [("a", 0, 3, True), ("b", 0, 5, False)]  # budget 8: b gets a 5-token chunk
    assert plan.rows[1].token_ids == [40, 41, 42, 43, 44]
    assert a.pages == [1] and b.pages == [2, 3] and sched.pages_used == 3
    assert [(d.request.request_id, d.new_token_ids) for d in deltas] == [("a", [next_token(a.prompt_token_ids)])]
    assert (a.num_computed_tokens, b.num_computed_tokens) == (3, 5)

    plan, deltas = run_step(sched, buckets, model)
    assert summary(plan) == [("a", 3, 1, True), ("b", 5, 5, True)]  # a decodes, b's last chunk samples
    assert plan.rows[0].token_ids == a.output_token_ids[:1] and plan.rows[1].token_ids == [45, 46, 47, 48, 49]
    assert a.pages == [1] and b.pages == [2, 3, 4]  # a's 4th token fits page 1; b grows to 10 tokens
    plan = sched.schedule()
    assert summary(plan) == [("a", 4, 1, True), ("b", 10, 1, True)]
    assert a.pages == [1, 5] and b.pages == [2, 3, 4]  # a's 5th token opens a page; b's 11th fits page 4
    deltas = sched.update(plan, model.step(pack(plan, buckets), plan))
    assert [(d.request.request_id, d.finished, d.finish_reason) for d in deltas] == [
        ("a", True, "length"),
        ("b", True, "length"),
    ]
    assert sched.pages_used == 0 and not sched.has_work() and sched.schedule() is None
    for r in (a, b):
        assert (r.output_token_ids, r.finish_reason) == reference(r.prompt_token_ids, r.params)
        assert r.status is RequestStatus.FINISHED and r.pages == []


def test_long_prompt_chunks_and_budget_blocks_admission():
    cfg = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=8, max_model_len=64, page_size=4, num_pages=30)
    sched, buckets, model = make(cfg)
    long, short = req("long", 20, 2), req("short", 2, 1)
    sched.add(long)
    sched.add(short)
    steps = [summary(run_step(sched, buckets, model)[0]) for _ in range(4)]
    assert steps == [
        [("long", 0, 8, False)],  # the budget is spent: short waits
        [("long", 8, 8, False)],
        [("long", 16, 4, True), ("short", 0, 2, True)],
        [("long", 20, 1, True)],
    ]
    assert sched.pages_used == 0 and not sched.has_work()
    assert long.output_token_ids == reference(long.prompt_token_ids, long.params)[0]


def test_max_num_seqs_and_fcfs_page_blocking():
    cfg = SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=32, max_model_len=32, page_size=4, num_pages=6)
    sched, buckets, model = make(cfg)
    for r in [req("a", 4, 4), req("b", 4, 4), req("c", 4, 4)]:
        sched.add(r)
    plan, _ = run_step(sched, buckets, model)
    assert [r.request.request_id for r in plan.rows] == ["a", "b"] and sched.num_waiting == 1
    # 5 usable pages: a big request at the head of the queue blocks smaller ones behind it.
    cfg = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=32, page_size=4, num_pages=6)
    sched, buckets, model = make(cfg)
    for r in [req("a", 8, 2), req("big", 16, 2), req("small", 2, 2)]:
        sched.add(r)
    plan, _ = run_step(sched, buckets, model)
    assert [r.request.request_id for r in plan.rows] == ["a"] and [r.request_id for r in sched.waiting] == ["big", "small"]


def test_preemption_takes_newest_frees_pages_and_recomputes_exactly():
    # 6 usable pages of 2 tokens; three 4-token prompts take all of them in step 0.
    cfg = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16, max_model_len=16, page_size=2, num_pages=7)
    sched, buckets, model = make(cfg)
    a, b, c = req("a", 4, 6), req("b", 4, 6, first=30), req("c", 4, 6, first=60)
    for r in (a, b, c):
        sched.add(r)
    plan, _ = run_step(sched, buckets, model)
    assert (a.pages, b.pages, c.pages) == ([1, 2], [3, 4], [5, 6]) and sched.allocator.num_free == 0
    # Step 1: a needs a 3rd page: c (newest) is preempted and its pages go to a and b.
    plan, _ = run_step(sched, buckets, model)
    assert summary(plan) == [("a", 4, 1, True), ("b", 4, 1, True)] and plan.preempted == [c]
    assert (a.pages, b.pages, c.pages) == ([1, 2, 5], [3, 4, 6], [])
    assert c.status is RequestStatus.PREEMPTED and c.num_computed_tokens == 0 and len(c.output_token_ids) == 1
    assert [r.request_id for r in sched.waiting] == ["c"] and sched.num_preemptions == 1
    # Step 2: a and b decode in their 3rd page; c cannot come back (no free page).
    plan, _ = run_step(sched, buckets, model)
    assert summary(plan) == [("a", 5, 1, True), ("b", 5, 1, True)] and plan.preempted == []
    # Step 3: a needs a 4th page: b is now the newest running request.
    plan, _ = run_step(sched, buckets, model)
    assert summary(plan) == [("a", 6, 1, True)] and plan.preempted == [b]
    assert a.pages == [1, 2, 5, 3] and [r.request_id for r in sched.waiting] == ["b", "c"]
    # Run to the end: the preempted ones recompute prompt + generated tokens, positions from 0.
    recomputes = []
    while sched.has_work():
        plan, _ = run_step(sched, buckets, model)
        recomputes += [(r.request.request_id, r.start_pos, r.num_tokens, r.sample) for r in plan.rows if r.start_pos == 0]
        for r in plan.rows:
            assert r.token_ids == r.request.tokens(r.start_pos, r.start_pos + r.num_tokens)
    assert recomputes == [("b", 0, 7, True), ("c", 0, 5, True)]
    for r in (a, b, c):
        assert (r.output_token_ids, r.finish_reason) == reference(r.prompt_token_ids, r.params)
    assert sched.allocator.num_free == 6 and sched.pages_used == 0


def test_preempting_itself_when_it_is_the_newest():
    cfg = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16, max_model_len=16, page_size=2, num_pages=5)
    sched, buckets, model = make(cfg)
    a, b = req("a", 4, 3), req("b", 2, 4, first=50)
    sched.add(a)
    sched.add(b)
    run_step(sched, buckets, model)  # a: pages 1,2; b: page 3 (its 2 tokens); 1 page free
    plan, _ = run_step(sched, buckets, model)  # a takes page 4 for position 4; b needs a page for position 2
    assert summary(plan) == [("a", 4, 1, True)] and plan.preempted == [b] and a.pages == [1, 2, 4]
    while sched.has_work():
        run_step(sched, buckets, model)
    for r in (a, b):
        assert r.output_token_ids == reference(r.prompt_token_ids, r.params)[0]
    assert sched.pages_used == 0


def test_stop_conditions_and_logprobs():
    cfg = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16, max_model_len=12, page_size=4, num_pages=12)
    sched, buckets, model = make(cfg)
    eos = Request("eos", [10, 11], SamplingParams(max_tokens=5))
    ign = Request("ign", [10, 11], SamplingParams(max_tokens=3, ignore_eos=True, logprobs=2))
    stp = Request("stp", [10, 11], SamplingParams(max_tokens=5, stop_token_ids=[4]))
    for r in (eos, ign, stp):
        sched.add(r)
    run_step(sched, buckets, model)
    model.forced.update({"eos": EOS, "ign": EOS, "stp": 4})
    plan, deltas = run_step(sched, buckets, model)
    got = {d.request.request_id: (d.new_token_ids, d.finished, d.finish_reason) for d in deltas}
    assert got == {"eos": ([EOS], True, "stop"), "ign": ([EOS], False, None), "stp": ([4], True, "stop")}
    assert eos.output_token_ids[-1] == EOS and eos.pages == [] and stp.pages == []
    d_ign = next(d for d in deltas if d.request is ign)
    # top-2 of the fake (ids 0, 1 with logprobs 0, -1) plus the sampled id's own logprob
    assert d_ign.new_logprobs == [{0: 0.0, 1: -1.0, EOS: float(np.float32(-EOS) / 100)}]
    assert len(ign.output_logprobs) == 2 and ign.output_logprobs[1] == d_ign.new_logprobs[0]
    run_step(sched, buckets, model)
    zero = Request("zero", [10], SamplingParams(max_tokens=1, logprobs=0))
    sched.add(zero)
    assert run_step(sched, buckets, model)[1][-1].new_logprobs == [{zero.output_token_ids[0]: pytest.approx(
        -zero.output_token_ids[0] / 100)}]
    assert ign.finish_reason == "length" and len(ign.output_token_ids) == 3 and sched.pages_used == 0
    assert ign.first_token_time is not None and ign.finish_time >= ign.first_token_time


def test_abort_and_finish_free_pages_at_once():
    cfg = SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=16, max_model_len=32, page_size=4, num_pages=20)
    sched, buckets, model = make(cfg)
    a, b, c = req("a", 6, 8), req("b", 5, 8), req("c", 3, 8)
    for r in (a, b, c):
        sched.add(r)
    run_step(sched, buckets, model)
    assert sched.pages_used == 4 and sched.num_waiting == 1
    assert sched.abort("a") is a and a.pages == [] and a.finish_reason == "abort" and sched.pages_used == 2
    assert sched.abort("a") is None and sched.abort("nope") is None
    assert sched.abort("c") is c and sched.num_waiting == 0 and c.status is RequestStatus.FINISHED
    assert sched.finish("b", "stop") is b and b.finish_reason == "stop" and sched.pages_used == 0
    assert not sched.has_work() and sched.allocator.num_free == 19


def test_abort_between_schedule_and_update_skips_the_row():
    cfg = SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=16, max_model_len=32, page_size=4, num_pages=20)
    sched, buckets, model = make(cfg)
    a, b = req("a", 6, 8), req("b", 5, 8)
    sched.add(a)
    sched.add(b)
    plan = sched.schedule()
    batch = pack(plan, buckets)
    sched.abort("a")
    deltas = sched.update(plan, model.step(batch, plan))
    assert [d.request.request_id for d in deltas] == ["b"] and a.output_token_ids == [] and sched.pages_used == 2


def test_static_batching_runs_a_batch_to_completion():
    cfg = SchedulerConfig(
        max_num_seqs=2, max_num_batched_tokens=16, max_model_len=32, page_size=4, num_pages=20, static_batching=True
    )
    sched, buckets, model = make(cfg)
    for r in [req("a", 3, 1), req("b", 3, 4), req("c", 3, 1)]:
        sched.add(r)
    rows = []
    while sched.has_work():
        plan, _ = run_step(sched, buckets, model)
        rows.append([r.request.request_id for r in plan.rows])
    # a finishes after step 0, but c does not join until b is done.
    assert rows == [["a", "b"], ["b"], ["b"], ["b"], ["c"]]
    # The same workload with continuous batching lets c join at once.
    sched, buckets, model = make(SchedulerConfig(**{**cfg.__dict__, "static_batching": False}))
    for r in [req("a", 3, 1), req("b", 3, 4), req("c", 3, 1)]:
        sched.add(r)
    rows = []
    while sched.has_work():
        plan, _ = run_step(sched, buckets, model)
        rows.append([r.request.request_id for r in plan.rows])
    assert rows == [["a", "b"], ["b", "c"], ["b"], ["b"]]


def test_rejections_and_config_errors():
    cfg = SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=8, max_model_len=32, page_size=4, num_pages=5)
    sched = Scheduler(cfg)
    with pytest.raises(ValueError, match=re.escape("prompt length 30 + max_tokens=3 = 33 must be <= max_model_len=32")):
        sched.add(req("x", 30, 3))
    # 4 usable pages hold 16 tokens; 17 + 3 - 1 = 19 cached tokens need 5.
    with pytest.raises(ValueError, match=re.escape("needs 5 KV pages (19 tokens, page_size=4) but the pool holds 4")):
        sched.add(req("y", 17, 3))
    sched.add(req("z", 14, 3))  # 16 cached tokens: exactly the pool
    with pytest.raises(ValueError, match=re.escape("request_id='z' is already in use")):
        sched.add(req("z", 2, 1))
    assert sched.num_waiting == 1
    bad = [
        (dict(max_num_seqs=0), "max_num_seqs=0 must be >= 1"),
        (dict(max_num_batched_tokens=1), "max_num_batched_tokens=1 must be >= max_num_seqs=2"),
        (dict(num_pages=1), "num_pages=1 must be >= 2"),
        (dict(max_model_len=1), "max_model_len=1 must be >= 2"),
        (dict(page_size=0), "page_size=0 must be >= 1"),
    ]
    for change, message in bad:
        with pytest.raises(ValueError, match=re.escape(message)):
            SchedulerConfig(**{**cfg.__dict__, **change})


def test_at_most_one_plan_in_flight():
    sched, buckets, model = make(
        SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=8, max_model_len=32, page_size=4, num_pages=5)
    )
    sched.add(req("a", 2, 3))
    plan = sched.schedule()
    ahead = sched.schedule()  # planned while `plan` runs: a placeholder for the token `plan` samples
    assert ahead.ahead and summary(ahead) == [("a", 2, 1, True)] and ahead.rows[0].prev_row == 0
    with pytest.raises(RuntimeError, match="two plans in flight"):
        sched.schedule()
    with pytest.raises(RuntimeError, match="oldest"):
        sched.update(ahead, model.step(pack(plan, buckets), plan))
    sched.update(plan, model.step(pack(plan, buckets), plan))
    third = sched.schedule()  # `ahead` samples a's 2nd token: the 3rd (its last) is planned after it
    assert summary(third) == [("a", 3, 1, True)] and third.rows[0].prev_row == 0 and ahead.rows[0].request.num_computed_tokens == 4


# -- randomized run ------------------------------------------------------------------------
def check_invariants(sched: Scheduler, plan) -> None:
    cfg = sched.config
    alloc = sched.allocator
    owned = [p for r in sched.running for p in r.pages]
    assert len(owned) == len(set(owned)), "a page is owned twice"
    assert 0 not in owned and len(owned) == alloc.num_used == sched.pages_used
    assert alloc.num_free + alloc.num_used == cfg.num_pages - 1
    assert all(not r.pages and r.num_computed_tokens == 0 for r in sched.waiting)
    # Pages hold exactly the tokens computed (after update) or being computed (a planned row).
    fed = {} if plan is None else {id(r.request): r.start_pos + r.num_tokens for r in plan.rows}
    for r in sched.running:
        assert len(r.pages) == alloc.pages_needed(fed.get(id(r), r.num_computed_tokens))
    if plan is None:  # only the newest running request may still be in the middle of its prefill
        assert all(r.num_tokens - r.num_computed_tokens == 1 for r in sched.running[:-1])
    else:
        assert plan.num_tokens <= cfg.max_num_batched_tokens and plan.num_rows <= cfg.max_num_seqs
        ids = [r.request.request_id for r in plan.rows]
        assert len(ids) == len(set(ids))


@pytest.mark.parametrize("seed, static", [(s, s % 3 == 2) for s in range(9)])
def test_random_workload_invariants(seed, static):
    rng = random.Random(seed)
    cfg = SchedulerConfig(
        max_num_seqs=rng.choice([3, 4, 8]),
        max_num_batched_tokens=rng.choice([8, 12, 32]),
        max_model_len=48,
        page_size=rng.choice([2, 4, 5]),
        num_pages=rng.choice([14, 20, 40]),
        static_batching=static,
    )
    cfg = SchedulerConfig(**{**cfg.__dict__, "max_num_batched_tokens": max(cfg.max_num_batched_tokens, cfg.max_num_seqs)})
    sched, buckets, model = make(cfg)
    capacity = (cfg.num_pages - 1) * cfg.page_size + 1
    requests: dict[str, Request] = {}
    added_at: dict[str, int] = {}
    first_run: dict[str, int] = {}
    batch_members: set[str] = set()
    batch_start = -1
    aborted: set[str] = set()
    stopped: set[str] = set()
    step = 0
    while len(requests) < 40 or sched.has_work():
        for _ in range(rng.choice([0, 0, 1, 2, 3]) if len(requests) < 40 else 0):
            n = rng.randint(1, 30)
            m = rng.randint(1, min(16, cfg.max_model_len - n, capacity - n) if n < capacity else 1)
            stops = (rng.randrange(5, VOCAB),) if rng.random() < 0.2 else ()
            r = Request(f"r{len(requests)}", [rng.randrange(VOCAB) for _ in range(n)],
                        SamplingParams(max_tokens=m, temperature=0.0, stop_token_ids=stops,
                                       ignore_eos=rng.random() < 0.5))
            try:
                sched.add(r)
            except ValueError:
                assert r.max_num_tokens > cfg.max_model_len or sched.allocator.pages_needed(r.max_num_tokens - 1) > cfg.num_pages - 1
                continue
            requests[r.request_id] = r
            added_at[r.request_id] = step
        if requests and rng.random() < 0.05:
            victim = rng.choice(list(requests))
            if sched.abort(victim) is not None:
                aborted.add(victim)
        plan = sched.schedule()
        check_invariants(sched, plan)
        if plan is not None:
            for row in plan.rows:
                r = row.request
                assert row.start_pos + row.num_tokens == r.num_computed_tokens  # advanced when scheduled
                assert row.token_ids == r.tokens(row.start_pos, row.start_pos + row.num_tokens)
                if r.request_id not in first_run:
                    first_run[r.request_id] = step
                    if static:  # no one joins a running batch
                        if not any(requests[m].status is not RequestStatus.FINISHED for m in batch_members - {r.request_id}):
                            batch_members, batch_start = set(), step
                        assert added_at[r.request_id] <= batch_start
                        batch_members.add(r.request_id)
                        assert len(batch_members) <= cfg.max_num_seqs
            sched.update(plan, model.step(pack(plan, buckets), plan))
            check_invariants(sched, None)
            if sched.running and rng.random() < 0.03:  # the engine matched a stop string
                victim = rng.choice(sched.running)
                assert sched.finish(victim.request_id, "stop") is victim and not victim.pages
                stopped.add(victim.request_id)
                check_invariants(sched, None)
        step += 1
        assert step < 5000
    assert sched.allocator.num_free == cfg.num_pages - 1 and sched.pages_used == 0
    for rid, r in requests.items():
        assert r.status is RequestStatus.FINISHED and not r.pages
        want, reason = reference(r.prompt_token_ids, r.params, set() if r.params.ignore_eos else {EOS})
        if rid in aborted or rid in stopped:
            assert r.finish_reason == ("abort" if rid in aborted else "stop")
            assert r.output_token_ids == want[: len(r.output_token_ids)]
        else:
            assert (r.output_token_ids, r.finish_reason) == (want, reason)
    assert sched.num_preemptions > 0 or cfg.num_pages == 40  # the small pools must have preempted
