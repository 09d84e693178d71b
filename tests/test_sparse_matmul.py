"""pack_sparse and sparse_matmul's Pallas kernel (interpret mode on CPU) against dense jnp."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from kernel_cases import INTERPRET, MIN_ROWS, TOLERANCE, case_id, pairwise, randn, rel_err
from pallas_kernels.sparse_matmul import pack_sparse, sparse_matmul, sparse_matmul_reference, unpack_sparse

FACTORS = {
    "m": (1, 8, 19),
    "kn": ((64, 64), (100, 72), (48, 130)),
    "sparsity": (0.5, 0.8, 0.95),
    "dtype": (jnp.float32, jnp.bfloat16),
    "splits": (None, 2),  # split-K: heuristic (1 in interpret mode), uneven K ranges
}


def _pruned(rng, k, n, sparsity, dtype):
    w = np.array(randn(rng, (k, n), jnp.float32))
    w[rng.random((k, n)) < sparsity] = 0.0
    return jnp.asarray(w).astype(dtype)


@pytest.mark.parametrize("case", pairwise(FACTORS), ids=case_id)
def test_matches_dense(case):
    rng = np.random.default_rng(case["m"])
    (k, n), dtype = case["kn"], case["dtype"]
    w = _pruned(rng, k, n, case["sparsity"], dtype)
    packed = pack_sparse(w, tile_k=16, tile_n=32)
    x = randn(rng, (case["m"], k), dtype)
    out = sparse_matmul(x, packed, implementation="pallas", interpret=INTERPRET, block_m=MIN_ROWS,
                        num_splits=case["splits"])
    dense = jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32))
    assert out.shape == (case["m"], n) and out.dtype == dtype
    assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))  # interpret mode starts outputs as NaN
    assert rel_err(out, dense) <= TOLERANCE[dtype]
    assert rel_err(sparse_matmul_reference(x, packed), dense) <= TOLERANCE[dtype]


@pytest.mark.parametrize("tiles", [(16, 32), (32, 32), (8, 4)])
def test_pack_roundtrip_and_size(tiles):
    rng = np.random.default_rng(1)
    w = _pruned(rng, 70, 50, 0.8, jnp.bfloat16)
    packed = pack_sparse(w, tile_k=tiles[0], tile_n=tiles[1])
    np.testing.assert_array_equal(np.asarray(unpack_sparse(packed), np.float32), np.asarray(w, np.float32))
    nnz = int(np.count_nonzero(np.asarray(w, np.float32)))
    kt, nt = packed.grid
    assert packed.values.size == nnz and packed.tile_offsets.size == kt * nt + 1
    assert packed.packed_bytes == nnz * 2 + kt * nt * tiles[0] * tiles[1] // 8 + 4 * (kt * nt + 1)
    assert packed.dense_bytes == 70 * 50 * 2


def test_empty_and_full_tiles():
    """A tile with no non-zeros, a fully dense tile and an all-zero weight all work."""
    rng = np.random.default_rng(2)
    w = np.array(randn(rng, (32, 64), jnp.float32))
    w[:16, :32] = 0.0  # one empty tile; [16:, 32:] stays fully dense
    x = randn(rng, (3, 32), jnp.float32)
    for weight in (w, np.zeros_like(w)):
        packed = pack_sparse(jnp.asarray(weight), tile_k=16, tile_n=32)
        out = sparse_matmul(x, packed, implementation="pallas", interpret=INTERPRET, block_m=MIN_ROWS)
        np.testing.assert_allclose(np.asarray(out), np.asarray(x) @ weight, rtol=1e-5, atol=1e-5)


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="tile_n=24"):
        pack_sparse(jnp.ones((4, 4)), tile_n=24)
    with pytest.raises(ValueError, match="num_splits=0"):
        sparse_matmul(jnp.ones((1, 4)), pack_sparse(jnp.ones((4, 4))), num_splits=0)

