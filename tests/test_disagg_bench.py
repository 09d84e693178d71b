"""``benchmarks/disagg.py`` and ``disagg_servers.py``: the SLO and goodput arithmetic against
numbers worked out by hand, the seeded workload, the planner offsets fitted on an unloaded pass,
the flags; end to end at a tiny size (real servers and pinned calibrations, slow)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from energon_jax.plan_sim import ReplicaLimits, StepCost

REPO = Path(__file__).resolve().parents[1]


def _load(name: str, file: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / file)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


# disagg.py imports disagg_servers (as a script its folder is on sys.path): loaded first under
# that name, without putting benchmarks/ (its serving.py, planner.py, ...) on this process's path.
servers = _load("disagg_servers", "disagg_servers.py")
bench = _load("disagg_bench", "disagg.py")

NAN = float("nan")


def test_splitwise_slo_per_request():
    # References (unloaded): TTFT 10, 20, 10 ms; TPOT 2, 4 ms and none (a one-token answer).
    ref_ttft, ref_tpot = np.array([0.010, 0.020, 0.010]), np.array([0.002, 0.004, NAN])
    ttft = np.array([0.029, 0.061, 0.025])  # limits at scale 1: 30, 60, 30 ms
    tpot = np.array([0.0029, 0.0050, NAN])  # limits at scale 1: 3, 6 ms
    assert bench.meets_slo(ttft, tpot, ref_ttft, ref_tpot, 1.0).tolist() == [True, False, True]
    # scale 0.5: limits 15, 30, 15 ms and 1.5, 3 ms: nobody
    assert bench.meets_slo(ttft, tpot, ref_ttft, ref_tpot, 0.5).tolist() == [False, False, False]
    # scale 2: 60, 120, 60 ms and 6, 12 ms: everybody
    assert bench.meets_slo(ttft, tpot, ref_ttft, ref_tpot, 2.0).tolist() == [True, True, True]
    # TPOT alone can fail a request: 2.9 ms against 1.5 x 1 ms
    assert not bench.meets_slo(np.array([0.001]), np.array([0.0029]), np.array([0.01]), np.array([0.001]), 1.0)[0]
    # a failed request (no TTFT) never meets
    assert not bench.meets_slo(np.array([NAN]), np.array([NAN]), np.array([0.01]), np.array([0.001]), 3.0)[0]


def test_goodput_and_best_rate():
    # 3 of 4 requests meet both SLOs over a 2 s run: 1.5 requests/s
    assert bench.goodput(np.array([True, False, True, True]), 2.0) == pytest.approx(1.5)
    with pytest.raises(ValueError, match="span_s=0 must be > 0"):
        bench.goodput(np.array([True]), 0)
    # DistServe's reading of a sweep: the highest rate met by 90%, every lower rate met too
    assert bench.best_rate([12, 4, 8], [0.5, 0.95, 0.9]) == 8
    assert bench.best_rate([4, 8, 12], [0.95, 0.5, 0.92]) == 4  # a lucky higher rate does not count
    assert bench.best_rate([4, 8], [0.8, 1.0]) == 0
    p = bench.percentiles(np.array([1.0, 2.0, 3.0, 4.0, 5.0, NAN]))  # NaN (failed) left out
    assert p == {"p50": 3.0, "p90": pytest.approx(4.6), "p99": pytest.approx(4.96)}


def test_summary_of_a_run_against_its_reference():
    ref = bench.Run(np.array([0.01, 0.01]), np.array([0.002, 0.002]), 1.0, 0)
    run = bench.Run(np.array([0.02, 0.05]), np.array([0.0025, 0.0025]), 4.0, 0)
    s = bench.summarize_run(run, ref, [1.0, 2.0])
    # scale 1: TTFT <= 30 ms and TPOT <= 3 ms: the first only; scale 2 (60 ms, 6 ms): both
    assert s["attained"] == {"1": 0.5, "2": 1.0}
    assert s["goodput"] == {"1": pytest.approx(0.25), "2": pytest.approx(0.5)}


def test_decode_step_gap_skips_the_hand_off_and_the_last_token():
    # tokens at 0, 30 (hand-off), 32, 35, 37, 37 ms (the last one comes with its own step):
    # gaps 30 | 2, 3, 2 | 0 -> median of the middle ones, 2 ms
    assert bench.decode_step_gap([0.0, 0.030, 0.032, 0.035, 0.037, 0.037]) == pytest.approx(0.002)
    assert np.isnan(bench.decode_step_gap([0.0, 0.030, 0.031]))


def test_mixed_workload_is_seeded_and_in_range():
    mix = bench.Mix(400, 0.25, (300, 440), (8, 24), (8, 48), (48, 64), seed=3)
    p, o = mix.lengths()
    p2, o2 = mix.lengths()
    assert (p == p2).all() and (o == o2).all()
    long = p >= 300
    assert 0.18 < long.mean() < 0.32
    assert p[long].min() >= 300 and p[long].max() <= 440 and o[long].min() >= 8 and o[long].max() <= 24
    assert p[~long].min() >= 8 and p[~long].max() <= 48 and o[~long].min() >= 48 and o[~long].max() <= 64
    prompts = mix.prompts(vocab=100, run=0)
    assert [len(x) for x in prompts] == p.tolist() and min(min(x) for x in prompts) >= 3
    assert prompts == mix.prompts(vocab=100, run=0)
    # another pass: the same lengths, other tokens (no prefix-cache hits between passes)
    other = mix.prompts(vocab=100, run=1)
    assert [len(x) for x in other] == p.tolist() and all(a[:8] != b[:8] for a, b in zip(prompts, other))
    with pytest.raises(ValueError, match=r"short_prompt=\(9, 8\) must be"):
        bench.Mix(4, 0.2, (300, 440), (8, 24), (9, 8), (48, 64))
    a = bench.poisson_arrivals(2000, 10.0, seed=1)
    assert a[0] == 0 and (np.diff(a) >= 0).all() and np.mean(np.diff(a)) == pytest.approx(0.1, rel=0.1)


def test_offsets_fitted_on_the_unloaded_pass_recover_known_constants():
    """Lone requests simulated with a known front end (4 ms on TTFT) and hand-off (2 ms + 10 us
    per prompt token) give those numbers back."""
    cost = StepCost(0.002, 1e-5, 1e-4, 0.0)
    limits = ReplicaLimits(8, 256)
    prompt, output = np.array([10, 200, 30, 400, 50]), np.array([20, 5, 30, 1, 12])
    alone = np.arange(5) * 1e3
    base = bench.predict("disaggregated", cost, limits, prompt, output, alone, bench.Offsets(0.0))
    handoff = 0.002 + 1e-5 * prompt
    many = output > 1
    measured = bench.Run(base.ttft + 0.004, np.where(many, base.tpot + handoff / np.maximum(output - 1, 1), NAN),
                         1.0, 0)
    off = bench.fit_offsets("disaggregated", cost, limits, prompt, output, measured)
    assert off.frontend_s == pytest.approx(0.004) and off.transfer_s == pytest.approx(0.002)
    assert off.transfer_s_per_token == pytest.approx(1e-5)
    again = bench.predict("disaggregated", cost, limits, prompt, output, alone, off)
    np.testing.assert_allclose(again.ttft, measured.ttft)
    np.testing.assert_allclose(again.tpot[many], measured.tpot[many])
    # the same hand-off read against the decode step each client saw (a step of 1 ms, not the model's)
    # and a served step 0.5 ms longer than the model's one-row step (2.11 ms + attention 0): 2.61 ms
    step = 0.002 + 1e-5 + 1e-4 + 0.0005
    seen = bench.Run(measured.ttft, np.where(many, step + handoff / np.maximum(output - 1, 1), NAN), 1.0, 0,
                     step_gap=np.where(output >= 4, step, NAN))
    off = bench.fit_offsets("disaggregated", cost, limits, prompt, output, seen)
    assert (off.transfer_s, off.transfer_s_per_token) == (pytest.approx(0.002), pytest.approx(1e-5))
    assert off.step_s == pytest.approx(0.0005)
    assert off.apply(cost).base_s == pytest.approx(0.0025) and off.apply(cost).per_request_s == off.frontend_s
    # colocated: only the front end
    colo = bench.predict("colocated", cost, limits, prompt, output, alone, bench.Offsets(0.0))
    off = bench.fit_offsets("colocated", cost, limits, prompt, output,
                            bench.Run(colo.ttft + 0.003, colo.tpot, 1.0, 0))
    assert off == bench.Offsets(pytest.approx(0.003))


def test_help_and_bad_flags(capsys):
    with pytest.raises(SystemExit) as info:
        bench.parse_args(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--rates" in out and "--slo-scales" in out and "--prefill-cpus" in out and "--json" in out
    with pytest.raises(SystemExit, match="--rates='0,4' must list numbers > 0"):
        bench.parse_args(["--rates", "0,4"])
    with pytest.raises(SystemExit, match="'both' is not one of colocated, disaggregated, colocated-1core"):
        bench.parse_args(["--layouts", "both"])
    args = bench.parse_args(["--rates", "2,4", "--slo-scales", "1"])
    assert args.rate_list == [2.0, 4.0] and args.scale_list == [1.0] and args.layout_list == list(servers.DEFAULT_LAYOUTS)


def test_server_flags_and_cpu_lists():
    # the same engine flags reach every server and calibration (disagg_servers.engine_flags)
    args = bench.parse_args(["--model", "/ckpt", "--max-num-seqs", "4"])
    assert servers.engine_flags(args) == ["--max-model-len=512", "--max-num-seqs=4", "--max-num-batched-tokens=256",
                                          "--model", "/ckpt"]
    outside = max(os.sched_getaffinity(0)) + 1
    args = bench.parse_args(["--decode-cpus", f"0-{outside}"])
    want = ("taskset is not installed" if shutil.which("taskset") is None
            else f"--decode-cpus=0-{outside} names CPUs outside this process's")
    with pytest.raises(SystemExit, match=want):
        servers.check_cpus(args)


class _Started:
    """Records ``Processes.start`` calls instead of starting anything."""

    def __init__(self) -> None:
        self.commands: dict[str, list[str]] = {}

    def start(self, name: str, cpus: str | None, args: list[str]) -> str:
        self.commands[name] = list(args)
        return f"{name}:1"


@pytest.mark.parametrize("no_warmup", [False, True])
def test_no_warmup_reaches_every_server(no_warmup):
    argv = ["--no-warmup"] if no_warmup else []
    for layout, engines in (("colocated", ["colocated"]), ("disaggregated", ["prefill", "decode"])):
        started = _Started()
        assert servers.start_layout(started, layout, bench.parse_args(argv)) == (
            "router:1" if layout == "disaggregated" else "colocated:1")
        for name in engines:  # every `energon serve` (colocated or a role) gets the flag, or none does
            assert started.commands[name][0] == "serve"
            assert ("--no-warmup" in started.commands[name]) == no_warmup, started.commands
        if layout == "disaggregated":  # the router runs no engine and takes no such flag
            assert started.commands["router"] == ["router", "--prefill", "prefill:1", "--decode", "decode:1"]


@pytest.mark.slow  # three servers, a router and two calibrations: a few minutes on the 2-core box
def test_tiny_run_end_to_end(tmp_path):
    out = tmp_path / "disagg.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "disagg.py"), "--requests", "4", "--rates", "20",
         "--slo-scales", "1,3", "--long-share", "0.5", "--long-prompt", "100,120", "--short-output", "8,12",
         "--max-model-len", "256", "--max-num-seqs", "4", "--max-num-batched-tokens", "64", "--no-warmup",
         "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| colocated | 20 |" in proc.stdout and "| disaggregated | 20 |" in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    assert {(r["layout"], r["rate"]) for r in rows} == {(x, y) for x in servers.DEFAULT_LAYOUTS for y in ("alone", 20.0)}
    for r in rows:
        assert r["measured"]["errors"] == 0
        assert r["measured"]["ttft"]["p90"] > 0 and r["predicted"]["ttft"]["p90"] > 0
    # the colocated server is its own reference: unloaded, it meets 3x its own latency
    alone = next(r for r in rows if r["layout"] == "colocated" and r["rate"] == "alone")
    assert alone["measured"]["attained"]["3"] == 1.0
