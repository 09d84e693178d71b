"""Packing: every StepBatch field of a small plan against hand-computed values; buckets."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest

from energon_jax.batch import Buckets, dummy_batch, pack, warmup_batches
from energon_jax.request import Request, RequestStatus, SamplingParams
from energon_jax.scheduler import ScheduledRow, Scheduler, SchedulerConfig, StepPlan


def _req(rid, prompt, params, *, outputs=(), pages=(), computed=0):
    r = Request(rid, list(prompt), params)
    r.output_token_ids = list(outputs)
    r.pages = list(pages)
    r.num_computed_tokens = computed
    r.status = RequestStatus.RUNNING
    return r


BUCKETS = Buckets.create(max_num_batched_tokens=32, max_num_seqs=4, max_model_len=32, page_size=4, min_tokens=8)


def test_buckets():
    assert BUCKETS.token_buckets == (8, 16, 32) and BUCKETS.page_size == 4
    assert BUCKETS.max_pages_per_row == 8 and BUCKETS.history_len == 32 and BUCKETS.max_logprobs == 20
    assert [BUCKETS.token_bucket(n) for n in (1, 8, 9, 16, 17, 32)] == [8, 8, 16, 16, 32, 32]
    with pytest.raises(ValueError, match=re.escape("num_tokens=33 exceeds the largest token bucket 32")):
        BUCKETS.token_bucket(33)
    assert BUCKETS.all_shapes() == [(8, 4), (16, 4), (32, 4)]
    b = Buckets.create(max_num_batched_tokens=100, max_num_seqs=5, max_model_len=50, page_size=16)
    assert b.token_buckets == (16, 32, 64, 96, 100) and b.max_pages_per_row == 4
    assert b.row_bucket(16) == 8 and b.row_bucket(100) == 8  # max_num_seqs rounded up to a power of two
    assert Buckets.create(max_num_batched_tokens=256, max_num_seqs=64, max_model_len=64, page_size=8).all_shapes() == [
        (16, 16), (32, 32), (64, 64), (96, 64), (128, 64), (192, 64), (256, 64)
    ]
    # half-steps from 64 tokens on, never one at or past the budget
    assert Buckets.create(max_num_batched_tokens=512, max_num_seqs=16, max_model_len=64, page_size=8,
                          min_tokens=1).token_buckets == (1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256, 384, 512)
    assert Buckets.create(max_num_batched_tokens=160, max_num_seqs=4, max_model_len=64, page_size=8).token_buckets == (
        16, 32, 64, 96, 128, 160)
    assert Buckets.create(max_num_batched_tokens=8, max_num_seqs=2, max_model_len=8, page_size=4).token_buckets == (8,)
    with pytest.raises(ValueError, match=re.escape("token_buckets=(16, 8) must be non-empty")):
        Buckets((16, 8), 4, 4, 8, 32)


def test_pack_every_field():
    # r0 decodes its 7th token (position 5 -> page 7, offset 1); r1 feeds the first 6-token
    # chunk of a 10-token prompt (no sample); r2 prefills a whole 3-token prompt.
    r0 = _req("r0", [5, 6, 7, 8, 9], SamplingParams(temperature=0), outputs=[11], pages=[3, 7], computed=5)
    p1 = SamplingParams(temperature=0.8, top_k=5, top_p=0.9, min_p=0.1, seed=42, repetition_penalty=1.3)
    r1 = _req("r1", range(1, 11), p1, pages=[2, 5])
    p2 = SamplingParams(presence_penalty=0.5, frequency_penalty=-0.25, logprobs=3)
    r2 = _req("r2", [20, 21, 22], p2, pages=[4])
    plan = StepPlan(
        [
            ScheduledRow(r0, [11], 5, True),
            ScheduledRow(r1, [1, 2, 3, 4, 5, 6], 0, False),
            ScheduledRow(r2, [20, 21, 22], 0, True),
        ]
    )
    b = pack(plan, BUCKETS)
    assert b.num_tokens_bucket == 16 and b.num_rows_bucket == 4  # 10 tokens -> bucket 16
    pad = [0] * 6
    np.testing.assert_array_equal(b.input_ids, [11, 1, 2, 3, 4, 5, 6, 20, 21, 22] + pad)
    np.testing.assert_array_equal(b.positions, [5, 0, 1, 2, 3, 4, 5, 0, 1, 2] + pad)
    np.testing.assert_array_equal(b.segment_ids, [0, 1, 1, 1, 1, 1, 1, 2, 2, 2] + [-1] * 6)
    # slot = page * 4 + offset: r0 pos 5 -> 7*4+1; r1 pos 0..3 -> page 2, 4..5 -> page 5; r2 -> page 4
    np.testing.assert_array_equal(b.attn.slot_mapping, [29, 8, 9, 10, 11, 20, 21, 16, 17, 18] + pad)
    tables = np.zeros((4, 8), np.int32)
    tables[0, :2], tables[1, :2], tables[2, :1] = [3, 7], [2, 5], [4]
    np.testing.assert_array_equal(b.attn.page_tables, tables)
    np.testing.assert_array_equal(b.attn.context_lens, [6, 6, 3, 0])
    np.testing.assert_array_equal(b.logits_indices, [0, 6, 9, 0])
    s = b.sampling
    np.testing.assert_array_equal(s.temperature, np.array([0, 0.8, 1.0, 0], np.float32))
    np.testing.assert_array_equal(s.top_k, [0, 5, 0, 0])
    np.testing.assert_array_equal(s.top_p, np.array([1, 0.9, 1, 1], np.float32))
    np.testing.assert_array_equal(s.min_p, np.array([0, 0.1, 0, 0], np.float32))
    np.testing.assert_array_equal(s.repetition_penalty, np.array([1, 1.3, 1, 1], np.float32))
    np.testing.assert_array_equal(s.presence_penalty, np.array([0, 0, 0.5, 0], np.float32))
    np.testing.assert_array_equal(s.frequency_penalty, np.array([0, 0, -0.25, 0], np.float32))
    np.testing.assert_array_equal(s.seed, np.array([r0.seed_key, 42, r2.seed_key, 0], np.uint32))
    np.testing.assert_array_equal(s.step, [1, 0, 0, 0])
    np.testing.assert_array_equal(s.prompt_len, [5, 10, 3, 0])
    np.testing.assert_array_equal(s.num_logprobs, [0, 0, 3, 0])
    hist = np.full((4, 32), -1, np.int32)  # r0 uses no penalty: its history row is never read
    hist[1, :10] = range(1, 11)
    hist[2, :3] = [20, 21, 22]
    np.testing.assert_array_equal(s.history, hist)
    floats = {"temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"}
    for path, leaf in jax.tree_util.tree_flatten_with_path(b)[0]:
        name = path[-1].name
        want = np.float32 if name in floats else np.uint32 if name == "seed" else np.int32
        assert leaf.dtype == want, name


def test_pack_history_includes_generated_tokens():
    r = _req("r", [4, 5], SamplingParams(repetition_penalty=1.1), outputs=[9, 8, 7], pages=[6, 2], computed=4)
    b = pack(StepPlan([ScheduledRow(r, [7], 4, True)]), BUCKETS)
    np.testing.assert_array_equal(b.sampling.history[0, :6], [4, 5, 9, 8, 7, -1])
    assert b.sampling.step[0] == 3 and b.sampling.prompt_len[0] == 2 and b.attn.slot_mapping[0] == 2 * 4 + 0


def test_pack_matches_scheduler_pages_and_bucket_is_smallest():
    cfg = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=32, max_model_len=32, page_size=4, num_pages=30)
    sched = Scheduler(cfg)
    for i, n in enumerate([9, 1, 5]):
        sched.add(Request(f"r{i}", list(range(100, 100 + n)), SamplingParams(max_tokens=4)))
    plan = sched.schedule()
    b = pack(plan, BUCKETS)
    assert plan.num_tokens == 15 and b.num_tokens_bucket == 16
    off = 0
    for r, row in enumerate(plan.rows):
        pages = row.request.pages
        np.testing.assert_array_equal(b.attn.page_tables[r, : len(pages)], pages)
        assert np.all(b.attn.page_tables[r, len(pages) :] == 0)
        for k in range(row.num_tokens):
            pos = row.start_pos + k
            assert b.attn.slot_mapping[off + k] == pages[pos // 4] * 4 + pos % 4
        off += row.num_tokens
    assert off == plan.num_tokens and np.all(b.segment_ids[off:] == -1)


def test_pack_errors():
    r = _req("r", [1, 2, 3, 4, 5], SamplingParams(), pages=[1])
    with pytest.raises(ValueError, match=re.escape("up to position 4, which needs page 1, but holds 1 pages")):
        pack(StepPlan([ScheduledRow(r, [1, 2, 3, 4, 5], 0, True)]), BUCKETS)
    rows = [ScheduledRow(_req(f"r{i}", [1], SamplingParams(), pages=[i + 1]), [1], 0, True) for i in range(5)]
    with pytest.raises(ValueError, match=re.escape("plan has 5 rows but the (t=8) bucket holds 4")):
        pack(StepPlan(rows), BUCKETS)


def test_dummy_batches_cover_every_shape():
    batches = warmup_batches(BUCKETS)
    assert [(x.num_tokens_bucket, x.num_rows_bucket, x.sampling.history.shape[1]) for x in batches] == [
        (t, b, h) for t, b in BUCKETS.all_shapes() for h in (32, 0)]  # with and without a penalty row
    d = dummy_batch(BUCKETS, 8, 4)
    assert np.all(d.segment_ids == -1) and np.all(d.attn.context_lens == 0) and np.all(d.sampling.temperature == 0)
    assert d.attn.page_tables.shape == (4, 8) and d.sampling.history.shape == (4, 32)
    assert np.all(d.prev_token_index == -1) and np.all(d.prev_history_row == -1)  # no placeholders
    # a registered pytree: jax sees every array as a leaf
    # (6 top-level/attn arrays + 16 sampling + logits_indices + 3 plan-ahead + 2 device page table fields)
    assert len(jax.tree_util.tree_leaves(d)) == 28
