"""The placement planner (DistServe): fit a step-time model on this backend, simulate layouts.

``energon plan`` answers "on N devices, at R requests/s, with these SLOs, which layout
serves the most requests per second per device within the SLOs?" in three stages:

1. **Measure** (``measure_steps``): the engine runs calibration requests through its public
   API (``add_request`` / ``step``) on the current backend: prompts alone (each a prefill
   step of known length) and groups of decoding rows at known context lengths. Each
   measured step is a ``StepSample`` (tokens, rows, attended pairs, seconds).
2. **Fit** (``fit_step_cost``): least squares of ``seconds = base + per_token * padded tokens
   + per_row * rows + per_attended * attended (+ per_request for a whole-run sample)``,
   non-negative (a negative term is dropped and the rest refit). Padded tokens use the
   engine's own token buckets. Prefill samples are lone requests timed from admission to
   their first token returned (``lone_ttft``: the prefill step, then the decode step that
   brings the token back, as the step loop returns it), decode samples single steps (by
   difference), so ``per_request`` is the latency a request adds once, to its TTFT, beyond
   those steps (admission, planning ahead, the host work around them).
3. **Simulate** (``plan_sim.py``): Poisson arrivals with the lengths given, for every
   colocated and disaggregated layout on the devices; report TTFT/TPOT percentiles at the
   requested rate and each layout's goodput (the highest rate that meets both SLOs for
   ``attainment`` of the requests). The simulation adds what the step loop costs a request
   on top of its steps (``plan_sim.LoopModel``): a request arriving while steps run waits
   for the one already planned, and a token comes back one step late.

What is measured and what is assumed: the step model is measured for one replica at
tensor-parallel degree 1. How a step speeds up with ``tp`` cannot be measured on one
device (nor on simulated CPU devices, which share the same cores), so the simulation
divides the work terms by ``tp * tp_efficiency ** log2(tp)`` (``--tp-efficiency``, 0.9 by
default); KV transfer between groups costs ``transfer_s_per_token`` per prompt token.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from energon_jax.plan_sim import StepCost


@dataclasses.dataclass(frozen=True)
class StepSample:
    tokens: int  # real tokens in the step (before bucket padding)
    rows: int
    attended: float  # (query token, context token) pairs attended
    seconds: float
    whole_run: bool = False  # a request's whole run (admission to last id fetched), not one step
    # A lone request's TTFT as the engine returns it (``lone_ttft``): besides its prefill step it
    # holds the one decode step (1 row, context ``tokens + 1``) that brings the first token back.
    then_decode: bool = False

    def features(self, cost: StepCost) -> list[float]:
        """The fit's regressors: 1, padded tokens, rows, attended pairs, whole runs."""
        x = [1.0, cost.padded(self.tokens), self.rows, self.attended, float(self.whole_run)]
        if self.then_decode:
            x = [a + b for a, b in zip(x, [1.0, cost.padded(1), 1, self.tokens + 1, 0.0])]
        return x


def prefill_attended(start: int, end: int) -> float:
    """Pairs attended by the queries at positions ``start .. end - 1`` (causal: position p sees p + 1 keys)."""
    return (end * (end + 1) - start * (start + 1)) / 2


def _timed_steps(engine: Any, requests: Sequence[tuple[list[int], int]]) -> list[float]:
    """Add every request, then step until all finish; the wall time of each step (synchronous:
    each ``step()`` returns after the previous step's ids are fetched)."""
    from energon_jax.request import SamplingParams

    rids = [engine.add_request(ids, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
            for ids, n in requests]
    times = []
    while engine.has_unfinished():
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    for rid in rids:
        engine.take_output(rid)
    return times


def lone_ttft(engine: Any, ids: list[int]) -> float:
    """Seconds from ``add_request`` to the first token a ``step()`` call returns, for a request
    alone with ``max_tokens=2``: as a served request sees it (the step loop returns a token
    that does not finish its request one step late, and plans ahead)."""
    from energon_jax.request import SamplingParams

    t0 = time.perf_counter()
    rid = engine.add_request(ids, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    first = None
    while engine.has_unfinished():
        out = engine.step()
        if first is None and any(d.request_id == rid and d.token_ids for d in out):
            first = time.perf_counter() - t0
    engine.take_output(rid)
    if first is None:
        raise RuntimeError(f"request {rid} returned no token")
    return first


def measure_steps(engine: Any, *, prompt_lens: Iterable[int] = (), decode_rows: Iterable[int] = (),
                  decode_contexts: Iterable[int] = (), decode_steps: int = 8, repeats: int = 2,
                  seed: int = 0) -> list[StepSample]:
    """Calibration steps on ``engine``'s backend (see the module docstring).

    Prefill: one request of each prompt length, alone, timed to its first token returned
    (``lone_ttft``: one step when the prompt fits the step budget, then the decode step
    that returns the token; host work included, as a served request has it). Decode: ``rows`` requests of a ``context``-token prompt each,
    run twice, to 2 and to ``2 + decode_steps`` tokens; the difference of the two wall
    times over ``decode_steps`` is one step of ``rows`` decode rows (prefill, compile and
    the pipeline's drain cancel out)."""
    cfg = engine.config
    vocab = int(engine.model_config.vocab_size)
    rng = np.random.default_rng(seed)

    def prompt(n: int) -> list[int]:
        return rng.integers(3, vocab, n).tolist()

    def wall(requests: Sequence[tuple[list[int], int]]) -> float:
        t0 = time.perf_counter()
        _timed_steps(engine, requests)
        return time.perf_counter() - t0

    budget = int(cfg.max_num_batched_tokens)
    samples: list[StepSample] = []
    for n in prompt_lens:
        n = min(int(n), budget, int(cfg.max_model_len) - 3)
        lone_ttft(engine, prompt(n))  # compiles this shape
        for _ in range(repeats):
            samples.append(StepSample(n, 1, prefill_attended(0, n), lone_ttft(engine, prompt(n)), whole_run=True,
                                      then_decode=True))
    for ctx in decode_contexts:
        for rows in decode_rows:
            rows = min(int(rows), int(cfg.max_num_seqs))
            ctx = min(int(ctx), int(cfg.max_model_len) - decode_steps - 3)
            prompts = [prompt(ctx) for _ in range(rows)]
            wall([(p, 2 + decode_steps) for p in prompts])  # compiles every shape of both runs
            short = np.median([wall([(p, 2) for p in prompts]) for _ in range(repeats)])
            long = [wall([(p, 2 + decode_steps) for p in prompts]) for _ in range(repeats)]
            for t in long:  # one sample per long run, against the median short run
                per_step = max(t - short, 0.0) / decode_steps
                samples.append(StepSample(rows, rows, float(rows * (ctx + 2 + decode_steps / 2)), per_step))
    return samples


def fit_step_cost(samples: Sequence[StepSample], token_buckets: Sequence[int] = ()) -> StepCost:
    """Non-negative least squares of the step model on ``samples`` (relative error weighted,
    so that short decode steps count as much as long prefills). Samples of 0 s (a decode
    difference lost in timing noise) carry no information and are left out."""
    samples = [s for s in samples if s.seconds > 0]
    if len(samples) < 4:
        raise ValueError(f"fit_step_cost needs at least 4 samples of > 0 s, got {len(samples)}")
    probe = StepCost(0.0, 0.0, 0.0, 0.0, tuple(token_buckets))
    x = np.array([s.features(probe) for s in samples])
    y = np.array([s.seconds for s in samples])
    w = 1.0 / np.maximum(y, 1e-9)
    keep = [0, 1, 2, 3, 4] if any(s.whole_run for s in samples) and not all(s.whole_run for s in samples) \
        else [0, 1, 2, 3]
    while True:
        coef, *_ = np.linalg.lstsq(x[:, keep] * w[:, None], y * w, rcond=None)
        if (coef >= 0).all() or len(keep) == 1:
            break
        keep = [k for k, c in zip(keep, coef) if c > 0] or [0]
    full = np.zeros(5)
    full[keep] = np.maximum(coef, 0.0)
    return StepCost(float(full[0]), float(full[1]), float(full[2]), float(full[3]), tuple(token_buckets),
                    per_request_s=float(full[4]))


def fit_error(cost: StepCost, samples: Sequence[StepSample]) -> float:
    """Median relative error of ``cost`` on ``samples``."""
    def predicted(s: StepSample) -> float:
        coef = [cost.base_s, cost.per_token_s, cost.per_row_s, cost.per_attended_s, cost.per_request_s]
        return float(np.dot(coef, s.features(cost)))

    errs = [abs(predicted(s) - s.seconds) / s.seconds for s in samples if s.seconds > 0]
    return float(np.median(errs))


def calibrate(engine: Any, *, quick: bool = False) -> tuple[StepCost, list[StepSample]]:
    """Measure and fit on ``engine`` (``quick``: fewer points, for tests and smoke runs)."""
    budget = int(engine.config.max_num_batched_tokens)
    lens = [16, 64, budget] if quick else [16, 32, 64, 128, 256, 512, budget]
    lens = sorted({min(n, budget) for n in lens})
    max_rows = int(engine.config.max_num_seqs)
    rows = [1, 4] if quick else sorted({1, 4, 16, min(64, max_rows), max_rows})
    contexts = [32] if quick else [32, 256]
    samples = measure_steps(engine, prompt_lens=lens, decode_rows=[min(r, max_rows) for r in rows],
                            decode_contexts=contexts, decode_steps=4 if quick else 8, repeats=2 if quick else 3)
    buckets = getattr(engine, "buckets", None)
    return fit_step_cost(samples, tuple(buckets.token_buckets) if buckets is not None else ()), samples
