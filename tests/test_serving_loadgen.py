"""Load generation and latency statistics (serving/loadgen.py) and ``energon bench serving``."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import numpy as np
import pytest
from serving_harness import REPO, TESTS, ServerProcess

from serving.loadgen import (
    GrpcBackend,
    Record,
    WorkItem,
    check_response,
    percentile,
    run_open_loop,
    summarize,
    synthetic_workload,
)
from serving.protos.energon.v1 import inference_pb2 as pb

pytestmark = pytest.mark.timeout(120)


def test_percentile_matches_numpy_linear() -> None:
    rng = np.random.default_rng()
    for n in (1, 2, 7, 100):
        xs = rng.random(n).tolist()
        for q in (0, 50, 90, 99, 100):
            assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)), rel=1e-12, abs=1e-15)


def test_summarize_by_hand() -> None:
    a = Record("a", sent=0.0, token_ids=[1, 2, 3], token_times=[1.0, 2.0, 3.0], done=3.0)  # TTFT 1, TPOT 1
    b = Record("b", sent=0.0, token_ids=[4, 5], token_times=[0.5, 0.7], done=0.7)  # TTFT 0.5, TPOT 0.2
    c = Record("c", sent=0.0, error="UNAVAILABLE", done=0.1)
    s = summarize([a, b, c], ttft_slo_s=0.6, tpot_slo_s=0.5)
    assert (s.requests, s.errors, s.output_tokens, s.duration_s) == (3, 1, 5, 3.0)
    assert s.ttft_s["p50"] == pytest.approx(0.75) and s.ttft_s["p99"] == pytest.approx(0.5 + 0.5 * 0.99)
    assert s.tpot_s["p50"] == pytest.approx(0.6)
    assert s.itl_s["p50"] == pytest.approx(1.0)  # gaps 1, 1, 0.2
    assert s.e2e_s["p50"] == pytest.approx(1.85)
    assert s.goodput_share == pytest.approx(1 / 3)  # only b meets both SLOs; the error counts against
    assert s.goodput == pytest.approx(1 / 3.0)  # one good request over 3 s
    assert s.request_throughput == pytest.approx(2 / 3.0) and s.token_throughput == pytest.approx(5 / 3.0)


def test_synthetic_workload_is_seeded_and_the_same_at_any_rate() -> None:
    burst = synthetic_workload(50, seed=7, vocab_size=100, prompt_len=(2, 30), output_len=(1, 9))
    again = synthetic_workload(50, seed=7, vocab_size=100, prompt_len=(2, 30), output_len=(1, 9))
    paced = synthetic_workload(50, seed=7, vocab_size=100, prompt_len=(2, 30), output_len=(1, 9), rate=10.0)
    other = synthetic_workload(50, seed=8, vocab_size=100, prompt_len=(2, 30), output_len=(1, 9))
    assert burst == again
    assert [(i.prompt, i.params) for i in burst] == [(i.prompt, i.params) for i in paced]
    assert [i.prompt for i in burst] != [i.prompt for i in other]
    assert all(i.send_at_s == 0.0 for i in burst)
    times = [i.send_at_s for i in paced]
    assert times == sorted(times) and times[0] > 0
    for i in burst:
        assert 2 <= len(i.prompt) <= 30 and all(3 <= t < 100 for t in i.prompt)
        assert 1 <= i.params.max_tokens <= 9 and i.params.ignore_eos
    assert len({i.params.seed for i in burst}) > 1
    with pytest.raises(ValueError, match="rate"):
        synthetic_workload(5, seed=0, vocab_size=10, rate=0.0)
    with pytest.raises(ValueError, match="n=0"):
        synthetic_workload(0, seed=0, vocab_size=10)


def test_bench_serving_command_against_a_server(tmp_path) -> None:
    """The same seeded workload over gRPC and over the server's OpenAI HTTP API: no errors, same tokens."""
    with ServerProcess("--max-num-seqs", "16", "--http-port", "0") as srv:
        srv.wait_serving()
        http_port = json.loads(srv.port_file.read_text())["http_port"]
        summaries = {}
        for backend, target in (("grpc", srv.target), ("openai", f"http://127.0.0.1:{http_port}")):
            out = tmp_path / f"{backend}.json"
            cmd = [sys.executable, "-m", "energon_jax.cli", "bench", "serving", "--target", target]
            cmd += ["--num-requests", "40", "--vocab-size", "500"]
            cmd += ["--rate", "200", "--prompt-len", "2", "20", "--output-len", "2", "12", "--json", str(out)]
            env = {"PYTHONPATH": f"{TESTS}:{REPO}", "PATH": ""}
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=90, env=env)
            assert proc.returncode == 0, proc.stderr
            assert f"({backend})" in proc.stdout and "TTFT (ms)" in proc.stdout and "goodput" in proc.stdout
            summaries[backend] = json.loads(out.read_text())
            assert (summaries[backend]["requests"], summaries[backend]["errors"]) == (40, 0)
        m = srv.wait_metrics(lambda m: m["energon_requests_running"] == 0)
        assert m["energon_requests_finished_total{reason=length}"] == 80
        expected = sum(i.params.max_tokens for i in synthetic_workload(40, seed=0, vocab_size=500, prompt_len=(2, 20),
                                                                        output_len=(2, 12)))  # fmt: skip
        assert summaries["grpc"]["output_tokens"] == summaries["openai"]["output_tokens"] == expected
        assert m["energon_generation_tokens_total"] == 2 * expected


# -- errors, request ids and the OpenAI HTTP backend ----------------------------------------------------


def _item(label: str = "w", max_tokens: int = 3, **fields) -> WorkItem:
    params = pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **fields)
    return WorkItem(label, [5, 6, 7], params)


def test_aborted_empty_short_and_unfinished_responses_are_errors() -> None:
    def rec(reason: str, n: int) -> Record:
        return Record("r", token_ids=list(range(n)), token_times=[1.0] * n, finish_reason=reason)

    assert check_response(rec("length", 3), _item()).error is None
    assert check_response(rec("stop", 3), _item()).error is None
    assert check_response(rec("abort", 2), _item()).error == "ABORTED"
    assert check_response(rec("length", 0), _item()).error == "EMPTY"
    assert check_response(rec("", 2), _item()).error == "INCOMPLETE"
    # An abort reported as a plain stop: ignore_eos and no stop condition, yet short of max_tokens.
    assert check_response(rec("stop", 2), _item()).error == "TRUNCATED"
    assert check_response(rec("stop", 2), _item(stop=["x"])).error is None  # a stop string may end it early
    assert check_response(rec("stop", 2), _item(stop_token_ids=[9])).error is None
    failed = Record("r", error="UNAVAILABLE", error_details="down")
    assert check_response(failed, _item()).error == "UNAVAILABLE"
    s = summarize([rec("length", 3), check_response(rec("abort", 1), _item())], ttft_slo_s=9, tpot_slo_s=9)
    assert (s.errors, s.output_tokens, s.goodput_share) == (1, 3, 0.5)


class _FakeGrpcClient:
    """Records the request ids it is sent; answers every request with max_tokens tokens."""

    def __init__(self) -> None:
        self.ids: list[str] = []

    async def generate(self, prompt, params, *, request_id, timeout=None):
        self.ids.append(request_id)
        for i in range(params.max_tokens):
            last = i == params.max_tokens - 1
            yield pb.GenerateResponse(request_id=request_id, token_ids=[i], text="a",
                                      finish_reason="length" if last else "")  # fmt: skip


def test_every_request_gets_a_fresh_id() -> None:
    client = _FakeGrpcClient()
    items = synthetic_workload(6, seed=3, vocab_size=50, prompt_len=(2, 4), output_len=(1, 3))
    first = asyncio.run(run_open_loop(GrpcBackend(client), items))
    again = asyncio.run(run_open_loop(GrpcBackend(client), items))  # the same workload once more
    assert len(set(client.ids)) == 12
    assert [r.request_id for r in first + again] == client.ids
    for r, item in zip(first + again, items + items, strict=True):
        assert r.label == item.label and r.request_id.startswith(item.label + "-") and r.error is None


def _sse(*chunks: object) -> bytes:
    return b"".join(b"data: " + (c if isinstance(c, bytes) else json.dumps(c).encode()) + b"\n\n" for c in chunks)


def _fake_openai_app(seen: list[dict]):
    """An OpenAI-shaped completions endpoint; a first prompt token from 9001 on picks a failure."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    def chunk(text: str, reason: str | None = None) -> dict:
        return {"id": "c", "object": "text_completion", "created": 0, "model": "fake",
                "choices": [{"index": 0, "text": text, "finish_reason": reason}]}  # fmt: skip

    async def models(request):
        return JSONResponse({"object": "list", "data": [{"id": "fake", "object": "model", "created": 0,
                                                         "owned_by": "t", "root": "fake", "max_model_len": 64}]})

    async def completions(request):
        body = await request.json()
        seen.append({**body, "x-request-id": request.headers.get("x-request-id")})
        n, mode = body["max_tokens"], body["prompt"][0]
        usage = {"prompt_tokens": len(body["prompt"]), "total_tokens": 0}
        if mode == 9400:
            return JSONResponse({"error": {"message": "bad prompt", "type": "invalid", "param": "prompt",
                                           "code": None}}, status_code=400)  # fmt: skip

        async def events():
            if mode == 9001:  # aborted after one token
                yield _sse(chunk("t0"), chunk("", "abort"), b"[DONE]")
            elif mode == 9002:  # empty
                yield _sse(chunk("", "length"), {**chunk(""), "choices": [], "usage": {**usage, "completion_tokens": 0}},
                           b"[DONE]")  # fmt: skip
            elif mode == 9003:  # the connection ends mid-stream
                yield _sse(chunk("t0"))
            elif mode == 9004:  # an error object inside the stream
                yield _sse({"error": {"message": "engine failed", "type": "internal"}}, b"[DONE]")
            else:  # a whole answer: one chunk per token, the finish reason, usage, [DONE]
                for i in range(n):
                    yield _sse(chunk(f"t{i}", "length" if i == n - 1 else None))
                yield _sse({**chunk("", None), "choices": [], "usage": {**usage, "completion_tokens": n}}, b"[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/models", models), Route("/v1/completions", completions, methods=["POST"])])


@pytest.fixture(scope="module")
def fake_openai_server():
    import threading

    import uvicorn

    seen: list[dict] = []
    server = uvicorn.Server(uvicorn.Config(_fake_openai_app(seen), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "fake server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", seen
    server.should_exit = True
    thread.join(timeout=10)


def test_openai_backend_times_the_stream_and_counts_bad_answers(fake_openai_server) -> None:
    from serving.loadgen_http import HttpTarget, open_backend

    url, seen = fake_openai_server
    items = [WorkItem(f"m{mode}", [mode, 9, 9], pb.SamplingParams(max_tokens=4, temperature=0.5, seed=7,
                                                                    ignore_eos=True)) for mode in (1, 9001, 9002, 9003, 9004, 9400)]

    async def go():
        async with open_backend(HttpTarget(url + "/v1")) as (backend, card):
            assert (backend.model, card["max_model_len"]) == ("fake", 64)
            return await run_open_loop(backend, items + items[:1], timeout_s=30)

    seen.clear()
    recs = asyncio.run(go())
    ok, aborted, empty, cut, stream_error, http_error, ok_again = recs
    assert ok.error is None and ok.text == "t0t1t2t3" and ok.finish_reason == "length"
    assert (ok.num_tokens, ok.prompt_tokens, len(ok.token_times)) == (4, 3, 4)
    assert ok.sent < ok.token_times[0] <= ok.token_times[-1] <= ok.done and ok.tpot_s is not None
    assert (aborted.error, empty.error, cut.error) == ("ABORTED", "EMPTY", "INCOMPLETE")
    assert stream_error.error == "STREAM_ERROR" and "engine failed" in stream_error.error_details
    assert http_error.error == "HTTP_400" and http_error.error_details == "bad prompt"
    assert ok_again.error is None and ok_again.request_id != ok.request_id
    sent = seen[0]
    assert sent["prompt"] == [1, 9, 9] and sent["model"] == "fake" and sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True}
    assert (sent["max_tokens"], sent["temperature"], sent["seed"], sent["ignore_eos"]) == (4, 0.5, 7, True)
    assert len({s["x-request-id"] for s in seen}) == len(seen) == 7
    s = summarize(recs, ttft_slo_s=60, tpot_slo_s=60)
    assert (s.requests, s.errors, s.output_tokens) == (7, 5, 8)


def test_bench_serving_command_over_http(fake_openai_server, tmp_path, capsys) -> None:
    from energon_jax.cli import main

    url, _ = fake_openai_server
    out = tmp_path / "bench.json"
    # Every prompt starts with token 1 (vocab 2, low token 1): the fake answers each in full.
    rc = main(["bench", "serving", "--target", url, "--num-requests", "5", "--vocab-size", "50", "--prompt-len",
               "2", "3", "--output-len", "2", "5", "--json", str(out)])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert f"{url} (openai)" in printed and "TTFT (ms)" in printed and "goodput" in printed
    summary = json.loads(out.read_text())
    assert (summary["requests"], summary["errors"]) == (5, 0)
    items = synthetic_workload(5, seed=0, vocab_size=50, prompt_len=(2, 3), output_len=(2, 5))
    assert summary["output_tokens"] == sum(i.params.max_tokens for i in items)  # the usage counts, summed
