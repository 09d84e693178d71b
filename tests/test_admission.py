"""The shared admission path of both front ends, over the mock engine in a real server process.

The mock engine (tests/mock_engine.py) makes timing controllable: a slow load, one
running sequence and a queue of two, a step loop that dies on a timer. What is
checked: 503 while loading, 429 / RESOURCE_EXHAUSTED on a full queue, limits that
name their flag on both front ends, server-owned request ids (a reused gRPC id is a
label only), tokenization off the event loop, drain (503 for new calls while the
calls in flight finish) and a step loop that dies while idle (both healths unhealthy
within a second, exit code 1). The limit checks themselves are also tested directly.
"""

from __future__ import annotations

import json
import signal
import threading
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2
from mock_engine import SamplingParams  # the runtime's class, through the mock
from serving_harness import ServerProcess

from serving.admission import AdmissionLimits, RequestError
from serving.client import generate_request
from serving.protos.energon.v1 import inference_pb2 as pb
from serving.protos.energon.v1 import inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(120)

SERVING = health_pb2.HealthCheckResponse.SERVING
LIMIT_ARGS = ["--max-stop-strings", "3", "--max-stop-string-len", "8", "--max-n", "2", "--max-embed-texts", "4",
              "--max-prompt-chars", "4000000"]  # fmt: skip


def _ids(responses) -> list[int]:
    return [t for r in responses for t in r.token_ids]


def _idle(m: dict[str, float]) -> bool:
    return m["energon_kv_pages_used"] == 0 and m["energon_requests_running"] == 0 and m["energon_requests_queued"] == 0


# -- the limits, without a server ------------------------------------------------------------------


def test_limits_validate_themselves() -> None:
    with pytest.raises(ValueError, match=r"max_n=0 must be an integer >= 1"):
        AdmissionLimits(max_n=0)


def test_limit_messages_name_the_field_the_value_and_the_flag() -> None:
    from serving.admission import Admission
    from serving.metrics import ServingMetrics

    adm = Admission(ServingMetrics(lambda: None), lambda e: None, AdmissionLimits(max_stop_strings=2))
    assert adm.check_stop("x") == ("x",)
    with pytest.raises(RequestError, match=r"stop has 3 strings, more than max_stop_strings=2 "
                                           r"\(server flag --max-stop-strings\)") as e:  # fmt: skip
        adm.check_stop(["a", "b", "c"])
    assert e.value.param == "stop"
    with pytest.raises(RequestError, match=r"stop\[0\] is 300 characters, longer than max_stop_string_len=256"):
        adm.check_stop(["x" * 300])
    with pytest.raises(RequestError, match=r"n=17 must be an integer in \[1, max_n=16\]"):
        adm.check_n(17)
    with pytest.raises(RequestError, match=r"texts holds 300 texts, more than max_embed_texts=256"):
        adm.check_embed_texts(["a"] * 300)


def test_tokenized_once_off_the_event_loop_and_the_engine_gets_server_ids() -> None:
    import asyncio

    from mock_engine import MockAsyncEngine, QueueFullError

    from serving.admission import Admission
    from serving.binding import EngineBinding
    from serving.metrics import ServingMetrics

    engine = MockAsyncEngine(step_s=0.001)
    encodes: list[bool] = []  # per call: was it on the event loop's thread?
    submitted: list[tuple[object, str]] = []
    encode, submit = engine.tokenizer.encode, engine.submit

    def counting_encode(text, add_special_tokens=True):
        encodes.append(threading.current_thread() is threading.main_thread())
        return encode(text)

    def recording_submit(prompt, params, *, request_id):
        submitted.append((prompt, request_id))
        return submit(prompt, params, request_id=request_id)

    engine.tokenizer.encode, engine.submit = counting_encode, recording_submit
    binding = EngineBinding(engine=engine, params_cls=SamplingParams, queue_full_error=QueueFullError)
    adm = Admission(ServingMetrics(lambda: None), lambda e: None)
    adm.attach(binding)
    engine.start()

    async def go():
        ids = await adm.tokenize(binding, "5 6 7")
        params = SamplingParams(max_tokens=2, temperature=0)
        streams = [await adm.open_stream(binding, ids, params, label="same") for _ in range(2)]
        return [[t for d in [x async for x in s] for t in d.token_ids] for s in streams]

    try:
        outs = asyncio.run(go())
    finally:
        engine.shutdown()
    assert encodes == [False]  # once, in a worker thread
    assert outs == [[8, 9], [8, 9]]
    assert [p for p, _ in submitted] == [[5, 6, 7], [5, 6, 7]]  # the engine got ids, not text
    rids = [rid for _, rid in submitted]
    assert len(set(rids)) == 2 and "same" not in rids  # the server's ids, never the label


# -- one mock server: loading, queue, ids, limits, drain -------------------------------------------


@pytest.fixture(scope="module")
def server():
    args = ["--max-num-seqs", "1", "--max-queue", "2", "--engine-arg", "step_s=0.02", "--engine-arg", "load_s=2",
            "--grace", "20", "--served-model-name", "mock-model", *LIMIT_ARGS]  # fmt: skip
    with ServerProcess(*args) as srv:
        srv.wait_ports()
        yield srv


def test_503_on_both_front_ends_while_loading_then_serving(server) -> None:
    with httpx.Client(base_url=server.http_url, timeout=10) as h:
        r = h.get("/health")
        assert (r.status_code, r.json()["status"]) == (503, "loading")
        r = h.post("/v1/completions", json={"prompt": "1 2"})
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
        with grpc.insecure_channel(server.target) as channel:
            with pytest.raises(grpc.RpcError) as e:
                list(pb_grpc.InferenceStub(channel).Generate(generate_request([1], pb.SamplingParams()), timeout=10))
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        server.wait_serving()
        assert h.get("/health").status_code == 200
        assert json.loads(server.port_file.read_text())["http_port"] == server.http_port


def test_full_queue_is_429_over_http_and_resource_exhausted_over_grpc(server) -> None:
    server.wait_serving()
    with grpc.insecure_channel(server.target) as channel, httpx.Client(base_url=server.http_url, timeout=30) as h:
        stub = pb_grpc.InferenceStub(channel)
        running = stub.Generate(generate_request([10], pb.SamplingParams(max_tokens=40, temperature=0)), timeout=60)
        next(running)
        waiting = [stub.Generate(generate_request([p], pb.SamplingParams(max_tokens=2, temperature=0)), timeout=60)
                   for p in (100, 200)]  # fmt: skip
        server.wait_metrics(lambda m: m["energon_requests_queued"] == 2)
        r = h.post("/v1/completions", json={"prompt": "300", "max_tokens": 2})
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full", r.text
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(generate_request([300], pb.SamplingParams(max_tokens=2)), timeout=30))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert [_ids(w) for w in waiting] == [[101, 102], [201, 202]]  # the accepted ones complete
        running.cancel()
        server.wait_metrics(_idle)


def test_a_reused_grpc_request_id_is_only_a_label(server) -> None:
    server.wait_serving()
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        calls = []
        for p in (1, 500):
            req = generate_request([p], pb.SamplingParams(max_tokens=12, temperature=0))
            req.request_id = "shared"
            calls.append(stub.Generate(req, timeout=60))
        first = next(calls[0])
        calls[0].cancel()  # the first client gives up: the other request with the same id runs on
        rest = list(calls[1])
    assert first.request_id == "shared" and first.token_ids == [2]
    assert all(r.request_id == "shared" for r in rest)
    assert _ids(rest) == list(range(501, 513)) and rest[-1].finish_reason == "length"
    server.wait_metrics(_idle)


@pytest.mark.parametrize(
    ("body", "param", "flag"),
    [
        ({"prompt": "1", "stop": ["a", "b", "c", "d"]}, "stop", "--max-stop-strings"),
        ({"prompt": "1", "stop": "123456789"}, "stop", "--max-stop-string-len"),
        ({"prompt": "1", "n": 3}, "n", "--max-n"),
    ],
)
def test_http_limits_name_the_field_and_the_flag(server, body, param, flag) -> None:
    server.wait_serving()
    with httpx.Client(base_url=server.http_url, timeout=30) as h:
        r = h.post("/v1/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param
    assert flag in r.json()["error"]["message"]


def test_grpc_limits_name_the_flag(server) -> None:
    server.wait_serving()
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        for params, flag in (
            (pb.SamplingParams(stop=["a", "b", "c", "d"]), "--max-stop-strings"),
            (pb.SamplingParams(stop=["x" * 9]), "--max-stop-string-len"),
        ):
            with pytest.raises(grpc.RpcError) as e:
                list(stub.Generate(generate_request([1], params), timeout=30))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and flag in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            stub.Embed(pb.EmbedRequest(texts=["1"] * 5), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "--max-embed-texts" in e.value.details()
    with httpx.Client(base_url=server.http_url, timeout=30) as h:
        r = h.post("/v1/completions", json={"prompt": "1 " * (3 << 20)})  # 6 MiB: over --max-message-bytes
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        r = h.post("/v1/embeddings", json={"input": ["1"] * 5})
        assert r.status_code == 400 and r.json()["error"]["param"] == "input"
        r = h.post("/v1/embeddings", json={"input": ["1 2", "3"], "model": "mock-model"})
        assert r.status_code == 200 and len(r.json()["data"]) == 2


def test_a_huge_prompt_is_tokenized_off_the_event_loop(server) -> None:
    server.wait_serving()
    huge = "1 " * (3 << 19)  # 3 MiB of text, 1.5 M tokens for the mock tokenizer
    result: dict[str, httpx.Response] = {}

    def send() -> None:
        with httpx.Client(base_url=server.http_url, timeout=60) as h:
            result["r"] = h.post("/v1/completions", json={"prompt": huge, "max_tokens": 1})

    sender = threading.Thread(target=send)
    sender.start()
    worst = 0.0
    with httpx.Client(base_url=server.http_url, timeout=10) as h, grpc.insecure_channel(server.target) as channel:
        while sender.is_alive():
            t0 = time.perf_counter()
            assert h.get("/health").status_code == 200
            assert server.health(channel) == SERVING
            worst = max(worst, time.perf_counter() - t0)
            time.sleep(0.02)
    sender.join()
    r = result["r"]
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert worst < 1.0, f"health took {worst:.2f} s while a 3 MiB prompt was tokenized"


def test_sigterm_drains_http_streams_and_refuses_new_calls(server) -> None:
    server.wait_serving()
    chunks: list[str] = []

    def stream() -> None:
        body = {"prompt": "1000", "max_tokens": 30, "temperature": 0, "stream": True}
        with httpx.Client(base_url=server.http_url, timeout=60) as h, h.stream("POST", "/v1/completions",
                                                                              json=body) as r:  # fmt: skip
            chunks.extend(line for line in r.iter_lines() if line.startswith("data: "))

    t = threading.Thread(target=stream)
    t.start()
    server.wait_metrics(lambda m: m["energon_requests_running"] == 1)
    server.signal(signal.SIGTERM)
    with httpx.Client(base_url=server.http_url, timeout=10) as h:
        deadline = time.monotonic() + 5
        while h.get("/health").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.01)
        health = h.get("/health")
        assert (health.status_code, health.json()["status"]) == (503, "draining")
        r = h.post("/v1/completions", json={"prompt": "1"})
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
    t.join(30)
    assert chunks[-1] == "data: [DONE]"
    text = "".join(json.loads(c[6:])["choices"][0]["text"] for c in chunks[:-1])
    assert text == "".join(f" {(1000 + k) % 1000}" for k in range(1, 31))  # the whole answer arrived
    assert server.wait_exit(30) == 0


# -- a step loop that dies with nothing in flight ---------------------------------------------------


def test_step_loop_death_while_idle_is_noticed_within_a_second() -> None:
    with ServerProcess("--engine-arg", "die_after_s=1.5") as srv:
        srv.wait_serving()
        serving_at = time.monotonic()  # the engine started before this, so it dies <= 1.5 s from now
        with httpx.Client(base_url=srv.http_url, timeout=5) as h:
            http_down = grpc_down = None
            while (http_down is None or grpc_down is None) and time.monotonic() - serving_at < 10:
                now = time.monotonic() - serving_at
                try:
                    if http_down is None and h.get("/health").status_code == 503:
                        http_down = now
                    if grpc_down is None and srv.health() != SERVING:
                        grpc_down = now
                except (httpx.HTTPError, grpc.RpcError):  # the server is already going away
                    http_down = now if http_down is None else http_down
                    grpc_down = now if grpc_down is None else grpc_down
                time.sleep(0.02)
        assert http_down is not None and http_down < 2.5, http_down
        assert grpc_down is not None and grpc_down < 2.5, grpc_down
        assert srv.wait_exit(30) == 1
        assert "injected step-loop death" in srv.log()
