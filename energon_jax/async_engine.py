"""AsyncEngine: the engine's step loop on its own thread, fed by asyncio submitters.

This is the seam the gRPC server uses (docs/architecture.md, "AsyncEngine"):

- ``submit(prompt, params, request_id=...)`` (an async generator) validates the request
  on the caller's thread (a bad one raises ``ValueError`` at once, a full queue
  ``QueueFullError``), hands it to the step thread through an inbox, and yields the
  request's ``StreamDelta`` objects as the step thread produces them;
- the step thread owns the ``Engine`` (nothing else touches it): each turn it admits
  the inbox, applies aborts, runs one ``Engine.step`` for every request in flight (so
  concurrent submitters share each step) and posts each delta to its submitter's
  asyncio queue with ``call_soon_threadsafe``;
- ``abort(request_id)`` is thread-safe; the pages are free within one step. A
  submitter that stops iterating (client gone, task cancelled) aborts its request;
- if a step raises, every request in flight gets the exception and the engine is dead:
  later submissions raise ``RuntimeError``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from energon_jax.engine import Engine, PromptInput
from energon_jax.request import QueueFullError, SamplingParams, StreamDelta, validate_cache_salt

logger = logging.getLogger(__name__)

STATS_LOG_INTERVAL_S = 10.0  # the step thread logs running/queued/pages/prefix-cache hit rate this often


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    architecture: str
    max_model_len: int
    vocab_size: int
    layout: dict[str, int]
    model: str = ""
    overlap: str = ""  # whether the step loop plans step N+1 while step N runs, and why not


def model_info(e: Engine) -> ModelInfo:
    """What is loaded (``AsyncEngine.info``; a prefill server's ``ModelInfo`` answer too)."""
    return ModelInfo(
        architecture=e.model_config.architecture,
        max_model_len=e.config.max_model_len,
        vocab_size=e.model_config.vocab_size,
        layout={"dp": e.parallel.dp, "tp": e.parallel.tp, "pp": e.parallel.pp,
                **({} if getattr(e, "disagg", None) is None else e.disagg.layout())},
        model=e.model_path or "",
        overlap=getattr(e, "overlap", ""),
    )


@dataclasses.dataclass(frozen=True)
class EngineStats:
    queued: int
    running: int
    pages_used: int
    pages_total: int
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache (cumulative)
    prefix_cache_hits: int = 0  # of those, tokens whose KV pages were reused


@dataclasses.dataclass
class _Submission:
    request_id: str
    prompt: PromptInput
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    cache_salt: str | None = None


class AsyncEngine:
    """Wraps an ``Engine``; call ``start()`` before submitting and ``shutdown()`` at the end."""

    def __init__(self, engine: Engine, *, max_queue: int = 256) -> None:
        if max_queue < 1:
            raise ValueError(f"{max_queue=} must be >= 1")
        self.engine = engine
        self.max_queue = max_queue
        self._cond = threading.Condition()
        self._inbox: list[_Submission] = []
        self._aborts: list[str] = []
        self._subs: dict[str, _Submission] = {}  # every request not finished (inbox included)
        self._stats = self._read_stats(queued_extra=0)
        self._dead: BaseException | None = None
        self._stop = False
        self._thread: threading.Thread | None = None
        self._embed_lock = threading.Lock()
        self._last_log = time.monotonic()  # of the periodic stats line (_log_stats)

    @classmethod
    def from_pretrained(cls, path: str | None = None, *, max_queue: int = 256, **engine_kwargs: Any) -> AsyncEngine:
        return cls(Engine.from_pretrained(path, **engine_kwargs), max_queue=max_queue)

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="energon-step-loop", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        from energon_jax.parallel.controller import shutdown_workers

        # Multi-process: the workers return from serve() (idempotent; nothing on one process).
        shutdown_workers(self.engine.runner)

    # -- what the server reads ----------------------------------------------------------

    @property
    def info(self) -> ModelInfo:
        return model_info(self.engine)

    @property
    def stats(self) -> EngineStats:
        with self._cond:
            return self._stats

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def failure(self) -> BaseException | None:
        """What killed the step loop (None while it lives); a server polls it to notice a death
        that happened with nothing in flight."""
        return self._dead

    # -- requests -----------------------------------------------------------------------

    async def submit(
        self, prompt: PromptInput, params: SamplingParams | None = None, *, request_id: str,
        cache_salt: str | None = None,
    ) -> AsyncIterator[StreamDelta]:
        """Yield the request's deltas until the last one (``finished=True``); ``cache_salt`` as
        ``Engine.add_request``."""
        sub = self._enqueue(prompt, params or SamplingParams(), request_id, cache_salt)
        done = False
        try:
            while True:
                item = await sub.queue.get()
                if isinstance(item, BaseException):
                    done = True
                    raise item
                yield item
                if item.finished:
                    done = True
                    return
        finally:
            if not done:
                self.abort(request_id)

    def _enqueue(
        self, prompt: PromptInput, params: SamplingParams, request_id: str, cache_salt: str | None = None
    ) -> _Submission:
        if self._dead is not None:
            raise RuntimeError(f"engine is dead: {self._dead!r}")
        if self._thread is None:
            raise RuntimeError("AsyncEngine.start() must be called before submit()")
        self.engine.check_request(prompt, params)  # ValueError on the caller's thread
        validate_cache_salt(cache_salt)
        sub = _Submission(str(request_id), prompt, params, asyncio.get_running_loop(), asyncio.Queue(), cache_salt)
        with self._cond:
            if sub.request_id in self._subs:
                raise ValueError(f"request_id={sub.request_id!r} is already in flight")
            if self._stats.queued + len(self._inbox) >= self.max_queue:
                raise QueueFullError(f"queue is full ({self.max_queue} waiting requests)")
            self._subs[sub.request_id] = sub
            self._inbox.append(sub)
            self._cond.notify_all()
        return sub

    def abort(self, request_id: str) -> None:
        """Thread-safe; the request's pages are free within one step."""
        with self._cond:
            if request_id in self._subs:
                self._aborts.append(request_id)
                self._cond.notify_all()

    async def embed(
        self, texts: Sequence[str], normalize: bool | None = None, *, truncate: bool = False
    ) -> list[list[float]]:
        """``Engine.embed`` off the event loop (``normalize=None``: as the checkpoint does)."""

        def run() -> list[list[float]]:
            with self._embed_lock:
                return self.engine.embed(list(texts), normalize=normalize, truncate=truncate).tolist()

        return await asyncio.to_thread(run)

    # -- the step thread ----------------------------------------------------------------

    def _read_stats(self, queued_extra: int) -> EngineStats:
        s = self.engine.scheduler
        if s is None:
            return EngineStats(queued_extra, 0, 0, 0)
        return EngineStats(
            s.num_waiting + queued_extra, s.num_running, s.pages_used, s.pages_total,
            getattr(s, "prefix_cache_queries", 0), getattr(s, "prefix_cache_hits", 0),
        )

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._stop and not self._inbox and not self._aborts and not self.engine.has_unfinished():
                        self._cond.wait()
                    if self._stop:
                        return
                    inbox, self._inbox = self._inbox, []
                    aborts, self._aborts = self._aborts, []
                deltas = self._admit(inbox, aborts)
                if self.engine.has_unfinished():
                    deltas += self.engine.step()
                stats = self._read_stats(queued_extra=0)
                with self._cond:
                    self._stats = stats  # before delivery: a submitter that sees its end sees the pages freed
                self._log_stats(stats)
                for delta in deltas:
                    self._deliver(delta)
        except BaseException as e:  # the engine dies; everyone in flight hears about it
            logger.exception("engine step loop failed")
            self._fail_all(e)

    def _log_stats(self, stats: EngineStats) -> None:
        """The periodic engine log line (at most every ``STATS_LOG_INTERVAL_S`` seconds)."""
        now = time.monotonic()
        if now - self._last_log < STATS_LOG_INTERVAL_S:
            return
        self._last_log = now
        rate = stats.prefix_cache_hits / stats.prefix_cache_queries if stats.prefix_cache_queries else 0.0
        logger.info(
            "engine: %d running, %d queued, KV pages %d/%d used, prefix cache hit rate %.1f%% (%d of %d tokens)",
            stats.running, stats.queued, stats.pages_used, stats.pages_total, 100 * rate,
            stats.prefix_cache_hits, stats.prefix_cache_queries,
        )

    def _admit(self, inbox: list[_Submission], aborts: list[str]) -> list[StreamDelta]:
        """Queue new submissions and apply aborts; returns the deltas that ends produced."""
        out: list[StreamDelta] = []
        aborted = set(aborts)
        for sub in inbox:
            if sub.request_id in aborted:
                out.append(StreamDelta(sub.request_id, "", [], None, True, "abort", None))
                continue
            try:
                self.engine.add_request(sub.prompt, sub.params, request_id=sub.request_id, cache_salt=sub.cache_salt)
            except ValueError as e:  # raced with something the caller-side check could not see
                self._deliver_error(sub, e)
        for rid in aborts:
            delta = self.engine.abort(rid)
            if delta is not None:
                out.append(delta)
        return out

    def _deliver(self, delta: StreamDelta) -> None:
        with self._cond:
            sub = self._subs.get(delta.request_id)
            if sub is not None and delta.finished:
                del self._subs[delta.request_id]
        if sub is None:
            return
        if delta.finished:
            self.engine.take_output(delta.request_id)
        sub.loop.call_soon_threadsafe(sub.queue.put_nowait, delta)

    def _deliver_error(self, sub: _Submission, exc: BaseException) -> None:
        with self._cond:
            self._subs.pop(sub.request_id, None)
        sub.loop.call_soon_threadsafe(sub.queue.put_nowait, exc)

    def _fail_all(self, exc: BaseException) -> None:
        with self._cond:
            self._dead = exc
            subs = list(self._subs.values())
            self._subs.clear()
            self._inbox.clear()
        for sub in subs:
            try:
                sub.loop.call_soon_threadsafe(sub.queue.put_nowait, exc)
            except RuntimeError:  # the submitter's event loop is closed
                pass
