"""Completions and chat completions over the shared admission path.

A request becomes ``len(prompts) x n`` engine requests ("choices"), each opened
through ``Admission.open_stream`` (server-owned id, metrics, abort on early exit).
All are opened before anything is sent, so a bad prompt, a full queue or a prompt
beyond the context is still a 400/429 rather than a broken stream; if one fails,
the others are aborted. Choice ``j`` of a seeded request gets ``seed + j`` so
the ``n`` samples differ and each is reproducible.

Streaming and non-streaming share one assembly (``_ChoiceState``): the streamed
pieces concatenate to exactly the non-streamed text and logprobs. The engine
holds text back near a stop string (``energon_jax/output.py``), so a stop string
never leaks into a stream, partially or whole.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from serving.admission import Admission, RequestError
from serving.binding import EngineBinding
from serving.openai import protocol as p

# Request fields passed to the runtime's SamplingParams when the client set them.
_SAMPLING_FIELDS = (
    "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
    "frequency_penalty", "ignore_eos",
)  # fmt: skip


@dataclass
class Choice:
    """One engine request of an OpenAI request: where it goes in ``choices`` and what it echoes."""

    index: int
    prompt_ids: list[int]
    params: Any
    echo_text: str = ""
    cache_salt: str | None = None


def sampling_kwargs(req: p._SamplingFields, admission: Admission) -> dict[str, Any]:
    """What the client set, in the runtime's names; the runtime validates the values."""
    kwargs: dict[str, Any] = {name: getattr(req, name) for name in _SAMPLING_FIELDS}
    kwargs = {k: v for k, v in kwargs.items() if v is not None and not (k == "ignore_eos" and v is False)}
    stop = admission.check_stop(req.stop, "stop")
    if stop:
        kwargs["stop"] = stop
    if req.stop_token_ids:
        kwargs["stop_token_ids"] = tuple(req.stop_token_ids)
    if req.seed is not None:
        kwargs["seed"] = req.seed
    if not req.skip_special_tokens:
        kwargs["skip_special_tokens"] = False
    if req.min_tokens:
        kwargs["min_tokens"] = req.min_tokens
    return kwargs


def check_common(req: p._SamplingFields, admission: Admission) -> None:
    """Fields this server refuses rather than silently ignores."""
    if req.stream_options is not None and not req.stream:
        raise RequestError("stream_options is only allowed with stream: true", param="stream_options")
    if req.logit_bias:
        raise RequestError("logit_bias is not supported by this server", param="logit_bias")
    admission.check_n(req.n)


def make_params(binding: EngineBinding, kwargs: dict[str, Any], max_tokens: int, seed_offset: int) -> Any:
    kw = dict(kwargs, max_tokens=max_tokens)
    if "seed" in kw and seed_offset:
        kw["seed"] = kw["seed"] + seed_offset
    return binding.params_cls(**kw)


def default_max_tokens(requested: int | None, prompt_len: int, max_model_len: int) -> int:
    """OpenAI's ``max_tokens: null``: whatever room the context leaves (at least 1, so a full
    prompt still gets the runtime's context-length error)."""
    return requested if requested is not None else max(1, max_model_len - prompt_len)


async def open_choices(
    admission: Admission, binding: EngineBinding, choices: Sequence[Choice], label: str
) -> list[AsyncIterator[Any]]:
    """Open every choice's stream, all or nothing (the first error is raised, the rest aborted)."""
    results = await asyncio.gather(
        *(admission.open_stream(binding, c.prompt_ids, c.params, label=label, cache_salt=c.cache_salt)
          for c in choices),
        return_exceptions=True,
    )
    failure = next((r for r in results if isinstance(r, BaseException)), None)
    if failure is not None:
        for r in results:
            if not isinstance(r, BaseException):
                await r.aclose()
        raise failure
    return list(results)


# -- token text and logprobs -------------------------------------------------------------------


class TokenText:
    """Text of one token id for logprobs (special tokens shown, as OpenAI does)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    def __call__(self, token_id: int) -> str:
        if self._tokenizer is None:
            return f"token_id:{token_id}"
        try:
            return self._tokenizer.decode([token_id], skip_special_tokens=False)
        except TypeError:  # a tokenizer without the keyword
            return self._tokenizer.decode([token_id])


@dataclass
class _ChoiceState:
    """What one choice has produced so far; both the streamed and the whole response read it."""

    choice: Choice
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Any = None
    pending_from: int = 0  # first token not yet sent in a stream chunk
    sent_text: str = ""  # text already sent in stream chunks
    offset: int = 0  # text offset of the next token (completions logprobs)

    def __post_init__(self) -> None:
        self.offset = len(self.choice.echo_text)

    def add(self, delta: Any) -> None:
        self.text += delta.text
        self.token_ids.extend(int(t) for t in delta.token_ids)
        if delta.logprobs:
            self.logprobs.extend(delta.logprobs)
        if delta.finished:
            # "abort" passes through as vLLM reports it: a client must be able to tell a cut answer from a stop.
            self.finish_reason = delta.finish_reason if delta.finish_reason in ("length", "abort") else "stop"
            self.usage = delta.usage


def completion_logprobs(
    state: _ChoiceState, token_text: TokenText, start: int, end: int, offset: int
) -> tuple[p.CompletionLogprobs, int]:
    out = p.CompletionLogprobs()
    for tid, entry in zip(state.token_ids[start:end], state.logprobs[start:end], strict=False):
        piece = token_text(tid)
        out.tokens.append(piece)
        out.token_logprobs.append(float(entry.get(tid, float("nan"))))
        out.top_logprobs.append({token_text(t): float(lp) for t, lp in entry.items()})
        out.text_offset.append(offset)
        offset += len(piece)
    return out, offset


def chat_logprobs(state: _ChoiceState, token_text: TokenText, start: int, end: int, top_n: int) -> p.ChatLogprobs:
    content = []
    for tid, entry in zip(state.token_ids[start:end], state.logprobs[start:end], strict=False):
        piece = token_text(tid)
        top = sorted(entry.items(), key=lambda kv: -kv[1])[:top_n]
        content.append(
            p.ChatTokenLogprob(
                token=piece,
                logprob=float(entry.get(tid, float("nan"))),
                bytes=list(piece.encode("utf-8")),
                top_logprobs=[
                    p.TopLogprob(token=token_text(t), logprob=float(lp), bytes=list(token_text(t).encode("utf-8")))
                    for t, lp in top
                ],
            )
        )
    return p.ChatLogprobs(content=content)


def usage_of(states: Sequence[_ChoiceState], n: int) -> p.Usage:
    """Prompt tokens count once per prompt (not per choice), as OpenAI counts them."""
    prompt = cached = completion = 0
    for k, s in enumerate(states):
        if s.usage is None:
            continue
        completion += int(s.usage.completion_tokens)
        if k % n == 0:
            prompt += int(s.usage.prompt_tokens)
            cached += int(getattr(s.usage, "cached_tokens", 0) or 0)
    return p.Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=p.PromptTokensDetails(cached_tokens=cached),
    )


# -- running the choices ---------------------------------------------------------------------


def new_states(choices: Sequence[Choice]) -> list[_ChoiceState]:
    return [_ChoiceState(c) for c in choices]


async def run_to_end(streams: Sequence[AsyncIterator[Any]], states: Sequence[_ChoiceState]) -> None:
    async def drain(stream: AsyncIterator[Any], state: _ChoiceState) -> None:
        async with _closing(stream):
            async for delta in stream:
                state.add(delta)

    await asyncio.gather(*(drain(s, st) for s, st in zip(streams, states, strict=True)))


async def merged(
    streams: Sequence[AsyncIterator[Any]], states: Sequence[_ChoiceState]
) -> AsyncIterator[tuple[_ChoiceState, bool]]:
    """Yield ``(state, finished)`` after each delta of any choice, in arrival order.

    One task per choice feeds a queue; leaving early (client gone) cancels the tasks,
    whose streams then abort their engine requests.
    """
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(k: int, stream: AsyncIterator[Any]) -> None:
        try:
            async with _closing(stream):
                async for delta in stream:
                    await queue.put((k, delta))
        except Exception as e:  # delivered to the consumer, which ends the response
            await queue.put((k, e))

    tasks = [asyncio.create_task(pump(k, s)) for k, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            k, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            states[k].add(item)
            if item.finished:
                remaining -= 1
            yield states[k], bool(item.finished)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _closing:
    def __init__(self, stream: AsyncIterator[Any]) -> None:
        self._stream = stream

    async def __aenter__(self) -> AsyncIterator[Any]:
        return self._stream

    async def __aexit__(self, *exc: object) -> None:
        await self._stream.aclose()


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())
