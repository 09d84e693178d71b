"""ModelRunner: paged steps (prefill, chunked prefill, decode) give the no-cache greedy
tokens; one compile per shape, none when shapes repeat; the cache is donated."""

from __future__ import annotations

import dataclasses
import logging

import jax
import numpy as np
import pytest

from energon_jax.runner import ModelRunner
from pallas_kernels import PagedAttentionMetadata
from test_sampling import FakeSamplingBatch, make_batch
from tiny_decoder import TinyConfig, TinyDecoder, greedy_reference, make_cache

PAGE = 4
MAX_PAGES = 16  # max_model_len 64


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FakeStepBatch:
    """The StepBatch fields the runner reads (batch.py owns the real one)."""

    input_ids: np.ndarray
    positions: np.ndarray
    segment_ids: np.ndarray
    attn: PagedAttentionMetadata
    logits_indices: np.ndarray
    sampling: FakeSamplingBatch


def fake_pack(rows, t_bucket: int, b_bucket: int) -> FakeStepBatch:
    """rows: list of (fed token ids, start position, page list)."""
    ids = np.zeros(t_bucket, np.int32)
    pos = np.zeros(t_bucket, np.int32)
    seg = np.full(t_bucket, -1, np.int32)
    slots = np.zeros(t_bucket, np.int32)
    tables = np.zeros((b_bucket, MAX_PAGES), np.int32)
    lens = np.zeros(b_bucket, np.int32)
    last = np.zeros(b_bucket, np.int32)
    t = 0
    for r, (toks, start, pages) in enumerate(rows):
        n = len(toks)
        ids[t : t + n] = toks
        pos[t : t + n] = np.arange(start, start + n)
        seg[t : t + n] = r
        slots[t : t + n] = [pages[j // PAGE] * PAGE + j % PAGE for j in range(start, start + n)]
        tables[r, : len(pages)] = pages
        lens[r] = start + n
        last[r] = t + n - 1
        t += n
    attn = PagedAttentionMetadata(slot_mapping=slots, page_tables=tables, context_lens=lens)
    return FakeStepBatch(ids, pos, seg, attn, last, make_batch(b_bucket))


@pytest.fixture(scope="module")
def tiny():
    c = TinyConfig()
    return c, TinyDecoder(c)


def test_paged_steps_match_no_cache_greedy(tiny, caplog):
    c, model = tiny
    runner = ModelRunner(model, make_cache(c, 40, PAGE))
    prompts = [[5, 9, 13], list(range(20, 39)), [3] * 7]
    max_new = 6
    want = [greedy_reference(model, p, max_new) for p in prompts]
    pages = [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12, 13], [14, 15, 16, 17]]
    out = [[] for _ in prompts]
    computed = [0, 0, 0]
    with caplog.at_level(logging.INFO, logger="energon_jax.runner"):
        # Step 1: prompt 0 whole, the first 10 tokens of prompt 1 (a chunk), prompt 2 whole.
        b = fake_pack([(prompts[0], 0, pages[0]), (prompts[1][:10], 0, pages[1]), (prompts[2], 0, pages[2])], 32, 4)
        ids = runner.step(b).token_ids
        out[0].append(int(ids[0]))
        out[2].append(int(ids[2]))
        computed = [3, 10, 7]
        # Step 2: rows 0 and 2 decode, the rest of prompt 1 prefills (same shape: no compile).
        b = fake_pack(
            [(out[0][-1:], 3, pages[0]), (prompts[1][10:], 10, pages[1]), (out[2][-1:], 7, pages[2])], 32, 4
        )
        ids = runner.step(b).token_ids
        out[0].append(int(ids[0]))
        out[1].append(int(ids[1]))
        out[2].append(int(ids[2]))
        computed = [4, 19, 8]
        # Decode steps in a smaller bucket.
        while any(len(o) < max_new for o in out):
            rows = [(o[-1:], computed[i], pages[i]) for i, o in enumerate(out)]
            ids = runner.step(fake_pack(rows, 8, 4)).token_ids
            for i in range(3):
                out[i].append(int(ids[i]))
                computed[i] += 1
    assert [o[:max_new] for o in out] == want
    assert runner.num_compiles == 2
    assert sum("compiled step" in r.message for r in caplog.records) == 2


def test_cache_is_donated(tiny):
    c, model = tiny
    runner = ModelRunner(model, make_cache(c, 8, PAGE))
    old = runner.kv_cache[0].k
    runner.step(fake_pack([([1, 2, 3], 0, [1])], 8, 4))
    assert old.is_deleted()
    assert not runner.kv_cache[0].k.is_deleted()


def test_warmup_compiles_without_running_and_later_steps_do_not_compile(tiny, caplog):
    c, model = tiny
    runner = ModelRunner(model, make_cache(c, 8, PAGE))
    shapes = [(8, 4), (16, 4), (32, 4)]
    assert runner.warmup(fake_pack([([1], 0, [1])], t, b) for t, b in shapes) == 3
    # Warm-up ran nothing: the cache is still all zeros.
    assert not np.asarray(runner.kv_cache[0].k).any()
    for t, b in shapes + shapes:
        runner.step(fake_pack([([1, 2], 0, [2])], t, b))
    assert runner.num_compiles == 3
    with caplog.at_level(logging.WARNING, logger="energon_jax.runner"):
        runner.step(fake_pack([([1, 2], 0, [2])], 64, 4))
    assert runner.num_compiles == 4
    assert any("after warm-up" in r.message for r in caplog.records)
