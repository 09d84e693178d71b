"""A mock AsyncEngine whose output is arithmetic you can check by hand.

It follows the seam in docs/architecture.md ("AsyncEngine") so the gRPC server
can be tested without a model:

- tokenizer: a text is whitespace-separated integers ("5 6 7" -> [5, 6, 7]);
  token ``t`` decodes to ``" t"``. Token 0 is EOS.
- generation: the next token is ``(last + 1 + shift) % vocab_size`` where
  ``shift`` is 0 when greedy (temperature 0) and ``seed % 7`` otherwise, so
  "5 6 7" greedily continues 8, 9, 10, ...
- a step loop on its own thread admits queued requests (bounded by
  ``max_num_seqs`` and free pages), gives every running request one token per
  step, and frees a request's pages in the step it finishes or is aborted;
- validation is the real engine's: the runtime's ``SamplingParams`` and
  ``validate_prompt`` (energon_jax/request.py) reject bad parameters, empty
  prompts, ids outside the vocabulary and prompt + max_tokens beyond
  ``max_model_len``, each with a ValueError naming the field; a request that
  needs more pages than the pool holds is refused; a full queue raises the
  runtime's ``QueueFullError``; deltas are the runtime's ``StreamDelta``;
- ``fail_on_token=X``: the first step that runs a request whose prompt holds
  token X raises, which fails every in-flight request and every later
  submission (the engine is dead), as a real step failure would;
- ``die_after_s=T``: the step loop dies T seconds after ``start()`` whether or
  not anything is in flight (``failure`` then says why), as a loop that breaks
  while idle would.

``serve_binding`` lets ``energon serve --engine-factory mock_engine:serve_binding``
run a real server process over this engine.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from energon_jax.request import QueueFullError, SamplingParams, StreamDelta, Usage, validate_prompt

EOS_TOKEN_ID = 0


@dataclass(frozen=True)
class ModelInfo:
    architecture: str
    max_model_len: int
    vocab_size: int
    layout: dict[str, int]
    model: str = "mock"


@dataclass(frozen=True)
class EngineStats:
    queued: int
    running: int
    pages_used: int
    pages_total: int


class MockTokenizer:
    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = []
        for word in text.split():
            if not word.lstrip("-").isdigit():
                raise ValueError(f"text word {word!r} is not an integer (the mock tokenizer reads integers)")
            ids.append(int(word) % self.vocab_size)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return "".join(f" {t}" for t in ids)


@dataclass
class _Request:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    generated: list[int] = field(default_factory=list)
    text: str = ""
    pages: int = 0


class MockAsyncEngine:
    def __init__(
        self,
        *,
        vocab_size: int = 1000,
        max_model_len: int = 256,
        page_size: int = 4,
        kv_cache_pages: int = 512,
        max_num_seqs: int = 8,
        max_queue: int = 256,
        step_s: float = 0.005,
        fail_on_token: int | None = None,
        die_after_s: float | None = None,
    ) -> None:
        self.tokenizer = MockTokenizer(vocab_size)
        self.info = ModelInfo("MockForCausalLM", max_model_len, vocab_size, {"dp": 1, "tp": 1, "pp": 1})
        self._page_size = page_size
        self._pages_total = kv_cache_pages
        self._max_num_seqs = max_num_seqs
        self._max_queue = max_queue
        self._step_s = step_s
        self._fail_on_token = fail_on_token
        self._die_after_s = die_after_s
        self._die_at: float | None = None
        self._lock = threading.Lock()
        self._waiting: deque[_Request] = deque()
        self._running: dict[str, _Request] = {}
        self._aborts: set[str] = set()
        self._known: set[str] = set()
        self._pages_used = 0
        self._steps = 0
        self._dead: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.aborted: list[str] = []  # ids aborted, in order (for tests)

    # -- the seam -------------------------------------------------------------------------
    @property
    def failure(self) -> BaseException | None:
        return self._dead

    def start(self) -> None:
        if self._die_after_s is not None:
            self._die_at = time.monotonic() + float(self._die_after_s)
        self._thread = threading.Thread(target=self._loop, name="mock-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    @property
    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(len(self._waiting), len(self._running), self._pages_used, self._pages_total)

    def abort(self, request_id: str) -> None:
        with self._lock:
            if request_id in self._known:
                self._aborts.add(request_id)

    async def embed(self, texts: Sequence[str], normalize: bool = True) -> list[list[float]]:
        if not texts:
            raise ValueError("texts must not be empty")
        out = []
        for text in texts:
            ids = self.tokenizer.encode(text)
            vec = [float(len(ids)), float(sum(ids)), 1.0]
            if normalize:
                norm = math.sqrt(sum(v * v for v in vec))
                vec = [v / norm for v in vec]
            out.append(vec)
        return out

    async def submit(
        self, prompt: str | Sequence[int], params: SamplingParams, *, request_id: str
    ) -> AsyncIterator[StreamDelta]:
        req = self._admit(prompt, params, request_id)
        try:
            while True:
                item = await req.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            self.abort(request_id)

    # -- admission (caller's thread) ------------------------------------------------------
    def _admit(self, prompt: str | Sequence[int], params: SamplingParams, request_id: str) -> _Request:
        if self._dead is not None:
            raise RuntimeError(f"engine is dead: {self._dead!r}")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        ids = validate_prompt(ids, params, max_model_len=self.info.max_model_len, vocab_size=self.info.vocab_size)
        need = math.ceil((len(ids) + params.max_tokens) / self._page_size)
        if need > self._pages_total:
            raise ValueError(f"request needs {need} pages, the pool holds {self._pages_total}")
        req = _Request(request_id, ids, params, asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            if request_id in self._known:
                raise ValueError(f"request_id={request_id!r} is already in flight")
            if len(self._waiting) >= self._max_queue:
                raise QueueFullError(f"queue is full ({self._max_queue} waiting requests)")
            self._known.add(request_id)
            self._waiting.append(req)
        return req

    # -- the step loop (engine thread) ----------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            time.sleep(self._step_s)
            try:
                self._step()
            except Exception as e:  # the engine dies; everyone in flight hears about it
                self._fail_all(e)
                return

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            self._dead = exc
            reqs = list(self._waiting) + list(self._running.values())
            self._waiting.clear()
            self._running.clear()
            self._pages_used = 0
        for req in reqs:
            req.loop.call_soon_threadsafe(req.queue.put_nowait, exc)

    def _pages_for(self, n_tokens: int) -> int:
        return math.ceil(n_tokens / self._page_size)

    def _step(self) -> None:
        self._steps += 1
        if self._die_at is not None and time.monotonic() >= self._die_at:
            raise RuntimeError(f"injected step-loop death in step {self._steps}")
        with self._lock:
            poisoned = [r for r in self._running.values() if self._fail_on_token in r.prompt]
            if self._fail_on_token is not None and poisoned:
                raise RuntimeError(f"injected failure in engine step {self._steps}")
            for rid in list(self._aborts):
                self._finish_aborted(rid)
            self._aborts.clear()
            while self._waiting and len(self._running) < self._max_num_seqs:
                req = self._waiting[0]
                need = self._pages_for(len(req.prompt) + 1)
                if self._pages_used + need > self._pages_total:
                    break
                self._waiting.popleft()
                req.pages = need
                self._pages_used += need
                self._running[req.request_id] = req
            deliveries = [(req, self._next_delta(req)) for req in list(self._running.values())]
        for req, delta in deliveries:
            req.loop.call_soon_threadsafe(req.queue.put_nowait, delta)

    def _finish_aborted(self, rid: str) -> None:
        self._known.discard(rid)
        for req in self._waiting:
            if req.request_id == rid:
                self._waiting.remove(req)
                self.aborted.append(rid)
                return
        req = self._running.pop(rid, None)
        if req is not None:
            self._pages_used -= req.pages
            self.aborted.append(rid)

    def _next_delta(self, req: _Request) -> StreamDelta:
        p = req.params
        last = req.generated[-1] if req.generated else req.prompt[-1]
        shift = 0 if p.temperature == 0 else (p.seed or 0) % 7
        tok = (last + 1 + shift) % self.info.vocab_size
        req.generated.append(tok)
        need = self._pages_for(len(req.prompt) + len(req.generated))
        self._pages_used += need - req.pages
        req.pages = need
        piece = self.tokenizer.decode([tok])
        reason = None
        if tok in p.stop_token_ids or (tok == EOS_TOKEN_ID and not p.ignore_eos):
            reason = "stop"
        text_before = req.text
        req.text += piece
        for s in p.stop:
            cut = req.text.find(s)
            if cut >= 0:
                req.text, reason = req.text[:cut], "stop"
        if reason is None and len(req.generated) >= p.max_tokens:
            reason = "length"
        logprobs = None
        if p.logprobs is not None:
            top = {tok: -0.5}
            for k in range(1, p.logprobs):
                top[(tok + k) % self.info.vocab_size] = -0.5 - k
            logprobs = [top]
        usage = None
        if reason is not None:
            usage = Usage(len(req.prompt), len(req.generated))
            self._running.pop(req.request_id)
            self._known.discard(req.request_id)
            self._pages_used -= req.pages
        return StreamDelta(
            request_id=req.request_id,
            text=req.text[len(text_before) :] if len(req.text) >= len(text_before) else "",
            token_ids=[tok],
            logprobs=logprobs,
            finished=reason is not None,
            finish_reason=reason,
            usage=usage,
        )


def expected_tokens(prompt: Sequence[int], params: SamplingParams, vocab_size: int = 1000) -> list[int]:
    """What the mock generates for ``prompt`` (ignoring stop strings): the hand arithmetic."""
    shift = 0 if params.temperature == 0 else (params.seed or 0) % 7
    out, last = [], prompt[-1]
    for _ in range(params.max_tokens):
        last = (last + 1 + shift) % vocab_size
        out.append(last)
        if last in params.stop_token_ids or (last == EOS_TOKEN_ID and not params.ignore_eos):
            break
    return out


def serve_binding(model: str | None, engine_kwargs: dict[str, Any]):
    """Engine factory for ``energon serve --engine-factory mock_engine:serve_binding``.

    ``load_s`` (an ``--engine-arg``) makes loading take that long, as a real checkpoint does.
    """
    from serving.binding import EngineBinding

    kwargs = dict(engine_kwargs)
    kwargs.pop("warmup", None)  # --no-warmup: the mock compiles nothing either way
    time.sleep(float(kwargs.pop("load_s", 0.0)))
    engine = MockAsyncEngine(**kwargs)
    return EngineBinding(engine=engine, params_cls=SamplingParams, queue_full_error=QueueFullError)


def real_binding_failing_on_token(model: str | None, engine_kwargs: dict[str, Any]):
    """The real AsyncEngine, except that a step raises once a prompt holding ``fail_on_token`` was added.

    For the fault test against the real engine's failure path
    (``--engine-factory mock_engine:real_binding_failing_on_token --engine-arg fail_on_token=X``).
    """
    from serving.binding import energon_binding

    kwargs = dict(engine_kwargs)
    poison = int(kwargs.pop("fail_on_token"))
    binding = energon_binding(model, kwargs)
    engine = binding.engine.engine  # the Engine the step thread drives
    add_request, step = engine.add_request, engine.step
    poisoned = threading.Event()

    def add_request_watching(prompt, params=None, *, request_id=None, **kwargs):
        if not isinstance(prompt, str) and poison in list(prompt):
            poisoned.set()
        return add_request(prompt, params, request_id=request_id, **kwargs)

    def failing_step():
        if poisoned.is_set():
            raise RuntimeError("injected failure in a real engine step")
        return step()

    engine.add_request, engine.step = add_request_watching, failing_step
    return binding
