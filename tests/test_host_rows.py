"""The host-time fast paths of a step against the plain ones they replace.

- ``host_rows.HostRows`` (page tables and sampling parameters kept between steps, patched
  by deltas): every field of every packed batch equals ``pack`` reading each request
  afresh, over a randomized scheduler run with chunked prefill, plans made ahead,
  preemption (a small pool), aborts, penalties, min_tokens and placeholders; with a
  sliding window too (pages released behind it, in place), and with device page tables,
  where the runner's view (rows loaded whole, then the step's entries) is rebuilt in numpy,
  the overflow path (more entries than the batch carries: rows loaded whole) included.
- ``output.add_many`` (one tokenizer call for a whole step): the text of every request
  equals a full ``decode`` of its ids cut at the first stop string, and each step's
  deltas equal ``OutputTracker.add`` row by row.
"""

from __future__ import annotations

import dataclasses

import random

import jax
import numpy as np
import pytest

from energon_jax.batch import Buckets, pack
from energon_jax.host_rows import HostRows
from energon_jax.output import OutputTracker, add_many
from energon_jax.request import Request, SamplingParams
from energon_jax.sampling import SampledTokens
from energon_jax.scheduler import Scheduler, SchedulerConfig
from pallas_kernels.page_layout import NULL_PAGE


def _params(rng: random.Random) -> SamplingParams:
    kind = rng.randrange(4)
    if kind == 0:
        return SamplingParams(max_tokens=rng.randrange(1, 12), temperature=0.0)
    if kind == 1:
        return SamplingParams(max_tokens=rng.randrange(1, 12), temperature=0.7, top_k=5, seed=rng.randrange(99),
                              repetition_penalty=1.3, logprobs=2)
    if kind == 2:
        return SamplingParams(max_tokens=rng.randrange(4, 12), min_tokens=3, stop_token_ids=[7, 9],
                              presence_penalty=0.5)
    return SamplingParams(max_tokens=rng.randrange(1, 12), top_p=0.8, min_p=0.1, frequency_penalty=0.2)


def _sampled(rows: int, rng: random.Random) -> SampledTokens:
    ids = np.array([rng.randrange(3, 50) for _ in range(rows)], np.int32)
    return SampledTokens(ids, np.zeros(rows, np.float32), np.tile(np.arange(20, dtype=np.int32), (rows, 1)),
                         np.zeros((rows, 20), np.float32))


def _same(a, b) -> None:
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    for (path, x), y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def _device_view(batch, table: np.ndarray, host: HostRows, plain, seen: dict | None = None):
    """What the runner's step sees with device page tables: the rows loaded whole, then the
    step's appended pages written, then each row's table read by slot (numpy, not the runner).
    ``seen`` counts the rows loaded whole and the entries that null a column."""
    null_row = table.shape[0] - 1
    for slot, row in host.take_loads():
        table[slot] = row
        if seen is not None:
            seen["loads"].append(slot)
    for slot, col, page in batch.page_deltas:
        if slot < null_row:
            table[slot, col] = page
            if seen is not None and page == NULL_PAGE:
                seen["nulled"] += 1
    rows = table[np.where(batch.row_slot >= 0, batch.row_slot, null_row)]
    return dataclasses.replace(batch, attn=dataclasses.replace(batch.attn, page_tables=rows),
                               row_slot=plain.row_slot, page_deltas=plain.page_deltas)


@pytest.mark.parametrize(("history", "device_pages", "window"),
                         [(False, False, None), (True, False, None), (False, True, None), (False, False, 6),
                          (False, True, 6)])
def test_host_rows_pack_equals_plain_pack(history: bool, device_pages: bool, window: int | None) -> None:
    rng = random.Random(3)
    # A window's sequences hold fewer pages at once: a smaller pool still preempts.
    cfg = SchedulerConfig(max_num_seqs=6, max_num_batched_tokens=8, max_model_len=48, page_size=4,
                          num_pages=14 if window is None else 9, enable_prefix_caching=True, prefix_cache_seed=0,
                          attention_window=window)
    sched = Scheduler(cfg, eos_token_ids=[2])
    buckets = Buckets.create(max_num_batched_tokens=8, max_num_seqs=6, max_model_len=48, page_size=4,
                             min_tokens=4, penalty_tables=not history, page_slots=7 if device_pages else 0)
    plain_buckets = dataclasses.replace(buckets, page_slots=0)
    host = HostRows(buckets, 7)  # far fewer slots than requests: slots are reclaimed and rewritten
    table = np.full((8, buckets.max_pages_per_row), -7, np.int32)  # device page tables: 7 slots + the null row
    table[7] = NULL_PAGE
    shared = [rng.randrange(3, 50) for _ in range(8)]  # a common prefix: prefix-cache hits
    n_req, in_flight, steps, rows_seen, seen = 0, [], 0, 0, {"loads": [], "nulled": 0}
    while steps < 400 and (n_req < 40 or sched.has_work() or in_flight):
        steps += 1
        if n_req < 40 and rng.random() < 0.5:
            own = [rng.randrange(3, 50) for _ in range(rng.randrange(1, 22))]
            prompt = (shared if rng.random() < 0.5 else []) + own
            sched.add(Request(f"r{n_req}", prompt, _params(rng)))
            n_req += 1
        if rng.random() < 0.05 and sched.running:  # an abort, possibly of a request in flight
            sched.abort(rng.choice(sched.running).request_id)
        plan = sched.schedule() if len(in_flight) < 2 else None
        if plan is not None:
            fast, plain = pack(plan, buckets, host_rows=host), pack(plan, plain_buckets)
            _same(_device_view(fast, table, host, plain, seen) if device_pages else fast, plain)
            np.testing.assert_array_equal(host.tables[host.slots([r.request for r in plan.rows])],
                                          plain.attn.page_tables[: plan.num_rows])  # the host table itself
            rows_seen += plan.num_rows
            in_flight.append(plan)
        # update the oldest plan, unless planning ahead (one stays in flight) this time
        if in_flight and (plan is None or len(in_flight) == 2 or rng.random() < 0.5):
            done = in_flight.pop(0)
            sched.update(done, _sampled(done.num_rows, rng))
    assert n_req == 40 and not sched.has_work() and rows_seen > 200
    assert sched.num_preemptions > 0 and sched.num_planned_ahead > 0
    if window is not None and device_pages:
        assert seen["nulled"] > 20  # released columns went up as entries, not only in rows loaded whole


def test_host_rows_window_release_overflows_into_a_whole_row() -> None:
    """A 140-token prompt in 64-token chunks (60 beside a 4-token one in the first step),
    window 8, pages of 4. The second chunk appends 16 pages and nulls the 13 that the first
    one's window left behind: with the short row's entry, more than the batch's 25 entries
    (2 x 4 rows + 64 / 4 + 1), so the long row (the most entries) goes up whole and the
    short one's entry still goes as an entry. The third chunk's 16 nulls and 4 new pages
    fit, and so does every later step (one null per row every 4 tokens). Each step's
    device view equals plain packing."""
    cfg = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=192, page_size=4, num_pages=40,
                          attention_window=8)
    sched = Scheduler(cfg, eos_token_ids=[2])
    buckets = Buckets.create(max_num_batched_tokens=64, max_num_seqs=4, max_model_len=192, page_size=4,
                             min_tokens=4, penalty_tables=True, page_slots=8)
    assert buckets.page_deltas_len() == 25
    plain_buckets = dataclasses.replace(buckets, page_slots=0)
    host = HostRows(buckets, 8)
    table = np.full((9, buckets.max_pages_per_row), -7, np.int32)
    table[8] = NULL_PAGE
    short = Request("short", [3, 4, 5, 6], SamplingParams(max_tokens=30, ignore_eos=True))
    req = Request("long", [3 + i % 40 for i in range(140)], SamplingParams(max_tokens=12, ignore_eos=True))
    sched.add(short)
    sched.add(req)
    rng = random.Random(0)
    loads_per_step, nulled_per_step = [], []
    while sched.has_work():
        plan = sched.schedule()
        seen = {"loads": [], "nulled": 0}
        fast, plain = pack(plan, buckets, host_rows=host), pack(plan, plain_buckets)
        _same(_device_view(fast, table, host, plain, seen), plain)
        loads_per_step.append([plan.rows[list(fast.row_slot).index(s)].request.request_id for s in seen["loads"]])
        nulled_per_step.append(seen["nulled"])
        sched.update(plan, _sampled(plan.num_rows, rng))
    # the joins, then the overflow: the long row only; then entries only
    assert loads_per_step == [["short", "long"], ["long"]] + [[]] * (len(loads_per_step) - 2)
    # the third step nulls what the second chunk's window left (written 124: 29 pages behind, 13
    # of them sent in the whole row), the fourth what the third's left (written 140: 33 behind)
    assert nulled_per_step[:4] == [0, 0, 16, 4]
    assert all(n <= 2 for n in nulled_per_step[4:]) and sum(nulled_per_step[4:]) >= 8
    assert len(req.output_token_ids) == 12 and len(short.output_token_ids) == 30 and sched.pages_used == 0


@pytest.fixture(scope="module")
def demo_tokenizer():
    from energon_jax.engine import demo_model_path
    from energon_jax.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(demo_model_path())


def test_add_many_equals_full_decode_and_tracker_add(demo_tokenizer) -> None:
    tok = demo_tokenizer
    rng = random.Random(5)
    texts = ["héllo wörld 🙂 naïve café 日本語のテキスト", "def f(x):\n    return x  # 初始化 🚀🚀",
             "plain ascii text here"]
    streams = []
    for i in range(24):
        ids = tok.encode(texts[i % 3], add_special_tokens=False) + [rng.randrange(3, tok.vocab_size) for _ in range(8)]
        ids.insert(rng.randrange(len(ids)), 2)  # a special token (eos) in the middle
        skip = i % 2 == 0
        stop = () if i % 4 < 2 else (rng.choice(["🚀", "ö", "xt", "re"]),)
        streams.append((ids, skip, stop))
    batched = [OutputTracker(tok.detokenizer(skip), stop) for _, skip, stop in streams]
    single = [OutputTracker(tok.detokenizer(skip), stop) for _, skip, stop in streams]
    fed = [0] * len(streams)
    got = [""] * len(streams)
    while any(f < len(s[0]) for f, s in zip(fed, streams)):
        rows, chunks, finished = [], [], []
        for i, (ids, _, _) in enumerate(streams):
            if fed[i] < len(ids) and rng.random() < 0.8:
                k = rng.randrange(1, 4)
                rows.append(i)
                chunks.append(ids[fed[i] : fed[i] + k])
                fed[i] += len(chunks[-1])
                finished.append(fed[i] >= len(ids))
        deltas = add_many([batched[i] for i in rows], chunks, finished)
        for i, chunk, fin, delta in zip(rows, chunks, finished, deltas, strict=True):
            assert delta == single[i].add(chunk, finished=fin)
            got[i] += delta
    for (ids, skip, stop), text, tracker in zip(streams, got, batched, strict=True):
        full = tok.decode(ids, skip)
        cuts = [full.find(s) for s in stop if s in full]
        expected = full[: min(cuts)] if cuts else full
        assert text == tracker.text == expected


def _workload(engine, tag: str) -> dict[str, list[tuple]]:
    """Staggered requests of every kind on a pool too small for all of them, one aborted."""
    from energon_jax import SamplingParams

    rng = np.random.default_rng(11)
    kinds = [
        SamplingParams(max_tokens=18, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=14, temperature=0.9, top_k=20, seed=4, repetition_penalty=1.4, logprobs=2),
        SamplingParams(max_tokens=16, temperature=0.8, seed=9, presence_penalty=0.6, frequency_penalty=0.3,
                       stop=["e", "a"]),
        SamplingParams(max_tokens=12, temperature=0.0, min_tokens=6, ignore_eos=True),
    ]
    prompts = [rng.integers(3, 300, n).tolist() for n in (10, 14, 6, 12, 9, 5, 13, 7)]
    seen: dict[str, list[tuple]] = {}
    step = 0
    while step < len(prompts) or engine.has_unfinished():
        if step < len(prompts):
            engine.add_request(prompts[step], kinds[step % 4], request_id=f"{tag}{step}")
        if step == 6:
            delta = engine.abort(f"{tag}2")
            if delta is not None:
                seen.setdefault(delta.request_id[len(tag):], []).append(tuple(delta)[1:])
        for delta in engine.step():
            seen.setdefault(delta.request_id[len(tag):], []).append(tuple(delta)[1:])
        step += 1
    return seen


def test_engine_stream_identical_without_host_rows(tiny_checkpoint) -> None:
    from energon_jax import Engine
    from energon_jax.tokenizer import Tokenizer
    from tiny_decoder import TinyConfig, TinyDecoder

    config = TinyConfig(vocab_size=300, max_position_embeddings=128)
    engine = Engine(TinyDecoder(config, seed=3), config, Tokenizer.from_pretrained(tiny_checkpoint("llama")),
                    max_model_len=48, page_size=4, max_num_seqs=8, max_num_batched_tokens=16, kv_cache_pages=13)
    assert engine._loop._host_rows is not None and engine.buckets.page_slots == 16  # device page tables
    fast = _workload(engine, "a")
    preempted = engine.scheduler.num_preemptions
    loads = engine.runner.page_table is not None
    engine._loop._host_rows = None  # pack reads every request afresh, as before HostRows
    # ... and the batches carry [B, M] page tables, as before device page tables (new shapes compile)
    engine._loop.buckets = dataclasses.replace(engine._loop.buckets, page_slots=0)
    engine.runner.page_table = None
    plain = _workload(engine, "b")
    assert loads
    assert preempted > 0 and len(fast) == 8
    assert fast == plain
    assert engine.scheduler.pages_used == 0
