"""End to end: ``energon serve`` over the real AsyncEngine and a tiny random Llama.

One server process for the module (it compiles its step shapes once), started on
127.0.0.1 on a free port with the tiny checkpoint the test session builds with
``transformers``. The load test sends 64 concurrent streaming clients x 4
requests and checks: no errors, every page back in the pool, and each stream's
tokens equal to ``Engine.generate``'s for the same prompt and seed (run here, in
this process, on the same checkpoint). Cancellation, deadlines and bad input are
checked against the real engine's page accounting through /metrics. The module
ends with SIGTERM: the server must exit 0.
"""

from __future__ import annotations

import asyncio
import signal

import grpc
import pytest
from serving_harness import ServerProcess

from serving.client import ClientConfig, InferenceClient, generate_request, sampling_params
from serving.loadgen import run_closed_loop, synthetic_workload
from serving.protos.energon.v1 import inference_pb2 as pb
from serving.protos.energon.v1 import inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(600)

ENGINE_KW = dict(max_model_len=128, page_size=4, max_num_seqs=64, max_num_batched_tokens=64)
VOCAB = 300  # tests/hf_fixtures.py


def _idle(m: dict[str, float]) -> bool:
    return m["energon_kv_pages_used"] == 0 and m["energon_requests_running"] == 0 and m["energon_requests_queued"] == 0


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint("llama")


@pytest.fixture(scope="module")
def server(checkpoint):
    args = ["--model", str(checkpoint), "--max-queue", "512"]
    for k, v in ENGINE_KW.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    srv = ServerProcess(*args, factory=None)
    try:
        srv.wait_serving(timeout_s=400)
        yield srv
        srv.signal(signal.SIGTERM)
        assert srv.wait_exit(60) == 0, srv.log()
    finally:
        srv.stop()


def _run(coro, timeout_s: float = 400):
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


def test_model_info_and_tokenize_come_from_the_checkpoint(server, checkpoint) -> None:
    from energon_jax.tokenizer import Tokenizer

    async def go():
        async with InferenceClient(ClientConfig(target=server.target)) as c:
            return await c.model_info(timeout=30), await c.tokenize("The quick brown fox", timeout=30)

    info, ids = _run(go())
    assert (info.architecture, info.max_model_len, info.vocab_size) == ("LlamaForCausalLM", 128, VOCAB)
    assert ids == Tokenizer.from_pretrained(checkpoint).encode("The quick brown fox")


@pytest.mark.slow  # default-run budget
def test_load_64_clients_x4_streams_equal_engine_generate(server, checkpoint) -> None:
    from energon_jax import Engine, SamplingParams

    items = synthetic_workload(256, seed=1234, vocab_size=VOCAB, prompt_len=(2, 24), output_len=(2, 16))
    for k in range(0, 256, 8):  # every 8th request also asks for top-3 logprobs
        items[k].params.logprobs = 3
    before = server.wait_metrics(_idle)

    async def go():
        async with InferenceClient(ClientConfig(target=server.target)) as c:
            return await run_closed_loop(c, [items[i::64] for i in range(64)], timeout_s=300)

    records = _run(go())
    assert [r.error for r in records if r.error] == []
    server.wait_metrics(_idle, timeout_s=30)  # zero leaked pages

    ref = Engine.from_pretrained(checkpoint, warmup=False, **ENGINE_KW)
    params = [
        SamplingParams(
            max_tokens=i.params.max_tokens,
            temperature=i.params.temperature,
            seed=i.params.seed,
            ignore_eos=True,
            logprobs=i.params.logprobs if i.params.HasField("logprobs") else None,
        )
        for i in items
    ]
    outs = ref.generate([i.prompt for i in items], params, use_tqdm=False)
    expected = {i.label: o for i, o in zip(items, outs, strict=True)}
    by_label = {r.label: r for r in records}
    assert len(by_label) == 256 and len({r.request_id for r in records}) == 256
    for item in items:
        rec, ref_out = by_label[item.label], expected[item.label]
        assert rec.token_ids == ref_out.token_ids, item.label
        if item.params.HasField("logprobs"):
            assert [lp.token_id for lp in rec.logprobs] == rec.token_ids
            for lp, ref_lp in zip(rec.logprobs, ref_out.logprobs, strict=True):
                assert lp.logprob == pytest.approx(ref_lp[lp.token_id], rel=1e-5, abs=1e-5)
                assert {t.token_id: t.logprob for t in lp.top} == pytest.approx(ref_lp, rel=1e-5, abs=1e-5)
        else:
            assert rec.logprobs == []
        assert len(rec.token_ids) == item.params.max_tokens and rec.finish_reason == "length"
        assert rec.prompt_tokens == len(item.prompt)

    # Text prompts with a stop string: the same text and tokens as Engine.generate.
    text_params = [SamplingParams(max_tokens=12, temperature=0.0), SamplingParams(max_tokens=12, temperature=0.5, seed=3)]
    prompts = ["The quick brown fox", "def fib(n):"]
    ref_text = ref.generate(prompts, text_params, use_tqdm=False)

    async def texts():
        async with InferenceClient(ClientConfig(target=server.target)) as c:
            return [
                await c.generate_all(p, sampling_params(max_tokens=12, temperature=sp.temperature, seed=sp.seed))
                for p, sp in zip(prompts, text_params)
            ]

    for resps, out in zip(_run(texts()), ref_text, strict=True):
        assert [t for r in resps for t in r.token_ids] == out.token_ids
        assert "".join(r.text for r in resps) == out.text
        assert resps[-1].finish_reason == out.finish_reason
    after = server.wait_metrics(_idle, timeout_s=30)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    finished = sum(delta(f"energon_requests_finished_total{{reason={r}}}") for r in ("length", "stop"))
    assert finished == 258 and delta("energon_requests_finished_total{reason=length}") >= 256
    assert delta("energon_time_to_first_token_seconds_count") == 258
    assert delta("energon_e2e_request_latency_seconds_count") == 258
    total = sum(len(r.token_ids) for r in records) + sum(len(o.token_ids) for o in ref_text)
    assert delta("energon_generation_tokens_total") == total
    assert delta("energon_inter_token_latency_seconds_count") == total - 258
    prompt_total = sum(len(i.prompt) for i in items) + sum(len(o.prompt_token_ids) for o in ref_text)
    assert delta("energon_prompt_tokens_total") == prompt_total


def test_cancel_and_deadline_free_the_real_engines_pages(server) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        before = server.wait_metrics(_idle)
        params = pb.SamplingParams(max_tokens=120, temperature=0.0, ignore_eos=True)
        call = stub.Generate(generate_request([5, 6, 7, 8], params), timeout=60)
        got = [t for _ in range(3) for t in next(call).token_ids]
        assert len(got) >= 3
        call.cancel()
        cancelled = "energon_requests_finished_total{reason=cancelled}"
        m = server.wait_metrics(lambda m: _idle(m) and m.get(cancelled, 0) == before.get(cancelled, 0) + 1)
        assert m["energon_kv_pages_used"] == 0

        late = stub.Generate(generate_request([9, 10, 11], params), timeout=0.05)
        with pytest.raises(grpc.RpcError) as e:
            list(late)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        server.wait_metrics(_idle)


def test_cache_salt_over_grpc_isolates_the_prefix_cache(server) -> None:
    """Same prompt: a salt hits only its own pages; the unsalted cache is a salt of its own."""
    prompt = [(i * 11) % 200 + 3 for i in range(30)]  # 7 full pages of 4 cached, the last token recomputed
    params = pb.SamplingParams(max_tokens=2, temperature=0.0)

    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.InferenceStub(channel)

        def cached(salt: str | None) -> int:
            return list(stub.Generate(generate_request(prompt, params, cache_salt=salt), timeout=120))[-1].usage.cached_tokens

        assert [cached("tenant-a"), cached("tenant-a"), cached("tenant-b"), cached(None), cached(None)] == [0, 28, 0, 0, 28]
        with pytest.raises(grpc.RpcError) as e:
            cached("x" * 1025)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cache_salt" in e.value.details()
    server.wait_metrics(_idle)


@pytest.mark.parametrize(
    ("field", "prompt", "params"),
    [
        ("top_p", [5, 6], dict(top_p=0.0)),
        ("repetition_penalty", [5, 6], dict(repetition_penalty=0.0)),
        ("prompt", "", dict(max_tokens=2)),
        ("prompt_token_ids", [], dict(max_tokens=2)),
        ("prompt_token_ids[1]", [5, VOCAB], dict(max_tokens=2)),
        ("max_model_len", list(range(3, 3 + 129)), dict(max_tokens=1)),
        ("max_tokens=20", list(range(3, 3 + 120)), dict(max_tokens=20)),
        ("stop_token_ids[0]", [5], dict(stop_token_ids=[VOCAB + 1])),
    ],
)
def test_bad_input_is_invalid_argument_from_the_real_engine(server, field, prompt, params) -> None:
    async def go():
        async with InferenceClient(ClientConfig(target=server.target)) as c:
            return await c.generate_all(prompt, sampling_params(**params), timeout=30)

    with pytest.raises(grpc.aio.AioRpcError) as e:
        _run(go())
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in e.value.details()


def test_real_engine_step_failure_is_internal_and_exit_nonzero(checkpoint) -> None:
    args = ["--model", str(checkpoint), "--max-model-len", "64", "--page-size", "4", "--max-num-seqs", "4"]
    args += ["--max-num-batched-tokens", "16", "--engine-arg", "fail_on_token=77"]
    with ServerProcess(*args, factory="mock_engine:real_binding_failing_on_token") as srv:
        srv.wait_serving(timeout_s=300)
        with grpc.insecure_channel(srv.target) as channel:
            stub = pb_grpc.InferenceStub(channel)
            params = pb.SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)
            calls = [stub.Generate(generate_request([5 + i, 6], params), timeout=120) for i in range(3)]
            for c in calls:
                next(c)
            poison = stub.Generate(generate_request([77, 78], params), timeout=120)
            for c in [*calls, poison]:
                with pytest.raises(grpc.RpcError) as e:
                    list(c)
                assert e.value.code() == grpc.StatusCode.INTERNAL, e.value
        assert srv.wait_exit(60) == 1
        assert "injected failure in a real engine step" in srv.log()


def test_embed_on_a_decoder_is_invalid_argument(server) -> None:
    async def go():
        async with InferenceClient(ClientConfig(target=server.target)) as c:
            return await c.embed(["hello"], timeout=30)

    with pytest.raises(grpc.aio.AioRpcError) as e:
        _run(go())
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "decoder" in e.value.details()


def test_encoder_server_embeds_like_engine_embed(tiny_checkpoint) -> None:
    import numpy as np

    from energon_jax import Engine

    bert = tiny_checkpoint("bert")
    texts = ["The quick brown fox", "hello world", "Paged attention keeps the key value cache in pages."]
    # A 64-token budget: three encoder buckets to warm up instead of nine.
    with ServerProcess("--model", str(bert), "--max-num-batched-tokens", "64", factory=None) as srv:
        srv.wait_serving(timeout_s=300)

        async def go():
            async with InferenceClient(ClientConfig(target=srv.target)) as c:
                vecs = await c.embed(texts, normalize=True, timeout=60)
                raw = await c.embed(texts, normalize=False, timeout=60)
                try:
                    await c.generate_all("hello", sampling_params(max_tokens=2), timeout=30)
                except grpc.aio.AioRpcError as e:
                    return vecs, raw, e
                return vecs, raw, None

        vecs, raw, gen_error = _run(go())
        # The OpenAI API over the same engine: /v1/embeddings, and completions refused naming the encoder.
        import httpx

        with httpx.Client(base_url=srv.http_url, timeout=60) as h:
            emb = h.post("/v1/embeddings", json={"model": str(bert), "input": texts})
            completion = h.post("/v1/completions", json={"prompt": "hello", "max_tokens": 2})
    assert emb.status_code == 200, emb.text
    body = emb.json()
    assert [d["index"] for d in body["data"]] == [0, 1, 2] and body["usage"]["prompt_tokens"] > 0
    np.testing.assert_allclose(np.asarray([d["embedding"] for d in body["data"]]), np.asarray(vecs), rtol=1e-6)
    assert completion.status_code == 400 and "encoder" in completion.json()["error"]["message"]
    ref = Engine.from_pretrained(bert, warmup=False)
    np.testing.assert_allclose(np.asarray(vecs), ref.embed(texts, normalize=True), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(raw), ref.embed(texts, normalize=False), rtol=1e-5, atol=1e-6)
    assert np.allclose(np.linalg.norm(np.asarray(vecs), axis=1), 1.0, atol=1e-5)
    assert gen_error is not None and gen_error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "encoder" in gen_error.details()
