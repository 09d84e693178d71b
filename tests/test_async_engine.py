"""AsyncEngine: concurrent submitters share steps and get the synchronous engine's tokens;
abort (explicit, or by walking away) frees pages; bounded queue; bad input; a failing
step fails everyone in flight and kills the engine."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from energon_jax import AsyncEngine, Engine, QueueFullError, SamplingParams

KW = dict(max_model_len=128, page_size=4, max_num_seqs=8, max_num_batched_tokens=32)


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint("llama")


@pytest.fixture(scope="module")
def engine(checkpoint):
    return Engine.from_pretrained(checkpoint, **KW)


@pytest.fixture()
def aengine(engine):
    ae = AsyncEngine(engine, max_queue=64)
    ae.start()
    yield ae
    ae.shutdown()


def _prompts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 300, int(rng.integers(1, 30))).tolist() for _ in range(n)]


async def _collect(ae, prompt, params, rid):
    deltas = [d async for d in ae.submit(prompt, params, request_id=rid)]
    return deltas


def test_concurrent_submitters_share_steps_and_match_generate(engine, aengine):
    prompts = _prompts(6)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    want = [o.token_ids for o in engine.generate(prompts, params, use_tqdm=False)]
    steps = []
    real_step = engine.step

    def counting_step():
        steps.append(1)
        return real_step()

    engine.step = counting_step
    try:

        async def main():
            return await asyncio.gather(*(_collect(aengine, p, params, f"r{i}") for i, p in enumerate(prompts)))

        results = asyncio.run(main())
    finally:
        del engine.step
    got = [[t for d in deltas for t in d.token_ids] for deltas in results]
    assert got == want
    for deltas in results:
        assert deltas[-1].finished and deltas[-1].finish_reason == "length"
        assert deltas[-1].usage.completion_tokens == 10
        assert not any(d.finished for d in deltas[:-1])
    # 60 tokens in far fewer steps than 60: the requests shared steps.
    assert len(steps) < 30
    assert aengine.stats.pages_used == 0 and aengine.stats.running == 0


def test_abort_and_walking_away_free_pages(engine, aengine):
    params = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)
    prompt = _prompts(1, seed=1)[0]

    async def main():
        # Explicit abort from another task after the first tokens.
        deltas = []
        async for d in aengine.submit(prompt, params, request_id="a"):
            deltas.append(d)
            if len(deltas) == 3:
                aengine.abort("a")
        # A consumer that stops early (break) aborts its request too.
        agen = aengine.submit(prompt, params, request_id="b")
        async for _ in agen:
            break
        await agen.aclose()
        for _ in range(200):
            if aengine.stats.running == 0 and aengine.stats.pages_used == 0:
                break
            await asyncio.sleep(0.02)
        return deltas

    deltas = asyncio.run(main())
    assert deltas[-1].finished and deltas[-1].finish_reason == "abort"
    assert 3 <= sum(len(d.token_ids) for d in deltas) < 100
    assert aengine.stats.running == 0 and aengine.stats.pages_used == 0
    assert not engine.has_unfinished()


def test_bad_input_raises_value_error_and_info(aengine):
    async def main():
        with pytest.raises(ValueError, match="max_model_len"):
            await _collect(aengine, [5, 6], SamplingParams(max_tokens=500), "x")
        with pytest.raises(ValueError, match="prompt_token_ids"):
            await _collect(aengine, [], SamplingParams(), "y")
        deltas = await _collect(aengine, "hello world", SamplingParams(max_tokens=3, temperature=0.0), "z")
        assert deltas[-1].finished

    asyncio.run(main())
    info = aengine.info
    assert info.architecture == "LlamaForCausalLM" and info.max_model_len == 128 and info.vocab_size == 300


def test_queue_full(engine):
    ae = AsyncEngine(engine, max_queue=2)
    entered, release = threading.Event(), threading.Event()
    real_step = engine.step

    def blocked_step():
        entered.set()
        release.wait(30)
        return real_step()

    engine.step = blocked_step
    ae.start()
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    try:

        async def main():
            gens = [ae.submit([5, 6, 7], params, request_id="q0")]
            first = asyncio.ensure_future(gens[0].__anext__())
            await asyncio.to_thread(entered.wait, 30)  # q0 is inside a (blocked) step
            for i in (1, 2):
                gens.append(ae.submit([5, 6, 7], params, request_id=f"q{i}"))
            pending = [asyncio.ensure_future(g.__anext__()) for g in gens[1:]]
            await asyncio.sleep(0.05)
            with pytest.raises(QueueFullError):
                await ae.submit([5, 6, 7], params, request_id="q3").__anext__()
            release.set()
            await asyncio.gather(first, *pending)
            for g in gens:
                async for _ in g:
                    pass

        asyncio.run(main())
    finally:
        release.set()
        ae.shutdown()
        del engine.step
    assert not engine.has_unfinished()


def test_failing_step_fails_everyone_and_kills_the_engine(engine):
    ae = AsyncEngine(engine)

    def broken_step():
        raise RuntimeError("device on fire")

    engine.step = broken_step
    ae.start()
    try:

        async def main():
            with pytest.raises(RuntimeError, match="device on fire"):
                await _collect(ae, [5, 6], SamplingParams(max_tokens=3), "f")
            with pytest.raises(RuntimeError, match="engine is dead"):
                await _collect(ae, [5, 6], SamplingParams(max_tokens=3), "g")

        asyncio.run(main())
    finally:
        ae.shutdown()
        del engine.step
        for rid in ("f",):  # leave the shared engine clean for other tests
            engine.abort(rid)
            engine.take_output(rid)
