"""One admission path for both front ends (gRPC and the OpenAI HTTP API).

Every request, whichever protocol brought it, goes through ``Admission``:

1. ``ready()``: the model is loaded and the server is not draining or broken,
   else ``Unavailable`` (gRPC UNAVAILABLE, HTTP 503);
2. limits, checked before any work: number and length of stop strings, ``n``,
   prompt length in characters, number of prompts or texts in one call. Each
   refusal is a ``RequestError`` (a ``ValueError``) naming the field, the value
   and the flag that sets the limit;
3. tokenization, once per request and off the event loop (``asyncio.to_thread``),
   so a huge prompt never stalls health checks or other streams; the engine is
   handed token ids and never tokenizes again;
4. ``stream()``: the request enters the engine under an id the server draws
   (``uuid4``). A client's own id is only a label the front end echoes back, so
   two clients with the same label both complete and neither can abort, replace
   or observe the other's request. Whatever ends the stream early (client gone,
   deadline, drain) aborts the request in the engine within one step. Latency,
   token and finish-reason metrics are recorded here, once for both front ends.

Errors the front ends map, in one place each: ``ValueError`` (bad input),
``QueueFull`` (bounded queue full), ``Unavailable``, ``EngineFailure`` (the engine
broke; the server is told through ``on_engine_failure`` and exits non-zero).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

from serving.binding import EngineBinding
from serving.metrics import ServingMetrics

log = logging.getLogger("energon.serving")


@dataclass(frozen=True)
class AdmissionLimits:
    """Per-request limits; each has an ``energon serve`` flag of the same name."""

    max_stop_strings: int = 16
    max_stop_string_len: int = 256  # characters
    max_n: int = 16  # choices per prompt (OpenAI ``n``)
    max_prompts: int = 64  # prompts in one completions request
    max_prompt_chars: int = 1 << 20  # characters of one prompt (or of all chat messages together)
    max_embed_texts: int = 256  # texts in one Embed / embeddings call

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{f.name}={value!r} must be an integer >= 1")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class RequestError(ValueError):
    """A request refused at admission. ``param`` names the field (OpenAI's ``param``)."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class Unavailable(Exception):
    """Not loaded yet, draining, or the engine failed: try again later (or elsewhere)."""


class QueueFull(Exception):
    """The engine's bounded queue is full; the request was not accepted."""


class EngineFailure(Exception):
    """The engine broke while serving this request."""


class Admission:
    """State and checks shared by the gRPC servicer and the HTTP API (see the module docstring)."""

    def __init__(
        self,
        metrics: ServingMetrics,
        on_engine_failure: Callable[[BaseException], None],
        limits: AdmissionLimits | None = None,
    ) -> None:
        self.metrics = metrics
        self.limits = limits or AdmissionLimits()
        self._on_engine_failure = on_engine_failure
        self._binding: EngineBinding | None = None
        self._draining = False
        self._failed = False
        self._unavailable: str | None = None  # why new requests are refused for now (set_unavailable)
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    # -- lifecycle (the server calls these on the event loop) ------------------------------
    def attach(self, binding: EngineBinding) -> None:
        self._binding = binding

    def start_draining(self) -> None:
        self._draining = True

    def set_unavailable(self, reason: str | None) -> None:
        """Refuse new requests for ``reason`` until called with None (an engine that is remote,
        the router's, can be without servers for a while and come back)."""
        self._unavailable = reason

    def mark_failed(self) -> None:
        self._failed = True
        self._draining = True

    @property
    def serving(self) -> bool:
        """What both health endpoints report."""
        return self.state == "serving"

    @property
    def state(self) -> str:
        """``loading``, ``serving``, ``unavailable``, ``draining`` or ``failed``."""
        if self._failed:
            return "failed"
        if self._draining:
            return "draining"
        if self._binding is None:
            return "loading"
        return "serving" if self._unavailable is None else "unavailable"

    @property
    def inflight(self) -> int:
        return self._inflight

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no call is in flight; False if ``timeout_s`` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except TimeoutError:
            return False

    def enter(self) -> None:
        """A call is in flight until ``leave()``: a drain waits for it."""
        self._inflight += 1
        self._idle.clear()

    def leave(self) -> None:
        self._inflight -= 1
        if self._inflight == 0:
            self._idle.set()

    def ready(self) -> EngineBinding:
        if self._failed:
            raise Unavailable("the engine failed; the server is shutting down")
        if self._draining:
            raise Unavailable("server is shutting down")
        if self._binding is None:
            raise Unavailable("model is still loading")
        if self._unavailable is not None:
            raise Unavailable(self._unavailable)
        return self._binding

    def count(self, reason: str) -> None:
        """Count a request that ended before reaching the engine (``invalid``, ``rejected``)."""
        self.metrics.finished.labels(reason).inc()

    # -- limits, before any work -------------------------------------------------------------
    def check_stop(self, stop: str | Sequence[str] | None, field: str = "stop") -> tuple[str, ...]:
        if stop is None:
            return ()
        items = (stop,) if isinstance(stop, str) else tuple(stop)
        lim = self.limits
        if len(items) > lim.max_stop_strings:
            raise RequestError(
                f"{field} has {len(items)} strings, more than max_stop_strings={lim.max_stop_strings} "
                f"(server flag {flag('max_stop_strings')})",
                param=field,
            )
        for i, s in enumerate(items):
            if isinstance(s, str) and len(s) > lim.max_stop_string_len:
                raise RequestError(
                    f"{field}[{i}] is {len(s)} characters, longer than max_stop_string_len="
                    f"{lim.max_stop_string_len} (server flag {flag('max_stop_string_len')})",
                    param=field,
                )
        return items

    def check_n(self, n: int, field: str = "n") -> None:
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= self.limits.max_n:
            raise RequestError(
                f"{field}={n!r} must be an integer in [1, max_n={self.limits.max_n}] (server flag {flag('max_n')})",
                param=field,
            )

    def check_prompt_count(self, count: int, field: str = "prompt") -> None:
        if count < 1:
            raise RequestError(f"{field} must not be empty", param=field)
        if count > self.limits.max_prompts:
            raise RequestError(
                f"{field} holds {count} prompts, more than max_prompts={self.limits.max_prompts} "
                f"(server flag {flag('max_prompts')})",
                param=field,
            )

    def check_prompt_chars(self, chars: int, field: str = "prompt") -> None:
        if chars > self.limits.max_prompt_chars:
            raise RequestError(
                f"{field} is {chars} characters, longer than max_prompt_chars={self.limits.max_prompt_chars} "
                f"(server flag {flag('max_prompt_chars')})",
                param=field,
            )

    def check_embed_texts(self, texts: Sequence[str], field: str = "texts") -> None:
        if not texts:
            raise RequestError(f"{field} must not be empty", param=field)
        if len(texts) > self.limits.max_embed_texts:
            raise RequestError(
                f"{field} holds {len(texts)} texts, more than max_embed_texts={self.limits.max_embed_texts} "
                f"(server flag {flag('max_embed_texts')})",
                param=field,
            )
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise RequestError(f"{field}[{i}] must be a string", param=field)
            self.check_prompt_chars(len(text), f"{field}[{i}]")

    # -- tokenization, once and off the event loop ---------------------------------------------
    async def tokenize(
        self, binding: EngineBinding, text: str, *, field: str = "prompt", add_special_tokens: bool = True
    ) -> list[int]:
        """The ids the engine will run: ``text`` through the model's tokenizer, in a worker thread.

        ``add_special_tokens=False`` for a rendered chat template (it writes the BOS itself).
        """
        if not isinstance(text, str):
            raise RequestError(f"{field} must be a string", param=field)
        if text == "":  # a tokenizer may turn "" into [bos], hiding the mistake
            raise RequestError(f"{field}='' must not be empty", param=field)
        self.check_prompt_chars(len(text), field)
        tokenizer = binding.engine.tokenizer
        if tokenizer is None:
            raise RequestError(f"{field} is text, but this model has no tokenizer.json: pass token ids", param=field)
        return await asyncio.to_thread(_encode, tokenizer, text, add_special_tokens)

    async def detokenize(self, binding: EngineBinding, ids: Sequence[int], field: str = "tokens") -> str:
        tokenizer = binding.engine.tokenizer
        if tokenizer is None:
            raise RequestError("this model has no tokenizer.json", param=field)
        vocab = int(binding.engine.info.vocab_size)
        for i, t in enumerate(ids):
            if not 0 <= t < vocab:
                raise RequestError(f"{field}[{i}]={t!r} must be in [0, vocab_size={vocab})", param=field)
        return await asyncio.to_thread(tokenizer.decode, list(ids))

    # -- the engine call -----------------------------------------------------------------------
    async def open_stream(
        self,
        binding: EngineBinding,
        prompt_ids: Sequence[int],
        params: Any,
        *,
        label: str = "",
        cancel_reason: Callable[[], str] = lambda: "cancelled",
        cache_salt: str | None = None,
    ) -> EngineStream:
        """Submit under a server-owned id and wait for the first delta; returns the whole stream.

        Validation in the engine (vocabulary, context length, queue) raises here, before the
        caller has sent anything, so an HTTP front end can still answer 400 or 429.
        """
        # The engine checks every id of the prompt on the event loop; a prompt that cannot fit
        # is refused here first, in O(1), so a huge one never costs that walk.
        max_len = int(binding.engine.info.max_model_len)
        max_tokens = int(getattr(params, "max_tokens", 0) or 0)
        if len(prompt_ids) + max_tokens > max_len:
            self.count("invalid")
            raise RequestError(
                f"prompt length {len(prompt_ids)} + max_tokens={max_tokens} = {len(prompt_ids) + max_tokens} "
                f"must be <= max_model_len={max_len}",
                param="prompt",
                code="context_length_exceeded",
            )
        extra = {} if cache_salt is None else {"cache_salt": cache_salt}  # prefix-cache isolation
        stream = self._stream(binding, list(prompt_ids), params, label, cancel_reason, extra)
        try:
            first = await stream.__anext__()
        except BaseException:
            await stream.aclose()
            raise
        return EngineStream(first, stream)

    async def _stream(
        self,
        binding: EngineBinding,
        prompt_ids: list[int],
        params: Any,
        label: str,
        cancel_reason: Callable[[], str],
        extra: dict[str, Any],
    ) -> AsyncIterator[Any]:
        engine = binding.engine
        request_id = uuid.uuid4().hex  # the server's; ``label`` never reaches the engine
        m = self.metrics
        arrived = time.perf_counter()
        finished = False
        last_token_at: float | None = None
        source = engine.submit(prompt_ids, params, request_id=request_id, **extra)
        try:
            try:
                async for delta in source:
                    now = time.perf_counter()
                    n = len(delta.token_ids)
                    if n:
                        if last_token_at is None:
                            m.ttft.observe(now - arrived)
                        else:
                            for _ in range(n):
                                m.inter_token.observe((now - last_token_at) / n)
                        last_token_at = now
                        m.generated_tokens.inc(n)
                    if delta.finished:
                        finished = True
                        m.e2e.observe(now - arrived)
                        if delta.usage is not None:
                            m.prompt_tokens.inc(delta.usage.prompt_tokens)
                        m.finished.labels(delta.finish_reason or "stop").inc()
                    yield delta
                    if delta.finished:
                        return
            except ValueError:
                m.finished.labels("invalid").inc()
                raise
            except binding.queue_full_error as e:
                m.finished.labels("rejected").inc()
                raise QueueFull(str(e) or "request queue is full") from e
            except Unavailable:  # a remote engine (the router's) lost its server: not this server's failure
                m.finished.labels("error").inc()
                raise
            except (asyncio.CancelledError, GeneratorExit):
                raise
            except Exception as e:  # the engine broke: this request and the server are done
                log.error("engine failed while serving request %s (label %r): %r", request_id, label, e)
                m.finished.labels("error").inc()
                self._on_engine_failure(e)
                raise EngineFailure(f"engine failure: {type(e).__name__}") from e
            m.finished.labels("error").inc()
            raise EngineFailure("engine stream ended before the request finished")
        except (asyncio.CancelledError, GeneratorExit):  # the client went away, a deadline passed
            if not finished:
                m.finished.labels(cancel_reason()).inc()
            raise
        finally:
            if not finished:
                engine.abort(request_id)
            await _close(source)


def _encode(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    """``tokenizer.encode`` as the engine would run it, in a way that lets the event loop run.

    The ``tokenizers`` binding holds the GIL for the whole of a single ``encode`` (a 3 MiB
    prompt: seconds of stalled health checks even from a worker thread) but releases it in
    ``encode_batch``; a tokenizer without ``encode_batch`` (the tests' mock) is called plainly.
    """
    batch = getattr(tokenizer, "encode_batch", None)
    if batch is not None:
        return batch([text], add_special_tokens=add_special_tokens)[0]
    if add_special_tokens:
        return tokenizer.encode(text)
    return tokenizer.encode(text, add_special_tokens=False)


def count_tokens(tokenizer: Any, texts: Sequence[str]) -> list[int]:
    """Token counts of ``texts`` (for usage), through ``encode_batch`` when there is one (GIL free)."""
    batch = getattr(tokenizer, "encode_batch", None)
    if batch is not None:
        return [len(ids) for ids in batch(list(texts))]
    return [len(tokenizer.encode(t)) for t in texts]


class EngineStream:
    """The deltas of one admitted request: the first (already received), then the rest.

    ``aclose()`` aborts the request (if not finished) even when iteration never started,
    which an async generator's ``aclose`` would not do.
    """

    def __init__(self, first: Any, rest: AsyncIterator[Any]) -> None:
        self._first: Any = first
        self._rest = rest

    def __aiter__(self) -> EngineStream:
        return self

    async def __anext__(self) -> Any:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        return await self._rest.__anext__()

    async def aclose(self) -> None:
        await self._rest.aclose()


async def _close(stream: AsyncIterator) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception as e:  # closing must not hide the call's own outcome
            log.debug("closing an engine stream raised %r", e)
