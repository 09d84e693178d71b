"""Planning step N+1 while step N runs (async scheduling).

Host-only first: a randomized run of the scheduler against the fake paged model of
test_scheduler.py, with one plan always in flight and the placeholders filled the way the
runner fills them on device; every request's output must equal the no-cache reference and
every page must come back. Then the engine on the tiny decoder: the same tokens with
async_scheduling on and off (staggered arrivals, chunked prefill, split and fused steps,
preemption, stop strings, stop tokens, eos, max_tokens, penalties, seeded sampling), and
an event log showing that step N+1 is planned and dispatched before step N's ids are
fetched.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from energon_jax import Engine, SamplingParams
from energon_jax.batch import pack
from energon_jax.request import Request, RequestStatus
from energon_jax.scheduler import PLACEHOLDER, SchedulerConfig
from energon_jax.tokenizer import Tokenizer
from test_engine import CONFIG, ENGINE_KW, SMALL_POOL_KW, _boundary_stop, _prompts, _run_staggered
from test_scheduler import EOS, VOCAB, make, reference
from tiny_decoder import TinyDecoder, greedy_reference


# -- host only: scheduler + pack against the fake paged model -------------------------------
def _fill_like_the_runner(batch, prev_ids: np.ndarray | None) -> None:
    """What runner._fill_placeholders does on device, in numpy (the batch is ours to change)."""
    idx = batch.prev_token_index
    if np.any(idx >= 0):
        assert prev_ids is not None
        batch.input_ids[idx >= 0] = prev_ids[idx[idx >= 0]]
    rows = np.flatnonzero(batch.prev_history_row >= 0)
    if not rows.size:
        return
    batch.sampling.history[rows, batch.prev_history_pos[rows]] = prev_ids[batch.prev_history_row[rows]]


@pytest.mark.parametrize("seed", range(6))
def test_random_workload_with_one_plan_in_flight(seed):
    rng = random.Random(seed)
    cfg = SchedulerConfig(
        max_num_seqs=rng.choice([3, 4, 8]), max_num_batched_tokens=32, max_model_len=48,
        page_size=rng.choice([2, 4, 5]), num_pages=rng.choice([14, 20, 40]),
    )
    sched, buckets, model = make(cfg)
    requests: dict[str, Request] = {}
    aborted: set[str] = set()
    in_flight = None  # (plan, sampled ids)
    ahead = steps = 0
    while len(requests) < 40 or sched.has_work() or in_flight is not None:
        for _ in range(rng.choice([0, 0, 1, 2, 3]) if len(requests) < 40 else 0):
            n = rng.randint(1, 30)
            stops = (rng.randrange(5, VOCAB),) if rng.random() < 0.2 else ()
            params = SamplingParams(max_tokens=rng.randint(1, 16), temperature=0.0, stop_token_ids=stops,
                                    ignore_eos=rng.random() < 0.5, repetition_penalty=rng.choice([1.0, 1.2]))
            r = Request(f"r{len(requests)}", [rng.randrange(VOCAB) for _ in range(n)], params)
            try:
                sched.add(r)
            except ValueError:
                continue
            requests[r.request_id] = r
        if requests and rng.random() < 0.05:
            victim = rng.choice(list(requests))
            if sched.abort(victim) is not None:
                aborted.add(victim)
        plan = sched.schedule()  # ahead of in_flight's update when there is one
        sampled = None
        if plan is not None:
            assert plan.ahead == (in_flight is not None)
            ahead += plan.ahead
            batch = pack(plan, buckets)
            for row in plan.rows:
                assert (row.prev_row >= 0) == (row.token_ids == [PLACEHOLDER])
                if row.prev_row >= 0:  # the request sampled in the plan in flight, at that row
                    assert in_flight[0].rows[row.prev_row].request is row.request and row.num_tokens == 1
            # The device runs steps in dispatch order: this one after the one in flight.
            _fill_like_the_runner(batch, None if in_flight is None else in_flight[1].token_ids)
            sampled = model.step(batch, plan)
        if in_flight is not None:
            sched.update(in_flight[0], in_flight[1])
        in_flight = None if plan is None else (plan, sampled)
        for r in sched.running:  # pages hold what was fed, placeholders included
            assert len(r.pages) == sched.allocator.pages_needed(r.num_computed_tokens)
        steps += 1
        assert steps < 5000
    assert ahead > 0
    assert sched.allocator.num_free == cfg.num_pages - 1 and sched.pages_used == 0
    for rid, r in requests.items():
        assert r.status is RequestStatus.FINISHED and not r.pages
        want, reason = reference(r.prompt_token_ids, r.params, set() if r.params.ignore_eos else {EOS})
        if rid in aborted:
            assert r.output_token_ids == want[: len(r.output_token_ids)]
        else:
            assert (r.output_token_ids, r.finish_reason) == (want, reason)  # max_tokens exact: no extra token


# -- the engine on the tiny decoder ---------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return Tokenizer.from_pretrained(tiny_checkpoint("llama"))


@pytest.fixture(scope="module")
def model():
    return TinyDecoder(CONFIG, seed=5)


@pytest.fixture(scope="module")
def engines(model, tokenizer):
    """(async split, async fused, sync split): one set of compiles each."""
    return (
        Engine(model, CONFIG, tokenizer, async_scheduling=True, **ENGINE_KW),
        Engine(model, CONFIG, tokenizer, split_prefill_decode=False, async_scheduling=True, **ENGINE_KW),
        Engine(model, CONFIG, tokenizer, async_scheduling=False, **ENGINE_KW),
    )


def _same_everywhere(engines, run):
    results = [run(e) for e in engines]
    assert results[0] == results[1] == results[2]
    for e in engines:
        assert e.scheduler.pages_used == 0 and not e.has_unfinished()
    return results[0]


def test_greedy_same_on_and_off_staggered_chunked(engines, model):
    prompts = _prompts(10, [3, 17, 40, 90, 9, 1, 25])  # 90 > the 64-token budget: chunked prefill
    max_tokens = [12, 7, 20, 5, 16, 9, 1]
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in max_tokens]
    before = [e.num_planned_ahead for e in engines]
    got = _same_everywhere(engines, lambda e: _run_staggered(e, prompts, params, arrivals=[0, 0, 2, 3, 5, 9, 9]))
    assert got == [greedy_reference(model, p, m) for p, m in zip(prompts, max_tokens)]
    ahead = [e.num_planned_ahead - b for e, b in zip(engines, before)]
    assert ahead[0] > 0 and ahead[1] > 0 and ahead[2] == 0
    assert engines[0].num_compiles == engines[1].num_compiles == len(engines[0]._buckets.all_shapes())


def test_penalties_and_seeded_sampling_same_on_and_off(engines):
    prompts = _prompts(11, [6, 30, 11, 4])
    params = [
        SamplingParams(max_tokens=14, temperature=0.0, repetition_penalty=1.5, ignore_eos=True),
        SamplingParams(max_tokens=9, temperature=0.0, presence_penalty=1.0, frequency_penalty=0.5, ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True),
        SamplingParams(max_tokens=10, temperature=0.8, seed=8, repetition_penalty=1.3, logprobs=3, ignore_eos=True),
    ]

    def run(e):
        outs = e.generate(prompts, params, use_tqdm=False)
        return [(o.token_ids, o.finish_reason, o.logprobs) for o in outs]

    got = _same_everywhere(engines, run)
    assert [len(t) for t, _, _ in got] == [14, 9, 12, 10]


@pytest.mark.slow  # ~30 s quiet; async is the default, so test_engine's stop/eos tests run it on every change
def test_stops_eos_max_tokens_same_on_and_off(engines, model, tokenizer):
    prompt = _prompts(12, [8])[0]
    ref = greedy_reference(model, prompt, 30)
    stop_id = ref[5]
    stop_str = _boundary_stop(tokenizer, ref)
    params = [
        SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=30, temperature=0.0, stop_token_ids=[stop_id]),
        SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, stop=[stop_str]),
    ]
    eos_engines = [
        Engine(model, CONFIG.__class__(**{**CONFIG.__dict__, "eos_token_ids": (stop_id,)}), tokenizer,
               async_scheduling=a, **ENGINE_KW)
        for a in (True, False)
    ]

    def run(e):
        outs = e.generate([prompt] * len(params) + _prompts(13, [20, 5]), params + params[:2], use_tqdm=False)
        return [(o.token_ids, o.finish_reason, o.text) for o in outs]

    got = _same_everywhere(engines, run)
    first = ref.index(stop_id)
    assert [(t, r) for t, r, _ in got[:3]] == [(ref[:6], "length"), (ref[:1], "length"), (ref[: first + 1], "stop")]
    assert got[3][1] == "stop" and stop_str not in got[3][2] and len(got[3][0]) < 30
    eos_params = SamplingParams(max_tokens=30, temperature=0.0)
    on, off = (e.generate([prompt, prompt], [eos_params, params[0]], use_tqdm=False) for e in eos_engines)
    assert [(o.token_ids, o.finish_reason) for o in on] == [(o.token_ids, o.finish_reason) for o in off]
    assert on[0].token_ids == ref[: first + 1] and on[0].finish_reason == "stop"
    assert all(e.scheduler.pages_used == 0 for e in eos_engines)


@pytest.mark.slow  # ~30 s quiet; test_engine and test_prefix_cache preempt with planning ahead by default
def test_preemption_same_on_and_off(model, tokenizer):
    # 12 usable pages of 4 tokens: the four requests cannot all hold their pages at once.
    small = [Engine(model, CONFIG, tokenizer, kv_cache_pages=13, async_scheduling=a, **SMALL_POOL_KW) for a in (True, False)]
    prompts = _prompts(14, [10, 14, 6, 12])
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    outs = [[o.token_ids for o in e.generate(prompts, params, use_tqdm=False)] for e in small]
    assert outs[0] == outs[1] == [greedy_reference(model, p, 20) for p in prompts]
    assert small[0].scheduler.num_preemptions > 0 and small[0].num_planned_ahead > 0
    assert all(e.scheduler.pages_used == 0 for e in small)


def _event_log(engine):
    """Wrap the engine's schedule/dispatch/fetch: a list of ("plan", n) / ("fetch", n) events."""
    events: list[tuple[str, int]] = []
    real_step, real_schedule = engine.runner.step_async, engine.scheduler.schedule
    plans: list = []

    def schedule():
        plan = real_schedule()
        if plan is not None:
            plans.append(plan)
            events.append(("plan", len(plans) - 1))
        return plan

    def step_async(batch, *prev):
        handle = real_step(batch, *prev)
        n = len(plans) - 1
        real_result = handle.result
        handle.result = lambda: events.append(("fetch", n)) or real_result()
        return handle

    engine.runner.step_async, engine.scheduler.schedule = step_async, schedule
    return events


def test_next_step_is_planned_before_the_previous_one_is_fetched(engines):
    prompts = _prompts(15, [5, 9, 7])
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    logs = []
    for e in (engines[1], engines[2]):  # async fused, sync
        events = _event_log(e)
        try:
            e.generate(prompts, params, use_tqdm=False)
        finally:
            del e.runner.step_async, e.scheduler.schedule
        logs.append(events)
    for events, overlapped in zip(logs, (True, False)):
        fetched: set[int] = set()
        early = 0  # plans made while an earlier plan's ids were still unfetched
        for kind, n in events:
            if kind == "fetch":
                fetched.add(n)
            elif set(range(n)) - fetched:
                early += 1
        assert (early > 0) == overlapped
        assert fetched == set(range(max(n for _, n in events) + 1))  # every step's ids fetched once done
