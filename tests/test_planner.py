"""The placement planner: the step-model fit, the layout simulation, goodput, ``energon plan``.

The simulation is checked against latencies worked out by hand for small cases (one
request alone, two requests sharing a step budget, a disaggregated hand-off with a
transfer delay); the fit against samples generated from known coefficients; the
calibration end to end on the tiny decoder (a real engine, measured steps)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from energon_jax.plan_sim import (
    Layout, LoopModel, ReplicaLimits, StepCost, Workload, goodput, layouts_for, sample_lengths, simulate,
)
from energon_jax.planner import StepSample, fit_error, fit_step_cost, prefill_attended

COST = StepCost(base_s=0.010, per_token_s=0.001, per_row_s=0.0005, per_attended_s=0.0)
LIMITS = ReplicaLimits(max_num_seqs=8, max_num_batched_tokens=64)


def one(prompt: int, output: int, at: float = 0.0) -> Workload:
    return Workload(np.array([at]), np.array([prompt]), np.array([output]))


BARE = dict(colocated_loop=LoopModel.bare())  # only the steps: no plan-ahead, tokens seen when their step ends


def test_one_request_alone_colocated():
    res = simulate(one(40, 5), Layout(1), COST, LIMITS, **BARE)
    prefill = 0.010 + 40 * 0.001 + 0.0005  # one step of 40 tokens, 1 row
    decode = 0.010 + 0.001 + 0.0005  # one decode row
    assert res.ttft_s[0] == pytest.approx(prefill)
    assert res.tpot_s[0] == pytest.approx(decode)
    assert res.finish_s[0] == pytest.approx(prefill + 4 * decode)


def test_two_requests_share_the_step_budget_and_chunk():
    # A (50 tokens) and B (30 tokens) arrive together; budget 64: step 1 = A's 50 + B's first 14,
    # step 2 = A's decode row + B's last 16 (B's first token), step 3 = two decode rows.
    w = Workload(np.array([0.0, 0.0]), np.array([50, 30]), np.array([3, 2]))
    res = simulate(w, Layout(1), COST, LIMITS, **BARE)
    s1 = 0.010 + 64 * 0.001 + 2 * 0.0005
    s2 = 0.010 + 17 * 0.001 + 2 * 0.0005
    s3 = 0.010 + 2 * 0.001 + 2 * 0.0005
    assert res.ttft_s.tolist() == pytest.approx([s1, s1 + s2])
    assert res.finish_s.tolist() == pytest.approx([s1 + s2 + s3, s1 + s2 + s3])
    assert res.tpot_s.tolist() == pytest.approx([(s2 + s3) / 2, s3])


def test_first_token_is_seen_when_the_next_step_ends():
    # The engine's loop: a token that does not finish its request is returned by the next
    # step() call, which ends with the next step. Alone: prefill 40 (50.5 ms), then decode
    # steps of 11.5 ms; the first token is seen after step 2, the last (finishing) after step 5.
    res = simulate(one(40, 5), Layout(1), COST, LIMITS)
    assert res.ttft_s[0] == pytest.approx(0.0505 + 0.0115)
    assert res.tpot_s[0] == pytest.approx((0.0505 + 4 * 0.0115 - 0.062) / 4)  # 3 steps over 4 gaps
    # A one-token answer finishes at once: its token comes back with its own step.
    assert simulate(one(40, 1), Layout(1), COST, LIMITS).ttft_s[0] == pytest.approx(0.0505)


def test_request_arriving_mid_step_waits_for_the_planned_step():
    # A (prompt 40, 10 tokens) at t=0; B (prompt 20, 3 tokens) at 51 ms, during A's first decode step
    # (50.5 - 62 ms). Steps: 1 A prefill 0-50.5; 2 A decode 50.5-62; 3 A decode 62-73.5 ...
    w = Workload(np.array([0.0, 0.051]), np.array([40, 20]), np.array([10, 3]))
    joint = 0.010 + 21 * 0.001 + 2 * 0.0005  # A's decode row + B's 20-token prefill: 32 ms
    two_rows = 0.010 + 2 * 0.001 + 2 * 0.0005  # 13 ms
    # Bare: B joins step 3, planned when it starts (62 ms): 62 + 32 = 94 ms.
    assert simulate(w, Layout(1), COST, LIMITS, **BARE).ttft_s[1] == pytest.approx(0.094 - 0.051)
    # Plan-ahead: step 3 was planned at 50.5 ms, before B came; B joins step 4 (73.5 - 105.5 ms).
    ahead = LoopModel(plans_ahead=True, deferred_tokens=False)
    assert simulate(w, Layout(1), COST, LIMITS, colocated_loop=ahead).ttft_s[1] == pytest.approx(0.1055 - 0.051)
    # The engine's loop (both): B's first token is seen when step 5 (two decode rows) ends.
    res = simulate(w, Layout(1), COST, LIMITS)
    assert res.ttft_s[1] == pytest.approx(0.0735 + joint + two_rows - 0.051)
    # B's last token finishes it: step 6 (two rows again) ends 13 ms later; 2 gaps from first to last
    assert res.tpot_s[1] == pytest.approx(two_rows / 2)
    # A is alone until B came: its first token (step 1) is seen when step 2 ends
    assert res.ttft_s[0] == pytest.approx(0.062)


def test_role_servers_do_not_plan_ahead():
    # A prefill server answers with the first token right after its step; a decode server's
    # last token finishes the request: neither loop delay shows on a lone request.
    res = simulate(one(40, 5), Layout(1, 1, 1, 1), COST, LIMITS)
    assert res.ttft_s[0] == pytest.approx(0.0505) and res.tpot_s[0] == pytest.approx(0.0115)


def test_per_request_slos_and_attainment():
    res = simulate(Workload(np.array([0.0, 10.0]), np.array([40, 40]), np.array([5, 5])), Layout(1), COST, LIMITS,
                   **BARE)  # two lone requests: TTFT 50.5 ms, TPOT 11.5 ms each
    assert res.attainment(np.array([0.06, 0.05]), 0.012) == 0.5  # the second request's TTFT SLO is too tight
    assert res.attainment(0.06, np.array([0.011, 0.012])) == 0.5


def test_token_buckets_pad_the_step():
    cost = StepCost(0.0, 0.001, 0.0, 0.0, token_buckets=(16, 32, 64))
    assert [cost.padded(n) for n in (1, 16, 17, 64, 65)] == [16, 16, 32, 64, 65]
    assert simulate(one(20, 1), Layout(1), cost, LIMITS).ttft_s[0] == pytest.approx(0.032)


def test_per_request_latency_adds_to_ttft_only():
    cost = StepCost(0.010, 0.001, 0.0005, 0.0, per_request_s=0.02)
    base, extra = simulate(one(40, 5), Layout(1), COST, LIMITS), simulate(one(40, 5), Layout(1), cost, LIMITS)
    assert extra.ttft_s[0] == pytest.approx(base.ttft_s[0] + 0.02) and extra.tpot_s[0] == pytest.approx(base.tpot_s[0])


def test_disaggregated_hand_off_waits_for_the_transfer():
    res = simulate(one(40, 5), Layout(1, 1, 1, 1), COST, LIMITS, transfer_s_per_token=0.0005)
    prefill = 0.010 + 40 * 0.001 + 0.0005
    decode = 0.010 + 0.001 + 0.0005
    assert res.ttft_s[0] == pytest.approx(prefill)
    assert res.tpot_s[0] == pytest.approx((40 * 0.0005 + 4 * decode) / 4)


def test_tp_scales_the_work_terms_not_the_base():
    assert COST.step_s(64, 1, 0, tp=2, tp_efficiency=0.5) == pytest.approx(0.010 + (0.064 + 0.0005) / 1.0)
    assert COST.step_s(64, 1, 0, tp=4, tp_efficiency=1.0) == pytest.approx(0.010 + 0.0645 / 4)


def test_layouts_cover_every_split_of_the_devices():
    names = {str(x) for x in layouts_for(2)}
    assert names == {"colocated dp=2 tp=1", "colocated dp=1 tp=2",
                     "disaggregated prefill dp=1 tp=1, decode dp=1 tp=1"}
    assert all(x.devices == 4 for x in layouts_for(4))
    with pytest.raises(ValueError, match="devices=0"):
        layouts_for(0)


def test_goodput_falls_with_stricter_slos_and_rises_with_replicas():
    lengths = Workload(np.zeros(200), sample_lengths(200, 48, dist="exponential", maximum=200, seed=1),
                       sample_lengths(200, 16, dist="exponential", maximum=64, seed=2))
    kw = dict(slo_ttft_s=0.5, slo_tpot_s=0.05)
    one_replica = goodput(lengths, Layout(1), COST, LIMITS, **kw)
    assert one_replica > 0
    assert goodput(lengths, Layout(1), COST, LIMITS, slo_ttft_s=0.2, slo_tpot_s=0.05) <= one_replica
    assert goodput(lengths, Layout(2), COST, LIMITS, **kw) > 1.5 * one_replica
    # past the goodput, attainment drops below the target
    res = simulate(lengths.at_rate(4 * one_replica), Layout(1), COST, LIMITS)
    assert res.attainment(0.5, 0.05) < 0.9


def test_fit_recovers_known_coefficients():
    true = StepCost(0.004, 2e-5, 1e-4, 3e-9, token_buckets=(16, 32, 64, 128, 256))
    rng = np.random.default_rng(0)
    samples = []
    for _ in range(40):
        t = int(rng.integers(1, 256))
        r = int(rng.integers(1, min(t, 32) + 1))
        a = float(rng.integers(t, t * 300))
        samples.append(StepSample(t, r, a, true.step_s(t, r, a)))
    fit = fit_step_cost(samples, true.token_buckets)
    got = np.array([fit.base_s, fit.per_token_s, fit.per_row_s, fit.per_attended_s])
    want = np.array([true.base_s, true.per_token_s, true.per_row_s, true.per_attended_s])
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert fit.per_request_s == 0 and fit_error(fit, samples) < 1e-6
    # whole-run samples (a request's admission and fetch on top of its step) fit per_request_s
    runs = [StepSample(s.tokens, s.rows, s.attended, s.seconds + 0.003, whole_run=True) for s in samples[:20]]
    fit = fit_step_cost(runs + samples[20:], true.token_buckets)
    assert fit.per_request_s == pytest.approx(0.003, rel=1e-6) and fit.base_s == pytest.approx(true.base_s, rel=1e-6)
    assert prefill_attended(0, 3) == 6 and prefill_attended(2, 4) == 7
    # lone-TTFT samples: the prefill step, the decode step (1 row at context t + 1) that returns
    # the first token, and the per-request latency
    ttft = [StepSample(s.tokens, 1, s.attended, true.step_s(s.tokens, 1, s.attended) + true.step_s(1, 1, s.tokens + 1)
                       + 0.003, whole_run=True, then_decode=True) for s in samples[:20]]
    fit = fit_step_cost(ttft + samples[20:], true.token_buckets)
    assert fit.per_request_s == pytest.approx(0.003, rel=1e-6) and fit.per_row_s == pytest.approx(1e-4, rel=1e-6)
    assert fit_error(fit, ttft) < 1e-6


def test_fit_drops_negative_terms():
    samples = [StepSample(t, 1, 0.0, 0.002 + 1e-4 * t) for t in (4, 8, 16, 32, 64)]
    fit = fit_step_cost(samples)
    assert fit.per_row_s >= 0 and fit.per_attended_s >= 0
    assert fit_error(fit, samples) < 0.05
    with pytest.raises(ValueError, match="at least 4 samples"):
        fit_step_cost(samples[:2])


@pytest.mark.slow  # a minute of compiles and timed runs on a busy 2-core box
def test_calibrate_on_a_real_engine():
    """Measured steps of the tiny decoder fit the model (quick calibration)."""
    from energon_jax import Engine
    from energon_jax.planner import calibrate
    from tiny_decoder import TinyConfig, TinyDecoder

    config = TinyConfig(vocab_size=300, max_position_embeddings=256)
    engine = Engine(TinyDecoder(config, seed=1), config, max_model_len=256, page_size=8, max_num_seqs=4,
                    max_num_batched_tokens=64, kv_cache_pages=80, warmup=False)
    cost, samples = calibrate(engine, quick=True)
    assert len(samples) == 8 and all(s.seconds >= 0 for s in samples)
    assert cost.token_buckets == tuple(engine.buckets.token_buckets)
    assert cost.step_s(64, 1, prefill_attended(0, 64)) > 0
    assert engine.scheduler.pages_used == 0


def test_trace_file_and_bad_flags(tmp_path):
    from energon_jax.commands.plan import read_trace

    trace = tmp_path / "t.jsonl"
    trace.write_text("\n".join(json.dumps({"prompt_len": p, "output_len": o}) for p, o in [(10, 5), (900, 40)]))
    w = read_trace(str(trace), max_len=512)
    assert w.prompt_len.tolist() == [10, 511] and w.output_len.tolist() == [5, 1]
    trace.write_text('{"prompt_len": 3}\n')
    with pytest.raises(ValueError, match="line 1: needs integer prompt_len and output_len"):
        read_trace(str(trace), max_len=512)
    with pytest.raises(ValueError, match="rate=0 must be > 0"):
        one(3, 3).at_rate(0)


def test_plan_command_is_registered(capsys):
    from energon_jax import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["plan", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--slo-ttft" in out and "--devices" in out and "--trace" in out


@pytest.mark.slow
def test_plan_command_end_to_end(tiny_checkpoint, capsys):
    """``energon plan`` on a tiny Llama checkpoint: one JSON row per layout of 2 devices, best first."""
    from energon_jax import cli

    path = tiny_checkpoint("llama")
    assert cli.main(["plan", "--model", str(path), "--rate", "2", "--slo-ttft", "1", "--slo-tpot", "0.1",
                     "--devices", "2", "--quick", "--num-requests", "60", "--max-model-len", "128",
                     "--max-num-seqs", "4", "--max-num-batched-tokens", "64", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert {r["layout"] for r in rows} == {str(x) for x in layouts_for(2)}
    per_device = [r["goodput"] / r["devices"] for r in rows]
    assert per_device == sorted(per_device, reverse=True) and per_device[0] > 0
    assert all(r["ttft_p90"] >= r["ttft_p50"] > 0 for r in rows)
