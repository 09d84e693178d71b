"""The engine's book of requests: what each one has emitted, from queueing to its output taken.

What flows in: requests as the engine queues or adopts them (``track``), and each step's
scheduler deltas (``process``: ``RequestDelta``, one per request at most). What flows out:
the user's ``StreamDelta`` objects (text through each request's ``OutputTracker``, stop
strings matched) and, once a request is finished, its ``RequestOutput`` (``take``).

Which thread: the engine's (whoever calls ``Engine.step``); plain Python, no locks. The
scheduler decides the rows and owns the pages; this book only keeps the output side, so
the engine's step loop, its user API and ``release``/``adopt`` share one ledger.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Sequence
from typing import Any

from energon_jax.output import OutputTracker
from energon_jax.output import add_many as add_texts
from energon_jax.request import Request, RequestOutput, StreamDelta, Usage


@dataclasses.dataclass
class LiveRequest:
    """A request in flight and where its output goes."""

    request: Request
    tracker: OutputTracker
    token_ids: list[int] = dataclasses.field(default_factory=list)  # emitted in deltas so far
    logprobs: list[dict[int, float]] | None = None  # None unless the request asked for logprobs
    finish_reason: str | None = None


class RequestBook:
    """Live requests by id, and finished ones whose ``RequestOutput`` is not taken yet."""

    def __init__(self, tokenizer: Any | None) -> None:
        self._tokenizer = tokenizer
        self._ids = itertools.count()
        self.live: dict[str, LiveRequest] = {}
        self.done: dict[str, LiveRequest] = {}  # finished, RequestOutput not yet taken

    def new_id(self) -> str:
        return f"req-{next(self._ids)}"

    def tracker(self, request: Request) -> OutputTracker:
        """A fresh output tracker for ``request``: its detokenizer and stop strings."""
        params = request.params
        detok = None if self._tokenizer is None else self._tokenizer.detokenizer(params.skip_special_tokens)
        return OutputTracker(detok, params.stop)

    def track(self, request: Request, tracker: OutputTracker, token_ids: Sequence[int] = ()) -> None:
        """Enter a queued (or adopted) request; ``token_ids``: its output already emitted elsewhere."""
        self.live[request.request_id] = LiveRequest(
            request, tracker, token_ids=list(token_ids),
            logprobs=[] if request.params.logprobs is not None else None,
        )

    def process(self, deltas: Sequence[Any], finish: Callable[[str, str], Any]) -> list[StreamDelta]:
        """Turn scheduler deltas (one step's, each request at most once) into the user's
        StreamDeltas (text, stop strings); every row's text is decoded in one call.
        ``finish(request_id, "stop")`` tells the scheduler about a stop string it cannot see."""
        pairs = [(d, live) for d in deltas if (live := self.live.get(d.request.request_id)) is not None]
        # (a request missing from live was aborted while its delta was deferred)
        texts = add_texts([live.tracker for _, live in pairs], [d.new_token_ids for d, _ in pairs],
                          [d.finished for d, _ in pairs])
        out = []
        for (delta, live), text in zip(pairs, texts, strict=True):
            ids = list(delta.new_token_ids)
            logprobs = None if delta.new_logprobs is None else list(delta.new_logprobs)
            reason = delta.finish_reason if delta.finished else None
            if live.tracker.stopped and not delta.finished:
                finish(live.request.request_id, "stop")
                reason = "stop"
            elif live.tracker.stopped:
                reason = "stop"
            if reason is not None:
                out.append(self.finish_delta(live, ids, logprobs, reason, text))
                continue
            live.token_ids.extend(ids)
            if live.logprobs is not None and logprobs is not None:
                live.logprobs.extend(logprobs)
            out.append(StreamDelta(live.request.request_id, text, ids, logprobs, False, None, None))
        return out

    def finish_delta(self, live: LiveRequest, ids, logprobs, reason: str, text: str) -> StreamDelta:
        """The last delta of ``live``, which moves from live to done."""
        live.token_ids.extend(ids)
        if live.logprobs is not None and logprobs is not None:
            live.logprobs.extend(logprobs)
        live.finish_reason = reason
        req = live.request
        if req.finish_time is None:
            req.finish_time = time.monotonic()
        self.live.pop(req.request_id, None)
        self.done[req.request_id] = live
        usage = Usage(len(req.prompt_token_ids), len(live.token_ids), req.num_cached_tokens)
        return StreamDelta(req.request_id, text, ids, logprobs, True, reason, usage)

    def take(self, rid: str) -> RequestOutput:
        """The finished request's output, dropped from the book (``KeyError`` when not done)."""
        live = self.done.pop(rid)
        req = live.request
        return RequestOutput(
            request_id=rid, prompt=req.prompt, prompt_token_ids=list(req.prompt_token_ids),
            token_ids=list(live.token_ids), text=live.tracker.text, finish_reason=live.finish_reason,
            logprobs=live.logprobs, ttft_s=req.ttft_s or 0.0, latency_s=req.latency_s or 0.0,
            num_cached_tokens=req.num_cached_tokens,
        )
