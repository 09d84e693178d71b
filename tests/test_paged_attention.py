"""paged_attention's Pallas kernel (interpret mode on CPU) against the jnp reference."""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from jax.experimental.pallas import tpu as pltpu

from kernel_cases import INTERPRET, TOLERANCE, case_id, pairwise, randn, rel_err
from pallas_kernels import paged_attention, paged_attention_reference
from pallas_kernels._paged_attention_pallas import combine_splits
from pallas_kernels._paged_attention_tpu import paged_attention_tpu
from pallas_kernels.block_sizes import PagedBlockSizes
from pallas_kernels.page_layout import quantize_kv

FACTORS = {
    "mode": ("decode", "multi_query"),
    "group": (1, 2, 4, 8),
    "head_dim": (64, 128),
    "dtype": (jnp.float32, jnp.bfloat16),
    "int8": (False, True),
    "splits": (1, 3),
}
NUM_KV_HEADS, PAGE_SIZE, NUM_PAGES, MAX_PAGES = 2, 8, 24, 6


def _problem(rng, case):
    h, dtype = case["head_dim"], case["dtype"]
    page_size, max_pages = case.get("page_size", PAGE_SIZE), case.get("max_pages", MAX_PAGES)
    num_pages = max(NUM_PAGES, 3 * max_pages + 1)
    b = 3
    lengths = rng.integers(1, max_pages * page_size, size=b).astype(np.int32)  # rarely page multiples
    lengths[0] = 3 * page_size + 5
    if "max_pages" in case:  # a long context: one row near the limit
        lengths[1] = max_pages * page_size - 3
    perm = rng.permutation(np.arange(1, num_pages))
    tables = np.zeros((b, max_pages), np.int32)
    used = 0
    for r in range(b):
        need = -(-int(lengths[r]) // page_size)
        tables[r, :need] = perm[used:used + need]
        used += need
    shape = (num_pages, page_size, NUM_KV_HEADS, h)
    k, v = randn(rng, shape, jnp.float32), randn(rng, shape, jnp.float32)
    scales = {}
    if case["int8"]:
        k, ks = quantize_kv(k.reshape(-1, NUM_KV_HEADS, h))
        v, vs = quantize_kv(v.reshape(-1, NUM_KV_HEADS, h))
        k, v = k.reshape(shape), v.reshape(shape)
        scales = dict(k_scale=ks.reshape(shape[:3]), v_scale=vs.reshape(shape[:3]))
    else:
        k, v = k.astype(dtype), v.astype(dtype)
    if case["mode"] == "decode":
        rows = dict()
        t = b
    else:  # chunked prefill / speculative: 1..4 trailing tokens per row, then 2 padding tokens
        per_row = [min(int(n), int(lengths[r])) for r, n in enumerate(rng.integers(1, 5, size=b))]
        seg = np.concatenate([np.full(n, r) for r, n in enumerate(per_row)] + [np.full(2, -1)]).astype(np.int32)
        pos = np.concatenate([np.arange(lengths[r] - n, lengths[r]) for r, n in enumerate(per_row)] + [np.zeros(2)])
        rows = dict(segment_ids=jnp.asarray(seg), positions=jnp.asarray(pos.astype(np.int32)))
        t = len(seg)
    q = randn(rng, (t, NUM_KV_HEADS * case["group"], h), dtype)
    return (q, k, v, jnp.asarray(tables), jnp.asarray(lengths)), dict(**rows, **scales)


def _run(case, seed, tpu=False):
    rng = np.random.default_rng(seed)
    args, kw = _problem(rng, case)
    blocks = PagedBlockSizes(num_splits=case["splits"])
    if tpu:  # the Mosaic kernel in TPU interpret mode (decode rows spelled out: it takes the packed form)
        q, lengths = args[0], args[4]
        rows = dict(segment_ids=jnp.arange(q.shape[0], dtype=jnp.int32), positions=lengths - 1)
        with pltpu.force_tpu_interpret_mode():
            out = paged_attention_tpu(*args, **{**rows, **kw}, block_sizes=blocks)
    else:
        out = paged_attention(*args, **kw, implementation="pallas", interpret=INTERPRET, block_sizes=blocks)
    ref = paged_attention_reference(*args, **kw)
    q = args[0]
    assert out.shape == q.shape and out.dtype == q.dtype
    # Interpret mode starts every kernel output as NaN: finite and equal to the reference means
    # fully written (TPU interpret mode: see test_flash_attention_tpu.test_tpu_interpret_poisons_outputs).
    assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
    if "segment_ids" in kw:
        assert np.all(np.asarray(out, np.float32)[np.asarray(kw["segment_ids"]) < 0] == 0.0)
    assert rel_err(out, ref) <= TOLERANCE[case["dtype"]]


@pytest.mark.parametrize("case", pairwise(FACTORS), ids=case_id)
def test_matches_reference_pairwise(case):
    _run(case, seed=len(case_id(case)) % 5)


@pytest.mark.slow
@pytest.mark.parametrize("case", [dict(zip(FACTORS, c)) for c in itertools.product(*FACTORS.values())], ids=case_id)
def test_matches_reference_full_grid(case):
    _run(case, seed=2)


# Head dims and page sizes that are not powers of two: the GPU kernel pads them in its tiles
# (it raised "power of 2" in the Triton lowering before; see test_kernel_lowering).
AWKWARD_CASES = [
    dict(mode="decode", group=2, head_dim=80, dtype=jnp.float32, int8=False, splits=2, page_size=12),
    dict(mode="multi_query", group=4, head_dim=96, dtype=jnp.bfloat16, int8=True, splits=1, page_size=8),
    dict(mode="multi_query", group=1, head_dim=24, dtype=jnp.float32, int8=False, splits=3, page_size=12),
]


@pytest.mark.parametrize("case", AWKWARD_CASES, ids=case_id)
def test_awkward_head_dims_and_page_sizes(case):
    _run(case, seed=9)


WIDE_FACTORS = {
    "mode": ("decode", "multi_query"),
    "group": (1, 4),
    "head_dim": (64, 80, 96, 128, 256),
    "dtype": (jnp.float32, jnp.bfloat16),
    "int8": (False, True),
    "splits": (1, 3),
    "page_size": (8, 12, 16, 32),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", pairwise(WIDE_FACTORS), ids=case_id)
def test_matches_reference_wide_grid(case):
    _run(case, seed=6)


@pytest.mark.slow
@pytest.mark.parametrize("page_size", [8, 16, 32])
def test_long_contexts_split_k(page_size):
    """Contexts into the thousands (up to 3000 tokens), split 8 ways, decode and multi-query rows."""
    for mode in ("decode", "multi_query"):
        _run(dict(mode=mode, group=4, head_dim=128, dtype=jnp.bfloat16, int8=False, splits=8,
                  page_size=page_size, max_pages=-(-3000 // page_size)), seed=7)


# Each value of each factor at least once: TPU interpret mode is slower than plain interpret.
TPU_CASES = [
    dict(mode="decode", group=1, head_dim=64, dtype=jnp.float32, int8=False, splits=1),
    dict(mode="multi_query", group=2, head_dim=128, dtype=jnp.bfloat16, int8=True, splits=3),
    dict(mode="decode", group=4, head_dim=128, dtype=jnp.float32, int8=True, splits=3),
    dict(mode="multi_query", group=8, head_dim=64, dtype=jnp.bfloat16, int8=False, splits=1),
]


@pytest.mark.parametrize("case", TPU_CASES, ids=case_id)
def test_tpu_kernel_matches_reference(case):
    _run(case, seed=case["group"], tpu=True)


@pytest.mark.slow
@pytest.mark.parametrize("case", pairwise(FACTORS), ids=case_id)
def test_tpu_kernel_matches_reference_pairwise(case):
    _run(case, seed=len(case_id(case)) % 5, tpu=True)


@pytest.mark.parametrize("kernel", ["pallas", "tpu"])
def test_pages_past_the_length_are_not_read(kernel):
    """Pages beyond a row's length (and the null page) hold NaN: reading them would leak NaN."""
    rng = np.random.default_rng(3)
    h = 64
    shape = (NUM_PAGES, PAGE_SIZE, NUM_KV_HEADS, h)
    k, v = np.array(randn(rng, shape, jnp.float32)), np.array(randn(rng, shape, jnp.float32))
    tables = np.array([[3, 5, 9, 0, 0, 0], [4, 0, 0, 0, 0, 0]], np.int32)
    lengths = np.array([2 * PAGE_SIZE + 1, 1], np.int32)
    for page in set(range(NUM_PAGES)) - {3, 5, 9, 4}:
        k[page], v[page] = np.nan, np.nan
    q = randn(rng, (2, 4 * NUM_KV_HEADS, h), jnp.float32)
    args = (q, jnp.asarray(k), jnp.asarray(v), jnp.asarray(tables), jnp.asarray(lengths))
    blocks = PagedBlockSizes(num_splits=3)
    if kernel == "tpu":
        rows = dict(segment_ids=jnp.arange(2, dtype=jnp.int32), positions=jnp.asarray(lengths) - 1)
        with pltpu.force_tpu_interpret_mode():
            out = paged_attention_tpu(*args, **rows, block_sizes=blocks)
    else:
        out = paged_attention(*args, implementation="pallas", interpret=INTERPRET, block_sizes=blocks)
    clean = (q, jnp.asarray(np.nan_to_num(k)), jnp.asarray(np.nan_to_num(v)), jnp.asarray(tables), jnp.asarray(lengths))
    assert bool(jnp.all(jnp.isfinite(out)))
    assert rel_err(out, paged_attention_reference(*clean)) <= 1e-5


def test_combine_splits_equals_one_softmax():
    rng = np.random.default_rng(4)
    s = rng.standard_normal((3, 10))  # 3 splits of 10 scores, one query row
    vals = rng.standard_normal((3, 10, 4))
    m = s.max(axis=1)
    p = np.exp(s - m[:, None])
    acc = np.einsum("sc,sch->sh", p, vals)[:, None, :]
    out = combine_splits(jnp.asarray(acc, jnp.float32), jnp.asarray(m[:, None], jnp.float32),
                         jnp.asarray(p.sum(1)[:, None], jnp.float32))
    full = np.exp(s.reshape(-1) - s.max())
    want = (full @ vals.reshape(-1, 4)) / full.sum()
    np.testing.assert_allclose(np.asarray(out)[0], want, rtol=1e-5)


def test_bad_split_count_names_the_field():
    with pytest.raises(ValueError, match="num_splits=0"):
        PagedBlockSizes(num_splits=0)


def test_default_splits_fill_a_gpu_at_batch_1():
    """Batch-1 decode, 8 KV heads, 256 pages: 8 programs without split-K; the GPU default splits
    the context until there are enough programs, never into empty splits; elsewhere 4."""
    from pallas_kernels.block_sizes import SPLIT_K_TARGET_PROGRAMS

    splits, per = PagedBlockSizes().splits(programs=8, num_pages=256, on_gpu=True)
    assert 8 * splits >= SPLIT_K_TARGET_PROGRAMS and (splits - 1) * per < 256 <= splits * per
    assert PagedBlockSizes().splits(programs=8, num_pages=256, on_gpu=False) == (4, 64)
    assert PagedBlockSizes().splits(programs=8, num_pages=3, on_gpu=True) == (3, 1)
    assert PagedBlockSizes(num_splits=2).splits(programs=8, num_pages=256, on_gpu=True) == (2, 128)


def _greedy_with_cache(model, config, prompts, steps, page_size=4, kv_dtype=jnp.float32):
    """Prefill both prompts into a paged cache (multi-query rows), then decode one token per row."""
    from pallas_kernels import PagedAttentionMetadata, make_kv_pages

    per_row = 8
    cache = tuple(
        make_kv_pages(1 + per_row * len(prompts), page_size, config.num_kv_heads, config.head_dim, kv_dtype)
        for _ in range(config.num_layers)
    )
    tables = np.array([np.arange(1 + r * per_row, 1 + (r + 1) * per_row) for r in range(len(prompts))], np.int32)
    seqs = [list(p) for p in prompts]
    new_tokens = [list(range(len(p))) for p in prompts]  # positions fed this step
    for _ in range(steps):
        ids = np.concatenate([[seqs[r][i] for i in new_tokens[r]] for r in range(len(seqs))]).astype(np.int32)
        pos = np.concatenate(new_tokens).astype(np.int32)
        seg = np.concatenate([np.full(len(t), r) for r, t in enumerate(new_tokens)]).astype(np.int32)
        slots = tables[seg, pos // page_size] * page_size + pos % page_size
        lens = np.array([len(s) for s in seqs], np.int32)
        meta = PagedAttentionMetadata(jnp.asarray(slots), jnp.asarray(tables), jnp.asarray(lens))
        last = np.cumsum([len(t) for t in new_tokens]) - 1
        logits, cache = model(jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(seg), kv_cache=cache,
                              attn_meta=meta, logits_indices=jnp.asarray(last))
        for r, tok in enumerate(np.asarray(jnp.argmax(logits, axis=-1))):
            seqs[r].append(int(tok))
            new_tokens[r] = [len(seqs[r]) - 1]
    return [s[len(p):] for s, p in zip(seqs, prompts)]


@pytest.mark.parametrize("kv_dtype", [jnp.float32, jnp.int8])
def test_tiny_model_greedy_tokens_match_with_kernels_forced(tiny_checkpoint, monkeypatch, kv_dtype):
    """Chunked prefill + decode over the page pool: the same greedy tokens with the kernel forced on."""
    import models
    from kernel_cases import greedy_no_cache, two_prompts

    model, config = models.load(tiny_checkpoint("llama_gqa"))
    prompts = two_prompts(np.random.default_rng(0))
    monkeypatch.setenv("ENERGON_KERNELS", "reference")
    want = _greedy_with_cache(model, config, prompts, 4, kv_dtype=kv_dtype)
    if kv_dtype == jnp.float32:  # the cache path agrees with plain prefill
        assert want == greedy_no_cache(model, prompts, steps=4)
    monkeypatch.setenv("ENERGON_KERNELS", "pallas")  # on CPU: interpret mode
    assert _greedy_with_cache(model, config, prompts, 4, kv_dtype=kv_dtype) == want

