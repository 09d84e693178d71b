"""The gRPC server as a real process over the mock engine: contract, limits and faults.

The mock engine's output is hand arithmetic (tests/mock_engine.py): after
prompt tokens ``... p`` a greedy request streams ``p+1, p+2, ...``; with a seed
``s`` and temperature > 0 each step adds ``1 + s % 7``. Engine state (queued,
running, KV pages, finish reasons) is read from the server's /metrics.
"""

from __future__ import annotations

import signal
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from mock_engine import SamplingParams, expected_tokens
from serving_harness import ServerProcess

from serving.client import generate_request
from serving.protos.energon.v1 import inference_pb2 as pb
from serving.protos.energon.v1 import inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(120)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _idle(m: dict[str, float]) -> bool:
    return m["energon_kv_pages_used"] == 0 and m["energon_requests_running"] == 0 and m["energon_requests_queued"] == 0


def _finished(m: dict[str, float], reason: str) -> float:
    return m.get(f"energon_requests_finished_total{{reason={reason}}}", 0.0)


def _call(stub, prompt, timeout: float = 30, **params):
    """Start a Generate stream with these sampling parameters."""
    return stub.Generate(generate_request(prompt, pb.SamplingParams(**params)), timeout=timeout)


def _ids(responses) -> list[int]:
    return [t for r in responses for t in r.token_ids]


@pytest.fixture(scope="module")
def server():
    # A slow-ish step (20 ms) so that cancellation and deadlines land mid-stream.
    with ServerProcess("--max-model-len", "64", "--engine-arg", "step_s=0.02", "--max-message-bytes", "65536") as srv:
        srv.wait_serving()
        yield srv


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.InferenceStub(channel)


def test_generate_streams_the_hand_arithmetic(server, stub) -> None:
    params = pb.SamplingParams(max_tokens=6, temperature=0.0)
    resps = list(stub.Generate(generate_request("5 6 7", params, "greedy-1"), timeout=30))
    ids = [t for r in resps for t in r.token_ids]
    assert ids == [8, 9, 10, 11, 12, 13]
    assert "".join(r.text for r in resps) == " 8 9 10 11 12 13"
    assert all(r.request_id == "greedy-1" for r in resps)
    assert [r.finish_reason for r in resps] == [""] * 5 + ["length"]
    assert (resps[-1].usage.prompt_tokens, resps[-1].usage.completion_tokens) == (3, 6)

    seeded = pb.SamplingParams(max_tokens=5, temperature=0.7, seed=10, stop_token_ids=[900])
    ids = [t for r in stub.Generate(generate_request([20, 30], seeded), timeout=30) for t in r.token_ids]
    by_hand = [34, 38, 42, 46, 50]  # 30 + k * (1 + 10 % 7)
    assert ids == expected_tokens([20, 30], SamplingParams(max_tokens=5, temperature=0.7, seed=10)) == by_hand


def test_logprobs_when_asked(stub) -> None:
    resps = list(_call(stub, [1], max_tokens=3, temperature=0, logprobs=2))
    lps = [lp for r in resps for lp in r.logprobs]
    assert [lp.token_id for lp in lps] == [2, 3, 4]
    assert [lp.logprob for lp in lps] == [-0.5] * 3
    tops = [[(t.token_id, t.logprob) for t in lp.top] for lp in lps]
    assert tops == [[(2, -0.5), (3, -1.5)], [(3, -0.5), (4, -1.5)], [(4, -0.5), (5, -1.5)]]
    plain = list(stub.Generate(generate_request([1], pb.SamplingParams(max_tokens=2, temperature=0)), timeout=30))
    assert all(len(r.logprobs) == 0 for r in plain)


def test_stop_token_ends_with_reason_stop(stub) -> None:
    resps = list(_call(stub, [10], max_tokens=20, temperature=0, stop_token_ids=[13]))
    assert [t for r in resps for t in r.token_ids] == [11, 12, 13]
    assert resps[-1].finish_reason == "stop"


def test_model_info_tokenize_embed(stub) -> None:
    info = stub.ModelInfo(pb.ModelInfoRequest(), timeout=10)
    assert (info.architecture, info.max_model_len, info.vocab_size) == ("MockForCausalLM", 64, 1000)
    assert (info.layout.dp, info.layout.tp, info.layout.pp) == (1, 1, 1)
    assert list(stub.Tokenize(pb.TokenizeRequest(text="3 1004 7"), timeout=10).token_ids) == [3, 4, 7]
    emb = stub.Embed(pb.EmbedRequest(texts=["3 4", "5"], normalize=False), timeout=10)
    assert [list(e.values) for e in emb.embeddings] == [[2.0, 7.0, 1.0], [1.0, 5.0, 1.0]]
    with pytest.raises(grpc.RpcError) as e:
        stub.Tokenize(pb.TokenizeRequest(text="three"), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "'three'" in e.value.details()


def test_health_and_reflection(server) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "energon.v1.Inference"):
            assert health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status == SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        ask = reflection_pb2.ServerReflectionRequest(list_services="")
        [resp] = list(refl.ServerReflectionInfo(iter([ask]), timeout=5))
        names = {s.name for s in resp.list_services_response.service}
        assert {"energon.v1.Inference", "grpc.health.v1.Health"} <= names


BAD_REQUESTS = [
    ("top_p", generate_request("1 2", pb.SamplingParams(top_p=1.5))),
    ("temperature", generate_request("1 2", pb.SamplingParams(temperature=-0.1))),
    ("max_tokens", generate_request("1 2", pb.SamplingParams(max_tokens=0))),
    ("logprobs", generate_request("1 2", pb.SamplingParams(logprobs=21))),
    ("prompt", generate_request("", pb.SamplingParams(max_tokens=2))),
    ("prompt", generate_request([], pb.SamplingParams(max_tokens=2))),
    ("prompt", pb.GenerateRequest(params=pb.SamplingParams(max_tokens=2))),
    ("prompt_token_ids[1]=1000", generate_request([5, 1000], pb.SamplingParams(max_tokens=2))),
    ("prompt_token_ids[0]=-1", generate_request([-1], pb.SamplingParams(max_tokens=2))),
    ("max_model_len", generate_request(list(range(65)), pb.SamplingParams(max_tokens=1))),
    ("max_tokens", generate_request(list(range(60)), pb.SamplingParams(max_tokens=5))),
]


@pytest.mark.parametrize(("field", "request_msg"), BAD_REQUESTS)
def test_bad_input_is_invalid_argument_naming_the_field(stub, field, request_msg) -> None:
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(request_msg, timeout=10))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in e.value.details()


def test_message_over_the_receive_limit_is_resource_exhausted(server, stub) -> None:
    big = generate_request("1 " * 40_000, pb.SamplingParams(max_tokens=1))  # ~80 KB > 64 KiB limit
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(big, timeout=10))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # The server is unharmed.
    assert _ids(_call(stub, "1", max_tokens=1, temperature=0)) == [2]


def test_cancel_mid_stream_aborts_and_frees_pages(server, stub) -> None:
    before = _finished(server.wait_metrics(_idle), "cancelled")
    call = stub.Generate(generate_request("1 2 3", pb.SamplingParams(max_tokens=50, temperature=0)), timeout=30)
    got = [next(call).token_ids[0] for _ in range(3)]
    assert got == [4, 5, 6]
    assert server.metrics()["energon_kv_pages_used"] > 0
    call.cancel()
    m = server.wait_metrics(lambda m: _idle(m) and _finished(m, "cancelled") == before + 1)
    assert m["energon_kv_pages_used"] == 0


def test_cancel_and_deadline_while_queued(server) -> None:
    # Fill the running batch (8 seqs in the mock) with long requests, then queue one more.
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        server.wait_metrics(_idle)
        before = server.metrics()
        long_calls = [_call(stub, [1], 60, max_tokens=60, temperature=0) for _ in range(8)]
        for c in long_calls:
            next(c)
        queued = stub.Generate(generate_request([2], pb.SamplingParams(max_tokens=5, temperature=0)), timeout=60)
        server.wait_metrics(lambda m: m["energon_requests_queued"] == 1)
        queued.cancel()
        server.wait_metrics(lambda m: m["energon_requests_queued"] == 0 and m["energon_requests_running"] == 8)
        # A deadline that expires while queued: DEADLINE_EXCEEDED, dropped before prefill.
        late = stub.Generate(generate_request([3], pb.SamplingParams(max_tokens=5, temperature=0)), timeout=0.3)
        with pytest.raises(grpc.RpcError) as e:
            next(late)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        deadlines = _finished(before, "deadline")
        m = server.wait_metrics(
            lambda m: m["energon_requests_queued"] == 0 and _finished(m, "deadline") == deadlines + 1
        )
        assert m["energon_requests_running"] == 8
        for c in long_calls:
            c.cancel()
        server.wait_metrics(_idle)


def test_deadline_mid_stream_is_deadline_exceeded_and_aborted(server, stub) -> None:
    before = _finished(server.wait_metrics(_idle), "deadline")
    call = stub.Generate(generate_request([7], pb.SamplingParams(max_tokens=60, temperature=0)), timeout=0.3)
    tokens = []
    with pytest.raises(grpc.RpcError) as e:
        for r in call:
            tokens.extend(r.token_ids)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert tokens == list(range(8, 8 + len(tokens)))  # what did arrive was right
    server.wait_metrics(lambda m: _idle(m) and _finished(m, "deadline") == before + 1)


def test_full_queue_is_resource_exhausted_at_once_while_accepted_complete() -> None:
    with ServerProcess("--max-num-seqs", "1", "--max-queue", "2", "--engine-arg", "step_s=0.02") as srv:
        srv.wait_serving()
        with grpc.insecure_channel(srv.target) as channel:
            stub = pb_grpc.InferenceStub(channel)
            running = stub.Generate(generate_request([10], pb.SamplingParams(max_tokens=20, temperature=0)), timeout=60)
            first = next(running)
            waiting = [_call(stub, [p], 60, max_tokens=3, temperature=0) for p in (100, 200)]
            srv.wait_metrics(lambda m: m["energon_requests_queued"] == 2)
            with pytest.raises(grpc.RpcError) as e:
                list(stub.Generate(generate_request([300], pb.SamplingParams(max_tokens=3)), timeout=60))
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "queue" in e.value.details()
            rest = [t for r in running for t in r.token_ids]
            assert list(first.token_ids) + rest == list(range(11, 31))
            for call, p in zip(waiting, (100, 200)):
                assert [t for r in call for t in r.token_ids] == [p + 1, p + 2, p + 3]
            m = srv.wait_metrics(_idle)
            assert _finished(m, "rejected") == 1


def test_engine_step_failure_is_internal_not_serving_and_nonzero_exit() -> None:
    with ServerProcess("--engine-arg", "step_s=0.02", "--engine-arg", "fail_on_token=500") as srv:
        srv.wait_serving()
        seen, watcher = srv.watch_health()
        with grpc.insecure_channel(srv.target) as channel:
            stub = pb_grpc.InferenceStub(channel)
            calls = [_call(stub, [i], 60, max_tokens=60, temperature=0) for i in (1, 2, 3)]
            for c in calls:
                next(c)
            poison = stub.Generate(generate_request([500], pb.SamplingParams(max_tokens=5)), timeout=60)
            for c in [*calls, poison]:
                with pytest.raises(grpc.RpcError) as e:
                    list(c)
                assert e.value.code() == grpc.StatusCode.INTERNAL, e.value
        assert srv.wait_exit(30) == 1
        watcher.join(10)
        assert seen[0] == SERVING and NOT_SERVING in seen
        assert "injected failure" in srv.log()


def test_sigterm_drains_in_flight_streams_and_exits_zero() -> None:
    with ServerProcess("--engine-arg", "step_s=0.02", "--grace", "20") as srv:
        srv.wait_serving()
        seen, _ = srv.watch_health()
        with grpc.insecure_channel(srv.target) as channel:
            stub = pb_grpc.InferenceStub(channel)
            calls = [_call(stub, [i * 100], 60, max_tokens=40, temperature=0) for i in (1, 2, 3, 4)]
            firsts = [next(c) for c in calls]
            srv.signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while NOT_SERVING not in seen and time.monotonic() < deadline:
                time.sleep(0.01)
            assert NOT_SERVING in seen
            assert srv.health(channel) == NOT_SERVING
            with pytest.raises(grpc.RpcError) as e:
                list(stub.Generate(generate_request([5], pb.SamplingParams(max_tokens=2)), timeout=10))
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            for i, (first, c) in enumerate(zip(firsts, calls), start=1):
                resps = [first, *c]
                assert [t for r in resps for t in r.token_ids] == list(range(i * 100 + 1, i * 100 + 41))
                assert resps[-1].finish_reason == "length"
        assert srv.wait_exit(30) == 0


def test_not_serving_and_unavailable_until_the_model_is_loaded() -> None:
    with ServerProcess("--engine-arg", "load_s=3") as srv:
        srv.wait_ports()
        with grpc.insecure_channel(srv.target) as channel:
            assert srv.health(channel) == NOT_SERVING
            with pytest.raises(grpc.RpcError) as e:
                list(_call(pb_grpc.InferenceStub(channel), [1], 10, max_tokens=1))
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in e.value.details()
            srv.wait_serving(channel=channel)
            assert _ids(_call(pb_grpc.InferenceStub(channel), [1], 10, max_tokens=2, temperature=0)) == [2, 3]


def test_sigterm_cancels_streams_still_running_after_the_grace_period() -> None:
    with ServerProcess("--engine-arg", "step_s=0.05", "--grace", "0.5") as srv:
        srv.wait_serving()
        with grpc.insecure_channel(srv.target) as channel:
            stub = pb_grpc.InferenceStub(channel)
            call = stub.Generate(generate_request([1], pb.SamplingParams(max_tokens=200, temperature=0)), timeout=60)
            first = next(call)
            srv.signal(signal.SIGTERM)
            tokens = list(first.token_ids)
            with pytest.raises(grpc.RpcError) as e:
                for r in call:
                    tokens.extend(r.token_ids)
            assert e.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
            assert tokens == list(range(2, 2 + len(tokens))) and len(tokens) < 200
        assert srv.wait_exit(30) == 0
        assert "still in flight" in srv.log()


def test_energon_client_streams_to_the_terminal(server) -> None:
    import subprocess
    import sys

    from serving_harness import REPO

    cmd = [sys.executable, "-m", "energon_jax.cli", "client", "--target", server.target]
    flags = ["--max-tokens", "3", "--temperature", "0", "--usage"]
    ok = subprocess.run([*cmd, "5 6 7", *flags], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == " 8 9 10\n[finish_reason=length prompt_tokens=3 completion_tokens=3]\n"
    bad = subprocess.run([*cmd, "5 6 7", "--top-p", "2"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1
    assert "INVALID_ARGUMENT" in bad.stderr and "top_p" in bad.stderr


def test_a_port_in_use_is_a_clear_error_and_exit_1() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        srv = ServerProcess("--port", str(port))  # the later --port wins over the harness's --port 0
        try:
            assert srv.wait_exit(60) == 1
            assert f"cannot listen on 127.0.0.1:{port}" in srv.log()
        finally:
            srv.stop()
