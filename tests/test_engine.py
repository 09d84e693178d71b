"""Engine end to end on a tiny decoder: greedy equals the no-cache reference with staggered
arrivals, chunked prefill and preemption; stop strings, max_tokens, eos, abort; pages all
returned; no compile after warm-up; seeded sampling independent of batch companions."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from energon_jax import Engine, SamplingParams
from energon_jax.tokenizer import Tokenizer
from tiny_decoder import TinyConfig, TinyDecoder, greedy_reference

CONFIG = TinyConfig(vocab_size=300, max_position_embeddings=128)
ENGINE_KW = dict(max_model_len=128, page_size=4, max_num_seqs=8, max_num_batched_tokens=64)
# 12 usable pages hold one 48-token sequence (a pool must hold one max_model_len sequence).
SMALL_POOL_KW = {**ENGINE_KW, "max_model_len": 48}


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return Tokenizer.from_pretrained(tiny_checkpoint("llama"))


@pytest.fixture(scope="module")
def model():
    return TinyDecoder(CONFIG, seed=3)


@pytest.fixture(scope="module")
def engine(model, tokenizer):
    return Engine(model, CONFIG, tokenizer, **ENGINE_KW)


def _prompts(seed: int, lengths) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, CONFIG.vocab_size, n).tolist() for n in lengths]


def _run_staggered(engine: Engine, prompts, params, arrivals) -> dict[str, list[int]]:
    """Submit prompt i before step arrivals[i]; run until everything is done."""
    rids: dict[int, str] = {}
    tokens: dict[str, list[int]] = {}
    step = 0
    while len(rids) < len(prompts) or engine.has_unfinished():
        for i, at in enumerate(arrivals):
            if at == step:
                rids[i] = engine.add_request(prompts[i], params[i] if isinstance(params, list) else params)
        for delta in engine.step():
            tokens.setdefault(delta.request_id, []).extend(delta.token_ids)
        step += 1
    return [tokens[rids[i]] for i in range(len(prompts))]


def test_greedy_matches_reference_with_staggered_arrivals_and_chunked_prefill(engine, model):
    prompts = _prompts(0, [3, 17, 40, 90, 9, 1])  # 90 > the 64-token budget: chunked prefill
    max_tokens = [12, 7, 20, 5, 16, 9]
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in max_tokens]
    got = _run_staggered(engine, prompts, params, arrivals=[0, 0, 2, 3, 5, 9])
    want = [greedy_reference(model, p, m) for p, m in zip(prompts, max_tokens)]
    assert got == want
    assert engine.scheduler.pages_used == 0
    assert not engine.has_unfinished()


@pytest.mark.slow  # default-run budget: test_async_scheduling compares split and fused engines
def test_split_and_fused_steps_give_the_same_tokens(engine, model, tokenizer):
    fused = Engine(model, CONFIG, tokenizer, split_prefill_decode=False, **ENGINE_KW)
    assert engine.split_prefill_decode  # the CPU default: reference attention
    prompts = _prompts(8, [30, 4, 50, 12])
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in (8, 14, 6, 10)]
    calls, plans = [], []
    real_step, real_schedule = engine.runner.step_async, engine.scheduler.schedule
    engine.runner.step_async = lambda batch, *prev: calls.append(batch) or real_step(batch, *prev)
    engine.scheduler.schedule = lambda: (lambda p: plans.append(p) or p)(real_schedule())
    try:
        split_tokens = _run_staggered(engine, prompts, params, arrivals=[0, 1, 2, 4])
    finally:
        del engine.runner.step_async, engine.scheduler.schedule
    fused_tokens = _run_staggered(fused, prompts, params, arrivals=[0, 1, 2, 4])
    assert split_tokens == fused_tokens == [greedy_reference(model, p, x.max_tokens) for p, x in zip(prompts, params)]
    # Mixed steps (decode rows and a prefill chunk) really ran as two calls.
    plans = [p for p in plans if p is not None]
    mixed = sum(1 for p in plans if {r.num_tokens == 1 for r in p.rows} == {True, False})
    assert mixed > 0 and len(calls) == len(plans) + mixed


def test_no_compile_after_warmup(engine):
    n = engine.num_compiles
    assert n == len(engine._buckets.all_shapes())
    prompts = _prompts(1, [5, 33, 64, 2, 77, 14, 20, 8, 9, 40])
    params = [
        SamplingParams(max_tokens=1 + i % 6, temperature=0.7 * (i % 2), top_p=0.9, top_k=i, seed=i,
                       repetition_penalty=1.0 + 0.1 * (i % 3), logprobs=(i % 4) or None, ignore_eos=True)
        for i in range(len(prompts))
    ]
    engine.generate(prompts, params, use_tqdm=False)
    assert engine.num_compiles == n


@pytest.mark.slow  # default-run budget: test_host_rows, test_penalty_slots and test_prefix_cache preempt
def test_preemption_gives_identical_greedy_output(model, tokenizer):
    # 12 usable pages of 4 tokens: the four requests below cannot all hold their pages at once.
    small = Engine(model, CONFIG, tokenizer, kv_cache_pages=13, **SMALL_POOL_KW)
    prompts = _prompts(2, [10, 14, 6, 12])
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    outs = small.generate(prompts, params, use_tqdm=False)
    assert small.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == [greedy_reference(model, p, 20) for p in prompts]
    assert small.scheduler.pages_used == 0


def test_seeded_sampling_is_independent_of_batch_companions(engine, model, tokenizer):
    prompt = _prompts(3, [11])[0]
    params = SamplingParams(max_tokens=15, temperature=1.0, top_p=0.95, seed=1234, ignore_eos=True)
    alone = engine.generate([prompt], params, use_tqdm=False)[0].token_ids
    others = _prompts(4, [30, 5, 50])
    other_params = [SamplingParams(max_tokens=9, temperature=0.5, seed=s, ignore_eos=True) for s in (1, 2, 3)]
    crowd = _run_staggered(engine, others + [prompt], other_params + [params], arrivals=[0, 0, 1, 2])[-1]
    assert crowd == alone
    # ...and through preemption (recompute) too.
    small = Engine(model, CONFIG, tokenizer, kv_cache_pages=13, **SMALL_POOL_KW)
    squeezed = _run_staggered(small, others[:2] + [prompt], other_params[:2] + [params], arrivals=[0, 0, 0])[-1]
    assert squeezed == alone
    assert small.scheduler.num_preemptions > 0
    unseeded = engine.generate([prompt] * 2, dataclasses.replace(params, seed=None), use_tqdm=False)
    assert unseeded[0].token_ids != unseeded[1].token_ids


def test_max_tokens_and_stop_token_ids_and_eos(engine, model, tokenizer):
    prompt = _prompts(5, [8])[0]
    ref = greedy_reference(model, prompt, 20)
    out = engine.generate([prompt], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True), use_tqdm=False)[0]
    assert out.finish_reason == "length" and out.token_ids == ref[:6]
    stop_id = ref[4]
    first = ref.index(stop_id)
    out = engine.generate(
        [prompt], SamplingParams(max_tokens=20, temperature=0.0, stop_token_ids=[stop_id]), use_tqdm=False
    )[0]
    assert out.finish_reason == "stop" and out.token_ids == ref[: first + 1]
    # The model's eos (from its config) stops too, unless ignore_eos.
    eos_engine = Engine(model, dataclasses.replace(CONFIG, eos_token_ids=(stop_id,)), tokenizer, **ENGINE_KW)
    out = eos_engine.generate([prompt], SamplingParams(max_tokens=20, temperature=0.0), use_tqdm=False)[0]
    assert out.finish_reason == "stop" and out.token_ids == ref[: first + 1]
    out = eos_engine.generate([prompt], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True), use_tqdm=False)[0]
    assert out.finish_reason == "length" and out.token_ids == ref


def test_min_tokens_holds_stop_token_ids_back(engine, model):
    prompt = _prompts(5, [8])[0]
    stop_id = greedy_reference(model, prompt, 1)[0]  # greedy would stop at once
    fwd = jax.jit(lambda ids, pos, seg: model(ids, pos, seg)[0])
    n = len(prompt)
    logits = np.asarray(fwd(jnp.asarray(prompt, jnp.int32), jnp.arange(n, dtype=jnp.int32), jnp.zeros(n, jnp.int32)))
    runner_up = int(np.argsort(logits[n - 1])[-2])  # the best token that is not the stop id
    params = SamplingParams(max_tokens=10, temperature=0.0, stop_token_ids=[stop_id], min_tokens=3)
    out = engine.generate([prompt], params, use_tqdm=False)[0]
    assert out.token_ids[0] == runner_up
    assert len(out.token_ids) >= 3 and stop_id not in out.token_ids[:3]
    assert out.finish_reason == "length" or out.token_ids[-1] == stop_id  # after min_tokens it stops again
    with pytest.raises(ValueError, match=r"min_tokens=11 must be in \[0, max_tokens=10\]"):
        SamplingParams(max_tokens=10, min_tokens=11)
    too_many = r"min_tokens=3 holds back 18 stop ids \(eos and stop_token_ids\), more than 16"
    with pytest.raises(ValueError, match=too_many):
        engine.generate([prompt], SamplingParams(min_tokens=3, stop_token_ids=list(range(3, 20))), use_tqdm=False)


def _boundary_stop(tokenizer, tokens: list[int]) -> str:
    """A two-character stop string made of the end of one token's text and the start of the next."""
    for k in range(2, len(tokens) - 1):
        a = tokenizer.decode(tokens[: k + 1])
        b = tokenizer.decode(tokens[: k + 2])
        prev = tokenizer.decode(tokens[:k])
        ok = a.startswith(prev) and b.startswith(a) and len(prev) < len(a) < len(b)
        if ok and "\ufffd" not in b[len(a) - 1 : len(a) + 1]:
            return b[len(a) - 1 : len(a) + 1]
    raise AssertionError("no token boundary found")


def test_stop_strings_across_token_boundaries(engine, model, tokenizer):
    prompt = _prompts(6, [7])[0]
    ref = greedy_reference(model, prompt, 30)
    stop = _boundary_stop(tokenizer, ref)
    full = tokenizer.decode(ref)
    cut = full.index(stop)
    n = next(i for i in range(1, len(ref) + 1) if stop in tokenizer.decode(ref[:i]))
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, stop=[stop, "\x00never"])
    out = engine.generate([prompt], params, use_tqdm=False)[0]
    assert out.finish_reason == "stop"
    assert out.text == full[:cut]
    assert out.token_ids == ref[:n]
    # Streaming: no delta ever shows text past the cut, and the deltas add up to the text.
    deltas = list(engine.stream(prompt, params))
    assert "".join(d.text for d in deltas) == full[:cut]
    assert [t for d in deltas for t in d.token_ids] == ref[:n]
    assert deltas[-1].finished and deltas[-1].finish_reason == "stop"
    assert deltas[-1].usage.completion_tokens == n
    assert engine.scheduler.pages_used == 0


def test_abort_frees_pages_at_once_and_spares_the_others(engine, model):
    prompts = _prompts(7, [20, 9])
    params = SamplingParams(max_tokens=25, temperature=0.0, ignore_eos=True)
    keep = engine.add_request(prompts[0], params)
    drop = engine.add_request(prompts[1], params)
    got = []
    for _ in range(4):
        got += [t for d in engine.step() if d.request_id == keep for t in d.token_ids]
    before = engine.scheduler.pages_used
    delta = engine.abort(drop)
    assert delta.finished and delta.finish_reason == "abort"
    assert engine.scheduler.pages_used < before
    out = engine.take_output(drop)
    assert out.finish_reason == "abort" and 0 < len(out.token_ids) < 25
    while engine.has_unfinished():
        got += [t for d in engine.step() if d.request_id == keep for t in d.token_ids]
    assert got == greedy_reference(model, prompts[0], 25)
    assert engine.scheduler.pages_used == 0


def test_generate_inputs_outputs_and_errors(engine, model, tokenizer):
    text = "The quick brown fox"
    ids = tokenizer.encode(text)
    p = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, logprobs=3)
    ref = greedy_reference(model, ids, 5)
    for prompts in (text, [text], ids, [ids]):
        outs = engine.generate(prompts, p, use_tqdm=False)
        assert len(outs) == 1
        o = outs[0]
        assert o.prompt_token_ids == ids and o.token_ids == ref
        assert o.text == tokenizer.decode(ref)
        assert len(o.logprobs) == 5
        for tok, lp in zip(o.token_ids, o.logprobs):
            assert tok in lp and 3 <= len(lp) <= 4
            assert lp[tok] == pytest.approx(max(lp.values()))  # greedy picks the most likely
        assert o.ttft_s > 0 and o.latency_s >= o.ttft_s
    outs = engine.generate([ids, text], [p, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)],
                           use_tqdm=False)
    assert [len(o.token_ids) for o in outs] == [5, 2]
    with pytest.raises(ValueError, match="sampling_params has 1 entries for 2 prompts"):
        engine.generate([ids, ids], [p], use_tqdm=False)
    with pytest.raises(ValueError, match="max_model_len"):
        engine.generate([ids], SamplingParams(max_tokens=200), use_tqdm=False)
    with pytest.raises(ValueError, match="prompt_token_ids"):
        engine.generate([[0, 5000]], p, use_tqdm=False)
    assert not engine.has_unfinished() and engine.scheduler.pages_used == 0


def test_engine_arguments_are_validated(model, tokenizer):
    with pytest.raises(ValueError, match="max_model_len"):
        Engine(model, CONFIG, tokenizer, max_model_len=4096, warmup=False)
    with pytest.raises(ValueError, match="kv_cache_pages or kv_cache_bytes"):
        Engine(model, CONFIG, tokenizer, kv_cache_pages=10, kv_cache_bytes=10**6, warmup=False)
    e = Engine(model, CONFIG, tokenizer, kv_cache_bytes=2 * 4 * 2 * 2 * 8 * 4 * 50, page_size=4, warmup=False)
    assert e.config.num_pages == 50
    with pytest.raises(ValueError, match=re.escape("holds 2 pages x page_size=4 = 8 tokens, fewer than one sequence of max_model_len=128 (32 pages)")):
        Engine(model, CONFIG, tokenizer, kv_cache_pages=3, page_size=4, warmup=False)
    tiny_pool = Engine(model, CONFIG, tokenizer, kv_cache_pages=3, page_size=4, max_model_len=8, warmup=False)
    with pytest.raises(ValueError, match="max_model_len"):
        tiny_pool.add_request(list(range(3, 10)), SamplingParams(max_tokens=4))


# -- real checkpoints against transformers ------------------------------------------------

HF_KW = dict(max_model_len=128, page_size=4, max_num_seqs=4, max_num_batched_tokens=32)
DEFAULT_VARIANTS = ["llama", "gpt2"]
SLOW_VARIANTS = ["llama_gqa", "llama3_rope", "llama_tied", "mistral", "qwen2", "mixtral", "opt"]


def _hf_greedy(path, variant, prompt, max_new):
    import torch
    from hf_fixtures import load_hf_model

    hf = load_hf_model(path, variant)
    hf.generation_config.eos_token_id = None  # the engine side runs with ignore_eos
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


def _check_against_transformers(tiny_checkpoint, variant):
    path = tiny_checkpoint(variant)
    engine = Engine.from_pretrained(path, dtype="float32", **HF_KW)
    rng = np.random.default_rng(11)
    lengths, max_new = [5, 40, 13, 1, 27], [10, 6, 14, 9, 4]
    prompts = [rng.integers(3, 300, n).tolist() for n in lengths]
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in max_new]
    warm = engine.num_compiles
    got = _run_staggered(engine, prompts, params, arrivals=[0, 0, 1, 3, 4])
    want = [_hf_greedy(path, variant, p, m) for p, m in zip(prompts, max_new)]
    assert got == want
    assert engine.scheduler.pages_used == 0
    assert engine.num_compiles == warm


@pytest.mark.parametrize("variant", DEFAULT_VARIANTS)
def test_greedy_matches_transformers(tiny_checkpoint, variant):
    _check_against_transformers(tiny_checkpoint, variant)


@pytest.mark.slow
@pytest.mark.parametrize("variant", SLOW_VARIANTS)
def test_greedy_matches_transformers_every_family(tiny_checkpoint, variant):
    _check_against_transformers(tiny_checkpoint, variant)


# -- embeddings (encoders) ------------------------------------------------------------------

def _hf_embeddings(path, texts, mode):
    import torch
    from hf_fixtures import load_hf_model
    from transformers import PreTrainedTokenizerFast

    hf = load_hf_model(path, "bert")
    tok = PreTrainedTokenizerFast.from_pretrained(str(path))
    out = []
    with torch.no_grad():
        for text in texts:
            enc = tok(text, return_tensors="pt")
            hidden = hf(**enc).last_hidden_state[0]  # [T, D]
            out.append((hidden[0] if mode == "cls" else hidden.mean(0)).numpy())
    return np.stack(out)


def test_embed_matches_transformers_and_honours_pooling_config(tiny_checkpoint, tmp_path):
    import json
    import shutil

    src = tiny_checkpoint("bert")
    texts = ["The quick brown fox.", "hello", "Paged attention keeps the key value cache in fixed size pages. " * 3]
    engine = Engine.from_pretrained(src, max_num_batched_tokens=64, max_num_seqs=2, warmup=False)
    got = engine.embed(texts, normalize=False)
    want = _hf_embeddings(src, texts, "mean")  # no pooling config: mean pooling
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert not engine.embedder.default_normalize  # no Normalize module: as sentence-transformers, not normalised
    np.testing.assert_allclose(engine.embed(texts), got, rtol=1e-6)
    unit = engine.embed(texts, normalize=True)
    np.testing.assert_allclose(unit, want / np.linalg.norm(want, axis=1, keepdims=True), rtol=1e-4, atol=1e-5)

    st = tmp_path / "st"
    shutil.copytree(src, st)
    (st / "1_Pooling").mkdir()
    (st / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 64,
                                                              "pooling_mode_cls_token": True}))
    (st / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]))
    cls_engine = Engine.from_pretrained(st, max_num_batched_tokens=64, max_num_seqs=2, warmup=False)
    np.testing.assert_allclose(cls_engine.embed(texts, normalize=False), _hf_embeddings(src, texts, "cls"),
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="encoder"):
        cls_engine.generate(["hi"], use_tqdm=False)
    with pytest.raises(ValueError, match="texts must not be empty"):
        engine.embed([])
