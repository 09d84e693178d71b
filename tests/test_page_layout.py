"""The page layout: writes land in their slots and paged attention equals packed attention."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import flash_attention_reference, make_kv_pages, paged_attention_reference, write_kv


def _packed(rng, lens, n, k, h):
    t = sum(lens)
    q = jnp.asarray(rng.standard_normal((t, n, h)), jnp.float32)
    kk = jnp.asarray(rng.standard_normal((t, k, h)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((t, k, h)), jnp.float32)
    seg = jnp.asarray(np.concatenate([np.full(n_, i) for i, n_ in enumerate(lens)]), jnp.int32)
    pos = jnp.asarray(np.concatenate([np.arange(n_) for n_ in lens]), jnp.int32)
    return q, kk, v, seg, pos


@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.int8])
def test_paged_matches_packed(page_size, dtype):
    rng = np.random.default_rng(page_size)
    lens = [5, 17, 1]
    q, k, v, seg, pos = _packed(rng, lens, 8, 2, 16)
    want = flash_attention_reference(q, k, v, segment_ids=seg, positions=pos)
    num_pages = 1 + sum(-(-n // page_size) for n in lens) + 3
    pages = make_kv_pages(num_pages, page_size, 2, 16, dtype)
    free = list(rng.permutation(np.arange(1, num_pages)))
    max_pages = max(-(-n // page_size) for n in lens)
    tables = np.zeros((len(lens), max_pages), np.int32)
    slots = []
    for row, n in enumerate(lens):
        for j in range(-(-n // page_size)):
            tables[row, j] = free.pop()
        slots += [tables[row, j // page_size] * page_size + j % page_size for j in range(n)]
    pages = write_kv(pages, k, v, jnp.asarray(slots, jnp.int32))
    got = paged_attention_reference(
        q, pages.k, pages.v, jnp.asarray(tables), jnp.asarray(lens, jnp.int32),
        segment_ids=seg, positions=pos, k_scale=pages.k_scale, v_scale=pages.v_scale,
    )
    tol = 1e-5 if dtype == jnp.float32 else 5e-2
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=tol, rtol=tol)


def test_padding_rows_are_zero():
    rng = np.random.default_rng(1)
    q, k, v, seg, pos = _packed(rng, [3, 2], 4, 4, 8)
    seg = seg.at[-1].set(-1)
    out = flash_attention_reference(q, k, v, segment_ids=seg, positions=pos)
    assert np.all(np.asarray(out[-1]) == 0)
    assert np.all(np.isfinite(np.asarray(out)))
