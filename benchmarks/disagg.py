"""Prefill/decode disaggregation against colocated serving, on this machine (issue 16, point 6).

A Poisson workload (fixed seed) mixes long prompts into decode-heavy traffic (short
prompts, long answers) and is served, over gRPC with streaming, by two layouts of the
same engine (the embedded demo model unless ``--model``), each in its own processes on
127.0.0.1:

- **colocated**: one ``energon serve`` pinned to ``--colocated-cpus`` (both cores);
- **disaggregated**: ``energon serve --role prefill`` pinned to ``--prefill-cpus``,
  ``energon serve --role decode`` pinned to ``--decode-cpus`` (``taskset -c``), and
  ``energon router`` in front of them (the router and the client are not pinned).

For each layout, first every request of the workload runs alone, one after another
(twice; the first pass compiles, the second is the **unloaded latency** of each request),
then the workload runs open-loop at each ``--rates`` value. The client times each
request's TTFT (send to first streamed token) and TPOT ((last - first) / (tokens - 1)).

SLOs are Splitwise's: a request meets them when its TTFT <= ``3 x scale`` and its TPOT
<= ``1.5 x scale`` times its own unloaded latency, measured on the reference layout
(``--slo-reference``: the colocated server by default, so both layouts answer to the
same objective; ``own``: each layout's own). Goodput is the number of requests meeting
both SLOs over the run's span (first send to last token), for ``scale`` in ``--slo-scales``.

Beside each measurement, the planner's prediction (``energon_jax/plan_sim.py``) on the
same arrivals and lengths, with step models fitted by ``energon_jax/planner.py`` on this
backend in a process pinned like each server (``taskset``): the colocated engine on the
colocated CPUs, a role engine on one core. From the unloaded pass only, what the
in-process step model cannot see is fitted per layout (``Offsets``): a served decode step's
extra time (the front end streaming tokens from the same process), the front end's latency
(gRPC, the router) added to every TTFT, and, for the disaggregated layout, the hand-off
between the servers (``transfer_s + transfer_s_per_token x prompt``: gather, pull, scatter,
the router's hop).

Here: the workload, the timing client, SLOs and goodput, the planner's prediction and the
tables. ``disagg_servers.py`` beside it starts and stops the servers and runs the pinned
calibrations.

Run (about 4 minutes on the 2-core box; numbers mean something only on a quiet machine)::

    JAX_PLATFORMS=cpu python benchmarks/disagg.py --json /tmp/disagg.json
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

# the processes (beside this file: the script's folder is on sys.path)
from disagg_servers import (  # noqa: E402
    DEFAULT_LAYOUTS, LAYOUTS, Processes, add_engine_flags, calibrate_pinned, check_cpus, start_layout)

TTFT_X, TPOT_X = 3.0, 1.5  # Splitwise: TTFT within 3x and TPOT within 1.5x of the unloaded latency


# --- the workload -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Mix:
    """Decode-heavy traffic with a share of long prompts; every range is inclusive."""

    requests: int
    long_share: float
    long_prompt: tuple[int, int]
    long_output: tuple[int, int]
    short_prompt: tuple[int, int]
    short_output: tuple[int, int]
    seed: int = 0

    def __post_init__(self) -> None:
        if self.requests < 1:
            raise ValueError(f"requests={self.requests} must be >= 1")
        if not 0 <= self.long_share <= 1:
            raise ValueError(f"long_share={self.long_share} must be in [0, 1]")
        for name in ("long_prompt", "long_output", "short_prompt", "short_output"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"{name}={(lo, hi)} must be (lo, hi) with 1 <= lo <= hi")

    def lengths(self) -> tuple[np.ndarray, np.ndarray]:
        """Prompt and output length of each request, ``[R]`` each (the same at every rate)."""
        rng = np.random.default_rng(self.seed)
        long = rng.random(self.requests) < self.long_share
        prompt = np.where(long, rng.integers(*self.long_prompt, self.requests, endpoint=True),
                          rng.integers(*self.short_prompt, self.requests, endpoint=True))
        output = np.where(long, rng.integers(*self.long_output, self.requests, endpoint=True),
                          rng.integers(*self.short_output, self.requests, endpoint=True))
        return prompt.astype(np.int64), output.astype(np.int64)

    def prompts(self, vocab: int, run: int) -> list[list[int]]:
        """Random token ids of the drawn lengths, different in every ``run``: a pass that sent
        the same prompts again would find them in the servers' prefix caches and skip prefills."""
        rng = np.random.default_rng([self.seed + 1, run])
        return [rng.integers(3, vocab, int(n)).tolist() for n in self.lengths()[0]]


def poisson_arrivals(n: int, rate: float, seed: int) -> np.ndarray:
    """``n`` arrival times (s, the first at 0) of a Poisson process at ``rate`` req/s: the
    planner's ``Workload.at_rate``, so the prediction replays the same arrivals."""
    from energon_jax.plan_sim import Workload

    return Workload(np.zeros(n), np.ones(n, np.int64), np.ones(n, np.int64)).at_rate(rate, seed).arrival_s


# --- SLOs and goodput (pure, tested by hand-worked numbers) --------------------------------------


def meets_slo(ttft: np.ndarray, tpot: np.ndarray, ref_ttft: np.ndarray, ref_tpot: np.ndarray,
              scale: float) -> np.ndarray:
    """``[R]`` bool: TTFT <= 3 x scale x ref TTFT and TPOT <= 1.5 x scale x ref TPOT, per request.
    A one-token answer (TPOT NaN) is judged on TTFT alone; a failed request (TTFT NaN) never meets."""
    ttft_ok = ttft <= TTFT_X * scale * ref_ttft
    tpot_ok = np.isnan(tpot) | np.isnan(ref_tpot) | (tpot <= TPOT_X * scale * ref_tpot)
    return ttft_ok & tpot_ok


def goodput(ok: np.ndarray, span_s: float) -> float:
    """Requests meeting both SLOs per second of the run's span."""
    if span_s <= 0:
        raise ValueError(f"span_s={span_s} must be > 0")
    return float(np.count_nonzero(ok)) / span_s


def percentiles(x: np.ndarray) -> dict[str, float]:
    x = x[~np.isnan(x)]
    return {f"p{q}": float(np.percentile(x, q)) if len(x) else float("nan") for q in (50, 90, 99)}


def best_rate(rates: Sequence[float], attained: Sequence[float], target: float = 0.9) -> float:
    """DistServe's goodput read off a rate sweep: the highest rate whose attainment reaches
    ``target`` with every lower rate reaching it too (0 when the lowest does not)."""
    best = 0.0
    for rate, share in sorted(zip(rates, attained)):
        if share < target:
            break
        best = rate
    return best


# --- the client ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """One pass of the workload against one layout: per request ``[R]``, seconds."""

    ttft: np.ndarray
    tpot: np.ndarray
    span_s: float
    errors: int
    # median gap between tokens after the second (one decode step), NaN under 4 tokens
    step_gap: np.ndarray | None = None


def decode_step_gap(token_times: Sequence[float]) -> float:
    """One decode step as a client sees it: the median gap between tokens 2 .. n-2 (the gap
    to token 1 holds the hand-off, the last token is not deferred a step like the others)."""
    gaps = np.diff(np.asarray(token_times, dtype=float))[1:-1]
    return float(np.median(gaps)) if len(gaps) else float("nan")


def run_workload(target: str, prompts: Sequence[list[int]], outputs: np.ndarray, arrivals: np.ndarray | None,
                 timeout_s: float) -> Run:
    """Send every request (open loop at ``arrivals``, or one after another when None), streamed."""
    from serving import loadgen
    from serving.client import ClientConfig, InferenceClient
    from serving.protos.energon.v1 import inference_pb2 as pb

    items = [loadgen.WorkItem(f"disagg-{i}", list(p), pb.SamplingParams(
        max_tokens=int(o), temperature=0.0, ignore_eos=True), 0.0 if arrivals is None else float(arrivals[i]))
        for i, (p, o) in enumerate(zip(prompts, outputs))]

    async def go() -> list[loadgen.Record]:
        async with InferenceClient(ClientConfig(target=target, max_receive_bytes=64 << 20)) as client:
            if arrivals is None:
                return [await loadgen.run_one(client, it, timeout_s) for it in items]
            return await loadgen.run_open_loop(client, items, timeout_s)

    records = asyncio.run(go())
    ttft = np.array([r.ttft_s if r.error is None and r.ttft_s is not None else np.nan for r in records])
    tpot = np.array([r.tpot_s if r.error is None and r.tpot_s is not None else np.nan for r in records])
    errors = [r for r in records if r.error is not None]
    for r in errors[:3]:
        print(f"  request {r.label} failed: {r.error} {r.error_details}", file=sys.stderr)
    span = max(r.done for r in records) - min(r.sent for r in records)
    gap = np.array([decode_step_gap(r.token_times) if r.error is None else np.nan for r in records])
    return Run(ttft, tpot, span, len(errors), gap)


# --- the planner's prediction -------------------------------------------------------------------


def step_cost(record: dict):
    from energon_jax.plan_sim import StepCost

    fields = {f.name for f in dataclasses.fields(StepCost)}
    kw = {k: v for k, v in record.items() if k in fields}
    return StepCost(**(kw | {"token_buckets": tuple(kw.get("token_buckets", ()))}))


@dataclasses.dataclass(frozen=True)
class Offsets:
    """What the step model cannot see, fitted on the unloaded pass (module docstring)."""

    frontend_s: float  # added to every TTFT: gRPC, the router's hop
    transfer_s: float = 0.0  # disaggregated hand-off: transfer_s + transfer_s_per_token * prompt
    transfer_s_per_token: float = 0.0
    # added to every step: what a served step costs beyond the in-process one (the gRPC front
    # end streams each token out of the same process), from the unloaded decode steps
    step_s: float = 0.0

    def apply(self, cost):
        return dataclasses.replace(cost, base_s=max(cost.base_s + self.step_s, 0.0),
                                   per_request_s=cost.per_request_s + self.frontend_s)


def _sim_layout(layout: str):
    from energon_jax.plan_sim import Layout

    return Layout(1) if layout.startswith("colocated") else Layout(1, 1, 1, 1)


def fit_offsets(layout: str, cost, limits, prompt_len: np.ndarray, output_len: np.ndarray,
                unloaded: Run) -> Offsets:
    """Offsets that make the simulated lone requests match the measured unloaded pass: the
    median gap between each request's decode step as its client saw it (``step_gap``) and
    the model's one-row step; then the median TTFT gap; and (disaggregated) a least-squares
    line against the prompt length (non-negative) of each request's hand-off: the time from
    its first to its last token beyond its ``tokens - 1`` decode steps (as seen)."""
    from energon_jax.plan_sim import Workload, simulate

    step_s = 0.0
    if unloaded.step_gap is not None and not np.isnan(unloaded.step_gap).all():
        model = np.array([cost.step_s(1, 1, float(p + o // 2)) for p, o in zip(prompt_len, output_len)])
        step_s = float(np.nanmedian(unloaded.step_gap - model))
    cost = Offsets(0.0, step_s=step_s).apply(cost)
    lone = Workload(np.arange(len(prompt_len)) * 1e3, prompt_len, output_len)
    sim = simulate(lone, _sim_layout(layout), cost, limits)
    frontend = float(np.nanmedian(unloaded.ttft - sim.ttft_s))
    if layout.startswith("colocated"):
        return Offsets(frontend, step_s=step_s)
    gaps = output_len - 1
    step = unloaded.step_gap if unloaded.step_gap is not None else sim.tpot_s
    many = (gaps > 0) & ~np.isnan(unloaded.tpot) & ~np.isnan(step)
    extra = (unloaded.tpot[many] - step[many]) * gaps[many]  # hand-off, per request
    if many.sum() < 2 or np.ptp(prompt_len[many]) == 0:  # no line to fit: one constant
        return Offsets(frontend, max(float(np.median(extra)), 0.0) if many.any() else 0.0, step_s=step_s)
    a, b = np.linalg.lstsq(np.stack([np.ones(many.sum()), prompt_len[many]], 1), extra, rcond=None)[0]
    if b < 0:
        a, b = float(np.median(extra)), 0.0
    return Offsets(frontend, max(float(a), 0.0), float(b), step_s)


def predict(layout: str, cost, limits, prompt_len: np.ndarray, output_len: np.ndarray, arrivals: np.ndarray,
            offsets: Offsets) -> Run:
    """The planner's simulation of one loaded run, as a ``Run``."""
    from energon_jax.plan_sim import Workload, simulate

    cost = offsets.apply(cost)
    sim = simulate(Workload(arrivals, prompt_len, output_len), _sim_layout(layout), cost, limits,
                   transfer_s=offsets.transfer_s, transfer_s_per_token=offsets.transfer_s_per_token)
    return Run(sim.ttft_s, sim.tpot_s, float(np.max(sim.finish_s) - np.min(arrivals)), 0)


# --- tables -------------------------------------------------------------------------------------


def _ms(x: float) -> str:
    return "-" if np.isnan(x) else f"{x * 1e3:.0f}" if x >= 0.1 else f"{x * 1e3:.1f}"


def latency_table(rows: Sequence[dict], scale: float = 1.0) -> str:
    """Per layout and rate: measured percentiles, the predicted p90s, SLO attainment and goodput at ``scale``."""
    k = f"{scale:g}"
    head = ("layout", "rate (req/s)", "TTFT p50 / p90 / p99 (ms)", "TTFT p90 predicted", "TPOT p50 / p90 / p99 (ms)",
            "TPOT p90 predicted", f"SLO met (x{k}), predicted", f"goodput x{k} (req/s), predicted")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        m, p = r["measured"], r["predicted"]
        rate = r["rate"] if r["rate"] == "alone" else format(r["rate"], "g")
        good = "-" if r["rate"] == "alone" else f"{m['goodput'][k]:.2f} ({p['goodput'][k]:.2f})"
        lines.append(
            f"| {r['layout']} | {rate} | {' / '.join(_ms(m['ttft'][q]) for q in ('p50', 'p90', 'p99'))} | "
            f"{_ms(p['ttft']['p90'])} | {' / '.join(_ms(m['tpot'][q]) for q in ('p50', 'p90', 'p99'))} | "
            f"{_ms(p['tpot']['p90'])} | {m['attained'][k]:.0%} ({p['attained'][k]:.0%}) | {good} |")
    return "\n".join(lines)


def scale_table(rows: Sequence[dict], scales: Sequence[float], layouts: Sequence[str]) -> str:
    """Per SLO scale and layout: goodput at each rate and the best rate with 90% attainment."""
    loaded = [r for r in rows if r["rate"] != "alone"]
    rates = sorted({r["rate"] for r in loaded})
    head = ["SLO scale", "layout", *(f"goodput @ {x:g} req/s (predicted)" for x in rates),
            "best rate >= 90% met (predicted)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in scales:
        key = f"{s:g}"
        for layout in layouts:
            mine = sorted((r for r in loaded if r["layout"] == layout), key=lambda r: r["rate"])
            if not mine:
                continue
            cells = [f"{r['measured']['goodput'][key]:.2f} ({r['predicted']['goodput'][key]:.2f})" for r in mine]
            best = best_rate([r["rate"] for r in mine], [r["measured"]["attained"][key] for r in mine])
            best_p = best_rate([r["rate"] for r in mine], [r["predicted"]["attained"][key] for r in mine])
            lines.append(f"| {key}x | {layout} | {' | '.join(cells)} | {best:g} ({best_p:g}) |")
    return "\n".join(lines)


def summarize_run(run: Run, ref: Run, scales: Sequence[float]) -> dict:
    out = {"ttft": percentiles(run.ttft), "tpot": percentiles(run.tpot), "span_s": run.span_s,
           "errors": run.errors, "attained": {}, "goodput": {}}
    for s in scales:
        ok = meets_slo(run.ttft, run.tpot, ref.ttft, ref.tpot, s)
        out["attained"][f"{s:g}"] = float(np.mean(ok))
        out["goodput"][f"{s:g}"] = goodput(ok, run.span_s)
    return out


# --- main ---------------------------------------------------------------------------------------


def _floats(text: str, flag: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise SystemExit(f"{flag}={text!r} must be comma-separated numbers") from e
    if not values or min(values) <= 0:
        raise SystemExit(f"{flag}={text!r} must list numbers > 0")
    return values


def _pair(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(",")
    return int(lo), int(hi or lo)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="4,8,12", help="request rates of the sweep (req/s, comma-separated)")
    ap.add_argument("--slo-scales", default="0.5,1,1.5,2,3", help="multipliers of the Splitwise SLOs")
    ap.add_argument("--slo-reference", choices=("colocated", "own"), default="colocated",
                    help="whose unloaded latency the SLOs multiply: the colocated server's (one objective "
                         "for both layouts) or each layout's own")
    ap.add_argument("--layouts", default=",".join(DEFAULT_LAYOUTS),
                    help=f"which layouts to run, of {', '.join(LAYOUTS)}")
    w = ap.add_argument_group("workload (lengths in tokens, ranges LO,HI inclusive)")
    w.add_argument("--requests", type=int, default=60, help="requests per rate (and in the unloaded pass)")
    w.add_argument("--long-share", type=float, default=0.2, help="share of requests with a long prompt")
    w.add_argument("--long-prompt", type=_pair, default=(300, 440))
    w.add_argument("--long-output", type=_pair, default=(8, 24))
    w.add_argument("--short-prompt", type=_pair, default=(8, 48))
    w.add_argument("--short-output", type=_pair, default=(48, 64))
    w.add_argument("--seed", type=int, default=0)
    e = ap.add_argument_group("servers (the same engine limits in every process)")
    add_engine_flags(e)
    e.add_argument("--colocated-cpus", default="0,1", help="taskset CPU list of the colocated server")
    e.add_argument("--prefill-cpus", default="0", help="taskset CPU list of the prefill server")
    e.add_argument("--decode-cpus", default="1", help="taskset CPU list of the decode server")
    e.add_argument("--no-warmup", action="store_true", help="servers compile on first use (smoke runs)")
    e.add_argument("--timeout", type=float, default=120.0, help="deadline of each request (s)")
    ap.add_argument("--full-calibration", action="store_true", help="the planner's full step calibration")
    ap.add_argument("--no-prediction", action="store_true", help="skip the planner (no calibration)")
    ap.add_argument("--json", type=Path, default=None, help="also write every number here")
    args = ap.parse_args(argv)
    args.rate_list = _floats(args.rates, "--rates")
    args.scale_list = _floats(args.slo_scales, "--slo-scales")
    args.layout_list = [x.strip() for x in args.layouts.split(",") if x.strip()]
    for x in args.layout_list:
        if x not in LAYOUTS:
            raise SystemExit(f"--layouts: {x!r} is not one of {', '.join(LAYOUTS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM (a killed run) unwinds like an exception: every server is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    check_cpus(args)
    from models.loading import load_config

    from energon_jax.engine import demo_model_path
    from energon_jax.plan_sim import ReplicaLimits

    mix = Mix(args.requests, args.long_share, args.long_prompt, args.long_output, args.short_prompt,
              args.short_output, args.seed)
    config = load_config(Path(args.model) if args.model else demo_model_path())
    prompt_len, output_len = mix.lengths()
    if int(np.max(prompt_len + output_len)) > args.max_model_len:
        raise SystemExit(f"the longest prompt + output ({int(np.max(prompt_len + output_len))} tokens) exceeds "
                         f"--max-model-len={args.max_model_len}")
    vocab = int(config.vocab_size)
    arrivals = {rate: poisson_arrivals(mix.requests, rate, args.seed + k) for k, rate in enumerate(args.rate_list)}
    limits = ReplicaLimits(args.max_num_seqs, args.max_num_batched_tokens)
    load0 = os.getloadavg()
    t_start = time.time()
    costs: dict[str, dict] = {}
    if not args.no_prediction:
        for layout in args.layout_list:
            cpus = args.colocated_cpus if layout == "colocated" else args.prefill_cpus
            print(f"calibrating the step model for {layout} on CPUs {cpus} ...", file=sys.stderr)
            costs[layout] = calibrate_pinned(cpus, layout.startswith("colocated"), args)
    runs: dict[str, dict] = {}
    for layout in args.layout_list:
        with Processes() as procs:
            print(f"starting {layout} ...", file=sys.stderr)
            target = start_layout(procs, layout, args)
            # each pass its own prompts (same lengths): nothing is served from the prefix cache
            run_workload(target, mix.prompts(vocab, 0), output_len, None, args.timeout)  # compiles what it needs
            runs[layout] = {"alone": run_workload(target, mix.prompts(vocab, 1), output_len, None, args.timeout)}
            for k, rate in enumerate(args.rate_list):
                print(f"  {layout} at {rate:g} req/s", file=sys.stderr)
                runs[layout][rate] = run_workload(target, mix.prompts(vocab, 2 + k), output_len, arrivals[rate],
                                                  args.timeout)
    load1 = os.getloadavg()
    rows = []
    for layout in args.layout_list:
        ref = runs["colocated" if args.slo_reference == "colocated" and "colocated" in runs else layout]["alone"]
        offsets = None
        if layout in costs:
            cost = step_cost(costs[layout])
            offsets = fit_offsets(layout, cost, limits, prompt_len, output_len, runs[layout]["alone"])
            costs[layout]["offsets"] = dataclasses.asdict(offsets)
        for rate, run in runs[layout].items():
            row = {"layout": layout, "rate": rate, "measured": summarize_run(run, ref, args.scale_list)}
            if offsets is not None:
                at = np.arange(mix.requests) * 1e3 if rate == "alone" else arrivals[rate]
                row["predicted"] = summarize_run(predict(layout, cost, limits, prompt_len, output_len, at, offsets),
                                                 ref, args.scale_list)
            else:  # no planner: NaN beside the measurement
                nan = {"ttft": percentiles(np.array([np.nan])), "tpot": percentiles(np.array([np.nan])),
                       "attained": {f"{s:g}": float("nan") for s in args.scale_list},
                       "goodput": {f"{s:g}": float("nan") for s in args.scale_list}}
                row["predicted"] = nan
            rows.append(row)
    print(f"\n{mix.requests} requests per rate, {args.long_share:.0%} long prompts {args.long_prompt} -> "
          f"{args.long_output} tokens, the rest {args.short_prompt} -> {args.short_output}; seed {args.seed}; "
          f"load average {load0[0]:.2f} before, {load1[0]:.2f} after; {time.time() - t_start:.0f} s\n")
    for layout in costs:
        c = costs[layout]
        print(f"step model, {layout}: {c['base_s'] * 1e3:.2f} ms + {c['per_token_s'] * 1e6:.1f} us/token + "
              f"{c['per_row_s'] * 1e6:.1f} us/row + {c['per_attended_s'] * 1e9:.2f} ns/pair, "
              f"{c['per_request_s'] * 1e3:.2f} ms/request (median fit error {c['fit_error']:.0%}); fitted on the "
              f"unloaded pass: {c['offsets']['step_s'] * 1e3:+.2f} ms per step, "
              f"front end {c['offsets']['frontend_s'] * 1e3:.1f} ms per TTFT, hand-off "
              f"{c['offsets']['transfer_s'] * 1e3:.1f} ms + {c['offsets']['transfer_s_per_token'] * 1e6:.1f} us/token")
    print()
    print(latency_table(rows, 1.0 if 1.0 in args.scale_list else args.scale_list[0]))
    print()
    print(scale_table(rows, args.scale_list, args.layout_list))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "json"},
                                         "load_before": load0, "load_after": load1, "costs": costs, "rows": rows},
                                        default=str, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
