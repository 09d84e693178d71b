"""The OpenAI-compatible HTTP API end to end: a real ``energon serve`` over the real engine.

One server process for the module, on 127.0.0.1 with free ports, over a copy of the
tiny random Llama checkpoint to which the test adds a chat template (in
``tokenizer_config.json``) and a tokenizer post-processor that prepends BOS (so a
chat prompt tokenized with special tokens would get a second one). The server needs
an API key. Clients: the official ``openai`` package (sync and async) and raw
``httpx`` for malformed bodies.

References are independent of the server: ``Engine.generate`` on the same checkpoint
in a separate process (sharing the server's persistent XLA cache, so it compiles
nothing), and the chat prompt rendered and tokenized by ``transformers``'
``apply_chat_template``.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import grpc
import httpx
import openai
import pytest
from serving_harness import REPO, TESTS, ServerProcess

from serving.client import generate_request
from serving.protos.energon.v1 import inference_pb2 as pb
from serving.protos.energon.v1 import inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(600)

KEY = "test-key-123"
ENGINE_KW = dict(max_model_len=128, page_size=4, max_num_seqs=8, max_num_batched_tokens=16)  # one step shape
PROMPTS = ["The quick brown fox", "def fib(n):", "Hello world"]
MAX_TOKENS = 10
LOGPROB_PROMPT = "Once upon a time"
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}<<SYS>>{{ m['content'] }}<</SYS>>\n"
    "{% elif m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]\n"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}\n"
    "{% else %}{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name a fox."},
]

_REFERENCE = """
import json, sys
from energon_jax import Engine, SamplingParams
job = json.loads(sys.stdin.read())
engine = Engine.from_pretrained(job["model"], **job["engine_kw"])
greedy = SamplingParams(max_tokens=job["max_tokens"], temperature=0.0)
outs = engine.generate(job["prompts"] + [job["chat_ids"]], greedy, use_tqdm=False)
lp = engine.generate([job["logprob_prompt"]], SamplingParams(max_tokens=6, temperature=0.0, logprobs=3))[0]
print(json.dumps({
    "texts": [o.text for o in outs], "token_ids": [o.token_ids for o in outs],
    "finish": [o.finish_reason for o in outs], "prompt_lens": [len(o.prompt_token_ids) for o in outs],
    "lp_ids": lp.token_ids, "lp": [{str(k): v for k, v in d.items()} for d in lp.logprobs],
}))
"""


def _env(cache: str) -> dict[str, str]:
    # One persistent XLA cache for the server and the reference process (no compile twice).
    return {
        "ENERGON_COMPILE_CACHE": cache,
        "JAX_COMPILATION_CACHE_DIR": cache,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
    }


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint, tmp_path_factory):
    import shutil

    import tokenizers
    from tokenizers import processors

    src = tiny_checkpoint("llama")
    dst = tmp_path_factory.mktemp("chat-ckpt") / "tiny-chat"
    shutil.copytree(src, dst)
    config = json.loads((dst / "tokenizer_config.json").read_text())
    config["chat_template"] = TEMPLATE
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    tok = tokenizers.Tokenizer.from_file(str(dst / "tokenizer.json"))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(dst / "tokenizer.json"))
    return dst


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("xla-cache"))


@pytest.fixture(scope="module")
def server(checkpoint, cache_dir):
    args = ["--model", str(checkpoint), "--max-queue", "256"]
    for k, v in ENGINE_KW.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    srv = ServerProcess(*args, factory=None, env={"ENERGON_API_KEY": KEY, **_env(cache_dir)})
    try:
        srv.wait_serving(timeout_s=400)
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def chat_ids(checkpoint) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(checkpoint))
    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    assert ids[0] == 1 and ids[1] != 1  # exactly one BOS, the template's
    return [int(t) for t in ids]


@pytest.fixture(scope="module")
def reference(server, checkpoint, cache_dir, chat_ids):
    """Engine.generate in its own process, after the server filled the XLA cache."""
    job = dict(model=str(checkpoint), engine_kw=ENGINE_KW, prompts=PROMPTS, chat_ids=chat_ids,
               max_tokens=MAX_TOKENS, logprob_prompt=LOGPROB_PROMPT)  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu", **_env(cache_dir))
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(REPO), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", _REFERENCE], input=json.dumps(job), capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=400)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.http_url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model_id(checkpoint) -> str:
    return str(checkpoint)  # --model as given


def _http(server) -> httpx.Client:
    return httpx.Client(base_url=server.http_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)


def _idle(m: dict[str, float]) -> bool:
    return m["energon_kv_pages_used"] == 0 and m["energon_requests_running"] == 0 and m["energon_requests_queued"] == 0


# -- endpoints ---------------------------------------------------------------------------------------


def test_models_health_version_metrics_and_keys(server, client, model_id) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [model_id]
    card = models[0].model_dump()
    assert card["object"] == "model" and card["owned_by"] and card["root"] == model_id
    assert card["max_model_len"] == 128 and isinstance(card["created"], int)
    with httpx.Client(base_url=server.http_url, timeout=30) as anon:
        assert anon.get("/health").status_code == 200  # no key needed, like gRPC health
        assert anon.get("/version").json()["version"]
        for path, body in (("/v1/models", None), ("/v1/completions", {"prompt": "x"})):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
                r = anon.request("POST" if body else "GET", path, json=body, headers=headers)
                assert r.status_code == 401, r.text
                assert r.json()["error"]["code"] == "invalid_api_key"
        metrics = anon.get("/metrics").text
    assert 'energon_http_requests_total{method="GET",route="/v1/models",status="401"}' in metrics
    assert "energon_kv_pages_total" in metrics  # the same registry as the metrics port


def test_greedy_completions_equal_engine_generate(server, client, model_id, reference) -> None:
    resp = client.completions.create(model=model_id, prompt=PROMPTS, max_tokens=MAX_TOKENS, temperature=0)
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert [c.text for c in resp.choices] == reference["texts"][:3]
    assert [c.finish_reason for c in resp.choices] == reference["finish"][:3]
    assert resp.usage.prompt_tokens == sum(reference["prompt_lens"][:3])
    assert resp.usage.completion_tokens == sum(len(ids) for ids in reference["token_ids"][:3])
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert resp.usage.prompt_tokens_details.cached_tokens >= 0
    # Token ids as the prompt give the same text, echo prepends the prompt.
    ids = [1, 5, 6, 7]
    by_ids = client.completions.create(model=model_id, prompt=[ids], max_tokens=3, temperature=0)
    echoed = client.completions.create(model=model_id, prompt=[ids], max_tokens=3, temperature=0, echo=True)
    with _http(server) as h:
        prompt_text = h.post("/detokenize", json={"tokens": ids}).json()["prompt"]
    assert prompt_text and echoed.choices[0].text == prompt_text + by_ids.choices[0].text


def test_chat_equals_generate_from_the_rendered_prompt(server, client, model_id, reference, chat_ids) -> None:
    resp = client.chat.completions.create(model=model_id, messages=MESSAGES, max_completion_tokens=MAX_TOKENS,
                                          temperature=0)  # fmt: skip
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == reference["texts"][3]
    assert resp.usage.prompt_tokens == len(chat_ids)
    assert resp.usage.completion_tokens == len(reference["token_ids"][3])
    with _http(server) as h:
        tokenized = h.post("/tokenize", json={"messages": MESSAGES}).json()
        assert tokenized["tokens"] == chat_ids and tokenized["count"] == len(chat_ids)
        assert h.post("/detokenize", json={"tokens": [5, 6, 7]}).json()["prompt"]
        plain = h.post("/tokenize", json={"prompt": "Hello"}).json()["tokens"]
        assert plain[0] == 1  # plain prompts keep the tokenizer's BOS
    # Content as text parts, and the deprecated max_tokens, mean the same.
    parts = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in MESSAGES]
    again = client.chat.completions.create(model=model_id, messages=parts, max_tokens=MAX_TOKENS, temperature=0)
    assert again.choices[0].message.content == reference["texts"][3]


def test_streaming_equals_non_streaming_with_usage(client, model_id) -> None:
    whole = client.completions.create(model=model_id, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0,
                                      stop=["o"], logprobs=2)  # fmt: skip
    chunks = list(client.completions.create(model=model_id, prompt=PROMPTS[0], max_tokens=MAX_TOKENS,
                                            temperature=0, stop=["o"], logprobs=2, stream=True,
                                            stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    pieces = [c.choices[0] for c in chunks[:-1]]
    assert "".join(p.text for p in pieces) == whole.choices[0].text
    assert "o" not in "".join(p.text for p in pieces)  # the stop string never leaks
    assert pieces[-1].finish_reason == whole.choices[0].finish_reason
    assert [t for p in pieces if p.logprobs for t in p.logprobs.tokens] == whole.choices[0].logprobs.tokens

    chat_whole = client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=MAX_TOKENS,
                                                temperature=0, n=2)  # fmt: skip
    stream = client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=MAX_TOKENS,
                                            temperature=0, n=2, stream=True,
                                            stream_options={"include_usage": True})  # fmt: skip
    texts, reasons, usage = {0: "", 1: ""}, {}, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            texts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                reasons[ch.index] = ch.finish_reason
    assert [texts[0], texts[1]] == [c.message.content for c in chat_whole.choices]
    assert reasons == {c.index: c.finish_reason for c in chat_whole.choices}
    assert usage == chat_whole.usage


def test_sse_wire_format(server, model_id) -> None:
    body = {"model": model_id, "prompt": "Hello", "max_tokens": 3, "temperature": 0, "stream": True}
    with _http(server) as h, h.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for e in events[:-2]:
        assert e.startswith("data: ")
        chunk = json.loads(e[len("data: ") :])
        assert set(chunk) >= {"id", "object", "created", "model", "choices"} and chunk["object"] == "text_completion"


def test_n_choices_and_seeds(server, client, model_id) -> None:
    kw = dict(model=model_id, prompt=["Hello", "The"], max_tokens=8, temperature=1.0, seed=7, n=3, logprobs=0)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.index for c in a.choices] == list(range(6))
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded: reproducible
    assert len({c.text for c in a.choices[:3]}) > 1  # seed + j per choice: the n samples differ
    with _http(server) as h:
        prompt_lens = [h.post("/tokenize", json={"prompt": t}).json()["count"] for t in ("Hello", "The")]
    assert a.usage.prompt_tokens == sum(prompt_lens)  # each prompt counted once, not once per choice
    assert a.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in a.choices)


def test_logprobs_shapes_and_values(client, model_id, reference) -> None:
    resp = client.completions.create(model=model_id, prompt=LOGPROB_PROMPT, max_tokens=6, temperature=0, logprobs=3)
    lp = resp.choices[0].logprobs
    n = resp.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    # top-3 plus the sampled token; tokens that decode to the same text share one key
    assert all(1 <= len(top) <= 4 and max(top.values()) <= 0 for top in lp.top_logprobs)
    assert all(tok in top for top, tok in zip(lp.top_logprobs, lp.tokens, strict=True))
    want = [d[str(t)] for t, d in zip(reference["lp_ids"], reference["lp"], strict=True)]
    assert lp.token_logprobs == pytest.approx(want, rel=1e-4, abs=1e-4)

    chat = client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=4, temperature=0,
                                          logprobs=True, top_logprobs=2)  # fmt: skip
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob


def test_unknown_fields_are_ignored(server, model_id) -> None:
    with _http(server) as h:
        r = h.post("/v1/completions", json={"model": model_id, "prompt": "Hi", "max_tokens": 2, "foo": {"bar": 1}})
    assert r.status_code == 200, r.text


# -- errors ------------------------------------------------------------------------------------------

_LONG = "word " * 200
ERRORS = [
    # (path, body, status, param, code)
    ("/v1/completions", [1, 2], 400, None, None),
    ("/v1/completions", "{not json", 400, None, None),
    ("/v1/completions", {"prompt": ""}, 400, "prompt", None),
    ("/v1/completions", {"prompt": []}, 400, "prompt", None),
    ("/v1/completions", {"prompt": [5000]}, 400, "prompt", None),
    ("/v1/completions", {"prompt": _LONG, "max_tokens": 16}, 400, "prompt", "context_length_exceeded"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 200}, 400, "prompt", "context_length_exceeded"),
    ("/v1/completions", {"prompt": "Hi", "logprobs": 21}, 400, "logprobs", None),
    ("/v1/completions", {"prompt": "Hi", "stream_options": {"include_usage": True}}, 400, "stream_options", None),
    ("/v1/completions", {"prompt": "Hi", "temperature": "hot"}, 400, "temperature", None),
    ("/v1/completions", {"prompt": "Hi", "temperature": -1}, 400, "temperature", None),
    ("/v1/completions", {"prompt": "Hi", "top_p": 0}, 400, "top_p", None),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 0}, 400, "max_tokens", None),
    ("/v1/completions", {"prompt": "Hi", "n": 0}, 400, "n", None),
    ("/v1/completions", {"prompt": "Hi", "stop": ["x"] * 17}, 400, "stop", None),
    ("/v1/completions", {"prompt": "Hi", "stop": ["x" * 300]}, 400, "stop", None),
    ("/v1/completions", {"prompt": "Hi", "suffix": "!"}, 400, "suffix", None),
    ("/v1/completions", {"prompt": "Hi", "stop_token_ids": [999]}, 400, "stop_token_ids", None),
    ("/v1/completions", {"prompt": "Hi", "model": "gpt-4"}, 404, "model", "model_not_found"),
    ("/v1/chat/completions", {"messages": MESSAGES, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs", None),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_completion_tokens": 0}, 400, "max_completion_tokens", None),
    ("/v1/chat/completions", {"messages": MESSAGES, "response_format": {"type": "json_object"}}, 400,
     "response_format", None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content[0].type", None),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages", None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": _LONG}]}, 400, "messages",
     "context_length_exceeded"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", None),
    ("/v1/chat/completions", {"messages": MESSAGES, "stream_options": {"include_usage": True}}, 400,
     "stream_options", None),
    ("/v1/embeddings", {"input": "hello"}, 400, "model", None),
    ("/detokenize", {"tokens": [5000]}, 400, "tokens", None),
    ("/v1/nothing-here", {}, 404, None, None),
]


@pytest.mark.parametrize(("path", "body", "status", "param", "code"), ERRORS)
def test_errors_have_openai_shape_and_name_the_field(server, path, body, status, param, code) -> None:
    with _http(server) as h:
        if isinstance(body, str):
            r = h.post(path, content=body.encode(), headers={"content-type": "application/json"})
        else:
            r = h.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert "Traceback" not in r.text
    assert (error["param"], error["code"]) == (param, code), error
    if path == "/v1/embeddings":
        assert str(server_model_name(server)) in error["message"]


def server_model_name(server) -> str:
    with _http(server) as h:
        return h.get("/v1/models").json()["data"][0]["id"]


def test_openai_client_raises_typed_errors(client, model_id) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model_id, prompt="Hi", max_tokens=500)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MESSAGES)
    bad = openai.OpenAI(base_url=str(client.base_url), api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


# -- admission over the real engine ------------------------------------------------------------------


def test_two_grpc_clients_with_the_same_request_id_both_complete(server, reference) -> None:
    prompts = [PROMPTS[0], PROMPTS[1]]
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        md = (("authorization", f"Bearer {KEY}"),)
        calls = []
        for p in prompts:
            req = generate_request(p, pb.SamplingParams(max_tokens=MAX_TOKENS, temperature=0))
            req.request_id = "same-id"
            calls.append(stub.Generate(req, timeout=120, metadata=md))
        results = [list(c) for c in calls]
    for resps, want in zip(results, reference["token_ids"][:2], strict=True):
        assert all(r.request_id == "same-id" for r in resps)  # the label is echoed back
        assert [t for r in resps for t in r.token_ids] == want
        assert resps[-1].finish_reason in ("stop", "length")


def test_32_concurrent_streaming_clients_without_errors(server, model_id, reference) -> None:
    async def one(c: openai.AsyncOpenAI, k: int) -> tuple[int, str]:
        i = k % 3
        stream = await c.completions.create(model=model_id, prompt=PROMPTS[i], max_tokens=MAX_TOKENS,
                                            temperature=0, stream=True)  # fmt: skip
        return i, "".join([ch.choices[0].text async for ch in stream if ch.choices])

    async def go():
        async with openai.AsyncOpenAI(base_url=server.http_url + "/v1", api_key=KEY, max_retries=0,
                                      timeout=300) as c:  # fmt: skip
            return await asyncio.gather(*(one(c, k) for k in range(32)), return_exceptions=True)

    results = asyncio.run(go())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors == []
    assert all(text == reference["texts"][i] for i, text in results)
    server.wait_metrics(_idle)


def test_clients_that_disconnect_mid_stream_free_their_requests(server, model_id) -> None:
    before = server.wait_metrics(_idle).get("energon_requests_finished_total{reason=cancelled}", 0.0)
    body = {"model": model_id, "prompt": "Once", "max_tokens": 100, "temperature": 0, "ignore_eos": True,
            "stream": True}  # fmt: skip
    clients = [_http(server) for _ in range(8)]
    streams = [c.stream("POST", "/v1/completions", json=body) for c in clients]
    try:
        for s in streams:
            lines = s.__enter__().iter_lines()
            while not next(lines).startswith("data: "):
                pass
        assert server.metrics()["energon_requests_running"] > 0
    finally:
        for s, c in zip(streams, clients, strict=True):
            s.__exit__(None, None, None)
            c.close()
    m = server.wait_metrics(
        lambda m: _idle(m) and m.get("energon_requests_finished_total{reason=cancelled}", 0.0) >= before + 8,
        timeout_s=30,
    )
    assert m["energon_kv_pages_used"] == 0 and m["energon_requests_running"] == 0


def test_a_non_streamed_client_that_disconnects_frees_its_request(server, model_id) -> None:
    before = server.wait_metrics(_idle).get("energon_requests_finished_total{reason=cancelled}", 0.0)
    body = {"model": model_id, "prompt": "Once", "max_tokens": 120, "temperature": 0, "ignore_eos": True}
    with _http(server) as h:
        with pytest.raises(httpx.ReadTimeout):
            h.post("/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.05))
    server.wait_metrics(
        lambda m: _idle(m) and m.get("energon_requests_finished_total{reason=cancelled}", 0.0) == before + 1,
        timeout_s=30,
    )


def test_health_answers_while_a_huge_prompt_is_tokenized_or_refused(server, model_id) -> None:
    import threading

    # Just under the default --max-prompt-chars (1 MiB): tokenized (seconds of work for this tiny
    # vocabulary) in a worker thread without the GIL, then refused for the context.
    big = "The quick brown fox jumps. " * (1_000_000 // 27)
    result: dict[str, httpx.Response] = {}

    def send() -> None:
        with _http(server) as h:
            result["r"] = h.post("/v1/completions", json={"model": model_id, "prompt": big})

    sender = threading.Thread(target=send)
    start = time.perf_counter()
    sender.start()
    worst = 0.0
    with httpx.Client(base_url=server.http_url, timeout=30) as h:
        while sender.is_alive():
            t0 = time.perf_counter()
            assert h.get("/health").status_code == 200
            worst = max(worst, time.perf_counter() - t0)
            time.sleep(0.02)
    sender.join()
    elapsed = time.perf_counter() - start
    assert result["r"].status_code == 400 and result["r"].json()["error"]["code"] == "context_length_exceeded"
    # A tokenizer holding the GIL would stall /health for about the whole request.
    assert worst < 0.5 * elapsed + 0.2, f"/health took {worst:.2f} s of a {elapsed:.2f} s tokenization"
    huge = "a" * (3 << 20)  # 3 MiB: over --max-prompt-chars, refused before tokenizing
    with _http(server) as h:
        r = h.post("/v1/completions", json={"model": model_id, "prompt": huge})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert "max_prompt_chars" in r.json()["error"]["message"]
