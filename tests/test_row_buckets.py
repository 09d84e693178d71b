"""Rows bucket separately from tokens: a step's shape is (token bucket, smallest row bucket
that holds its rows), every such shape is listed by all_shapes / warmup_batches."""

from __future__ import annotations

import re

import numpy as np
import pytest

from energon_jax.batch import Buckets, pack, warmup_batches
from energon_jax.request import SamplingParams
from energon_jax.scheduler import ScheduledRow, StepPlan
from test_batch import _req


def test_row_buckets_per_token_bucket():
    b = Buckets.create(max_num_batched_tokens=512, max_num_seqs=256, max_model_len=64, page_size=8, row_split=8)
    assert b.row_buckets(16) == (16,) and b.row_buckets(32) == (32,)  # under 64 rows: no split
    assert b.row_buckets(64) == (8, 64) and b.row_buckets(512) == (4, 32, 256)
    assert [b.rows_bucket(512, n) for n in (1, 4, 5, 32, 33, 256)] == [4, 4, 32, 32, 256, 256]
    shapes = b.all_shapes()
    assert len(shapes) == len(set(shapes)) == 2 + 2 * 4 + 3 * 3 and (512, 4) in shapes and (16, 16) in shapes
    # the engine's defaults (32 seqs, 512 tokens) keep one row bucket per token bucket
    small = Buckets.create(max_num_batched_tokens=512, max_num_seqs=32, max_model_len=64, page_size=8, row_split=8)
    assert small.all_shapes() == [(t, min(t, 32)) for t in small.token_buckets]
    # each shape with the full history (a step with a penalty row) and without (every other step)
    assert [(d.num_tokens_bucket, d.num_rows_bucket, d.sampling.history.shape[1]) for d in warmup_batches(b)] == [
        (t, r, h) for t, r in shapes for h in (64, 0)]
    # row_split=1 (the default): one row bucket per token bucket, as before
    one = Buckets.create(max_num_batched_tokens=512, max_num_seqs=256, max_model_len=64, page_size=8)
    assert one.all_shapes() == [(t, min(t, 256)) for t in one.token_buckets]
    with pytest.raises(ValueError, match=re.escape("row_split=0 must be >= 1")):
        Buckets((16,), 4, 4, 8, 32, row_split=0)


def test_one_row_prefill_chunk_packs_into_a_small_row_bucket():
    b = Buckets.create(max_num_batched_tokens=128, max_num_seqs=64, max_model_len=128, page_size=4, row_split=8)
    r = _req("a", range(1, 101), SamplingParams(max_tokens=4), pages=range(1, 26))
    batch = pack(StepPlan([ScheduledRow(r, list(range(1, 101)), 0, True)]), b)
    assert (batch.num_tokens_bucket, batch.num_rows_bucket) == (128, 8)
    assert batch.logits_indices[0] == 99 and np.all(batch.logits_indices[1:] == 0)
    assert (batch.num_tokens_bucket, batch.num_rows_bucket) in b.all_shapes()
