"""The ``energon.v1.Inference`` service: gRPC requests in, AsyncEngine calls out.

One Generate call is one ``engine.submit`` stream. Whatever ends the call
early (the client cancels, its deadline expires, the server stops it) lands in
a ``finally`` that aborts the request in the engine, so its pages go back to
the pool within one step. Errors map to status codes in one place:

- ``ValueError`` from ``SamplingParams`` or ``submit`` -> INVALID_ARGUMENT, with
  the runtime's message (it names the field);
- the runtime's ``QueueFullError`` -> RESOURCE_EXHAUSTED, at once;
- anything else from the engine -> INTERNAL, and the server is told the engine
  is broken (``on_engine_failure``): it turns NOT_SERVING and exits non-zero;
- not loaded yet, or draining -> UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from grpc import aio

from serving.binding import EngineBinding
from serving.convert import (
    embeddings_to_proto,
    info_to_proto,
    params_from_proto,
    prompt_from_proto,
    response_from_delta,
)
from serving.metrics import ServingMetrics
from serving.protos.energon.v1 import inference_pb2 as pb
from serving.protos.energon.v1 import inference_pb2_grpc as pb_grpc

log = logging.getLogger("energon.serving")


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(self, metrics: ServingMetrics, on_engine_failure: Callable[[BaseException], None]) -> None:
        self._metrics = metrics
        self._on_engine_failure = on_engine_failure
        self._binding: EngineBinding | None = None
        self._draining = False
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    # -- lifecycle (called by the server on the event loop) ---------------------------------
    def attach(self, binding: EngineBinding) -> None:
        self._binding = binding

    def start_draining(self) -> None:
        self._draining = True

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

    def _enter(self) -> None:
        self._inflight += 1
        self._idle.clear()

    def _leave(self) -> None:
        self._inflight -= 1
        if self._inflight == 0:
            self._idle.set()

    async def _ready(self, context: aio.ServicerContext) -> EngineBinding:
        if self._draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
        if self._binding is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "model is still loading")
        return self._binding

    # -- Generate ----------------------------------------------------------------------------
    async def Generate(
        self, request: pb.GenerateRequest, context: aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        binding = await self._ready(context)
        arrived = time.perf_counter()
        request_id = request.request_id or uuid.uuid4().hex
        try:
            prompt = prompt_from_proto(request)
            params = params_from_proto(request.params, binding.params_cls)
        except ValueError as e:
            self._metrics.finished.labels("invalid").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        self._enter()
        responses = self._generate(binding, request_id, prompt, params, arrived, context)
        try:  # in flight until the final status is sent, so a drain waits for it
            async for resp in responses:
                yield resp
        finally:
            # Cancelled while suspended at a yield, the inner generator would only be
            # closed (and the request aborted) when garbage-collected: close it now.
            await responses.aclose()
            self._leave()

    async def _generate(
        self,
        binding: EngineBinding,
        request_id: str,
        prompt: str | list[int],
        params: Any,
        arrived: float,
        context: aio.ServicerContext,
    ) -> AsyncIterator[pb.GenerateResponse]:
        engine = binding.engine
        stream = engine.submit(prompt, params, request_id=request_id)
        reason: str | None = None  # set when the engine finished the request
        failure: tuple[grpc.StatusCode, str] | None = None
        last_token_at: float | None = None
        try:
            try:
                async for delta in stream:
                    now = time.perf_counter()
                    n = len(delta.token_ids)
                    if n:
                        if last_token_at is None:
                            self._metrics.ttft.observe(now - arrived)
                        else:
                            for _ in range(n):
                                self._metrics.inter_token.observe((now - last_token_at) / n)
                        last_token_at = now
                        self._metrics.generated_tokens.inc(n)
                    if delta.finished:
                        reason = delta.finish_reason or "stop"
                        self._metrics.e2e.observe(now - arrived)
                        if delta.usage is not None:
                            self._metrics.prompt_tokens.inc(delta.usage.prompt_tokens)
                        self._metrics.finished.labels(reason).inc()
                    yield response_from_delta(request_id, delta)
                    if delta.finished:
                        break
            except ValueError as e:
                failure = (grpc.StatusCode.INVALID_ARGUMENT, str(e))
                self._metrics.finished.labels("invalid").inc()
            except binding.queue_full_error as e:
                failure = (grpc.StatusCode.RESOURCE_EXHAUSTED, str(e) or "request queue is full")
                self._metrics.finished.labels("rejected").inc()
            except Exception as e:  # the engine broke: this request and the server are done
                log.error("engine failed while serving request %s: %r", request_id, e)
                failure = (grpc.StatusCode.INTERNAL, f"engine failure: {type(e).__name__}")
                self._metrics.finished.labels("error").inc()
                self._on_engine_failure(e)
            if reason is None and failure is None:  # the stream ended without a finished delta
                failure = (grpc.StatusCode.INTERNAL, "engine stream ended before the request finished")
                self._metrics.finished.labels("error").inc()
        except (asyncio.CancelledError, GeneratorExit):  # the client went away or the deadline passed
            self._metrics.finished.labels("deadline" if _deadline_passed(context) else "cancelled").inc()
            raise
        finally:
            if reason is None:
                engine.abort(request_id)
            await _close(stream)
        if failure is not None:
            await context.abort(*failure)

    # -- unary methods ---------------------------------------------------------------------
    async def Embed(self, request: pb.EmbedRequest, context: aio.ServicerContext) -> pb.EmbedResponse:
        binding = await self._ready(context)
        self._enter()
        try:
            vectors = await binding.engine.embed(list(request.texts), normalize=request.normalize)
            return embeddings_to_proto(vectors)
        except ValueError as e:
            failure = (grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except Exception as e:
            log.error("embed failed: %r", e)
            failure = (grpc.StatusCode.INTERNAL, f"embed failed: {type(e).__name__}")
        finally:
            self._leave()
        await context.abort(*failure)

    async def Tokenize(self, request: pb.TokenizeRequest, context: aio.ServicerContext) -> pb.TokenizeResponse:
        binding = await self._ready(context)
        tokenizer = binding.engine.tokenizer
        if tokenizer is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this model has no tokenizer (tokenizer.json)")
        try:
            ids = tokenizer.encode(request.text)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return pb.TokenizeResponse(token_ids=[int(t) for t in ids])

    async def ModelInfo(self, request: pb.ModelInfoRequest, context: aio.ServicerContext) -> pb.ModelInfoResponse:
        binding = await self._ready(context)
        return info_to_proto(binding.engine.info)


def _deadline_passed(context: aio.ServicerContext) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0


async def _close(stream: AsyncIterator) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception as e:  # closing must not hide the call's own outcome
            log.debug("closing an engine stream raised %r", e)
