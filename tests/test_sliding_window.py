"""Sliding-window attention (Mistral ``sliding_window``, Qwen2 ``use_sliding_window``).

References are independent of the code under test: kernels against a dense numpy loop that
applies transformers' rule (a query at position p sees keys p - W < k <= p); configs
against ``transformers``' own config objects (Qwen2's ``layer_types``); models and the
engine against ``transformers`` run on the whole sequence, with prompts and generations
longer than the window. Page release is checked with a fake model that reads exactly the
window, on the real scheduler, allocator and packer.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from model_parity import assert_matches_hf, decode_paged, hf_logits, jitted, packed_batch, rel_error, tiny_variant

import models
from energon_jax.batch import Buckets, pack
from energon_jax.request import Request, SamplingParams
from energon_jax.sampling import SampledTokens
from energon_jax.scheduler import Scheduler, SchedulerConfig
from energon_jax.sliding_window import (
    live_pages,
    pages_behind_window,
    pages_held_at_once,
    release_pages_behind_window,
)
from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.page_layout import NULL_PAGE
from pallas_kernels.paged_attention import paged_attention
from pallas_kernels.step_attention import step_attention

F32_TOL = 1e-4
WINDOW = 8


# -- kernels ------------------------------------------------------------------------------
def dense_window_attention(q, k, v, q_rows, q_pos, kv_rows, kv_pos, window, scale):
    """``[T, N, H]`` by a plain loop: token t attends keys of its row with q_pos - W < kv_pos <= q_pos."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    t, n, h = q.shape
    g = n // k.shape[1]
    out = np.zeros((t, n, h))
    for i in range(t):
        if q_rows[i] < 0:
            continue
        keys = [j for j in range(len(kv_rows))
                if kv_rows[j] == q_rows[i] and q_pos[i] - window < kv_pos[j] <= q_pos[i]]
        for head in range(n):
            s = np.array([q[i, head] @ k[j, head // g] for j in keys]) * scale
            p = np.exp(s - s.max())
            out[i, head] = (p / p.sum()) @ v[keys, head // g]
    return out


@pytest.mark.parametrize("implementation", ["reference", "pallas"])
def test_flash_attention_window_matches_dense(implementation):
    rng = np.random.default_rng(0)
    lens, pad, (n, kh, h), w = [29, 11, 3], 3, (4, 2, 16), 7
    t = sum(lens) + pad
    q, k, v = (jnp.asarray(rng.normal(size=(t, heads, h)), jnp.float32) for heads in (n, kh, kh))
    seg = np.concatenate([np.full(m, r) for r, m in enumerate(lens)] + [np.full(pad, -1)]).astype(np.int32)
    pos = np.concatenate([np.arange(m) for m in lens] + [np.zeros(pad)]).astype(np.int32)
    got = flash_attention(q, k, v, segment_ids=jnp.asarray(seg), positions=jnp.asarray(pos), sliding_window=w,
                          implementation=implementation)
    want = dense_window_attention(q, k, v, seg, pos, seg, pos, w, h**-0.5)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)


def test_flash_attention_tpu_kernel_window_matches_dense():
    """The Mosaic kernel in TPU interpret mode; 300 tokens with 128-key blocks and a window of
    40, so whole key blocks fall behind the window and the block schedule skips them."""
    from jax.experimental.pallas import tpu as pltpu

    from pallas_kernels._flash_attention_tpu import flash_attention_tpu
    from pallas_kernels.block_sizes import FlashBlockSizes

    rng = np.random.default_rng(3)
    lens, pad, (n, kh, h), w = [260, 40], 4, (2, 1, 128), 40
    t = sum(lens) + pad
    q, k, v = (jnp.asarray(rng.normal(size=(t, heads, h)), jnp.float32) for heads in (n, kh, kh))
    seg = np.concatenate([np.full(m, r) for r, m in enumerate(lens)] + [np.full(pad, -1)]).astype(np.int32)
    pos = np.concatenate([np.arange(m) for m in lens] + [np.zeros(pad)]).astype(np.int32)
    with pltpu.force_tpu_interpret_mode():
        got = flash_attention_tpu(q, k, v, segment_ids=jnp.asarray(seg), positions=jnp.asarray(pos), sliding_window=w,
                                  block_sizes=FlashBlockSizes(block_q=32, block_k=128))
    want = dense_window_attention(q, k, v, seg, pos, seg, pos, w, h**-0.5)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)


def paged_case(seed: int, *, page_size: int = 4):
    """Rows with long contexts (decode rows and prefill chunks) in a shuffled page pool whose
    pages behind every window hold NaN-free garbage or are the null page (released)."""
    rng = np.random.default_rng(seed)
    n, kh, h, w = 4, 2, 8, WINDOW
    ctx = [37, 21, 50, 9]  # cached tokens after the step, this step's included
    q_len = [1, 6, 1, 9]  # decode, chunk, decode, fresh prompt
    max_pages = -(-max(ctx) // page_size)
    num_pages = 1 + sum(-(-c // page_size) for c in ctx)
    kp = rng.normal(size=(num_pages, page_size, kh, h)).astype(np.float32)
    vp = rng.normal(size=(num_pages, page_size, kh, h)).astype(np.float32)
    perm = rng.permutation(np.arange(1, num_pages))
    tables = np.zeros((len(ctx), max_pages), np.int32)
    used = 0
    for r, c in enumerate(ctx):
        m = -(-c // page_size)
        tables[r, :m] = perm[used:used + m]
        used += m
        # What the scheduler would have released before this step: pages behind the first query.
        dead = pages_behind_window(c - q_len[r], w, page_size)
        tables[r, :dead] = NULL_PAGE
    kp[NULL_PAGE] = 1e4 * rng.normal(size=kp.shape[1:])  # must never be attended
    seg = np.concatenate([np.full(m, r) for r, m in enumerate(q_len)] + [np.full(3, -1)]).astype(np.int32)
    pos = np.concatenate([np.arange(c - m, c) for c, m in zip(ctx, q_len)] + [np.zeros(3)]).astype(np.int32)
    q = rng.normal(size=(len(seg), n, h)).astype(np.float32)
    # Dense reference over each row's context, rebuilt from the pool.
    keys_k, keys_v, kv_rows, kv_pos = [], [], [], []
    for r, c in enumerate(ctx):
        for p in range(c):
            page = tables[r, p // page_size]
            keys_k.append(kp[page, p % page_size])
            keys_v.append(vp[page, p % page_size])
            kv_rows.append(r)
            kv_pos.append(p)
    want = dense_window_attention(q, np.stack(keys_k), np.stack(keys_v), seg, pos, kv_rows, kv_pos, w, h**-0.5)
    arrays = dict(q=q, k_pages=kp, v_pages=vp, page_tables=tables, lengths=np.asarray(ctx, np.int32), seg=seg, pos=pos)
    return {k: jnp.asarray(v) for k, v in arrays.items()}, want, w


@pytest.mark.parametrize("implementation", ["reference", "xla"])
def test_paged_attention_window_matches_dense(implementation):
    a, want, w = paged_case(1)
    got = paged_attention(a["q"], a["k_pages"], a["v_pages"], a["page_tables"], a["lengths"], segment_ids=a["seg"],
                          positions=a["pos"], sliding_window=w, implementation=implementation)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("implementation", ["reference", "xla", "pallas"])
def test_step_attention_window_grid(seed, implementation):
    """Through the models' entry point, every implementation (pallas: the ragged kernel, interpreted)."""
    from pallas_kernels.page_layout import KVPages, PagedAttentionMetadata

    a, want, w = paged_case(seed, page_size=[4, 8, 16, 4][seed])
    pages = KVPages(a["k_pages"], a["v_pages"])
    meta = PagedAttentionMetadata(slot_mapping=jnp.zeros(a["q"].shape[0], jnp.int32), page_tables=a["page_tables"],
                                  context_lens=a["lengths"])
    got = step_attention(a["q"], pages, meta, segment_ids=a["seg"], positions=a["pos"], sliding_window=w,
                         implementation=implementation)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)


def test_window_errors_name_the_value():
    a, _, _ = paged_case(0)
    with pytest.raises(ValueError, match="sliding_window=0"):
        paged_attention(a["q"], a["k_pages"], a["v_pages"], a["page_tables"], a["lengths"], segment_ids=a["seg"],
                        positions=a["pos"], sliding_window=0, implementation="reference")
    with pytest.raises(ValueError, match="split-K"):
        paged_attention(a["q"], a["k_pages"], a["v_pages"], a["page_tables"], a["lengths"], segment_ids=a["seg"],
                        positions=a["pos"], sliding_window=4, implementation="pallas", interpret=True)


# -- configs ------------------------------------------------------------------------------
def test_layer_windows_follow_transformers():
    import transformers as tf

    from models.llama import config_from_hf
    from models.mixtral import config_from_hf as mixtral_config_from_hf

    base = dict(vocab_size=10, hidden_size=8, num_attention_heads=2, num_key_value_heads=1, intermediate_size=16,
                max_position_embeddings=64)
    cases = [
        tf.MistralConfig(**base, num_hidden_layers=3, sliding_window=16),
        tf.MistralConfig(**base, num_hidden_layers=2, sliding_window=None),
        tf.MixtralConfig(**base, num_hidden_layers=2, sliding_window=12),
        tf.Qwen2Config(**base, num_hidden_layers=4, use_sliding_window=True, sliding_window=16, max_window_layers=1),
        tf.Qwen2Config(**base, num_hidden_layers=4, use_sliding_window=False, sliding_window=16, max_window_layers=1),
        tf.Qwen2Config(**base, num_hidden_layers=3, use_sliding_window=True, sliding_window=5,
                       layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    ]
    for hf in cases:
        d = {**hf.to_dict(), "architectures": [type(hf).__name__.replace("Config", "ForCausalLM")]}
        cfg = (mixtral_config_from_hf if isinstance(hf, tf.MixtralConfig) else config_from_hf)(d)
        if isinstance(hf, tf.Qwen2Config):
            want = [hf.sliding_window if t == "sliding_attention" else None for t in hf.layer_types]
        else:
            want = [hf.sliding_window] * hf.num_hidden_layers
        assert [cfg.sliding_window(i) for i in range(cfg.num_layers)] == want, d
        assert cfg.max_position_embeddings == 64  # no longer capped at the window
    # Qwen2 as older checkpoints store it: no layer_types, max_window_layers decides.
    old = dict(base, architectures=["Qwen2ForCausalLM"], num_hidden_layers=3, use_sliding_window=True,
               sliding_window=6, max_window_layers=2)
    cfg = config_from_hf(old)
    assert cfg.layer_windows == (None, None, 6) and cfg.kv_window is None
    mistral = config_from_hf(dict(base, architectures=["MistralForCausalLM"], num_hidden_layers=2, sliding_window=6))
    assert mistral.kv_window == 6
    with pytest.raises(ValueError, match="sliding_window=0"):
        config_from_hf({**old, "sliding_window": 0})
    with pytest.raises(ValueError, match="layer_types"):
        config_from_hf({**old, "layer_types": ["sliding_attention"]})


# -- models against transformers ------------------------------------------------------------
@pytest.fixture(scope="module")
def windowed(tmp_path_factory):
    """Tiny Mistral (every layer windowed) and Qwen2 (layer 1 of 2 windowed), window 8."""
    root = tmp_path_factory.mktemp("sliding")
    paths = {
        "mistral": tiny_variant(root / "mistral", "mistral", seed=3, sliding_window=WINDOW),
        "qwen2": tiny_variant(root / "qwen2", "qwen2", seed=4, use_sliding_window=True, sliding_window=WINDOW,
                              max_window_layers=1, layer_types=["full_attention", "sliding_attention"]),
    }
    from hf_fixtures import _save_tokenizer

    for path in paths.values():
        _save_tokenizer("mistral", path)
    return paths


def load_ref(path):
    import torch
    import transformers as tf

    ref = tf.AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32, attn_implementation="eager")
    return ref.eval()


# Qwen2 here mixes a full and a windowed layer; Mistral (every layer windowed) runs through
# the engine below by default, and here in the slow run.
@pytest.mark.parametrize("variant", [pytest.param("mistral", marks=pytest.mark.slow), "qwen2"])
def test_model_matches_transformers_past_the_window(variant, windowed):
    model, config = models.load(windowed[variant])
    assert config.sliding_window(1) == WINDOW
    ref = load_ref(windowed[variant])
    batch = packed_batch([23, 12, 19], config.vocab_size, seed=5)
    want = hf_logits(ref, batch.seqs)
    forward = jitted(model)
    # Packed prefill without a cache (flash_attention), bucket padding included.
    logits, _ = forward(batch.input_ids, batch.positions, batch.segment_ids)
    assert_matches_hf(logits, batch, want, rtol=F32_TOL)
    # Through the paged cache: a first step with a prefix of each row, then one token per row per step.
    got = decode_paged(forward, config, batch, prefill=[10, 3, 13], page_size=4)  # [real tokens, V]
    assert rel_error(got, np.concatenate(want)) <= F32_TOL


def hf_greedy(ref, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation by re-running transformers on the whole sequence each token (no cache)."""
    import torch

    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(ref(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("variant", ["mistral", pytest.param("qwen2", marks=pytest.mark.slow)])
def test_engine_greedy_matches_transformers_and_releases_pages(variant, windowed):
    """Chunked prefill (8-token budget), paged decode, prefix caching on, planning ahead, device
    page tables: greedy tokens equal transformers' past the window, and the pool ends empty. Mistral
    windows every layer (pages are released, the default pool holds 8 pages a sequence);
    this Qwen2 has a full layer too (nothing released)."""
    from energon_jax import Engine

    path = windowed[variant]
    engine = Engine.from_pretrained(path, page_size=4, max_num_seqs=4, max_num_batched_tokens=8, min_token_bucket=8,
                                    max_model_len=128, warmup=False)
    assert engine._scheduler.config.attention_window == (WINDOW if variant == "mistral" else None)
    # Page tables stay on the device, the window's released pages sent as null entries (HostRows).
    assert engine.runner.page_table is not None and engine._loop._host_rows is not None
    ref = load_ref(path)
    rng = np.random.default_rng(7)
    shared = rng.integers(3, 300, 13).tolist()
    prompts = [shared + rng.integers(3, 300, 9).tolist(), shared + rng.integers(3, 300, 4).tolist(),
               rng.integers(3, 300, 5).tolist()]
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    outs = engine.generate(prompts, params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(ref, prompt, 20)
    assert engine._scheduler.pages_used == 0
    # Again: the shared prefix now comes from the cache (pages released by the first run).
    again = engine.generate(prompts[:1], params, use_tqdm=False)
    assert again[0].token_ids == outs[0].token_ids and engine._scheduler.pages_used == 0


# -- page release ---------------------------------------------------------------------------
class WindowEcho:
    """A fake model over the page pool that reads only the fed tokens' windows (checking that
    every page there is live and holds its positions); its next token is a hash of the last
    ``window`` tokens and of the length, read back through the page table."""

    def __init__(self, num_pages: int, page_size: int, window: int) -> None:
        self.page_size, self.window = page_size, window
        self.tok = np.full(num_pages * page_size, -1, np.int64)
        self.pos = np.full(num_pages * page_size, -1, np.int64)

    def step(self, batch, plan) -> SampledTokens:
        s, real = self.page_size, batch.segment_ids >= 0
        self.tok[batch.attn.slot_mapping[real]] = batch.input_ids[real]
        self.pos[batch.attn.slot_mapping[real]] = batch.positions[real]
        ids = np.zeros(batch.logits_indices.shape[0], np.int32)
        for r in range(len(plan.rows)):
            ctx = int(batch.attn.context_lens[r])
            # Every fed token reads its own window: positions from the first one's window start.
            p = np.arange(max(0, plan.rows[r].start_pos - self.window + 1), ctx)
            pages = batch.attn.page_tables[r][p // s]
            assert np.all(pages != NULL_PAGE), "a page inside the window was released"
            sl = pages * s + p % s
            assert np.all(self.pos[sl] == p), "a page inside the window was reused"
            ids[r] = window_rule(self.tok[sl][-self.window:].tolist(), ctx)
        top = np.zeros((len(ids), 2), np.int32)
        return SampledTokens(ids, np.zeros(len(ids), np.float32), top, np.zeros((len(ids), 2), np.float32))


def window_rule(last: list[int], length: int) -> int:
    h = length
    for t in last:
        h = (h * 31 + t) % 1_000_003
    return 5 + h % 90


def window_reference(prompt: list[int], n: int, window: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(window_rule(ids[-window:], len(ids)))
    return ids[len(prompt):]


@pytest.mark.parametrize("num_pages", [40, 10])  # 10: a pool of 9 usable pages, for 20-page sequences
@pytest.mark.parametrize("prefix_caching", [False, True])
def test_scheduler_releases_pages_behind_the_window(prefix_caching, num_pages):
    ps, w = 4, 6
    cfg = SchedulerConfig(max_num_seqs=3, max_num_batched_tokens=10, max_model_len=96, page_size=ps,
                          num_pages=num_pages, enable_prefix_caching=prefix_caching, prefix_cache_seed=0,
                          attention_window=w)
    assert pages_held_at_once(96, ps, w, 10) == 9  # ceil((6 + 2 * 10) / 4) + 2
    sched = Scheduler(cfg)
    buckets = Buckets.create(max_num_batched_tokens=10, max_num_seqs=3, max_model_len=96, page_size=ps, min_tokens=4)
    fake = WindowEcho(cfg.num_pages, ps, w)
    rng = np.random.default_rng(2)
    shared = rng.integers(5, 95, 20).tolist()  # the last request's hits start behind its window
    prompts = [shared + rng.integers(5, 95, k).tolist() for k in (3, 17, 0)] + [rng.integers(5, 95, 30).tolist()]
    reqs = [Request(f"r{i}", p, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
            for i, p in enumerate(prompts)]
    for r in reqs:
        sched.add(r)
    peak = 0
    while sched.has_work():
        plan = sched.schedule()
        sched.update(plan, fake.step(pack(plan, buckets), plan))
        for r in sched.running:
            live = [p for p in r.pages if p != NULL_PAGE]
            # Live pages: the window plus the partial pages at its two ends.
            assert len(live) <= -(-w // ps) + 2, (r.request_id, r.pages)
        peak = max(peak, sched.pages_used)
    for r, p in zip(reqs, prompts):
        assert r.output_token_ids == window_reference(p, 40, w), r.request_id
    assert sched.pages_used == 0
    assert peak <= 3 * (-(-w // ps) + 2) + 3  # without release, three requests of ~60 tokens hold ~45 pages
    if prefix_caching:
        assert sched.prefix_cache_hits > 0


def test_pool_needs_only_the_window():
    from energon_jax.engine_config import check_pool_holds_one_sequence

    check_pool_holds_one_sequence(10, 4, 96, window=6, max_num_batched_tokens=10)  # 9 pages held at once
    with pytest.raises(ValueError, match=r"holds 8 pages .*\(9 pages held at once with sliding window 6\)"):
        check_pool_holds_one_sequence(9, 4, 96, window=6, max_num_batched_tokens=10)
    with pytest.raises(ValueError, match="24 pages"):
        check_pool_holds_one_sequence(10, 4, 96)
    sched = Scheduler(SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=10, max_model_len=96, page_size=4,
                                      num_pages=10, attention_window=6))
    sched.add(Request("long", list(range(5, 50)), SamplingParams(max_tokens=50)))  # 94 tokens, 9 usable pages
    no_window = Scheduler(SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=10, max_model_len=96, page_size=4,
                                          num_pages=10))
    with pytest.raises(ValueError, match="needs 24 KV pages"):
        no_window.add(Request("long", list(range(5, 50)), SamplingParams(max_tokens=50)))


def test_release_function_edits_pages_in_place():
    from energon_jax.kv_cache import PageAllocator

    alloc = PageAllocator(20, 4)
    pages = alloc.allocate(6)  # positions 0..23
    assert pages_behind_window(10, 6, 4) == 1 and pages_behind_window(5, 6, 4) == 0
    assert release_pages_behind_window(pages, alloc, 13, 6) == 2  # keys >= 8 still needed: pages 0, 1 dead
    assert pages[:2] == [NULL_PAGE, NULL_PAGE] and alloc.num_used == 4
    assert release_pages_behind_window(pages, alloc, 14, 6) == 0  # nothing new
    assert release_pages_behind_window(pages, alloc, 24, 1) == 4  # all six now
    assert alloc.num_used == 0
    assert live_pages(pages) == [] and live_pages([3, 4]) == [3, 4]
    with pytest.raises(ValueError, match="window=0"):
        pages_behind_window(3, 0, 4)


# -- the windowed flash kernels lower for their real platforms (no hardware needed) ---------
def test_windowed_flash_kernels_lower_for_gpu_and_tpu(monkeypatch):
    from kernel_lowering import assert_one_triton_kernel, lower_for_cuda, lower_for_tpu, packed_causal_args

    from pallas_kernels._flash_attention_tpu import flash_attention_tpu

    args = packed_causal_args(1000, 8, 2, 128, jnp.bfloat16)
    gpu = lambda q, k, v, seg, pos: flash_attention(  # noqa: E731
        q, k, v, segment_ids=seg, positions=pos, sliding_window=256, implementation="pallas")
    assert_one_triton_kernel(lower_for_cuda(monkeypatch, gpu, *args), "flash_attention_packed")
    tpu = lambda q, k, v, seg, pos: flash_attention_tpu(  # noqa: E731
        q, k, v, segment_ids=seg, positions=pos, sliding_window=256)
    assert lower_for_tpu(tpu, *args).count("stablehlo.custom_call @tpu_custom_call") == 1
