"""Client-side load generation and latency statistics for a running server.

A workload is a list of ``WorkItem`` (prompt token ids, sampling parameters and
the time, from the start of the run, at which to send it). ``synthetic_workload``
draws one from a seed: long-tailed prompt and output lengths, arrivals from a
Poisson process at ``rate`` requests/s, or all at once (a burst) when ``rate``
is None. ``run_open_loop`` sends each item at its time, whatever is in flight;
``run_closed_loop`` runs N clients that each send their items one after another.
Both drive a backend: ``GrpcBackend`` (the ``energon.v1`` Generate stream) here, or
``OpenAIBackend`` (streamed ``/v1/completions`` over HTTP, ``serving/loadgen_http.py``).

Every request goes out under a fresh id (``label-<uuid4>``): a workload sent twice, or
by two benchmark clients at once, never reuses an id. A response counts as an error
when the call fails, when it ends without a finish reason, when it was aborted
(``finish_reason`` other than ``stop``/``length``), when it carries no token, or when a
request that ignores EOS and has no stop condition finishes short of ``max_tokens``
(an abort that the front end reported as a plain stop).

Every streamed response is timestamped on arrival, so the statistics are what a
client sees: TTFT (send -> first token), TPOT ((last - first) / (tokens - 1)),
inter-token latency (gaps between arrivals: tokens of one gRPC message arrive
together, an HTTP stream is timed per SSE chunk as ``vllm bench serve`` does) and
end-to-end latency. Goodput, as DistServe defines it, is the share (and rate) of
requests that meet both the TTFT and the TPOT SLO.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import grpc

from serving.client import InferenceClient
from serving.protos.energon.v1 import inference_pb2 as pb


@dataclass(frozen=True)
class WorkItem:
    label: str  # the same in every run of a seeded workload; the request id sent is label-<uuid4>
    prompt: list[int]
    params: pb.SamplingParams
    send_at_s: float = 0.0  # offset from the start of an open-loop run


def new_request_id(label: str) -> str:
    """A request id no other request uses, however often the workload is sent."""
    return f"{label}-{uuid.uuid4().hex}"


@dataclass
class Record:
    request_id: str  # the id sent (unique)
    label: str = ""  # the work item's label
    sent: float = 0.0
    token_ids: list[int] = field(default_factory=list)  # gRPC; an HTTP stream carries text only
    token_times: list[float] = field(default_factory=list)  # arrival time of each token (HTTP: of each chunk)
    output_tokens: int | None = None  # the server's count (HTTP usage); None: len(token_ids)
    text: str = ""
    logprobs: list[pb.TokenLogprob] = field(default_factory=list)  # one per token, when asked
    finish_reason: str = ""
    prompt_tokens: int = 0
    error: str | None = None  # status code name when the call failed
    error_details: str = ""
    done: float = 0.0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids) if self.output_tokens is None else self.output_tokens

    @property
    def ttft_s(self) -> float | None:
        return self.token_times[0] - self.sent if self.token_times else None

    @property
    def tpot_s(self) -> float | None:
        n = self.num_tokens
        return (self.token_times[-1] - self.token_times[0]) / (n - 1) if n > 1 and self.token_times else None

    @property
    def e2e_s(self) -> float:
        return self.done - self.sent

    def inter_token_s(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]


def _long_tailed(rng: random.Random, lo: int, hi: int) -> int:
    """A log-uniform integer in [lo, hi]: most short, a few long."""
    return min(hi, max(lo, int(math.exp(rng.uniform(math.log(lo), math.log(hi + 1))))))


def synthetic_workload(
    n: int,
    *,
    seed: int,
    vocab_size: int,
    prompt_len: tuple[int, int] = (4, 64),
    output_len: tuple[int, int] = (4, 64),
    rate: float | None = None,
    temperature: float = 0.8,
    low_token: int = 3,
) -> list[WorkItem]:
    """``n`` seeded requests; ``rate`` req/s Poisson arrivals, or a burst when None.

    Token ids are drawn from ``[low_token, vocab_size)`` (skipping the usual special
    ids); every request has its own sampling seed and ``ignore_eos`` so its output
    length is exactly the drawn one.
    """
    if n < 1:
        raise ValueError(f"{n=} must be >= 1")
    if rate is not None and not rate > 0:
        raise ValueError(f"{rate=} must be > 0 (or None for a burst)")
    if not 1 <= prompt_len[0] <= prompt_len[1] or not 1 <= output_len[0] <= output_len[1]:
        raise ValueError(f"{prompt_len=} and {output_len=} must be (lo, hi) with 1 <= lo <= hi")
    rng = random.Random(seed)
    arrivals = random.Random(seed + 1)  # separate stream: the same requests at any rate
    items, t = [], 0.0
    for i in range(n):
        if rate is not None:
            t += arrivals.expovariate(rate)
        prompt = [rng.randrange(low_token, vocab_size) for _ in range(_long_tailed(rng, *prompt_len))]
        params = pb.SamplingParams(
            max_tokens=_long_tailed(rng, *output_len),
            temperature=temperature,
            seed=rng.randrange(2**31),
            ignore_eos=True,
        )
        items.append(WorkItem(f"load-{seed}-{i}", prompt, params, t if rate is not None else 0.0))
    return items


_FINISHED = ("stop", "length")


def _runs_to_max_tokens(p: pb.SamplingParams) -> bool:
    """Nothing but ``max_tokens`` can end such a request: no EOS, no stop string or token."""
    return p.ignore_eos and not p.stop and not p.stop_token_ids and p.HasField("max_tokens")


def check_response(rec: Record, item: WorkItem) -> Record:
    """Mark a response that came back without failing but is not a whole answer (module docstring)."""
    if rec.error is not None:
        return rec
    p = item.params
    if not rec.finish_reason:
        rec.error, rec.error_details = "INCOMPLETE", "the stream ended without a finish reason"
    elif rec.finish_reason not in _FINISHED:
        rec.error, rec.error_details = "ABORTED", f"finish_reason={rec.finish_reason!r}"
    elif rec.num_tokens == 0:
        rec.error, rec.error_details = "EMPTY", f"no token in the response (finish_reason={rec.finish_reason!r})"
    elif _runs_to_max_tokens(p) and rec.num_tokens < p.max_tokens:
        rec.error = "TRUNCATED"
        rec.error_details = f"{rec.num_tokens} of max_tokens={p.max_tokens} tokens with ignore_eos and no stop"
    return rec


class Backend(Protocol):
    """Sends one work item as a streamed request and times what comes back."""

    async def send(self, item: WorkItem, timeout_s: float | None) -> Record: ...


class GrpcBackend:
    """``energon.v1.Inference/Generate`` through an ``InferenceClient``."""

    def __init__(self, client: InferenceClient) -> None:
        self.client = client

    async def send(self, item: WorkItem, timeout_s: float | None = None) -> Record:
        rec = Record(new_request_id(item.label), label=item.label, sent=time.perf_counter())
        try:
            stream = self.client.generate(item.prompt, item.params, request_id=rec.request_id, timeout=timeout_s)
            async for resp in stream:
                now = time.perf_counter()
                rec.token_ids.extend(resp.token_ids)
                rec.token_times.extend([now] * len(resp.token_ids))
                rec.text += resp.text
                rec.logprobs.extend(resp.logprobs)
                if resp.finish_reason:
                    rec.finish_reason = resp.finish_reason
                    rec.prompt_tokens = resp.usage.prompt_tokens
        except grpc.aio.AioRpcError as e:
            rec.error, rec.error_details = e.code().name, e.details() or ""
        rec.done = time.perf_counter()
        return check_response(rec, item)


def _backend(target: InferenceClient | Backend) -> Backend:
    return GrpcBackend(target) if isinstance(target, InferenceClient) else target


async def run_one(client: InferenceClient | Backend, item: WorkItem, timeout_s: float | None = None) -> Record:
    return await _backend(client).send(item, timeout_s)


async def run_open_loop(
    client: InferenceClient | Backend, items: Sequence[WorkItem], timeout_s: float | None = None
) -> list[Record]:
    backend = _backend(client)
    start = time.perf_counter()

    async def send(item: WorkItem) -> Record:
        await asyncio.sleep(max(0.0, start + item.send_at_s - time.perf_counter()))
        return await backend.send(item, timeout_s)

    return list(await asyncio.gather(*(send(it) for it in items)))


async def run_closed_loop(
    client: InferenceClient | Backend, per_client: Sequence[Sequence[WorkItem]], timeout_s: float | None = None
) -> list[Record]:
    backend = _backend(client)

    async def one_client(items: Sequence[WorkItem]) -> list[Record]:
        return [await backend.send(it, timeout_s) for it in items]

    results = await asyncio.gather(*(one_client(items) for items in per_client))
    return [r for rs in results for r in rs]


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile ``q`` in [0, 100]; NaN for no values."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass(frozen=True)
class Summary:
    requests: int
    errors: int
    duration_s: float
    output_tokens: int
    ttft_s: dict[str, float]
    tpot_s: dict[str, float]
    itl_s: dict[str, float]
    e2e_s: dict[str, float]
    request_throughput: float  # finished requests / s
    token_throughput: float  # output tokens / s
    goodput_share: float  # share of all requests meeting both SLOs
    goodput: float  # requests meeting both SLOs / s
    ttft_slo_s: float
    tpot_slo_s: float


def _pcts(values: Sequence[float]) -> dict[str, float]:
    return {f"p{q}": percentile(values, q) for q in (50, 90, 99)}


def summarize(records: Sequence[Record], *, ttft_slo_s: float, tpot_slo_s: float) -> Summary:
    ok = [r for r in records if r.error is None]
    start = min(r.sent for r in records)
    duration = max(r.done for r in records) - start
    good = [
        r for r in ok
        if r.ttft_s is not None and r.ttft_s <= ttft_slo_s and (r.tpot_s is None or r.tpot_s <= tpot_slo_s)
    ]  # fmt: skip
    tokens = sum(r.num_tokens for r in ok)
    return Summary(
        requests=len(records),
        errors=len(records) - len(ok),
        duration_s=duration,
        output_tokens=tokens,
        ttft_s=_pcts([r.ttft_s for r in ok if r.ttft_s is not None]),
        tpot_s=_pcts([r.tpot_s for r in ok if r.tpot_s is not None]),
        itl_s=_pcts([g for r in ok for g in r.inter_token_s()]),
        e2e_s=_pcts([r.e2e_s for r in ok]),
        request_throughput=len(ok) / duration if duration > 0 else float("nan"),
        token_throughput=tokens / duration if duration > 0 else float("nan"),
        goodput_share=len(good) / len(records),
        goodput=len(good) / duration if duration > 0 else float("nan"),
        ttft_slo_s=ttft_slo_s,
        tpot_slo_s=tpot_slo_s,
    )


def format_summary(s: Summary, title: str = "") -> str:
    ms = 1000.0
    lines = [title] if title else []
    lines.append(
        f"requests {s.requests}  errors {s.errors}  duration {s.duration_s:.2f} s  output tokens {s.output_tokens}"
    )
    lines.append("| metric | p50 | p90 | p99 |")
    lines.append("|---|---|---|---|")
    for name, d in (("TTFT (ms)", s.ttft_s), ("TPOT (ms)", s.tpot_s), ("ITL (ms)", s.itl_s), ("E2E (ms)", s.e2e_s)):
        lines.append(f"| {name} | {d['p50'] * ms:.1f} | {d['p90'] * ms:.1f} | {d['p99'] * ms:.1f} |")
    lines.append(
        f"throughput {s.request_throughput:.2f} req/s, {s.token_throughput:.1f} tok/s; "
        f"goodput (TTFT <= {s.ttft_slo_s * ms:.0f} ms and TPOT <= {s.tpot_slo_s * ms:.0f} ms) "
        f"{s.goodput_share * 100:.1f}% of requests = {s.goodput:.2f} req/s"
    )
    return "\n".join(lines)
