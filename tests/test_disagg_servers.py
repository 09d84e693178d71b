"""Prefill and decode servers in separate processes behind ``energon router`` (issue 16, point 2-3).

Real processes on 127.0.0.1, the demo model: ``energon serve --role prefill``, ``energon serve
--role decode`` and ``energon router`` (gRPC and the OpenAI HTTP API). The K/V pages go from the prefill process to the
decode process through ``jax.experimental.transfer``; the reference is a colocated in-process
``Engine`` with the same limits (greedy, so the tokens must be identical). The processes and the
reference come from ``disagg_harness.py``; keys, TLS and metrics are in ``test_disagg_security.py``.
"""

from __future__ import annotations

import json
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2

from disagg_harness import LIMITS, MAX_TOKENS, PENALTIES, PROMPT_LENS, TEXT_PROMPT, Trio, prompt_ids
from serving.protos.energon.v1 import inference_pb2 as pb

# The trio of processes and the colocated reference are shared with test_disagg_security.py.
pytest_plugins = ["disagg_harness"]


def _generate(stub, ids: list[int], max_tokens: int = MAX_TOKENS, timeout: float = 300.0) -> list[pb.GenerateResponse]:
    req = pb.GenerateRequest(request_id="t", token_ids=pb.TokenIds(ids=ids),
                             params=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0))
    return list(stub.Generate(req, timeout=timeout))


def test_greedy_tokens_match_colocated_and_pages_are_freed(trio, colocated_tokens):
    for n in PROMPT_LENS:
        responses = _generate(trio.stub, prompt_ids(n))
        ids = [t for r in responses for t in r.token_ids]
        assert (ids, "".join(r.text for r in responses)) == colocated_tokens[n], f"prompt of {n} tokens"
        assert len(responses) >= 2  # the first token is streamed on its own, from the prefill server
        assert all(r.request_id == "t" for r in responses)
        assert responses[-1].finish_reason == "length"
    req = pb.GenerateRequest(text=TEXT_PROMPT, params=pb.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
    responses = list(trio.stub.Generate(req, timeout=300))
    got = ([t for r in responses for t in r.token_ids], "".join(r.text for r in responses))
    assert got == colocated_tokens["text"]
    trio.wait_pages_free()
    assert trio.health() == health_pb2.HealthCheckResponse.SERVING
    pulled = trio.stats(trio.decode)
    assert pulled.pulls >= len(PROMPT_LENS) and pulled.pull_bytes > 0  # every K/V went server to server


def test_cancel_frees_pages_on_both_sides(trio):
    req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt_ids(40)),
                             params=pb.SamplingParams(max_tokens=80, temperature=0.0))
    call = trio.stub.Generate(req, timeout=300)
    next(call)  # the first token, from the prefill server
    next(call)  # a token from the decode server: the request holds decode pages
    assert trio.stats(trio.decode).pages_used > 0
    call.cancel()
    trio.wait_pages_free()
    for _ in range(3):  # cancelled right after the first token: during the pull / the adoption
        call = trio.stub.Generate(req, timeout=300)
        next(call)
        call.cancel()
    trio.wait_pages_free()
    assert [t for r in _generate(trio.stub, prompt_ids(5)) for t in r.token_ids]  # still serving


def test_bad_requests_fail_with_invalid_argument_through_the_router(trio):
    with pytest.raises(grpc.RpcError) as err:  # longer than max_model_len: refused by the prefill server
        _generate(trio.stub, prompt_ids(LIMITS["max_model_len"] + 1))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    trio.wait_pages_free()


def test_penalties_match_colocated_through_the_router(trio, colocated_tokens):
    for n in PROMPT_LENS:
        req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt_ids(n)),
                                 params=pb.SamplingParams(max_tokens=MAX_TOKENS, **PENALTIES))
        responses = list(trio.stub.Generate(req, timeout=300))
        got = ([t for r in responses for t in r.token_ids], "".join(r.text for r in responses))
        assert got == colocated_tokens[("penalties", n)], f"prompt of {n} tokens"
    assert colocated_tokens[("penalties", 45)][0] != colocated_tokens[45][0]  # the penalties changed the tokens
    trio.wait_pages_free()


def test_cache_salt_and_cached_tokens_through_the_router(trio):
    """The salt reaches the prefill server's prefix cache; usage reports its hits (two full pages of 16)."""
    import httpx

    def grpc_cached(salt: str) -> int:
        req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt_ids(45)), cache_salt=salt,
                                 params=pb.SamplingParams(max_tokens=3, temperature=0.0))
        return list(trio.stub.Generate(req, timeout=300))[-1].usage.cached_tokens

    def http_cached(salt: str) -> int:
        body = dict(prompt=prompt_ids(45), max_tokens=3, temperature=0.0, cache_salt=salt)
        r = httpx.post(f"http://127.0.0.1:{trio.router.http_port}/v1/completions", json=body, timeout=300)
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert [grpc_cached("g1"), grpc_cached("g1"), grpc_cached("g2")] == [0, 32, 0]
    assert [http_cached("h1"), http_cached("h1"), http_cached("g1")] == [0, 32, 32]
    trio.wait_pages_free()


def _http_text(trio: Trio, prompt: str | list[int], stream: bool) -> tuple[str, str]:
    import httpx

    body = dict(prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0, stream=stream)
    url = f"http://127.0.0.1:{trio.router.http_port}/v1/completions"
    if not stream:
        r = httpx.post(url, json=body, timeout=300)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        return choice["text"], choice["finish_reason"]
    pieces, reason = [], None
    with httpx.stream("POST", url, json=body, timeout=300) as r:
        assert r.status_code == 200
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    for e in events[:-1]:
        choice = json.loads(e)["choices"][0]
        pieces.append(choice["text"])
        reason = choice["finish_reason"] or reason
    assert len(pieces) >= 2  # streamed as the tokens came, not one buffered answer
    return "".join(pieces), reason


def test_openai_completions_through_the_router_match_colocated(trio, colocated_tokens):
    import httpx

    for key, prompt in ((16, prompt_ids(16)), (45, prompt_ids(45)), ("text", TEXT_PROMPT)):
        for stream in (False, True):
            text, reason = _http_text(trio, prompt, stream)
            assert text == colocated_tokens[key][1], f"prompt {key}, stream={stream}"
            assert reason == "length"
    chat = dict(messages=[{"role": "user", "content": TEXT_PROMPT}], max_tokens=MAX_TOKENS, temperature=0.0)
    r = httpx.post(f"http://127.0.0.1:{trio.router.http_port}/v1/chat/completions", json=chat, timeout=300)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == colocated_tokens["chat"][1]
    trio.wait_pages_free()


def test_openai_errors_and_disconnects_through_the_router(trio, colocated_tokens):
    import httpx

    url = f"http://127.0.0.1:{trio.router.http_port}/v1/completions"
    long = dict(prompt=prompt_ids(LIMITS["max_model_len"]), max_tokens=4)  # refused at the router's admission
    r = httpx.post(url, json=long, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    penalty = dict(prompt=prompt_ids(16), max_tokens=MAX_TOKENS, **PENALTIES)
    r = httpx.post(url, json=penalty, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == colocated_tokens[("penalties", 16)][1]
    body = dict(prompt=prompt_ids(40), max_tokens=80, temperature=0.0, stream=True)
    with httpx.stream("POST", url, json=body, timeout=300) as r:  # the client leaves mid-stream
        events = (line for line in r.iter_lines() if line.startswith("data: "))
        next(events), next(events)  # a token from the decode server: the request holds decode pages
        assert trio.stats(trio.decode).pages_used > 0
    trio.wait_pages_free()


def test_models_modelinfo_and_tokenize_through_the_router(trio):
    import httpx

    from energon_jax.engine_config import demo_model_path
    from energon_jax.tokenizer import Tokenizer

    demo = str(demo_model_path())
    info = trio.stub.ModelInfo(pb.ModelInfoRequest(), timeout=30)  # answered by the prefill server
    assert (info.max_model_len, info.model) == (LIMITS["max_model_len"], demo)
    assert info.vocab_size > 0 and info.architecture
    want = Tokenizer.from_pretrained(demo).encode(TEXT_PROMPT)
    assert list(trio.stub.Tokenize(pb.TokenizeRequest(text=TEXT_PROMPT), timeout=30).token_ids) == want
    health = httpx.get(f"http://127.0.0.1:{trio.router.http_port}/health", timeout=30)
    assert (health.status_code, health.json()["status"]) == (200, "serving")
    models = httpx.get(f"http://127.0.0.1:{trio.router.http_port}/v1/models", timeout=30).json()["data"]
    assert [(m["id"], m["max_model_len"]) for m in models] == [(demo, LIMITS["max_model_len"])]
    with pytest.raises(grpc.RpcError) as err:  # a decoder: refused by the prefill server, passed through
        trio.stub.Embed(pb.EmbedRequest(texts=["a"]), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_grpc_engine_round_trips_params_and_deltas():
    """What the router's HTTP API sends and gets back is what the colocated server would use."""
    from energon_jax.request import SamplingParams, StreamDelta, Usage
    from serving.convert import params_from_proto, params_to_proto, response_from_delta
    from serving.grpc_engine import delta_from_response

    for params in (SamplingParams(), SamplingParams(max_tokens=7, temperature=0.5, top_k=3, top_p=0.9, min_p=0.1,
                                                     seed=11, stop=("a", "bc"), stop_token_ids=(2, 5), ignore_eos=True,
                                                     logprobs=2, skip_special_tokens=False, min_tokens=1)):
        assert params_from_proto(params_to_proto(params), SamplingParams) == params
    deltas = [StreamDelta("r", "ab", [4, 9], [{4: -0.5, 1: -1.5}, {9: -0.25, 4: -2.0}], False, None, None),
              StreamDelta("r", "", [3], None, True, "length", Usage(5, 3, 0))]
    for d in deltas:
        assert delta_from_response("r", response_from_delta("label", d)) == d


def test_router_flags_are_checked():
    from serving.router import parse_targets

    assert parse_targets("127.0.0.1:1,h:2", "--prefill") == ["127.0.0.1:1", "h:2"]
    with pytest.raises(ValueError, match="--decode='nope': 'nope' must look like HOST:PORT"):
        parse_targets("nope", "--decode")


@pytest.mark.slow
def test_decode_server_death_fails_in_flight_and_turns_health(colocated_tokens):
    t = Trio()
    try:
        ids = prompt_ids(16)
        assert [x for r in _generate(t.stub, ids) for x in r.token_ids] == colocated_tokens[16][0]
        req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt_ids(40)),
                                 params=pb.SamplingParams(max_tokens=80, temperature=0.0))
        call = t.stub.Generate(req, timeout=300)
        next(call)
        next(call)  # decoding on the decode server
        t.decode.proc.kill()
        with pytest.raises(grpc.RpcError) as err:
            list(call)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        deadline = time.monotonic() + 10
        while t.health() != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline, "router health still SERVING with no decode server"
            time.sleep(0.1)
        with pytest.raises(grpc.RpcError) as err:
            _generate(t.stub, ids)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        import httpx

        base = f"http://127.0.0.1:{t.router.http_port}"
        while httpx.get(f"{base}/health", timeout=10).status_code != 503:  # HTTP health follows gRPC's
            assert time.monotonic() < deadline + 5, "router HTTP health still 200 with no decode server"
            time.sleep(0.1)
        assert httpx.get(f"{base}/health", timeout=10).json()["status"] == "unavailable"
        r = httpx.post(f"{base}/v1/completions", json=dict(prompt=ids, max_tokens=4), timeout=30)
        assert r.status_code == 503 and "no prefill or no decode server" in r.json()["error"]["message"]
        assert t.stats(t.prefill).pages_used == 0  # the prefill side freed its pages
    finally:
        t.close()


@pytest.mark.slow
def test_prefill_server_death_routes_to_the_other_one(colocated_tokens):
    t = Trio(num_prefill=2)
    try:
        ids = prompt_ids(45)
        for _ in range(2):  # least-loaded pick: both prefill servers are in use
            assert [x for r in _generate(t.stub, ids) for x in r.token_ids] == colocated_tokens[45][0]
        t.prefills[0].proc.kill()
        deadline = time.monotonic() + 10
        for _ in range(4):  # new requests go to the remaining prefill server once the probe saw it die
            try:
                got = [x for r in _generate(t.stub, ids) for x in r.token_ids]
            except grpc.RpcError as e:  # only a request sent before the probe noticed
                assert e.code() == grpc.StatusCode.UNAVAILABLE
                assert time.monotonic() < deadline
                time.sleep(0.5)
                continue
            assert got == colocated_tokens[45][0]
        assert t.health() == health_pb2.HealthCheckResponse.SERVING  # one prefill server is left
        t.prefills[1].proc.kill()
        deadline = time.monotonic() + 10
        while t.health() != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline, "router health still SERVING with no prefill server"
            time.sleep(0.1)
        assert t.stats(t.decode).pages_used == 0
    finally:
        t.close()


def _role_pair_vs_colocated(path, kw: dict, prompts: list[list[int]], int8: bool) -> tuple[list, list, list]:
    """Prefill on one ``RoleWorker``, pull and decode on another (one process, two engines and
    two transfer servers), against a colocated engine with the same pools."""
    import threading

    import jax.numpy as jnp

    from energon_jax.engine import Engine
    from energon_jax.request import SamplingParams
    from pallas_kernels import make_kv_pages
    from serving.disagg_role import RoleWorker, iterate

    def int8_pools(engine):  # before the first step, as tests/test_disagg.py does
        def like(pages):
            n, s, k, h = pages.k.shape
            return make_kv_pages(n, s, k, h, jnp.int8, sharding=pages.k.sharding)
        engine.runner.kv_cache = tuple(like(p) for p in engine.runner.kv_cache)

    sp = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    colocated = Engine.from_pretrained(path, warmup=False, **kw)
    prefill = Engine.from_pretrained(path, warmup=False, async_scheduling=False, **kw)
    decode = Engine.from_pretrained(path, warmup=False, async_scheduling=False, enable_prefix_caching=False, **kw)
    if int8:
        for e in (colocated, prefill, decode):
            int8_pools(e)
    want = [list(o.token_ids) for o in colocated.generate(prompts, sp)]
    pw, dw = RoleWorker(prefill, "prefill"), RoleWorker(decode, "decode")
    got, nulls = [], []
    try:
        for i, ids in enumerate(prompts):
            delta, offer = next(iterate(pw.prefill(f"p{i}", ids, sp), timeout_s=300))
            nulls.append(len(offer.null_slots))
            out = dw.decode(f"d{i}", ids, sp, delta.token_ids[0], offer, threading.Event())
            rest = []
            for d in iterate(out, timeout_s=300):
                rest.extend(d.token_ids)
                if d.finished:
                    break
            got.append(list(delta.token_ids) + rest)
        deadline = time.monotonic() + 10
        while (pw.pages()[0], dw.pages()[0]) != (0, 0):
            assert time.monotonic() < deadline, f"pages still used: {pw.pages()}, {dw.pages()}"
            time.sleep(0.05)
        if int8:
            assert decode.runner.kv_cache[0].k_scale is not None
    finally:
        pw.shutdown()
        dw.shutdown()
    return want, got, nulls


@pytest.mark.slow
def test_int8_pages_move_with_their_scales_between_role_workers():
    kw = dict(LIMITS, page_size=8)
    want, got, _ = _role_pair_vs_colocated(None, kw, [prompt_ids(n) for n in (7, 16, 33)], int8=True)
    assert got == want


@pytest.mark.slow
def test_sliding_window_page_tables_keep_their_null_pages_between_role_workers(tmp_path):
    from model_parity import tiny_variant

    path = tiny_variant(tmp_path / "mistral", "mistral", seed=3, sliding_window=8)
    kw = dict(max_model_len=128, page_size=4, max_num_seqs=3, max_num_batched_tokens=8, min_token_bucket=8,
              kv_cache_pages=40)
    want, got, nulls = _role_pair_vs_colocated(path, kw, [[(i * 5) % 290 + 1 for i in range(n)] for n in (5, 23, 30)],
                                               int8=False)
    assert got == want
    assert max(nulls) > 0  # pages behind the window were released before the move
