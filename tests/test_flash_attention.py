"""flash_attention's Pallas kernel (interpret mode on CPU) against the jnp reference."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from kernel_cases import INTERPRET, TOLERANCE, case_id, packed_batch, pairwise, randn, rel_err
from pallas_kernels import flash_attention, flash_attention_reference
from pallas_kernels._flash_attention_pallas import block_schedule
from pallas_kernels.block_sizes import FlashBlockSizes

FACTORS = {
    "segments": (1, 2, 3, 4),
    "causal": (True, False),
    "group": (1, 2, 4, 8),
    "head_dim": (64, 128),
    "dtype": (jnp.float32, jnp.bfloat16),
}
# Small blocks so that interpret mode walks many of them; compiled on a TPU, Mosaic needs
# key blocks of 128 lanes (the lengths here then fit one or two blocks).
BLOCKS = FlashBlockSizes(block_q=128, block_k=128) if jax.default_backend() == "tpu" else FlashBlockSizes(16, 16)
NUM_KV_HEADS = 2


def _run(case: dict, seed: int) -> None:
    rng = np.random.default_rng(seed)
    total = 41 + 6 * seed  # never a multiple of the 16-token blocks: sequences span several blocks
    seg, pos = packed_batch(rng, total, case["segments"], padding=3)
    if case.get("singleton"):  # the first token is a sequence of its own (length 1)
        first = seg == 0
        seg = np.where(seg >= 0, seg + 1, -1).astype(np.int32)
        pos = np.where(first, pos - 1, pos).astype(np.int32)
        seg[0], pos[0] = 0, 0
    n, h, dtype = NUM_KV_HEADS * case["group"], case["head_dim"], case["dtype"]
    q = randn(rng, (total, n, h), dtype)
    k = randn(rng, (total, NUM_KV_HEADS, h), dtype)
    v = randn(rng, (total, NUM_KV_HEADS, h), dtype)
    kw = dict(segment_ids=jnp.asarray(seg), positions=jnp.asarray(pos), causal=case["causal"],
              sm_scale=case.get("sm_scale"))
    out = flash_attention(q, k, v, **kw, implementation="pallas", interpret=INTERPRET, block_sizes=BLOCKS)
    ref = flash_attention_reference(q, k, v, **kw)
    assert out.shape == q.shape and out.dtype == dtype
    # Interpret mode starts every output buffer as NaN (see test_interpret_poisons_outputs):
    # a finite result means the kernel wrote every element.
    assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
    assert np.all(np.asarray(out, np.float32)[seg < 0] == 0.0)
    assert rel_err(out, ref) <= TOLERANCE[dtype]


PAIRWISE = pairwise(FACTORS)


@pytest.mark.parametrize("case", PAIRWISE, ids=case_id)
def test_matches_reference_pairwise(case):
    _run(case, seed=PAIRWISE.index(case) % 7)  # fixed seeds: reproducible under any PYTHONHASHSEED


# Head dims that are not powers of two (padded to 128 in the kernel's tiles), a passed
# sm_scale, a one-token sequence beside longer ones.
AWKWARD_CASES = [
    dict(segments=3, causal=True, group=2, head_dim=80, dtype=jnp.float32, sm_scale=0.3, singleton=True),
    dict(segments=2, causal=False, group=4, head_dim=96, dtype=jnp.bfloat16, sm_scale=0.05, singleton=True),
]


@pytest.mark.parametrize("case", AWKWARD_CASES, ids=case_id)
def test_awkward_head_dims_scale_and_one_token_rows(case):
    _run(case, seed=2)


WIDE_FACTORS = {**FACTORS, "head_dim": (64, 80, 96, 128, 256), "sm_scale": (None, 0.2), "singleton": (False, True)}


@pytest.mark.slow
@pytest.mark.parametrize("case", pairwise(WIDE_FACTORS), ids=case_id)
def test_matches_reference_wide_grid(case):
    _run(case, seed=5)


@pytest.mark.slow
@pytest.mark.parametrize("causal", [True, False])
def test_long_sequences(causal):
    """Thousands of tokens in 64-token blocks: long rows next to short ones."""
    rng = np.random.default_rng(12)
    total = 2500
    seg, pos = packed_batch(rng, total, 3, padding=7)
    q, k, v = randn(rng, (total, 8, 128), jnp.bfloat16), *(randn(rng, (total, 2, 128), jnp.bfloat16) for _ in "kv")
    kw = dict(segment_ids=jnp.asarray(seg), positions=jnp.asarray(pos), causal=causal)
    blocks = BLOCKS if jax.default_backend() == "tpu" else FlashBlockSizes(64, 64)
    out = flash_attention(q, k, v, **kw, implementation="pallas", interpret=INTERPRET, block_sizes=blocks)
    assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
    assert rel_err(out, flash_attention_reference(q, k, v, **kw)) <= TOLERANCE[jnp.bfloat16]


@pytest.mark.slow
@pytest.mark.parametrize(
    "case", [dict(zip(FACTORS, c)) for c in itertools.product(*FACTORS.values())], ids=case_id
)
def test_matches_reference_full_grid(case):
    _run(case, seed=3)


def test_interpret_poisons_outputs():
    """The premise of the "fully written" checks: an output the kernel never writes stays NaN."""

    def kernel(x_ref, o_ref):
        @pl.when(pl.program_id(0) == 0)
        def _():
            o_ref[...] = x_ref[...]

    out = pl.pallas_call(
        kernel, grid=(2,), in_specs=[pl.BlockSpec((8,), lambda i: (i,))],
        out_specs=pl.BlockSpec((8,), lambda i: (i,)), out_shape=jax.ShapeDtypeStruct((16,), jnp.float32),
        interpret=True,
    )(jnp.ones(16, jnp.float32))
    assert np.all(np.asarray(out[:8]) == 1.0) and np.all(np.isnan(np.asarray(out[8:])))


def test_masked_kv_blocks_are_skipped():
    """Keys no query can see sit in their own blocks and hold NaN: had they been read, NaN would leak."""
    rng = np.random.default_rng(0)
    b = BLOCKS.block_k
    t, c, n, kh, h = b + b // 2, 4 * b, 4, 2, 64
    q = randn(rng, (t, n, h), jnp.float32)
    k = np.array(randn(rng, (c, kh, h), jnp.float32))
    v = np.array(randn(rng, (c, kh, h), jnp.float32))
    kv_seg = np.full(c, 0, np.int32)
    kv_seg[b:3 * b] = 7  # a segment no query belongs to: KV blocks 1 and 2
    k[b:3 * b], v[b:3 * b] = np.nan, np.nan
    kv_pos = np.concatenate([np.arange(b), np.zeros(2 * b, np.int32), np.arange(b, 2 * b)]).astype(np.int32)
    kw = dict(
        segment_ids=jnp.zeros(t, jnp.int32), positions=jnp.arange(t, dtype=jnp.int32), causal=True,
        kv_segment_ids=jnp.asarray(kv_seg), kv_positions=jnp.asarray(kv_pos),
    )
    out = flash_attention(q, jnp.asarray(k), jnp.asarray(v), **kw, implementation="pallas", interpret=INTERPRET,
                          block_sizes=BLOCKS)
    ref = flash_attention_reference(q, jnp.asarray(np.nan_to_num(k)), jnp.asarray(np.nan_to_num(v)), **kw)
    assert bool(jnp.all(jnp.isfinite(out)))
    assert rel_err(out, ref) <= 1e-5


def test_block_schedule_skips_above_the_causal_diagonal():
    seg = jnp.zeros(64, jnp.int32)
    pos = jnp.arange(64, dtype=jnp.int32)
    needed, kv_blocks, counts = block_schedule(seg, pos, seg, pos, block_q=16, block_k=16, causal=True)
    np.testing.assert_array_equal(np.asarray(needed), np.tril(np.ones((4, 4), bool)))
    np.testing.assert_array_equal(np.asarray(counts), [1, 2, 3, 4])
    # Needed blocks first, ascending; then the last one repeated (no new DMA when prefetched).
    np.testing.assert_array_equal(np.asarray(kv_blocks), [[0, 0, 0, 0], [0, 1, 1, 1], [0, 1, 2, 2], [0, 1, 2, 3]])
    # Two segments, no causality: the off-diagonal blocks are skipped too.
    seg2 = jnp.repeat(jnp.arange(2, dtype=jnp.int32), 32)
    needed, kv_blocks, counts = block_schedule(seg2, pos, seg2, pos, block_q=16, block_k=16, causal=False)
    np.testing.assert_array_equal(np.asarray(needed), np.kron(np.eye(2, dtype=bool), np.ones((2, 2), bool)))
    np.testing.assert_array_equal(np.asarray(counts), [2, 2, 2, 2])
    np.testing.assert_array_equal(np.asarray(kv_blocks), [[0, 1, 1, 1], [0, 1, 1, 1], [2, 3, 3, 3], [2, 3, 3, 3]])


def test_block_schedule_lists_match_the_marks():
    """On random packed batches, each query block's list is exactly its marked blocks, ascending."""
    from kernel_cases import packed_batch

    rng = np.random.default_rng(5)
    for segments, causal in ((1, True), (3, True), (4, False)):
        seg, pos = packed_batch(rng, 128, segments, padding=21)
        needed, kv_blocks, counts = (np.asarray(a) for a in block_schedule(
            jnp.asarray(seg), jnp.asarray(pos), jnp.asarray(seg), jnp.asarray(pos), block_q=16, block_k=8,
            causal=causal))
        for i in range(needed.shape[0]):
            want = np.flatnonzero(needed[i])
            assert counts[i] == len(want)
            np.testing.assert_array_equal(kv_blocks[i, : counts[i]], want)
            assert np.all(kv_blocks[i, counts[i]:] == (want[-1] if len(want) else 0))
        assert not needed[-1].any()  # the last 16 rows are padding only: nothing to visit


def test_env_var_forces_the_kernel(monkeypatch):
    rng = np.random.default_rng(1)
    q, k, v = (randn(rng, (19, 2, 64), jnp.float32) for _ in range(3))
    kw = dict(segment_ids=jnp.zeros(19, jnp.int32), positions=jnp.arange(19, dtype=jnp.int32))
    monkeypatch.setenv("ENERGON_KERNELS", "pallas")
    out = flash_attention(q, k, v, **kw, interpret=INTERPRET, block_sizes=BLOCKS)
    assert rel_err(out, flash_attention_reference(q, k, v, **kw)) <= 1e-5


def test_bad_block_size_names_the_field():
    with pytest.raises(ValueError, match="block_q=24"):
        FlashBlockSizes(block_q=24)


def test_tiny_model_greedy_tokens_match_with_kernels_forced(tiny_checkpoint, monkeypatch):
    """A tiny Llama (GQA, head dim 24) decodes the same greedy tokens with the Pallas kernel forced on."""
    import models
    from kernel_cases import greedy_no_cache, two_prompts

    model, _ = models.load(tiny_checkpoint("llama_gqa"))
    prompts = two_prompts(np.random.default_rng(0))
    monkeypatch.setenv("ENERGON_KERNELS", "reference")
    want = greedy_no_cache(model, prompts, steps=4)
    monkeypatch.setenv("ENERGON_KERNELS", "pallas")  # on CPU: interpret mode
    assert greedy_no_cache(model, prompts, steps=4) == want

