"""``slot_loads.py``: whole rows into per-slot device tables, one padded call per chunk.

Checked against numpy assignment on fresh random tables and rows: every real row lands in
its slot, padding rows change nothing, a load bigger than one call is cut into several,
and ``(replica, slot)`` pairs address a stacked ``[dp, S, ...]`` table the same way.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from energon_jax.sampling import PenaltyTables
from energon_jax.slot_loads import LOAD_SIZES, MAX_LOAD_ROWS, PAD_SLOT, SlotLoader, chunks, template


def test_chunks_pad_to_a_size_and_cut_big_loads():
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 5, 64, 65, 130):
        slots = rng.permutation(200)[:n].astype(np.int32)
        rows = rng.integers(0, 1000, (n, 7)).astype(np.int32)
        got = chunks(slots, rows)
        assert len(got) == -(-n // MAX_LOAD_ROWS)
        real_slots, real_rows = [], []
        for s, r in got:
            assert len(s) in LOAD_SIZES and r.shape == (len(s), 7)
            keep = s != PAD_SLOT
            assert keep[: keep.sum()].all() and not keep[keep.sum():].any()  # real rows first
            assert not r[~keep].any()  # padding rows are zeros
            real_slots.extend(s[keep])
            real_rows.extend(r[keep])
        np.testing.assert_array_equal(real_slots, slots)
        np.testing.assert_array_equal(np.array(real_rows), rows)


@pytest.mark.parametrize("slot_dims", [1, 2])
def test_loader_writes_rows_like_numpy(slot_dims):
    rng = np.random.default_rng(slot_dims)
    vocab, num_slots = 11, 9
    lead = (num_slots,) if slot_dims == 1 else (3, num_slots)
    counts = rng.integers(0, 5, (*lead, vocab)).astype(np.int32)
    seen = rng.random((*lead, vocab)) < 0.5
    table = jax.device_put(PenaltyTables(counts, seen))
    loader = SlotLoader(jax.sharding.SingleDeviceSharding(jax.devices()[0]), slot_dims=slot_dims)
    loader.warmup(table)
    n = 5
    idx = rng.permutation(num_slots)[:n]
    slots = idx if slot_dims == 1 else np.stack([rng.integers(0, 3, n), idx], axis=1)
    rows = PenaltyTables(rng.integers(0, 9, (n, vocab)).astype(np.int32), rng.random((n, vocab)) < 0.5)
    want_counts, want_seen = counts.copy(), seen.copy()
    for i in range(n):
        where = tuple(slots[i]) if slot_dims == 2 else slots[i]
        want_counts[where], want_seen[where] = rows.output_counts[i], rows.prompt_seen[i]
    (s, r), = chunks(slots, rows)
    assert len(s) == 8  # 5 rows padded to 8: three padding rows, dropped
    table = loader(table, s, r)
    np.testing.assert_array_equal(np.asarray(table.output_counts), want_counts)
    np.testing.assert_array_equal(np.asarray(table.prompt_seen), want_seen)
    # a worker's all-padding template changes nothing
    table = loader(table, *template(table, 8, slot_dims))
    np.testing.assert_array_equal(np.asarray(table.output_counts), want_counts)
    assert loader.num_loads == 2
