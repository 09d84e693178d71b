"""int8_matmul's Pallas kernel (interpret mode on CPU) against the jnp reference."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jax.experimental.pallas import tpu as pltpu

from kernel_cases import INTERPRET, MIN_ROWS, TOLERANCE, case_id, pairwise, randn, rel_err
from pallas_kernels._int8_matmul_tpu import int8_matmul_tpu
from pallas_kernels.block_sizes import MatmulBlockSizes
from pallas_kernels.int8_matmul import fit_block, int8_matmul, int8_matmul_reference

FACTORS = {
    "m": (1, 7, 40),
    "kn": ((96, 64), (100, 72), (64, 200)),  # block multiples and not
    "dtype": (jnp.float32, jnp.bfloat16),
    "splits": (None, 1, 3),  # split-K: heuristic (1 in interpret mode), none, uneven K ranges
}


@pytest.mark.parametrize("case", pairwise(FACTORS), ids=case_id)
def test_matches_reference(case):
    rng = np.random.default_rng(case["m"])
    (k, n), dtype = case["kn"], case["dtype"]
    x = randn(rng, (case["m"], k), dtype)
    w = jnp.asarray(rng.integers(-127, 128, (k, n)), jnp.int8)
    scales = jnp.asarray(rng.uniform(1e-3, 2e-2, n), jnp.float32)
    blocks = MatmulBlockSizes(block_m=MIN_ROWS, block_n=32, block_k=32, num_splits=case["splits"])
    out = int8_matmul(x, w, scales, implementation="pallas", interpret=INTERPRET, block_sizes=blocks)
    ref = int8_matmul_reference(x, w, scales)
    assert out.shape == (case["m"], n) and out.dtype == dtype
    assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))  # interpret mode starts outputs as NaN
    assert rel_err(out, ref) <= TOLERANCE[dtype]


# The Mosaic kernel in TPU interpret mode: one tile (dims below the block), several K and N
# tiles that divide, and dims that must be padded (1000 = no multiple of 128 divides it).
TPU_CASES = [
    dict(m=1, kn=(96, 64), dtype=jnp.float32),
    dict(m=7, kn=(1000, 300), dtype=jnp.bfloat16),
    dict(m=40, kn=(256, 384), dtype=jnp.float32),
    dict(m=19, kn=(384, 1000), dtype=jnp.bfloat16),
]
TPU_BLOCKS = MatmulBlockSizes(block_m=16, block_n=128, block_k=128)


@pytest.mark.parametrize("case", TPU_CASES, ids=case_id)
def test_tpu_kernel_matches_reference(case):
    rng = np.random.default_rng(case["m"])
    (k, n), dtype = case["kn"], case["dtype"]
    x = randn(rng, (case["m"], k), dtype)
    w = jnp.asarray(rng.integers(-127, 128, (k, n)), jnp.int8)
    scales = jnp.asarray(rng.uniform(1e-3, 2e-2, n), jnp.float32)
    with pltpu.force_tpu_interpret_mode():  # buffers start as NaN: finite + equal to the reference = written
        out = int8_matmul_tpu(x, w, scales, block_sizes=TPU_BLOCKS)
    assert out.shape == (case["m"], n) and out.dtype == dtype
    assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
    assert rel_err(out, int8_matmul_reference(x, w, scales)) <= TOLERANCE[dtype]


def test_leading_dims_are_kept():
    rng = np.random.default_rng(0)
    x = randn(rng, (2, 3, 64), jnp.float32)
    w = jnp.asarray(rng.integers(-127, 128, (64, 32)), jnp.int8)
    s = jnp.ones(32, jnp.float32)
    blocks = MatmulBlockSizes(block_m=MIN_ROWS, block_n=32, block_k=32)
    out = int8_matmul(x, w, s, implementation="pallas", interpret=INTERPRET, block_sizes=blocks)
    assert out.shape == (2, 3, 32)
    assert rel_err(out, int8_matmul_reference(x, w, s)) <= 1e-5


def test_errors_name_the_field():
    with pytest.raises(ValueError, match="w_int8.dtype"):
        int8_matmul(jnp.ones((1, 4)), jnp.ones((4, 4)), jnp.ones(4))
    with pytest.raises(ValueError, match="scales.shape"):
        int8_matmul(jnp.ones((1, 4)), jnp.ones((4, 4), jnp.int8), jnp.ones(3))


def test_split_k_covers_every_k_block_once():
    from pallas_kernels.block_sizes import SPLIT_K_TARGET_PROGRAMS, split_k

    for num_splits, programs, num_k in ((None, 56, 224), (None, 300, 56), (3, 1, 7), (8, 1, 3), (1, 4, 10)):
        splits, per = split_k(num_splits, programs=programs, num_k_blocks=num_k, on_gpu=True)
        ranges = [range(s * per, min((s + 1) * per, num_k)) for s in range(splits)]
        assert sorted(k for r in ranges for k in r) == list(range(num_k)) and all(len(r) for r in ranges)
    # The batch-1 OPT down projection (56 output tiles) gets enough programs for every SM twice.
    splits, _ = split_k(None, programs=56, num_k_blocks=224, on_gpu=True)
    assert 56 * splits >= SPLIT_K_TARGET_PROGRAMS
    assert split_k(None, programs=56, num_k_blocks=224, on_gpu=False) == (1, 224)
    with pytest.raises(ValueError, match="num_splits=0"):
        MatmulBlockSizes(num_splits=0)


def test_fit_block_prefers_divisors():
    assert fit_block(4096, 128) == 128
    assert fit_block(96, 128) == 32
    assert fit_block(100, 128) == 128  # no power-of-two divisor >= 16: pad

