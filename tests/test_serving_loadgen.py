"""Load generation and latency statistics (serving/loadgen.py) and ``energon bench serving``."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from serving_harness import REPO, TESTS, ServerProcess

from serving.loadgen import Record, percentile, summarize, synthetic_workload

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
    with ServerProcess("--max-num-seqs", "16") as srv:
        srv.wait_serving()
        out = tmp_path / "bench.json"
        cmd = [sys.executable, "-m", "energon_jax.cli", "bench", "serving", "--target", srv.target]
        cmd += ["--num-requests", "40"]
        cmd += ["--rate", "200", "--prompt-len", "2", "20", "--output-len", "2", "12", "--json", str(out)]
        env = {"PYTHONPATH": f"{TESTS}:{REPO}", "PATH": ""}
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=90, env=env)
        assert proc.returncode == 0, proc.stderr
        assert "TTFT (ms)" in proc.stdout and "goodput" in proc.stdout
        summary = json.loads(out.read_text())
        assert (summary["requests"], summary["errors"]) == (40, 0)
        m = srv.wait_metrics(lambda m: m["energon_requests_running"] == 0)
        assert m["energon_requests_finished_total{reason=length}"] == 40
        assert summary["output_tokens"] == m["energon_generation_tokens_total"]
