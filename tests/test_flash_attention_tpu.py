"""The TPU (Mosaic) FlashAttention kernel in TPU interpret mode on CPU, against the jnp reference.

TPU interpret mode simulates HBM/VMEM/SMEM and starts every allocated buffer as NaN
(``InterpretParams.uninitialized_memory="nan"``): a finite output that matches the reference
was fully written (see ``test_tpu_interpret_poisons_outputs`` for why both are needed).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernel_cases import TOLERANCE, case_id, packed_batch, pairwise, randn, rel_err
from pallas_kernels import flash_attention_reference
from pallas_kernels._flash_attention_tpu import flash_attention_tpu
from pallas_kernels.block_sizes import FlashBlockSizes

FACTORS = {
    "segments": (1, 2, 3, 4),
    "causal": (True, False),
    "group": (1, 2, 4, 8),
    "head_dim": (64, 128),
    "dtype": (jnp.float32, jnp.bfloat16),
}
# Each value of each factor at least once (TPU interpret mode is slower than plain interpret).
DEFAULT_CASES = [
    dict(segments=1, causal=True, group=1, head_dim=64, dtype=jnp.float32),
    dict(segments=2, causal=False, group=2, head_dim=128, dtype=jnp.bfloat16),
    dict(segments=3, causal=True, group=4, head_dim=128, dtype=jnp.float32),
    dict(segments=4, causal=False, group=8, head_dim=64, dtype=jnp.bfloat16),
]
# The smallest blocks Mosaic accepts (block_q a multiple of 8, block_k of 128: FlashBlockSizes.check_tpu);
# test_kernel_lowering lowers the kernel at exactly these. ~170-token batches: several query and KV blocks.
BLOCKS = FlashBlockSizes(block_q=32, block_k=128)


def _run(case: dict, seed: int) -> None:
    rng = np.random.default_rng(seed)
    total = 150 + 7 * seed
    seg, pos = packed_batch(rng, total, case["segments"], padding=4)
    n, h, dtype = 2 * case["group"], case["head_dim"], case["dtype"]
    q, k, v = randn(rng, (total, n, h), dtype), randn(rng, (total, 2, h), dtype), randn(rng, (total, 2, h), dtype)
    kw = dict(segment_ids=jnp.asarray(seg), positions=jnp.asarray(pos), causal=case["causal"])
    with pltpu.force_tpu_interpret_mode():
        out = flash_attention_tpu(q, k, v, **kw, block_sizes=BLOCKS)
    ref = flash_attention_reference(q, k, v, **kw)
    assert out.shape == q.shape and out.dtype == dtype
    assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
    assert np.all(np.asarray(out, np.float32)[seg < 0] == 0.0)
    assert rel_err(out, ref) <= TOLERANCE[dtype]


@pytest.mark.parametrize("case", DEFAULT_CASES, ids=case_id)
def test_matches_reference(case):
    _run(case, seed=case["segments"])


@pytest.mark.slow
@pytest.mark.parametrize("case", pairwise({**FACTORS, "head_dim": (64, 80, 96, 128, 256)}), ids=case_id)
def test_matches_reference_pairwise(case):
    _run(case, seed=1)


@pytest.mark.slow
@pytest.mark.parametrize("case", [dict(zip(FACTORS, c)) for c in itertools.product(*FACTORS.values())], ids=case_id)
def test_matches_reference_full_grid(case):
    _run(case, seed=4)


def test_masked_kv_blocks_are_not_computed():
    """Keys in a segment no query has hold NaN; skipped blocks must not reach the output."""
    rng = np.random.default_rng(0)
    t, c, h = 200, 384, 64
    q = randn(rng, (t, 4, h), jnp.float32)
    k, v = np.array(randn(rng, (c, 2, h), jnp.float32)), np.array(randn(rng, (c, 2, h), jnp.float32))
    kv_seg = np.zeros(c, np.int32)
    kv_seg[128:256] = 7  # the whole middle KV block belongs to a segment no query has
    k[128:256], v[128:256] = np.nan, np.nan
    kv_pos = np.concatenate([np.arange(128), np.zeros(128, np.int32), np.arange(128, 256)]).astype(np.int32)
    kw = dict(segment_ids=jnp.zeros(t, jnp.int32), positions=jnp.arange(t, dtype=jnp.int32), causal=True,
              kv_segment_ids=jnp.asarray(kv_seg), kv_positions=jnp.asarray(kv_pos))
    with pltpu.force_tpu_interpret_mode():
        out = flash_attention_tpu(q, jnp.asarray(k), jnp.asarray(v), **kw, block_sizes=BLOCKS)
    ref = flash_attention_reference(q, jnp.asarray(np.nan_to_num(k)), jnp.asarray(np.nan_to_num(v)), **kw)
    assert bool(jnp.all(jnp.isfinite(out)))
    assert rel_err(out, ref) <= 1e-5


def test_tpu_interpret_poisons_outputs():
    """The premise of the "fully written" checks, and its limit.

    TPU interpret mode, like a TPU, stages each output block in one VMEM buffer: a block the
    kernel never writes is copied out from whatever that buffer holds, NaN if no earlier grid
    step wrote it, else the previous block's values. So a finite output proves every element
    was written *or* holds another block's stale values; the comparison with the reference
    (fresh random inputs, so no two blocks agree) rules out the second.
    """

    def kernel(x_ref, o_ref):
        @pl.when(pl.program_id(0) == 1)
        def _():
            o_ref[...] = x_ref[...]

    spec = pl.BlockSpec((8, 128), lambda i: (i, 0))
    with pltpu.force_tpu_interpret_mode():
        out = pl.pallas_call(kernel, grid=(3,), in_specs=[spec], out_specs=spec,
                             out_shape=jax.ShapeDtypeStruct((24, 128), jnp.float32))(jnp.ones((24, 128), jnp.float32))
    out = np.asarray(out)
    assert np.all(np.isnan(out[:8]))  # never written, nothing staged before it
    assert np.all(out[8:16] == 1.0)  # written
    assert np.all(out[16:] == 1.0)  # never written: the stale copy of block 1


@pytest.mark.parametrize(("block_q", "block_k", "field"), [(32, 16, "block_k=16"), (32, 64, "block_k=64"),
                                                            (4, 128, "block_q=4")])
def test_block_sizes_mosaic_rejects_are_refused_by_name(block_q, block_k, field):
    """Sizes Mosaic cannot tile raise a ValueError naming the field and the rule (Mosaic's own
    lowering error came later and named neither)."""
    rng = np.random.default_rng(1)
    q, k, v = (randn(rng, (40, 2, 64), jnp.float32) for _ in range(3))
    with pytest.raises(ValueError, match=rf"{field} must be a multiple of"):
        flash_attention_tpu(q, k, v, segment_ids=jnp.zeros(40, jnp.int32), positions=jnp.arange(40),
                            block_sizes=FlashBlockSizes(block_q=block_q, block_k=block_k))
