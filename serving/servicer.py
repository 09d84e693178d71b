"""The ``energon.v1.Inference`` service: gRPC requests in, AsyncEngine calls out.

Every call goes through the shared admission path (``serving/admission.py``):
limits before any work, tokenization once and off the event loop, server-owned
request ids (the client's ``request_id`` is only a label echoed back in each
response), and one place that aborts a request whose call ended early (client
cancel, deadline, drain), so its pages go back to the pool within one step.
Errors map to status codes here:

- ``ValueError`` (the runtime's ``SamplingParams`` and prompt checks, admission
  limits) -> INVALID_ARGUMENT, with the message (it names the field);
- ``QueueFull`` -> RESOURCE_EXHAUSTED, at once;
- ``EngineFailure`` -> INTERNAL (the server has been told and exits non-zero);
- ``Unavailable`` (loading, draining, engine failed) -> UNAVAILABLE.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc import aio

from serving.admission import Admission, EngineFailure, QueueFull, Unavailable
from serving.binding import EngineBinding
from serving.convert import (
    embeddings_to_proto,
    info_to_proto,
    params_from_proto,
    response_from_delta,
)
from serving.protos.energon.v1 import inference_pb2 as pb
from serving.protos.energon.v1 import inference_pb2_grpc as pb_grpc

log = logging.getLogger("energon.serving")


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(self, admission: Admission) -> None:
        self._admission = admission

    async def _ready(self, context: aio.ServicerContext) -> EngineBinding:
        try:
            return self._admission.ready()
        except Unavailable as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))

    # -- Generate ----------------------------------------------------------------------------
    async def Generate(
        self, request: pb.GenerateRequest, context: aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        adm = self._admission
        binding = await self._ready(context)
        # Echoed in every response (one is made up when empty); the engine's id is the server's own.
        label = request.request_id or uuid.uuid4().hex
        adm.enter()  # in flight until the final status is sent, so a drain waits for it
        failure: tuple[grpc.StatusCode, str] | None = None
        stream: AsyncIterator[Any] | None = None
        submitted = False  # from here on the admission path counts the request's outcome
        try:
            try:
                adm.check_stop(list(request.params.stop), "stop")
                params = params_from_proto(request.params, binding.params_cls)
                prompt_ids = await self._prompt_ids(binding, request)
                submitted = True
                salt = request.cache_salt if request.HasField("cache_salt") else None
                stream = await adm.open_stream(
                    binding, prompt_ids, params, label=label, cancel_reason=lambda: _cancel_reason(context),
                    cache_salt=salt,
                )
                async for delta in stream:
                    yield response_from_delta(label, delta)
            except ValueError as e:
                if not submitted:
                    adm.count("invalid")
                failure = (grpc.StatusCode.INVALID_ARGUMENT, str(e))
            except QueueFull as e:
                failure = (grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
            except EngineFailure as e:
                failure = (grpc.StatusCode.INTERNAL, str(e))
            except Unavailable as e:
                failure = (grpc.StatusCode.UNAVAILABLE, str(e))
        finally:
            # Cancelled while suspended at a yield, the stream would only be closed (and the
            # request aborted) when garbage-collected: close it now.
            if stream is not None:
                await stream.aclose()
            adm.leave()
        if failure is not None:
            await context.abort(*failure)

    async def _prompt_ids(self, binding: EngineBinding, request: pb.GenerateRequest) -> list[int]:
        which = request.WhichOneof("prompt")
        if which == "text":
            return await self._admission.tokenize(binding, request.text, field="prompt text")
        if which == "token_ids":
            return list(request.token_ids.ids)
        raise ValueError("prompt must be set: give text or token_ids")

    # -- unary methods ---------------------------------------------------------------------
    async def Embed(self, request: pb.EmbedRequest, context: aio.ServicerContext) -> pb.EmbedResponse:
        adm = self._admission
        binding = await self._ready(context)
        adm.enter()
        try:
            texts = list(request.texts)
            adm.check_embed_texts(texts, "texts")
            vectors = await binding.engine.embed(texts, normalize=request.normalize)
            return embeddings_to_proto(vectors)
        except ValueError as e:
            failure = (grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except Exception as e:
            log.error("embed failed: %r", e)
            failure = (grpc.StatusCode.INTERNAL, f"embed failed: {type(e).__name__}")
        finally:
            adm.leave()
        await context.abort(*failure)

    async def Tokenize(self, request: pb.TokenizeRequest, context: aio.ServicerContext) -> pb.TokenizeResponse:
        binding = await self._ready(context)
        if binding.engine.tokenizer is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this model has no tokenizer (tokenizer.json)")
        try:
            self._admission.check_prompt_chars(len(request.text), "text")
            ids = await self._admission.tokenize(binding, request.text, field="text") if request.text else []
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return pb.TokenizeResponse(token_ids=[int(t) for t in ids])

    async def ModelInfo(self, request: pb.ModelInfoRequest, context: aio.ServicerContext) -> pb.ModelInfoResponse:
        binding = await self._ready(context)
        return info_to_proto(binding.engine.info)


def _cancel_reason(context: aio.ServicerContext) -> str:
    remaining = context.time_remaining()
    return "deadline" if remaining is not None and remaining <= 0 else "cancelled"
