"""PageAllocator accounting (null page never handed out, double frees caught) and pool sizing."""

from __future__ import annotations

import random
import re

import jax.numpy as jnp
import pytest

from energon_jax.kv_cache import PageAllocator, kv_cache_pages_for_bytes
from pallas_kernels import NULL_PAGE, page_bytes


def test_null_page_reserved_and_lowest_first():
    a = PageAllocator(6, page_size=4)
    assert a.num_usable == 5 and a.num_free == 5 and a.num_used == 0
    assert a.allocate(2) == [1, 2]
    assert a.allocate(3) == [3, 4, 5]
    assert a.num_free == 0 and not a.can_allocate(1) and a.can_allocate(0)
    a.free([4, 2])
    assert a.num_free == 2 and a.allocate(2) == [2, 4]
    assert not a.is_allocated(NULL_PAGE)


def test_errors():
    with pytest.raises(ValueError, match=re.escape("num_pages=1 must be >= 2")):
        PageAllocator(1, 4)
    with pytest.raises(ValueError, match=re.escape("page_size=0 must be >= 1")):
        PageAllocator(4, 0)
    a = PageAllocator(4, 2)
    with pytest.raises(RuntimeError, match=re.escape("cannot allocate n_pages=4: only 3 of 3 pages are free")):
        a.allocate(4)
    pages = a.allocate(2)
    a.free(pages)
    with pytest.raises(RuntimeError, match="double free"):
        a.free(pages)
    with pytest.raises(RuntimeError, match="double free"):
        a.free([NULL_PAGE])
    p = a.allocate(1)
    with pytest.raises(RuntimeError, match="double free"):
        a.free(p + p)
    assert a.num_used == 1  # a refused free changes nothing


def test_pages_needed():
    a = PageAllocator(8, page_size=4)
    assert [a.pages_needed(n) for n in range(10)] == [0, 1, 1, 1, 1, 2, 2, 2, 2, 3]


def test_random_alloc_free_accounting():
    rng = random.Random(0)
    a = PageAllocator(33, 3)
    owned: list[list[int]] = []
    for _ in range(500):
        if owned and (rng.random() < 0.5 or not a.can_allocate(1)):
            a.free(owned.pop(rng.randrange(len(owned))))
        else:
            n = rng.randint(0, min(4, a.num_free))
            owned.append(a.allocate(n))
        flat = [p for o in owned for p in o]
        assert len(flat) == len(set(flat)) and NULL_PAGE not in flat
        assert a.num_used == len(flat) and a.num_free + a.num_used == 32
    for o in owned:
        a.free(o)
    assert a.num_free == 32


def test_pages_for_bytes():
    per_layer = page_bytes(16, 2, 8, jnp.float32)
    assert per_layer == 16 * 2 * 2 * 8 * 4
    assert kv_cache_pages_for_bytes(per_layer * 3 * 10 + 5, 3, 16, 2, 8, jnp.float32) == 10
    with pytest.raises(ValueError, match=re.escape(f"kv_cache_bytes={per_layer * 3} holds 1 pages")):
        kv_cache_pages_for_bytes(per_layer * 3, 3, 16, 2, 8, jnp.float32)
