"""ragged_paged_attention: both kernels (GPU-style Pallas interpret mode, Mosaic in TPU
interpret mode) against the jnp reference on fresh random inputs with fixed seeds, and the
reference against a dense numpy attention written here.

Every problem mixes rows: idle rows (no query; with and without cached context), a decode
row with context 1, decode rows with long contexts, a chunk resuming late in its prompt and
longer than a query block, a whole prompt, rows past ``num_rows`` with junk lengths, and
padding tokens after the last row. Pool pages that no row owns, the null page included,
hold NaN: a kernel that reads past a row's length (or uses a padding row) leaks NaN into
the output. Every output element is compared: valid tokens against the reference, padding
tokens against exact zeros.
"""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from kernel_cases import INTERPRET, MIN_ROWS, TOLERANCE, case_id, pairwise, randn, rel_err
from pallas_kernels import RaggedBlockSizes, ragged_paged_attention, ragged_paged_attention_reference
from pallas_kernels._ragged_paged_attention_tpu import ragged_paged_attention_tpu
from pallas_kernels.page_layout import quantize_kv
from pallas_kernels.ragged_paged_attention import max_work_items, ragged_schedule

NUM_KV_HEADS = 2


def _rows(page_size: int, long: int) -> list[tuple[int, int]]:
    """(query tokens, context length) of each row in use: the mix the module docstring lists."""
    assert long >= 45, "the 37-token chunk must resume after some cached context"
    return [(0, 0), (1, 1), (1, long), (37, long - 3), (13, 13), (0, 2 * page_size + 1), (3, 3 * page_size + 2),
            (1, page_size)]


def make_problem(rng, *, rows, page_size, group, head_dim, dtype, int8, extra_rows=2, pad_tokens=3):
    """Random pool with NaN in every page no row owns; returns (args, kwargs, clean_args)."""
    b = len(rows) + extra_rows
    max_pages = max(-(-c // page_size) for _, c in rows) + 1
    need = [-(-c // page_size) for _, c in rows]
    num_pages = 1 + sum(need) + 3
    perm = rng.permutation(np.arange(1, num_pages))
    tables = np.zeros((b, max_pages), np.int32)
    used = 0
    for r, n in enumerate(need):
        tables[r, :n] = perm[used:used + n]
        used += n
    q_lens = [q for q, _ in rows]
    cu = np.concatenate([[0], np.cumsum(q_lens), np.full(extra_rows, sum(q_lens))]).astype(np.int32)
    ctx = np.array([c for _, c in rows] + list(rng.integers(1, 50, extra_rows)), np.int32)  # junk past num_rows
    t = sum(q_lens) + pad_tokens
    shape = (num_pages, page_size, NUM_KV_HEADS, head_dim)
    k, v = randn(rng, shape, jnp.float32), randn(rng, shape, jnp.float32)
    kw = {}
    if int8:
        k, ks = quantize_kv(k.reshape(-1, NUM_KV_HEADS, head_dim))
        v, vs = quantize_kv(v.reshape(-1, NUM_KV_HEADS, head_dim))
        k, v = k.reshape(shape), v.reshape(shape)
        kw = dict(k_scales=ks.reshape(shape[:3]), v_scales=vs.reshape(shape[:3]))
    else:
        k, v = k.astype(dtype), v.astype(dtype)
    q = randn(rng, (t, NUM_KV_HEADS * group, head_dim), dtype)
    owned = set(tables[: len(rows)].ravel()) - {0}
    unowned = np.array(sorted(set(range(num_pages)) - owned))
    meta = (jnp.asarray(tables), jnp.asarray(ctx), jnp.asarray(cu), jnp.asarray([len(rows)], jnp.int32))
    clean = (q, k, v, *meta)
    if int8:  # NaN scales poison int8 pages
        kw_nan = {name: s.at[unowned].set(jnp.nan) for name, s in kw.items()}
        return (q, k, v, *meta), kw_nan, clean, kw
    return (q, k.at[unowned].set(jnp.nan), v.at[unowned].set(jnp.nan), *meta), kw, clean, kw


def check(out, ref, args, dtype):
    """Every element: finite, padding tokens exactly 0, the rest within tolerance of the reference."""
    q, cu, num_rows = args[0], np.asarray(args[5]), int(np.asarray(args[6])[0])
    out32, ref32 = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert np.isfinite(out32).all() and np.isfinite(ref32).all()
    real = cu[num_rows]
    assert (out32[real:] == 0).all() and (ref32[real:] == 0).all()
    assert np.abs(ref32[:real]).max() > 0
    assert rel_err(out, ref) <= TOLERANCE[dtype]


def run_case(case, seed, *, tpu=False):
    rng = np.random.default_rng(seed)
    page, long = case["page_size"], case.get("long", 70)
    args, kw, clean, clean_kw = make_problem(
        rng, rows=_rows(page, long), page_size=page, group=case["group"], head_dim=case["head_dim"],
        dtype=case["dtype"], int8=case["int8"],
    )
    opts = dict(sm_scale=case.get("sm_scale"), sliding_window=case.get("window"), soft_cap=case.get("soft_cap"))
    blocks = RaggedBlockSizes(block_q=case.get("block_q", 8), pages_per_block=case.get("pages_per_block", 2),
                              num_splits=None if tpu else case.get("splits", 2), min_rows=1 if tpu else MIN_ROWS)
    if tpu:
        with pltpu.force_tpu_interpret_mode():
            out = ragged_paged_attention_tpu(*args, **kw, **opts, block_sizes=blocks)
    else:
        out = ragged_paged_attention(*args, **kw, **opts, block_sizes=blocks, implementation="pallas",
                                     interpret=INTERPRET)
    ref = ragged_paged_attention_reference(*clean, **clean_kw, **opts)
    check(out, ref, args, case["dtype"])


@pytest.mark.parametrize("tpu", [False, True], ids=["pallas", "tpu"])
def test_pages_behind_the_window_are_not_read(tpu):
    """With a sliding window, pages wholly behind every query's window may be released (the
    scheduler puts the null page there) or hold anything: NaN there must not reach the output."""
    rng = np.random.default_rng(21)
    page, window = 8, 20
    rows = [(1, 100), (30, 90), (1, 9), (0, 40)]
    args, kw, clean, clean_kw = make_problem(rng, rows=rows, page_size=page, group=2, head_dim=128,
                                             dtype=jnp.float32, int8=False)
    q, k, v, tables, ctx, cu, nr = args
    behind = []
    for r, (ql, c) in enumerate(rows):
        first_visible = max(c - ql - window + 1, 0)  # the row's first query sees keys from here on
        behind += [int(tables[r, p]) for p in range(first_visible // page)]
    assert len(behind) > 10
    k, v = k.at[jnp.asarray(behind)].set(jnp.nan), v.at[jnp.asarray(behind)].set(jnp.nan)
    blocks = RaggedBlockSizes(block_q=4, pages_per_block=4, num_splits=None if tpu else 2, min_rows=MIN_ROWS)
    if tpu:
        with pltpu.force_tpu_interpret_mode():
            out = ragged_paged_attention_tpu(q, k, v, tables, ctx, cu, nr, sliding_window=window, block_sizes=blocks)
    else:
        out = ragged_paged_attention(q, k, v, tables, ctx, cu, nr, sliding_window=window, block_sizes=blocks,
                                     implementation="pallas", interpret=INTERPRET)
    check(out, ragged_paged_attention_reference(*clean, sliding_window=window), args, jnp.float32)


# --- the reference against dense attention written out in numpy ------------------------------


def dense_numpy(q, k, v, tables, ctx, cu, num_rows, *, scale, window=None, soft_cap=None, ks=None, vs=None):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    if ks is not None:
        k, v = k * np.asarray(ks)[..., None], v * np.asarray(vs)[..., None]
    t, n, h = q.shape
    page_size, kh = k.shape[1], k.shape[2]
    out = np.zeros_like(q)
    for r in range(num_rows):
        ql, c = cu[r + 1] - cu[r], ctx[r]
        keys = np.concatenate([k[p] for p in tables[r]])[:c]  # [C, K, H]
        vals = np.concatenate([v[p] for p in tables[r]])[:c]
        for i in range(ql):
            pos = c - ql + i
            for head in range(n):
                kv = head // (n // kh)
                s = keys[:, kv] @ q[cu[r] + i, head] * scale
                if soft_cap is not None:
                    s = soft_cap * np.tanh(s / soft_cap)
                j = np.arange(c)
                ok = (j <= pos) & ((j > pos - window) if window else True)
                p = np.where(ok, np.exp(s - s[ok].max()), 0.0)
                out[cu[r] + i, head] = p @ vals[:, kv] / p.sum()
    return out


@pytest.mark.parametrize("opts", [dict(), dict(window=5, soft_cap=2.5, sm_scale=0.2), dict(int8=True, window=17)],
                         ids=["plain", "window-softcap-scale", "int8-window"])
def test_reference_matches_dense_numpy(opts):
    rng = np.random.default_rng(7)
    int8 = opts.get("int8", False)
    args, kw, clean, clean_kw = make_problem(rng, rows=_rows(4, 45), page_size=4, group=2, head_dim=16,
                                             dtype=jnp.float32, int8=int8)
    scale = opts.get("sm_scale", 16**-0.5)
    ref = ragged_paged_attention_reference(*clean, **clean_kw, sm_scale=scale, sliding_window=opts.get("window"),
                                           soft_cap=opts.get("soft_cap"))
    q, k, v, tables, ctx, cu, nr = (np.asarray(x) for x in clean)
    want = dense_numpy(q, k, v, tables, ctx, cu, int(nr[0]), scale=scale, window=opts.get("window"),
                       soft_cap=opts.get("soft_cap"), ks=clean_kw.get("k_scales"), vs=clean_kw.get("v_scales"))
    assert np.abs(np.asarray(ref) - want).max() <= 1e-5 * np.abs(want).max()


def test_schedule_has_no_item_for_empty_rows_and_splits_long_chunks():
    cu = jnp.asarray([0, 0, 1, 21, 21, 21], jnp.int32)  # rows of 0, 1, 20, 0 tokens; row 4 unused
    ctx = jnp.asarray([0, 5, 40, 9, 99], jnp.int32)
    sched = ragged_schedule(cu, jnp.asarray([4], jnp.int32), ctx, num_tokens=24, block_q=8)
    assert sched.item_len.shape == (max_work_items(24, 5, 8),)
    real = np.asarray(sched.item_len) > 0
    assert np.asarray(sched.item_row)[real].tolist() == [1, 2, 2, 2]
    assert np.asarray(sched.item_len)[real].tolist() == [1, 8, 8, 4]
    assert np.asarray(sched.item_pos)[real].tolist() == [4, 20, 28, 36]
    assert np.asarray(sched.token_valid).tolist() == [True] * 21 + [False] * 3


# --- the kernels ----------------------------------------------------------------------------

FACTORS = {
    "head_dim": (64, 80, 96, 128, 256),
    "page_size": (8, 16, 32),
    "group": (1, 2, 4),
    "dtype": (jnp.float32, jnp.bfloat16),
    "int8": (False, True),
    "opts": ("plain", "window", "softcap-scale"),
}
OPTS = {"plain": {}, "window": dict(window=21), "softcap-scale": dict(soft_cap=3.0, sm_scale=0.11)}


def _expand(case):
    return {**{k: v for k, v in case.items() if k != "opts"}, **OPTS[case["opts"]]}


DEFAULT_CASES = [  # one of each awkward thing, kept cheap: the grid below is @slow
    dict(head_dim=80, page_size=12, group=2, dtype=jnp.float32, int8=False, window=21, splits=3),
    dict(head_dim=64, page_size=8, group=4, dtype=jnp.bfloat16, int8=True, soft_cap=3.0, sm_scale=0.11, splits=1),
    dict(head_dim=128, page_size=16, group=1, dtype=jnp.float32, int8=False, block_q=4, pages_per_block=3, splits=2),
]


@pytest.mark.parametrize("case", DEFAULT_CASES, ids=case_id)
def test_pallas_kernel_matches_reference(case):
    run_case(case, seed=11)


@pytest.mark.slow
@pytest.mark.parametrize("case", pairwise(FACTORS), ids=case_id)
def test_pallas_kernel_matches_reference_grid(case):
    run_case(_expand(case), seed=3)


@pytest.mark.slow
@pytest.mark.parametrize("page_size", [8, 16, 32])
@pytest.mark.parametrize("splits", [1, 4])
def test_pallas_kernel_long_contexts(page_size, splits):
    """Contexts into the thousands, split-K over many KV blocks."""
    case = dict(head_dim=128, page_size=page_size, group=2, dtype=jnp.bfloat16, int8=False, long=2500,
                splits=splits, pages_per_block=64 // page_size)
    run_case(case, seed=5)


# The Mosaic kernel runs only at sizes Mosaic accepts (RaggedBlockSizes.check_tpu): pages of
# whole sublane tiles (8 rows f32, 16 bf16, 32 int8), query tiles of whole 8-row tiles.
TPU_DEFAULT_CASES = [
    dict(head_dim=128, page_size=8, group=2, dtype=jnp.float32, int8=False, window=21, block_q=4,
         pages_per_block=2),
    dict(head_dim=64, page_size=32, group=4, dtype=jnp.bfloat16, int8=True, soft_cap=3.0, sm_scale=0.11,
         block_q=8, pages_per_block=1),
]


@pytest.mark.parametrize("case", TPU_DEFAULT_CASES, ids=case_id)
def test_tpu_kernel_matches_reference(case):
    run_case(case, seed=13, tpu=True)


def _tpu_legal(case):
    sub = 32 if case["int8"] else 16 if case["dtype"] == jnp.bfloat16 else 8
    return case["page_size"] % sub == 0 and (case["head_dim"] % 128 == 0 or case["head_dim"] == 64)


TPU_FACTORS = {**FACTORS, "head_dim": (64, 128, 256)}


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in pairwise(TPU_FACTORS) if _tpu_legal(c)], ids=case_id)
def test_tpu_kernel_matches_reference_grid(case):
    run_case({**_expand(case), "block_q": 8}, seed=4, tpu=True)


@pytest.mark.slow
def test_tpu_kernel_long_context():
    run_case(dict(head_dim=128, page_size=16, group=2, dtype=jnp.bfloat16, int8=False, long=2100, block_q=8,
                  pages_per_block=8), seed=6, tpu=True)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(page_size=12, dtype=jnp.float32, head_dim=128), "page_size=12 must be a multiple of 8"),
        (dict(page_size=16, dtype=jnp.int8, head_dim=128), "page_size=16 must be a multiple of 32"),
        (dict(page_size=16, dtype=jnp.float32, head_dim=80), "head_dim=80 must be 64 or a multiple of 128"),
        (dict(page_size=16, dtype=jnp.float32, head_dim=128, block_q=2), r"block_q \* group=4 must be a multiple of 8"),
    ],
)
def test_tpu_block_sizes_name_the_mosaic_rule(kw, message):
    blocks = RaggedBlockSizes(block_q=kw.get("block_q", 8))
    with pytest.raises(ValueError, match=message):
        blocks.check_tpu(page_size=kw["page_size"], group=2, head_dim=kw["head_dim"], kv_dtype=kw["dtype"])


def test_bad_options_name_the_field():
    rng = np.random.default_rng(0)
    args, kw, _, _ = make_problem(rng, rows=[(2, 5)], page_size=4, group=1, head_dim=8, dtype=jnp.float32,
                                  int8=False)
    with pytest.raises(ValueError, match="sliding_window=0"):
        ragged_paged_attention(*args, sliding_window=0, implementation="reference")
    with pytest.raises(ValueError, match="soft_cap=-1"):
        ragged_paged_attention(*args, soft_cap=-1.0, implementation="reference")
    with pytest.raises(ValueError, match="block_q=6"):
        RaggedBlockSizes(block_q=6)
    with pytest.raises(ValueError, match="k_scales"):
        ragged_paged_attention(*args, k_scales=jnp.ones(args[1].shape[:3]), v_scales=jnp.ones(args[1].shape[:3]))


@pytest.mark.slow
@pytest.mark.parametrize("case", list(itertools.islice(pairwise(FACTORS), 4)), ids=case_id)
def test_reference_matches_dense_numpy_grid(case):
    c = _expand(case)
    rng = np.random.default_rng(8)
    args, kw, clean, clean_kw = make_problem(rng, rows=_rows(c["page_size"], 45), page_size=c["page_size"],
                                             group=c["group"], head_dim=c["head_dim"], dtype=jnp.float32,
                                             int8=c["int8"])
    scale = c.get("sm_scale") or c["head_dim"] ** -0.5
    ref = ragged_paged_attention_reference(*clean, **clean_kw, sm_scale=scale, sliding_window=c.get("window"),
                                           soft_cap=c.get("soft_cap"))
    q, k, v, tables, ctx, cu, nr = (np.asarray(x) for x in clean)
    want = dense_numpy(q, k, v, tables, ctx, cu, int(nr[0]), scale=scale, window=c.get("window"),
                       soft_cap=c.get("soft_cap"), ks=clean_kw.get("k_scales"), vs=clean_kw.get("v_scales"))
    assert np.abs(np.asarray(ref) - want).max() <= 1e-5 * np.abs(want).max()


# --- the serving path: a tiny model with the kernel forced -----------------------------------


def _with_attention(model, config, implementation: str):
    """The same weights in a model whose config forces ``attention_implementation``."""
    import dataclasses

    from flax import nnx

    from models.loading import abstract_model

    forced = abstract_model(dataclasses.replace(config, attention_implementation=implementation))
    nnx.update(forced, nnx.state(model))
    return forced


def greedy_staggered(model, config, prompts, steps, *, page_size=4, chunk=4, tokens=16):
    """Greedy decoding over a paged cache as the engine packs steps: row 0's whole prompt,
    then row 0 decoding beside row 1's prompt in ``chunk``-token chunks (mixed steps), then
    both decoding. Every step is one static ``tokens``-token bucket with padding at the end."""
    import jax
    from flax import nnx

    from pallas_kernels import PagedAttentionMetadata, make_kv_pages

    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, ids, pos, seg, cache, meta, last):  # one compile for every step (static bucket)
        return nnx.merge(graphdef, state)(ids, pos, seg, kv_cache=cache, attn_meta=meta, logits_indices=last)

    per_row = 8
    cache = tuple(make_kv_pages(1 + per_row * len(prompts), page_size, config.num_kv_heads, config.head_dim)
                  for _ in range(config.num_layers))
    tables = np.array([np.arange(1 + r * per_row, 1 + (r + 1) * per_row) for r in range(len(prompts))], np.int32)
    seqs = [list(p) for p in prompts]
    fed = [0, 0]  # tokens of each row in the cache
    out = [[], []]
    while min(len(o) for o in out) < steps:
        feeds = []
        for r in range(len(prompts)):
            if r == 1 and fed[0] == 0:  # row 1 joins at the second step
                feeds.append([])
                continue
            take = len(seqs[r]) - fed[r] if r == 0 or fed[r] >= len(prompts[r]) else min(chunk, len(seqs[r]) - fed[r])
            feeds.append(list(range(fed[r], fed[r] + take)))
        ids = np.zeros(tokens, np.int32)
        seg = np.full(tokens, -1, np.int32)
        pos = np.zeros(tokens, np.int32)
        t = 0
        for r, f in enumerate(feeds):
            ids[t:t + len(f)] = [seqs[r][i] for i in f]
            seg[t:t + len(f)], pos[t:t + len(f)] = r, f
            t += len(f)
        slots = np.where(seg >= 0, tables[np.maximum(seg, 0), pos // page_size] * page_size + pos % page_size, 0)
        lens = np.array([fed[r] + len(f) for r, f in enumerate(feeds)], np.int32)
        ends = np.cumsum([len(f) for f in feeds]) - 1
        meta = PagedAttentionMetadata(jnp.asarray(slots, jnp.int32), jnp.asarray(tables), jnp.asarray(lens))
        logits, cache = forward(state, jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(seg), cache, meta,
                                jnp.asarray(np.maximum(ends, 0), jnp.int32))
        best = np.asarray(jnp.argmax(logits, axis=-1))
        for r, f in enumerate(feeds):
            fed[r] += len(f)
            if f and fed[r] == len(seqs[r]) and len(out[r]) < steps:  # prompt done (or a decode step)
                seqs[r].append(int(best[r]))
                out[r].append(int(best[r]))
    return out


def test_tiny_model_greedy_tokens_with_the_ragged_kernel_forced(tiny_checkpoint, monkeypatch):
    """Decode, chunked prefill and mixed steps through the ragged kernel (interpret mode on CPU):
    the same greedy tokens as the reference attention and as plain prefill without a cache."""
    import models
    import pallas_kernels.step_attention as step_attention
    from kernel_cases import greedy_no_cache, two_prompts

    calls = []
    kernel = step_attention.ragged_paged_attention
    monkeypatch.setattr(step_attention, "ragged_paged_attention", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    model, config = models.load(tiny_checkpoint("llama_gqa"))
    prompts = two_prompts(np.random.default_rng(0))
    want = greedy_staggered(_with_attention(model, config, "reference"), config, prompts, 4)
    assert want == greedy_no_cache(model, prompts, steps=4) and calls == []
    assert greedy_staggered(_with_attention(model, config, "pallas"), config, prompts, 4) == want
    assert len(calls) == config.num_layers  # traced once per layer: every step runs the one compiled kernel


def test_attention_implementation_is_checked():
    import dataclasses

    from models.config import ModelConfig

    base = dict(architecture="LlamaForCausalLM", vocab_size=8, hidden_size=8, num_layers=1, num_heads=2,
                num_kv_heads=1, head_dim=4, intermediate_size=8, max_position_embeddings=16)
    with pytest.raises(ValueError, match="attention_implementation='ragged'"):
        ModelConfig(**base, attention_implementation="ragged")
    forced = dataclasses.replace(ModelConfig(**base), attention_implementation="pallas")
    assert forced.attention_implementation == "pallas"


@pytest.mark.parametrize("variant", ["gpt2"] + [pytest.param(v, marks=pytest.mark.slow)
                                                 for v in ("opt", "llama", "mixtral", "qwen2")])
def test_every_decoder_passes_its_forced_attention_implementation(tiny_checkpoint, monkeypatch, variant):
    """``attention_implementation`` reaches ``step_attention`` from every decoder family, and the
    forced reference path gives the logits of the default path (one cached step, 2 rows)."""
    import models
    import models.layers as layers
    from pallas_kernels import PagedAttentionMetadata, make_kv_pages

    seen = []
    real = layers.step_attention
    monkeypatch.setattr(layers, "step_attention",
                        lambda *a, **kw: seen.append(kw.get("implementation")) or real(*a, **kw))
    model, config = models.load(tiny_checkpoint(variant))
    rng = np.random.default_rng(3)
    page, lens = 4, np.array([5, 3], np.int32)
    ids = jnp.asarray(rng.integers(3, config.vocab_size, int(lens.sum())), jnp.int32)
    seg = jnp.asarray(np.repeat([0, 1], lens), jnp.int32)
    pos = jnp.asarray(np.concatenate([np.arange(n) for n in lens]), jnp.int32)
    tables = np.array([[1, 2], [3, 4]], np.int32)
    slots = tables[np.asarray(seg), np.asarray(pos) // page] * page + np.asarray(pos) % page
    meta = PagedAttentionMetadata(jnp.asarray(slots, jnp.int32), jnp.asarray(tables), jnp.asarray(lens))
    last = jnp.asarray(np.cumsum(lens) - 1, jnp.int32)

    def logits(m):
        import jax
        from flax import nnx

        graphdef, state = nnx.split(m)
        cache = tuple(make_kv_pages(5, page, config.num_kv_heads, config.head_dim) for _ in range(config.num_layers))
        step = jax.jit(lambda st, c: nnx.merge(graphdef, st)(ids, pos, seg, kv_cache=c, attn_meta=meta,
                                                             logits_indices=last)[0])
        return np.asarray(step(state, cache))

    default = logits(model)
    assert set(seen) == {"auto"} and len(seen) == config.num_layers
    seen.clear()
    forced = logits(_with_attention(model, config, "reference"))
    assert seen == ["reference"] * config.num_layers
    np.testing.assert_allclose(forced, default, rtol=1e-4, atol=1e-4)
