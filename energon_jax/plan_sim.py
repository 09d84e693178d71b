"""Simulating a serving layout step by step, for the placement planner (DistServe).

A layout is colocated (``dp`` replicas, each running prefill and decode together with
chunked prefill, as ``Scheduler`` does) or disaggregated (``prefill_dp`` prefill replicas
that run prompts and sample the first token, then hand the KV pages to one of
``decode_dp`` decode replicas after a transfer delay). Each replica is a loop of engine
steps whose duration comes from a ``StepCost`` (``planner.py``, fit from measured steps):
``base + per_token * padded_tokens + per_row * rows + per_attended * attended``, where
``attended`` counts (query token, context token) pairs, the attention work of the step.

The simulation replays a workload (arrival time, prompt length, output length per
request) and returns each request's TTFT (arrival to first token) and TPOT (mean time
between its later tokens), from which ``goodput`` finds the highest request rate at which
a target share of requests meets both SLOs (DistServe's definition).

Beyond the steps' durations, the engine's step loop (``step_loop.py``) delays what a
caller sees in two ways, modelled by ``LoopModel``: with ``async_scheduling`` step k+1 is
planned when step k starts, so a request arriving mid-step waits for the step in flight
and for the one already planned; and a token that does not finish its request reaches
the caller when the next step ends (its text is made during that step), so the first
token shows one step late. A finishing token is returned by its own step.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections import deque
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class StepCost:
    """Seconds per engine step on one replica of tensor-parallel degree 1."""

    base_s: float
    per_token_s: float
    per_row_s: float
    per_attended_s: float
    token_buckets: tuple[int, ...] = ()  # the engine pads a step's tokens up to one of these
    # Once per request, on its TTFT: admission, and the fetch of its first token that a
    # lone step's wall time does not show (fit from whole-run samples, ``planner.py``).
    per_request_s: float = 0.0

    def padded(self, tokens: int) -> int:
        if not self.token_buckets or tokens > self.token_buckets[-1]:
            return tokens
        return self.token_buckets[bisect.bisect_left(self.token_buckets, tokens)]

    def step_s(self, tokens: int, rows: int, attended: float, *, tp: int = 1, tp_efficiency: float = 1.0) -> float:
        """One step; with ``tp > 1`` the work terms shrink by ``tp * tp_efficiency ** log2(tp)``
        (an assumption, not a measurement: see ``planner.py``)."""
        work = self.per_token_s * self.padded(tokens) + self.per_row_s * rows + self.per_attended_s * attended
        speedup = tp * tp_efficiency ** math.log2(tp) if tp > 1 else 1.0
        return self.base_s + work / speedup


@dataclasses.dataclass(frozen=True)
class Layout:
    """Colocated when ``decode_dp == 0``; else ``prefill_dp`` x ``prefill_tp`` devices prefill
    and ``decode_dp`` x ``decode_tp`` devices decode."""

    prefill_dp: int
    prefill_tp: int = 1
    decode_dp: int = 0
    decode_tp: int = 1

    @property
    def colocated(self) -> bool:
        return self.decode_dp == 0

    @property
    def devices(self) -> int:
        return self.prefill_dp * self.prefill_tp + self.decode_dp * self.decode_tp

    def __str__(self) -> str:
        if self.colocated:
            return f"colocated dp={self.prefill_dp} tp={self.prefill_tp}"
        return (f"disaggregated prefill dp={self.prefill_dp} tp={self.prefill_tp}, "
                f"decode dp={self.decode_dp} tp={self.decode_tp}")


def layouts_for(devices: int, *, max_tp: int = 8) -> list[Layout]:
    """Every colocated and disaggregated layout on exactly ``devices`` devices with power-of-two tp."""
    if devices < 1:
        raise ValueError(f"devices={devices} must be >= 1")
    tps = [t for t in (1, 2, 4, 8, 16) if t <= min(devices, max_tp)]
    out = [Layout(devices // t, t) for t in tps if devices % t == 0]
    for p_dev in range(1, devices):
        d_dev = devices - p_dev
        for pt in tps:
            for dt in tps:
                if p_dev % pt == 0 and d_dev % dt == 0:
                    out.append(Layout(p_dev // pt, pt, d_dev // dt, dt))
    return out


@dataclasses.dataclass(frozen=True)
class Workload:
    arrival_s: np.ndarray  # [R] ascending
    prompt_len: np.ndarray  # [R]
    output_len: np.ndarray  # [R] >= 1

    def __post_init__(self) -> None:
        n = len(self.arrival_s)
        if len(self.prompt_len) != n or len(self.output_len) != n:
            raise ValueError("arrival_s, prompt_len and output_len must have one entry per request")
        if n and (np.min(self.prompt_len) < 1 or np.min(self.output_len) < 1):
            raise ValueError("every prompt_len and output_len must be >= 1")

    def at_rate(self, rate: float, seed: int = 0) -> Workload:
        """The same lengths with Poisson arrivals at ``rate`` requests per second."""
        if rate <= 0:
            raise ValueError(f"rate={rate} must be > 0")
        gaps = np.random.default_rng(seed).exponential(1.0 / rate, len(self.prompt_len))
        return Workload(np.cumsum(gaps) - gaps[0], self.prompt_len, self.output_len)


def sample_lengths(n: int, mean: float, *, dist: str, maximum: int, seed: int) -> np.ndarray:
    """``n`` lengths with the given mean: ``fixed``, ``exponential`` or ``lognormal`` (sigma 1)."""
    rng = np.random.default_rng(seed)
    if dist == "fixed":
        x = np.full(n, mean)
    elif dist == "exponential":
        x = rng.exponential(mean, n)
    elif dist == "lognormal":
        x = rng.lognormal(math.log(mean) - 0.5, 1.0, n)
    else:
        raise ValueError(f"length distribution {dist!r} must be fixed, exponential or lognormal")
    return np.clip(np.round(x), 1, maximum).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class LoopModel:
    """How one replica's step loop delays a request beyond its steps (module docstring)."""

    plans_ahead: bool = True  # the engine's async_scheduling (the role servers run without it)
    deferred_tokens: bool = True  # a non-final token is seen when the next step ends

    @classmethod
    def bare(cls) -> LoopModel:
        """Only the steps: a request joins the next step to start, a token is seen when its step ends."""
        return cls(plans_ahead=False, deferred_tokens=False)


COLOCATED_LOOP = LoopModel()  # Engine's default (async_scheduling on)
ROLE_LOOP = LoopModel(plans_ahead=False)  # serving/disagg_role.py: async_scheduling off


@dataclasses.dataclass(frozen=True)
class ReplicaLimits:
    max_num_seqs: int
    max_num_batched_tokens: int


@dataclasses.dataclass
class _Req:
    idx: int
    ready_s: float  # when it can be scheduled on this replica
    prompt: int
    output: int
    prefilled: int = 0
    generated: int = 0


@dataclasses.dataclass
class SimResult:
    ttft_s: np.ndarray  # [R]
    tpot_s: np.ndarray  # [R] (0 for one-token outputs)
    finish_s: np.ndarray  # [R]

    def percentile(self, which: str, q: float) -> float:
        values = self.ttft_s if which == "ttft" else self.tpot_s[~np.isnan(self.tpot_s)]
        return float(np.percentile(values, q)) if len(values) else 0.0

    def attainment(self, slo_ttft_s: float | np.ndarray, slo_tpot_s: float | np.ndarray) -> float:
        """Share of requests meeting both SLOs (each a number, or one per request)."""
        ok = (self.ttft_s <= slo_ttft_s) & (np.nan_to_num(self.tpot_s) <= slo_tpot_s)
        return float(np.mean(ok)) if len(ok) else 1.0


def _run_replica(reqs: list[_Req], cost: StepCost, limits: ReplicaLimits, *, tp: int, tp_eff: float,
                 prefill_only: bool, loop: LoopModel, first_token_s: dict[int, float],
                 last_token_s: dict[int, float]) -> None:
    """Continuous batching on one replica, FCFS: decode rows first, then prefill chunks in the
    token budget left (as ``Scheduler``). ``prefill_only``: a request leaves once its first
    token is sampled. Records when the caller sees each request's first and last token."""
    pending = deque(sorted(reqs, key=lambda r: r.ready_s))
    running: list[_Req] = []
    now = 0.0
    prev_start: float | None = None  # start of the step before this one, when they ran back to back
    unseen: list[_Req] = []  # first tokens sampled by the last step, seen when this one ends
    while pending or running:
        # With plan-ahead, the step starting now was planned when the previous one started.
        plan_at = prev_start if loop.plans_ahead and prev_start is not None else now
        while pending and pending[0].ready_s <= plan_at and len(running) < limits.max_num_seqs:
            running.append(pending.popleft())
        if not running:  # idle: the next arrival is planned and dispatched at once
            now, prev_start = max(now, pending[0].ready_s), None
            continue
        budget = limits.max_num_batched_tokens
        tokens = rows = 0
        attended = 0.0
        work: list[tuple[_Req, int]] = []
        for r in running:  # decode rows: one token each
            if r.prefilled >= r.prompt and budget > 0:
                ctx = r.prompt + r.generated
                work.append((r, 1))
                tokens, rows, budget, attended = tokens + 1, rows + 1, budget - 1, attended + ctx
        for r in running:  # prefill chunks, in arrival order
            if r.prefilled < r.prompt and budget > 0:
                take = min(budget, r.prompt - r.prefilled)
                lo, hi = r.prefilled, r.prefilled + take
                work.append((r, take))
                tokens, rows, budget = tokens + take, rows + 1, budget - take
                attended += (hi * (hi + 1) - lo * (lo + 1)) / 2
        prev_start = now
        now += cost.step_s(tokens, rows, attended, tp=tp, tp_efficiency=tp_eff)
        for r in unseen:
            first_token_s[r.idx] = now
        unseen = []
        done = []
        for r, n in work:
            if r.prefilled < r.prompt:
                r.prefilled += n
                if r.prefilled < r.prompt:
                    continue
            r.generated += 1  # a finished prompt samples its first token, a decode row its next
            finished = r.generated >= r.output or (prefill_only and r.generated == 1)
            if r.generated == 1:
                if finished or not loop.deferred_tokens:
                    first_token_s[r.idx] = now
                else:
                    unseen.append(r)
            last_token_s[r.idx] = now
            if finished:
                done.append(r)
        for r in done:
            running.remove(r)


def simulate(workload: Workload, layout: Layout, cost: StepCost, limits: ReplicaLimits, *,
             tp_efficiency: float = 0.9, transfer_s_per_token: float = 0.0, transfer_s: float = 0.0,
             colocated_loop: LoopModel = COLOCATED_LOOP, role_loop: LoopModel = ROLE_LOOP) -> SimResult:
    """TTFT and TPOT of every request of ``workload`` served by ``layout``. A disaggregated
    request reaches its decode replica ``transfer_s + transfer_s_per_token * prompt`` after
    its first token; ``colocated_loop`` and ``role_loop`` say how the step loops of a
    colocated replica and of a prefill or decode server delay tokens (``LoopModel``)."""
    n = len(workload.arrival_s)
    first: dict[int, float] = {}
    last: dict[int, float] = {}

    def assign(items: list[tuple[int, float]], replicas: int) -> list[list[int]]:
        """Round robin in order of readiness (with equal replicas and Poisson arrivals, close
        to the router's least-loaded choice)."""
        out: list[list[int]] = [[] for _ in range(replicas)]
        for k, (i, _) in enumerate(items):
            out[k % replicas].append(i)
        return out

    order = [(i, float(workload.arrival_s[i])) for i in range(n)]
    groups = assign(order, layout.prefill_dp) if layout.prefill_dp > 1 else [list(range(n))]
    for members in groups:
        reqs = [_Req(i, float(workload.arrival_s[i]), int(workload.prompt_len[i]),
                     1 if not layout.colocated else int(workload.output_len[i])) for i in members]
        _run_replica(reqs, cost, limits, tp=layout.prefill_tp, tp_eff=tp_efficiency,
                     prefill_only=not layout.colocated, loop=colocated_loop if layout.colocated else role_loop,
                     first_token_s=first, last_token_s=last)
    if not layout.colocated:
        handoff = sorted(
            ((i, first[i] + transfer_s + transfer_s_per_token * int(workload.prompt_len[i])) for i in range(n)
             if workload.output_len[i] > 1), key=lambda x: x[1])
        decode_last: dict[int, float] = {}
        for members in assign(handoff, layout.decode_dp):
            ready = dict(handoff)
            reqs = [_Req(i, ready[i], int(workload.prompt_len[i]), int(workload.output_len[i]),
                         prefilled=int(workload.prompt_len[i]), generated=1) for i in members]
            _run_replica(reqs, cost, limits, tp=layout.decode_tp, tp_eff=tp_efficiency, prefill_only=False,
                         loop=role_loop, first_token_s={}, last_token_s=decode_last)
        last.update(decode_last)
    ttft = np.array([first[i] - workload.arrival_s[i] + cost.per_request_s for i in range(n)])
    tpot = np.array([(last[i] - first[i]) / (workload.output_len[i] - 1) if workload.output_len[i] > 1 else np.nan
                     for i in range(n)])
    return SimResult(ttft, tpot, np.array([last[i] for i in range(n)]))


def goodput(lengths: Workload, layout: Layout, cost: StepCost, limits: ReplicaLimits, *,
            slo_ttft_s: float | np.ndarray, slo_tpot_s: float | np.ndarray, attainment: float = 0.9, seed: int = 0,
            tp_efficiency: float = 0.9, transfer_s_per_token: float = 0.0, transfer_s: float = 0.0,
            iterations: int = 14, colocated_loop: LoopModel = COLOCATED_LOOP,
            role_loop: LoopModel = ROLE_LOOP) -> float:
    """The highest Poisson rate (requests/s) at which ``attainment`` of the requests meet both
    SLOs (bisection on the rate; 0 when even a trickle misses them). An SLO is one number for
    every request, or one per request (``[R]``: Splitwise's multiples of each one's unloaded latency)."""

    def ok(rate: float) -> bool:
        res = simulate(lengths.at_rate(rate, seed), layout, cost, limits, tp_efficiency=tp_efficiency,
                       transfer_s_per_token=transfer_s_per_token, transfer_s=transfer_s, colocated_loop=colocated_loop,
                       role_loop=role_loop)
        return res.attainment(slo_ttft_s, slo_tpot_s) >= attainment

    lo, hi = 0.0, 1.0
    while ok(hi):
        lo, hi = hi, hi * 2
        if hi > 1e6:
            return hi
    if lo == 0.0:
        lo_try = hi / 1024
        if not ok(lo_try):
            return 0.0
        lo = lo_try
    for _ in range(iterations):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def summarize(result: SimResult) -> dict[str, float]:
    return {f"{w}_p{q}": result.percentile(w, q) for w in ("ttft", "tpot") for q in (50, 90, 99)}


def layouts_table(rows: Sequence[dict]) -> str:
    """A markdown table of the planner's rows (``commands/plan.py``)."""
    head = ("layout", "devices", "TTFT p50 / p90 (ms)", "TPOT p50 / p90 (ms)", "SLO attained",
            "goodput (req/s)", "per device")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(
            f"| {r['layout']} | {r['devices']} | {r['ttft_p50'] * 1e3:.0f} / {r['ttft_p90'] * 1e3:.0f} | "
            f"{r['tpot_p50'] * 1e3:.1f} / {r['tpot_p90'] * 1e3:.1f} | {r['attained']:.0%} | "
            f"{r['goodput']:.2f} | {r['goodput'] / r['devices']:.2f} |")
    return "\n".join(lines)
