"""Prefill and decode servers in separate processes behind ``energon router`` (issue 16, point 2-3).

Real processes on 127.0.0.1, the demo model: ``energon serve --role prefill``, ``energon serve
--role decode`` and ``energon router`` (gRPC and the OpenAI HTTP API). The K/V pages go from the prefill process to the
decode process through ``jax.experimental.transfer``; the reference is a colocated in-process
``Engine`` with the same limits (greedy, so the tokens must be identical).
"""

from __future__ import annotations

import json
import os
import ssl
import tempfile
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving_harness import CliProcess
from serving.protos.energon.v1 import disagg_pb2 as dpb
from serving.protos.energon.v1 import disagg_pb2_grpc as dpb_grpc
from serving.protos.energon.v1 import inference_pb2 as pb
from serving.protos.energon.v1 import inference_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[1]
# Small limits: a chunk of 32 tokens (so a 45-token prompt takes two prefill steps), pages of 16.
LIMITS = dict(max_model_len=128, max_num_batched_tokens=32, kv_cache_pages=64, max_num_seqs=4)
FLAGS = ["--no-warmup", *(f"--{k.replace('_', '-')}={v}" for k, v in LIMITS.items())]
PROMPT_LENS = (5, 16, 45)  # shorter than a page, an exact page multiple, longer than one chunk
MAX_TOKENS = 8
TEXT_PROMPT = "The quick brown fox"  # tokenized by the prefill server
# Greedy with every penalty: the decode server rebuilds each request's counts from its prompt.
PENALTIES = dict(temperature=0.0, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.7)
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # the router's --chat-template


def _prompt(n: int) -> list[int]:
    return [(i * 7) % 50 + 1 for i in range(n)]


class Proc(CliProcess):
    """One ``energon`` subprocess (a role server or the router) on a free port."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        super().__init__([*args, "--port", "0"], env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
                                                           **(env or {})), prefix="energon-disagg-")


class Trio:
    """Prefill server(s), a decode server and the router in front of them."""

    def __init__(self, num_prefill: int = 1) -> None:
        self.prefills = [Proc("serve", "--role", "prefill", *FLAGS) for _ in range(num_prefill)]
        self.prefill = self.prefills[0]
        self.decode = Proc("serve", "--role", "decode", *FLAGS)
        self.procs = [*self.prefills, self.decode]
        for p in self.procs:
            p.wait_ports(120)
        self._tmp = tempfile.TemporaryDirectory(prefix="energon-router-")
        template = Path(self._tmp.name) / "chat.jinja"
        template.write_text(CHAT_TEMPLATE)
        self.router = Proc("router", "--prefill", ",".join(p.target for p in self.prefills),
                           "--decode", self.decode.target, "--probe-interval", "0.2", "--http-port", "0",
                           "--chat-template", str(template))
        self.procs.append(self.router)
        self.router.wait_ports(120)
        self.channel = grpc.insecure_channel(self.router.target)
        self.stub = pb_grpc.InferenceStub(self.channel)

    def stats(self, proc: Proc) -> dpb.StatsResponse:
        with grpc.insecure_channel(proc.target) as ch:
            return dpb_grpc.DisaggStub(ch).Stats(dpb.StatsRequest(), timeout=10)

    def health(self) -> int:
        return health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status

    def wait_pages_free(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            used = [self.stats(p).pages_used for p in (self.prefill, self.decode)]
            if used == [0, 0]:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"pages still used on (prefill, decode): {used}")
            time.sleep(0.1)

    def close(self) -> list[str]:
        """Stop every process; the ones that needed SIGKILL."""
        killed = []
        for p in reversed(self.procs):
            if not p.stop():
                killed.append(" ".join(p.proc.args[3:6]))
        self.channel.close()
        self._tmp.cleanup()
        return killed


def _generate(stub, ids: list[int], max_tokens: int = MAX_TOKENS, timeout: float = 300.0) -> list[pb.GenerateResponse]:
    req = pb.GenerateRequest(request_id="t", token_ids=pb.TokenIds(ids=ids),
                             params=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0))
    return list(stub.Generate(req, timeout=timeout))


@pytest.fixture(scope="module")
def trio():
    t = Trio()
    yield t
    # A handler thread left waiting on an aborted request's queue (cancel test) held the
    # decode server's exit until SIGKILL.
    assert t.close() == [], "processes that ignored SIGTERM"


@pytest.fixture(scope="module")
def colocated_tokens():
    """Greedy tokens of a colocated in-process engine with the same limits (the reference)."""
    from energon_jax.engine import Engine
    from energon_jax.request import SamplingParams

    engine = Engine.from_pretrained(None, warmup=False, **LIMITS)
    chat = engine.tokenizer.encode(TEXT_PROMPT, add_special_tokens=False)  # one user message, CHAT_TEMPLATE
    prompts = [*(_prompt(n) for n in PROMPT_LENS), TEXT_PROMPT, chat]
    outs = engine.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
    ref = {n: (list(o.token_ids), o.text) for n, o in zip([*PROMPT_LENS, "text", "chat"], outs, strict=True)}
    outs = engine.generate([_prompt(n) for n in PROMPT_LENS], SamplingParams(max_tokens=MAX_TOKENS, **PENALTIES))
    ref.update({("penalties", n): (list(o.token_ids), o.text) for n, o in zip(PROMPT_LENS, outs, strict=True)})
    return ref


def test_greedy_tokens_match_colocated_and_pages_are_freed(trio, colocated_tokens):
    for n in PROMPT_LENS:
        responses = _generate(trio.stub, _prompt(n))
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
    req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=_prompt(40)),
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
    assert [t for r in _generate(trio.stub, _prompt(5)) for t in r.token_ids]  # still serving


def test_bad_requests_fail_with_invalid_argument_through_the_router(trio):
    with pytest.raises(grpc.RpcError) as err:  # longer than max_model_len: refused by the prefill server
        _generate(trio.stub, _prompt(LIMITS["max_model_len"] + 1))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    trio.wait_pages_free()


def test_penalties_match_colocated_through_the_router(trio, colocated_tokens):
    for n in PROMPT_LENS:
        req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=_prompt(n)),
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
        req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=_prompt(45)), cache_salt=salt,
                                 params=pb.SamplingParams(max_tokens=3, temperature=0.0))
        return list(trio.stub.Generate(req, timeout=300))[-1].usage.cached_tokens

    def http_cached(salt: str) -> int:
        body = dict(prompt=_prompt(45), max_tokens=3, temperature=0.0, cache_salt=salt)
        r = httpx.post(f"http://127.0.0.1:{trio.router.http_port}/v1/completions", json=body, timeout=300)
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert [grpc_cached("g1"), grpc_cached("g1"), grpc_cached("g2")] == [0, 32, 0]
    assert [http_cached("h1"), http_cached("h1"), http_cached("g1")] == [0, 32, 32]
    trio.wait_pages_free()


def _metric(text: str, name: str, default: float | None = None) -> float:
    """The value of one sample line ``name value`` (``name`` with its labels, as Prometheus prints it)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    if default is None:
        raise AssertionError(f"{name} not in the scrape")
    return default


def test_router_api_key_tls_and_metrics(trio, colocated_tokens, tmp_path):
    """A second router over the same servers: clients need the key (health excepted) and TLS, on
    gRPC and HTTP; the HTTP front end reaches the router through its plaintext loopback port."""
    import httpx
    from test_serving_security import _make_certs

    _make_certs(tmp_path)
    router = Proc("router", "--prefill", trio.prefill.target, "--decode", trio.decode.target, "--http-port", "0",
                  "--metrics-port", "0", "--tls-cert", str(tmp_path / "server.pem"), "--tls-key",
                  str(tmp_path / "server.key"), env={"ENERGON_API_KEY": "router-key"})
    try:
        router.wait_ports(120)
        key = (("authorization", "Bearer router-key"),)
        req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=_prompt(16)),
                                 params=pb.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
        creds = grpc.ssl_channel_credentials(root_certificates=(tmp_path / "ca.pem").read_bytes())
        with grpc.secure_channel(router.target, creds) as ch:
            health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=30)
            assert health.status == health_pb2.HealthCheckResponse.SERVING  # no key needed
            stub = pb_grpc.InferenceStub(ch)
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Generate(req, timeout=60))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            responses = list(stub.Generate(req, timeout=300, metadata=key))
            got = ([t for r in responses for t in r.token_ids], "".join(r.text for r in responses))
            assert got == colocated_tokens[16]
        with grpc.insecure_channel(router.target) as plain:  # plaintext to the TLS port
            with pytest.raises(grpc.RpcError):
                list(pb_grpc.InferenceStub(plain).Generate(req, timeout=10, metadata=key))
        url = f"https://127.0.0.1:{router.http_port}/v1/completions"
        body = dict(prompt=_prompt(45), max_tokens=MAX_TOKENS, temperature=0.0)
        with httpx.Client(verify=ssl.create_default_context(cafile=tmp_path / "ca.pem"), timeout=300) as http:
            assert http.post(url, json=body).status_code == 401
            r = http.post(url, json=body, headers={"Authorization": "Bearer router-key"})
            assert r.status_code == 200, r.text + router.log_path.read_text(errors="replace")
            assert r.json()["choices"][0]["text"] == colocated_tokens[45][1]
        deadline = time.monotonic() + 30  # a call is counted when its handler returns, just after its last response
        while _metric(text := router.metrics_text(10), 'energon_router_requests_total{outcome="OK"}', 0.0) < 2:
            assert time.monotonic() < deadline, text
            time.sleep(0.1)
        time.sleep(0.5)
        text = router.metrics_text(10)
        assert _metric(text, 'energon_router_requests_total{outcome="OK"}') == 2  # one gRPC, one HTTP
        assert _metric(text, "energon_router_time_to_first_token_seconds_count") == 2
        assert _metric(text, "energon_router_handoff_seconds_count") == 2
        assert _metric(text, f'energon_router_backend_up{{role="prefill",target="{trio.prefill.target}"}}') == 1
        assert _metric(text, f'energon_router_backend_in_flight{{role="decode",target="{trio.decode.target}"}}') == 0
    finally:
        assert router.stop()
    trio.wait_pages_free()


@pytest.mark.slow  # three more processes; the default run covers the router's side above
def test_role_servers_with_api_key_tls_and_metrics(colocated_tokens, tmp_path):
    """Role servers that need a key and TLS: a router with --backend-api-key and --backend-tls-ca
    serves through them; one without the key sees no server up (health NOT_SERVING)."""
    from test_serving_security import _make_certs

    _make_certs(tmp_path)
    tls = ("--tls-cert", str(tmp_path / "server.pem"), "--tls-key", str(tmp_path / "server.key"))
    env = {"ENERGON_API_KEY": "backend-key"}
    servers = [Proc("serve", "--role", role, *FLAGS, *tls, "--metrics-port", "0", env=env)
               for role in ("prefill", "decode")]
    procs = list(servers)
    try:
        for p in servers:
            p.wait_ports(120)
        prefill, decode = servers
        targets = ("--prefill", prefill.target, "--decode", decode.target, "--backend-tls-ca", str(tmp_path / "ca.pem"))
        router = Proc("router", *targets, "--backend-api-key", "backend-key", "--probe-interval", "0.2")
        keyless = Proc("router", *targets, "--probe-interval", "0.2")
        procs += [router, keyless]
        router.wait_ports(120)
        keyless.wait_ports(120)
        with grpc.insecure_channel(router.target) as ch:
            responses = list(pb_grpc.InferenceStub(ch).Generate(
                pb.GenerateRequest(token_ids=pb.TokenIds(ids=_prompt(45)),
                                   params=pb.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)), timeout=300))
        assert [t for r in responses for t in r.token_ids] == colocated_tokens[45][0]
        with grpc.insecure_channel(keyless.target) as ch:
            health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert "refuses the router's key" in keyless.log_path.read_text(errors="replace")
        assert _metric(decode.metrics_text(10), "energon_kv_pulls_total") == 1
        assert _metric(prefill.metrics_text(10), "energon_kv_pages_used") == 0
    finally:
        for p in reversed(procs):
            p.stop()


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

    for key, prompt in ((16, _prompt(16)), (45, _prompt(45)), ("text", TEXT_PROMPT)):
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
    long = dict(prompt=_prompt(LIMITS["max_model_len"]), max_tokens=4)  # refused at the router's admission
    r = httpx.post(url, json=long, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    penalty = dict(prompt=_prompt(16), max_tokens=MAX_TOKENS, **PENALTIES)
    r = httpx.post(url, json=penalty, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == colocated_tokens[("penalties", 16)][1]
    body = dict(prompt=_prompt(40), max_tokens=80, temperature=0.0, stream=True)
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
        ids = _prompt(16)
        assert [x for r in _generate(t.stub, ids) for x in r.token_ids] == colocated_tokens[16][0]
        req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=_prompt(40)),
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
        ids = _prompt(45)
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
    want, got, _ = _role_pair_vs_colocated(None, kw, [_prompt(n) for n in (7, 16, 33)], int8=True)
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
