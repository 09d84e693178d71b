"""What a user asks for and what comes back: the edge where every input is checked once.

- ``SamplingParams`` (frozen): how to pick tokens and when to stop. ``__post_init__``
  validates every field and raises ``ValueError`` naming the field, the value and the
  allowed range; nothing downstream re-checks.
- ``validate_prompt``: the checks that need the model (vocabulary, ``max_model_len``).
- ``Request`` (mutable, host only): one request's life inside the engine. The scheduler
  owns its state (``status``, ``num_computed_tokens``, ``pages``, ``output_token_ids``).
- ``RequestOutput`` (``Engine.generate``) and ``StreamDelta`` (``stream`` / ``AsyncEngine``):
  what leaves the engine.
"""

from __future__ import annotations

import dataclasses
import enum
import numbers
import secrets
import time
from collections.abc import Sequence
from typing import NamedTuple

MAX_LOGPROBS = 20  # top-N logprobs per token; the sampler always computes this many
_SEED_MIN, _SEED_MAX = -(2**63), 2**64  # int64 (gRPC) and uint64 seeds are both accepted


class QueueFullError(RuntimeError):
    """The bounded waiting queue is full; the request was not accepted."""


def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample and when to stop; every field is validated on construction."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 (or -1) keeps every token
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # over prompt and output tokens
    presence_penalty: float = 0.0  # over output tokens only
    frequency_penalty: float = 0.0  # over output tokens only
    seed: int | None = None  # same seed, same output, whatever else is in the batch
    stop: tuple[str, ...] = ()  # stop strings, matched across token boundaries, not in the text
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N logprobs per generated token, N <= MAX_LOGPROBS
    skip_special_tokens: bool = True  # drop special tokens (bos, eos, ...) from the output text
    min_tokens: int = 0  # eos and stop_token_ids are not sampled before this many output tokens

    def __post_init__(self) -> None:
        # Normalise containers first so a list (or a lone string) is accepted.
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        object.__setattr__(self, "stop", tuple(stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        self._check_types()
        if self.top_k == -1:  # the OpenAI / vLLM spelling of "off"
            object.__setattr__(self, "top_k", 0)
        checks = [
            ("max_tokens", self.max_tokens >= 1, "must be >= 1"),
            ("min_tokens", 0 <= self.min_tokens <= self.max_tokens, f"must be in [0, max_tokens={self.max_tokens}]"),
            ("temperature", 0.0 <= self.temperature <= 100.0, "must be in [0, 100] (0 means greedy)"),
            ("top_k", self.top_k >= 0, "must be >= 0 (0 or -1 disables)"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "must be in [0, 1]"),
            ("repetition_penalty", 0.0 < self.repetition_penalty <= 100.0, "must be in (0, 100]"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "must be in [-2, 2]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "must be in [-2, 2]"),
            (
                "seed",
                self.seed is None or _SEED_MIN <= self.seed < _SEED_MAX,
                "must be None or an integer in [-2**63, 2**64)",
            ),
            (
                "logprobs",
                self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
                f"must be None or in [0, {MAX_LOGPROBS}]",
            ),
        ]
        for name, ok, limit in checks:  # NaN fails every comparison, so it is caught here too
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} {limit}")
        for i, s in enumerate(self.stop):
            if s == "":
                raise ValueError(f"stop[{i}]={s!r} must be a non-empty string")
        for i, t in enumerate(self.stop_token_ids):
            if t < 0:
                raise ValueError(f"stop_token_ids[{i}]={t!r} must be >= 0")

    def _check_types(self) -> None:
        ints = ["max_tokens", "top_k", "min_tokens"]
        reals = ["temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"]
        for name in ints:
            if not _is_int(getattr(self, name)):
                raise ValueError(f"{name}={getattr(self, name)!r} must be an integer")
        for name in reals:
            if not _is_real(getattr(self, name)):
                raise ValueError(f"{name}={getattr(self, name)!r} must be a number")
        for name in ("seed", "logprobs"):
            value = getattr(self, name)
            if value is not None and not _is_int(value):
                raise ValueError(f"{name}={value!r} must be None or an integer")
        for name in ("ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be a bool")
        for i, s in enumerate(self.stop):
            if not isinstance(s, str):
                raise ValueError(f"stop[{i}]={s!r} must be a string")
        for i, t in enumerate(self.stop_token_ids):
            if not _is_int(t):
                raise ValueError(f"stop_token_ids[{i}]={t!r} must be an integer")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_penalties(self) -> bool:
        """Whether the sampler needs this request's token history."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def validate_prompt(
    prompt_token_ids: Sequence[int], params: SamplingParams, *, max_model_len: int, vocab_size: int
) -> list[int]:
    """Checks that need the model; returns the prompt as a list of Python ints.

    Raises ``ValueError`` for an empty prompt, an id outside ``[0, vocab_size)`` (prompt or
    ``stop_token_ids``), or ``prompt + max_tokens > max_model_len``.
    """
    ids = list(prompt_token_ids)
    if not ids:
        raise ValueError("prompt_token_ids=[] must not be empty")
    for i, t in enumerate(ids):
        if not _is_int(t) or not 0 <= t < vocab_size:
            raise ValueError(f"prompt_token_ids[{i}]={t!r} must be an integer in [0, {vocab_size=})")
    for i, t in enumerate(params.stop_token_ids):
        if not 0 <= t < vocab_size:
            raise ValueError(f"stop_token_ids[{i}]={t!r} must be in [0, {vocab_size=})")
    if len(ids) + params.max_tokens > max_model_len:
        raise ValueError(
            f"prompt length {len(ids)} + max_tokens={params.max_tokens} = {len(ids) + params.max_tokens} "
            f"must be <= {max_model_len=}"
        )
    return [int(t) for t in ids]


MAX_CACHE_SALT_LEN = 1024


def validate_cache_salt(cache_salt: object) -> None:
    """A prefix-cache salt is ``None`` or a non-empty string of at most ``MAX_CACHE_SALT_LEN`` characters."""
    if cache_salt is None:
        return
    if not isinstance(cache_salt, str) or not 1 <= len(cache_salt) <= MAX_CACHE_SALT_LEN:
        raise ValueError(
            f"cache_salt={cache_salt!r:.60} must be None or a non-empty string of <= {MAX_CACHE_SALT_LEN} characters"
        )


def seed_key_for(seed: int | None) -> int:
    """The uint32 the sampler keys its PRNG with: folded from ``seed``, or fresh random bits."""
    if seed is None:  # unseeded requests must differ from one another
        return secrets.randbits(32)
    s = seed % 2**64
    return (s ^ (s >> 32)) & 0xFFFFFFFF  # equals ``seed`` for every seed in [0, 2**32)


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # submitted, never admitted
    RUNNING = "running"  # owns pages, scheduled every step it fits
    PREEMPTED = "preempted"  # pages taken back; will recompute prompt + generated tokens
    FINISHED = "finished"  # done (stop, length or abort); owns no pages


@dataclasses.dataclass(eq=False)
class Request:
    """One request's state on the host. Mutated only by the scheduler's thread."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = dataclasses.field(default_factory=time.monotonic)
    prompt: str | None = None  # the text, when the user gave text
    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    # One dict (token id -> logprob, the sampled id included) per output token, when asked.
    output_logprobs: list[dict[int, float]] | None = None
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache (prompt first, then output)
    pages: list[int] = dataclasses.field(default_factory=list)  # page table, in position order
    seed_key: int | None = None  # uint32; drawn at construction when None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    first_token_time: float | None = None  # time.monotonic() of the first output token
    finish_time: float | None = None
    num_preemptions: int = 0
    # With params.min_tokens: the ids that would end the request (eos unless ignore_eos, and
    # stop_token_ids), which the sampler masks until min_tokens tokens are out (batch.py).
    min_tokens_ban: tuple[int, ...] = ()
    # Prefix caching: requests with different salts never share KV pages (multi-tenant isolation).
    cache_salt: str | None = None
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at first admission
    # Scheduler-owned: the block hash of each full page of known tokens (kv_cache.block_hash)
    block_hashes: list[bytes] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        self.prompt_token_ids = list(self.prompt_token_ids)
        if self.seed_key is None:
            self.seed_key = seed_key_for(self.params.seed)
        if self.output_logprobs is None and self.params.logprobs is not None:
            self.output_logprobs = []

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens: what a recompute after preemption must feed again."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def max_num_tokens(self) -> int:
        """Tokens this request may ever hold in the cache (the last sampled one is never fed)."""
        return len(self.prompt_token_ids) + self.params.max_tokens

    def token_at(self, position: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[position] if position < n else self.output_token_ids[position - n]

    def tokens(self, start: int, stop: int) -> list[int]:
        """Known tokens at positions ``[start, stop)`` (prompt, then output)."""
        n = len(self.prompt_token_ids)
        if stop <= n:
            return self.prompt_token_ids[start:stop]
        if start >= n:
            return self.output_token_ids[start - n : stop - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[: stop - n]

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def latency_s(self) -> float | None:
        return None if self.finish_time is None else self.finish_time - self.arrival_time


@dataclasses.dataclass(frozen=True)
class RequestOutput:
    """One finished request, as ``Engine.generate`` returns it."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" | "length" | "abort"
    logprobs: list[dict[int, float]] | None  # per token: token id -> logprob, the sampled id included
    ttft_s: float
    latency_s: float
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


@dataclasses.dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # of prompt_tokens, those served from the prefix cache


class StreamDelta(NamedTuple):
    """What one step added to one request's output (``stream`` and ``AsyncEngine.submit``).

    (A NamedTuple, not a frozen dataclass: one is built per decode row per step, and a
    frozen dataclass takes about 3x as long to construct: host time per step.)"""

    request_id: str
    text: str  # new text
    token_ids: list[int]  # new ids
    logprobs: list[dict[int, float]] | None  # one per new id, when asked
    finished: bool
    finish_reason: str | None
    usage: Usage | None  # on the last delta only
