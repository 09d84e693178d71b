"""Automatic prefix caching on the host: page hashes, refcounted pages, LRU eviction,
cache-aware admission.

The hash chain (parent, tokens, salt, seed), the allocator's reference counts and eviction
order, the scheduler's reuse limits (never the last known token), in-batch deferral,
prefix-aware ordering, and a randomized mix of finish, abort and preemption against the
fake paged model of ``scheduler_fakes`` (in three modes: one plan at a time, one plan
ahead, pipeline micro-batches) that checks after every step that reference counts equal
the requests holding each page, that only published pages are shared, that no plan reads
a page another request's plan still in flight is writing, and that every page comes back.
The fake model reads each row's context back through its page table, so a wrong hit gives
a wrong token. The engine-level tests are in ``test_prefix_cache_engine.py``.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from energon_jax import SamplingParams
from energon_jax.batch import pack
from energon_jax.kv_cache import PageAllocator, block_hash, prefix_cache_root
from energon_jax.request import Request, RequestStatus
from energon_jax.scheduler import SchedulerConfig
from scheduler_fakes import EOS, VOCAB, make, reference, summary

PS = 4  # page size of every test here


def _cfg(**kw) -> SchedulerConfig:
    base = dict(max_num_seqs=4, max_num_batched_tokens=32, max_model_len=64, page_size=PS, num_pages=40,
                enable_prefix_caching=True, prefix_cache_seed=0)
    return SchedulerConfig(**{**base, **kw})


def _req(rid: str, prompt: list[int], max_tokens: int = 3, salt: str | None = None) -> Request:
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
                   cache_salt=salt)


def _run(sched, buckets, model, max_steps: int = 500) -> None:
    for _ in range(max_steps):
        plan = sched.schedule()
        if plan is None:
            return
        sched.update(plan, model.step(pack(plan, buckets), plan))
    raise AssertionError("did not finish")


# -- hashes and the allocator ---------------------------------------------------------------
def test_block_hash_chains_parent_tokens_and_extra_keys():
    root = prefix_cache_root(7)
    assert root == prefix_cache_root(7) != prefix_cache_root(8)
    assert prefix_cache_root(None) != prefix_cache_root(None)  # random per scheduler unless seeded
    h1 = block_hash(root, [1, 2, 3, 4])
    assert h1 == block_hash(root, [1, 2, 3, 4]) and len(h1) == 32
    # The same page of tokens under another parent, another salt or other tokens: another hash.
    assert len({h1, block_hash(block_hash(root, [9, 9, 9, 9]), [1, 2, 3, 4]), block_hash(root, [1, 2, 3, 4], b"s"),
                block_hash(root, [1, 2, 3, 5]), block_hash(root, [1, 2, 3])}) == 5
    # Length-prefixed: tokens and extra keys cannot be traded for one another.
    assert block_hash(root, [1], b"") != block_hash(root, [], np.asarray([1], np.int64).tobytes())


def test_allocator_refcounts_lru_and_tail_first_eviction():
    a = PageAllocator(8, page_size=PS)  # 7 usable pages
    chain = a.allocate(3)
    assert chain == [1, 2, 3]
    for i, p in enumerate(chain):
        assert a.register(p, bytes([i]))
    assert not a.register(4 if a.is_allocated(4) else chain[0], bytes([0]))  # already published
    assert a.num_cached == 3 and a.num_used == 3 and a.num_free == 4
    assert a.match([bytes([0]), bytes([1]), bytes([7])]) == [1, 2]
    a.acquire([1, 2])  # a second request hits the first two pages
    assert (a.ref_count(1), a.ref_count(2), a.ref_count(3)) == (2, 2, 1)
    a.free(chain)  # the first request finishes: pages 1 and 2 stay with the second
    assert a.num_used == 2 and a.num_free == 5 and a.num_cached == 3
    a.free([1, 2])  # released tail first: 3, then 2, then 1 on the LRU list
    assert a.num_used == 0 and a.num_free == 7 and a.num_cached == 3
    # Untouched pages go first; then the cached ones, the chain's tail before its head.
    assert a.allocate(4) == [4, 5, 6, 7] and a.num_cached == 3
    assert a.allocate(1) == [3] and a.match([bytes([0]), bytes([1]), bytes([2])]) == [1, 2]
    assert a.allocate(1) == [2] and a.match([bytes([0]), bytes([1])]) == [1]
    assert a.num_evictions == 2
    a.acquire([1])  # a hit takes a page back off the free list
    assert a.num_free == 0 and not a.can_allocate(1)
    with pytest.raises(RuntimeError, match="double free"):
        a.free([5, 5])
    a.free([1, 2, 3, 4, 5, 6, 7])
    with pytest.raises(RuntimeError, match="double free"):
        a.free([1])
    with pytest.raises(RuntimeError, match="not a published cache page"):
        a.acquire([4])
    assert a.reset_prefix_cache() == 1 and a.num_cached == 0 and a.num_free == 7


# -- the scheduler ----------------------------------------------------------------------------
def test_reuse_stops_before_the_last_known_token_and_counts_hits():
    sched, buckets, model = make(_cfg())
    prompt = list(range(10, 22))  # 12 tokens: exactly 3 pages
    sched.add(_req("a", prompt))
    _run(sched, buckets, model)
    assert sched.pages_cached == 3  # 12 prompt + 2 fed outputs = 14 tokens: 3 full pages
    sched.add(_req("b", prompt))  # fully cached: the last page is recomputed for the logits
    sched.add(_req("c", prompt + [5]))  # one more token: every prompt page is a hit
    sched.add(_req("d", prompt[:7]))  # 7 tokens: the first page only
    plan = sched.schedule()  # a short queue goes longest cached prefix first
    assert summary(plan) == [("c", 12, 1, True), ("b", 8, 4, True), ("d", 4, 3, True)]
    assert [r.request.num_cached_tokens for r in plan.rows] == [12, 8, 4]
    a_pages = plan.rows[0].request.pages[:3]
    assert plan.rows[1].request.pages[:2] == a_pages[:2] and plan.rows[1].request.pages[2] != a_pages[2]
    assert plan.rows[2].request.pages[0] == a_pages[0]
    sched.update(plan, model.step(pack(plan, buckets), plan))
    _run(sched, buckets, model)
    for row in plan.rows:
        r = row.request
        assert r.output_token_ids == reference(r.prompt_token_ids, r.params)[0]
    assert sched.prefix_cache_queries == 12 + 12 + 13 + 7 and sched.prefix_cache_hits == 8 + 12 + 4
    assert sched.pages_used == 0


@pytest.mark.parametrize("static", [False, True])
def test_outputs_match_reference_and_salts_do_not_share(static):
    sched, buckets, model = make(_cfg(static_batching=static))  # the static baseline reuses pages too
    prompt = list(range(30, 47))
    reqs = [_req("a", prompt, 6), _req("b", prompt, 6, salt="t1"), _req("c", prompt, 6, salt="t1"),
            _req("d", prompt[:9] + [1, 2], 6)]
    sched.add(reqs[0])
    _run(sched, buckets, model)
    for r in reqs[1:]:
        sched.add(r)
        _run(sched, buckets, model)
    assert [r.num_cached_tokens for r in reqs] == [0, 0, 16, 8]  # b has another salt; c shares b's
    for r in reqs:
        assert r.output_token_ids == reference(r.prompt_token_ids, r.params)[0]
    assert sched.pages_used == 0


def test_published_only_after_the_step_that_wrote_it_and_in_batch_deferral():
    sched, buckets, model = make(_cfg(max_num_batched_tokens=12))
    shared = list(range(50, 66))  # 4 pages
    sched.add(_req("a", shared + [1, 2]))
    first = sched.schedule()  # a's first chunk: 12 tokens, 3 pages
    first_out = model.step(pack(first, buckets), first)
    sched.add(_req("b", shared + [3]))
    ahead = sched.schedule()  # planned while `first` is in flight: b must not hit a's unwritten pages
    assert ahead.ahead and summary(ahead) == [("a", 12, 6, True)]  # b, with budget left, waits for a's pages
    assert sched.pages_cached == 0
    ahead_out = model.step(pack(ahead, buckets), ahead)
    sched.update(first, first_out)
    assert sched.pages_cached == 3  # published once the step that wrote them is done
    sched.update(ahead, ahead_out)
    assert sched.pages_cached == 4
    plan = sched.schedule()
    assert [(r.request.request_id, r.start_pos) for r in plan.rows] == [("a", 18), ("b", 16)]
    assert plan.rows[1].request.num_cached_tokens == 16  # a's 4 pages, no page computed twice
    sched.update(plan, model.step(pack(plan, buckets), plan))
    _run(sched, buckets, model)
    b = plan.rows[1].request
    assert b.output_token_ids == reference(b.prompt_token_ids, b.params)[0] and sched.pages_used == 0


def test_short_queue_prefers_the_longest_cached_prefix():
    sched, buckets, model = make(_cfg(max_num_seqs=1, max_num_batched_tokens=32))
    hot = list(range(20, 36))
    sched.add(_req("warm", hot + [1]))
    _run(sched, buckets, model)
    sched.add(_req("cold", list(range(60, 77))))
    sched.add(_req("hot", hot + [2, 3]))
    plan = sched.schedule()
    assert summary(plan) == [("hot", 16, 2, True)]  # queued second, admitted first: 16 tokens cached
    sched.update(plan, model.step(pack(plan, buckets), plan))
    _run(sched, buckets, model)
    assert sched.pages_used == 0


def test_dp_replicas_cache_apart_and_route_to_the_cached_prefix():
    from energon_jax.parallel.data_parallel import DataParallelScheduler
    from energon_jax.scheduler import Scheduler

    cfg = _cfg()
    dp = DataParallelScheduler([Scheduler(cfg), Scheduler(cfg)])
    shared = list(range(10, 30))
    models = [make(cfg)[2] for _ in dp.replicas]
    buckets = make(cfg)[1]

    def run_all():
        for s, m in zip(dp.replicas, models):
            _run(s, buckets, m)

    assert dp.add(_req("x", list(range(40, 50)))) == 0  # ties go to replica 0
    assert dp.add(_req("a", shared + [1])) == 1
    run_all()
    assert dp.add(_req("b", shared + [2])) == 1  # equal loads: the replica holding its prefix
    assert dp.add(_req("c", shared + [3])) == 0  # replica 1 is busier now: load first
    run_all()
    assert [s.pages_used for s in dp.replicas] == [0, 0]
    assert dp.prefix_cache_hits == 20 and dp.replicas[0].prefix_cache_hits == 0  # b hit, c missed on replica 0
    assert dp.pages_cached == sum(s.pages_cached for s in dp.replicas) > 0


def _check_invariants(sched) -> None:
    """Refcounts equal the running requests holding each page; only published pages are shared."""
    holders: dict[int, int] = {}
    for r in sched.running:
        assert len(set(r.pages)) == len(r.pages)
        for p in r.pages:
            holders[p] = holders.get(p, 0) + 1
    alloc = sched.allocator
    assert {p: alloc.ref_count(p) for p in holders} == holders and alloc.num_used == len(holders)
    assert alloc.num_free + alloc.num_used == alloc.num_usable
    for p, n in holders.items():
        if n > 1:
            assert alloc.hash_of(p) is not None  # shared pages are published ones


@pytest.mark.parametrize("mode", ["sync", "ahead", "micro"])
@pytest.mark.parametrize("seed", range(3))
def test_random_mix_of_finish_abort_and_preemption(mode, seed):
    rng = random.Random(seed)
    cfg = _cfg(max_num_seqs=rng.choice([3, 4, 6]), max_num_batched_tokens=rng.choice([8, 16, 32]),
               num_pages=rng.choice([14, 20, 40]), page_size=rng.choice([2, 4]))
    sched, buckets, model = make(cfg)
    prefixes = [[rng.randrange(5, VOCAB) for _ in range(rng.randint(4, 20))] for _ in range(3)]
    requests: dict[str, Request] = {}
    aborted: set[str] = set()
    pipeline: list = []  # (plan, sampled, {page: writer}), oldest first
    writer: dict[int, str] = {}  # page -> request whose plan in flight writes it
    depth = {"sync": 1, "ahead": 2, "micro": 3}[mode]
    steps = 0
    while len(requests) < 40 or sched.has_work() or pipeline:
        for _ in range(rng.choice([0, 1, 2]) if len(requests) < 40 else 0):
            prompt = rng.choice(prefixes)[: rng.randint(1, 20)] + [rng.randrange(5, VOCAB)
                                                                   for _ in range(rng.choice([0, 0, 1, 3, 9]))]
            r = _req(f"r{len(requests)}", prompt, rng.randint(1, 12), salt=rng.choice([None, None, None, "x"]))
            try:
                sched.add(r)
            except ValueError:
                continue
            requests[r.request_id] = r
        if requests and rng.random() < 0.08:
            victim = rng.choice(list(requests))
            if sched.abort(victim) is not None:
                aborted.add(victim)
        plan = None
        if len(pipeline) < depth:
            plan = sched.schedule_micro_batch(depth) if mode == "micro" else sched.schedule()
        if plan is not None:
            batch = pack(plan, buckets)
            for i, row in enumerate(plan.rows):  # nothing reads a page another request is still writing
                ctx_pages = row.request.pages[: -(-row.start_pos // cfg.page_size)]
                assert all(writer.get(p, row.request.request_id) == row.request.request_id for p in ctx_pages)
                if row.prev_row >= 0:  # placeholders filled as the runner does on device
                    batch.input_ids[batch.segment_ids == i] = pipeline[-1][1].token_ids[row.prev_row]
            writes = {}
            for row in plan.rows:
                first, last = row.start_pos // cfg.page_size, (row.start_pos + row.num_tokens - 1) // cfg.page_size
                for p in row.request.pages[first : last + 1]:
                    writes[p] = row.request.request_id
            writer.update(writes)
            pipeline.append((plan, model.step(batch, plan), writes))
        if pipeline and (plan is None or len(pipeline) == depth or mode == "sync"):
            done, sampled, writes = pipeline.pop(0)
            for p, rid in writes.items():  # that step is done: its pages are written
                if writer.get(p) == rid and not any(p in w for _, _, w in pipeline):
                    del writer[p]
            sched.update(done, sampled)
        _check_invariants(sched)
        steps += 1
        assert steps < 5000
    assert sched.pages_used == 0 and sched.allocator.num_free == cfg.num_pages - 1
    assert sched.prefix_cache_hits > 0
    for rid, r in requests.items():
        assert r.status is RequestStatus.FINISHED and not r.pages
        want, reason = reference(r.prompt_token_ids, r.params, set() if r.params.ignore_eos else {EOS})
        n = len(r.output_token_ids)
        assert r.output_token_ids == (want[:n] if rid in aborted else want), rid
