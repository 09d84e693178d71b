"""An ``AsyncEngineLike`` (``binding.py``) over a remote ``energon.v1.Inference`` endpoint.

The router has no engine of its own. Its OpenAI HTTP API is the same FastAPI app as
``energon serve``'s (``serving/openai/``: one admission path, the same routes and errors)
over this adapter, whose ``submit`` is a streaming ``Generate`` call to the router's own gRPC
endpoint on loopback. So one routing implementation (``router.py``: least-loaded prefill
server, K/V pulled server to server, decode server, failures, cancels) serves both protocols,
at the cost of one local hop; each response is handed on as it arrives (nothing buffered).

What stays here, in the router's process: the tokenizer (read from the checkpoint directory;
the HTTP API detokenizes for ``echo``, logprobs and ``/detokenize``, which gRPC cannot) and
the model's limits (``ModelInfo``, asked once). Status codes become the exceptions the
admission path maps: INVALID_ARGUMENT / FAILED_PRECONDITION -> ``ValueError`` (400),
RESOURCE_EXHAUSTED -> ``QueueFullError`` (429), UNAVAILABLE -> ``Unavailable`` (503); any
other code is a ``RuntimeError`` (an engine failure of this request, 503).
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from grpc import aio

from energon_jax.request import QueueFullError, SamplingParams, StreamDelta, Usage
from serving.admission import Unavailable
from serving.convert import params_to_proto
from serving.protos.energon.v1 import inference_pb2 as pb
from serving.protos.energon.v1 import inference_pb2_grpc as pb_grpc

_INVALID = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)


@dataclasses.dataclass(frozen=True)
class RemoteModelInfo:
    """``ModelInfo`` as the endpoint reports it (the fields ``AsyncEngine.info`` has)."""

    architecture: str
    max_model_len: int
    vocab_size: int
    layout: dict[str, int]
    model: str


def _error(e: grpc.RpcError) -> Exception:
    code, details = e.code(), e.details() or ""
    if code in _INVALID:
        return ValueError(details)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return QueueFullError(details)
    if code == grpc.StatusCode.UNAVAILABLE:
        return Unavailable(details)
    return RuntimeError(f"{code.name}: {details}")


def delta_from_response(request_id: str, resp: pb.GenerateResponse) -> StreamDelta:
    """The inverse of ``convert.response_from_delta``."""
    ids = [int(t) for t in resp.token_ids]
    logprobs = None
    if resp.logprobs:
        logprobs = []
        for entry in resp.logprobs:
            top = {int(t.token_id): float(t.logprob) for t in entry.top}
            top.setdefault(int(entry.token_id), float(entry.logprob))
            logprobs.append(top)
    finished = bool(resp.finish_reason)
    usage = None
    if finished and resp.HasField("usage"):
        u = resp.usage
        usage = Usage(int(u.prompt_tokens), int(u.completion_tokens), int(u.cached_tokens))
    return StreamDelta(request_id, resp.text, ids, logprobs, finished, resp.finish_reason or None, usage)


class GrpcEngine:
    """Generate, Embed and ModelInfo of an ``energon.v1.Inference`` endpoint, as an engine.

    Build it with ``connect`` inside the event loop that will use it (grpc.aio channels
    belong to one loop); ``close`` at the end.
    """

    def __init__(self, channel: aio.Channel, info: RemoteModelInfo, tokenizer: Any) -> None:
        self.channel = channel  # the router_http health watch shares it
        self._stub = pb_grpc.InferenceStub(channel)
        self.info = info
        self.tokenizer = tokenizer
        self._calls: dict[str, aio.UnaryStreamCall] = {}  # request id -> its Generate call

    @staticmethod
    async def model_info(channel: aio.Channel, timeout_s: float) -> RemoteModelInfo:
        try:
            m = await pb_grpc.InferenceStub(channel).ModelInfo(pb.ModelInfoRequest(), timeout=timeout_s)
        except grpc.RpcError as e:
            raise _error(e) from e
        layout = {k: getattr(m.layout, k) for k in ("dp", "tp", "pp", "processes", "devices")}
        return RemoteModelInfo(m.architecture, m.max_model_len, m.vocab_size, layout, m.model)

    async def remote_tokenize(self, text: str, timeout_s: float = 30.0) -> list[int]:
        """The endpoint's own tokenization (to check that the local tokenizer agrees)."""
        try:
            resp = await self._stub.Tokenize(pb.TokenizeRequest(text=text), timeout=timeout_s)
        except grpc.RpcError as e:
            raise _error(e) from e
        return list(resp.token_ids)

    # -- the AsyncEngineLike seam -----------------------------------------------------------
    def start(self) -> None:  # the endpoint's engines run elsewhere
        pass

    @property
    def stats(self) -> None:  # no pages or queue here: the prefill and decode servers export theirs
        return None

    async def submit(
        self, prompt: str | Sequence[int], params: SamplingParams, *, request_id: str, cache_salt: str | None = None
    ) -> AsyncIterator[StreamDelta]:
        req = pb.GenerateRequest(request_id=request_id, params=params_to_proto(params), cache_salt=cache_salt)
        if isinstance(prompt, str):
            req.text = prompt
        else:
            req.token_ids.ids.extend(int(t) for t in prompt)
        call = self._stub.Generate(req)
        self._calls[request_id] = call
        try:
            async for resp in call:
                yield delta_from_response(request_id, resp)
        except grpc.RpcError as e:  # (a call cancelled here raises asyncio.CancelledError instead)
            raise _error(e) from e
        finally:
            if self._calls.pop(request_id, None) is not None:
                call.cancel()  # a consumer that stopped early cancels the routed request (pages freed)

    def abort(self, request_id: str) -> None:
        call = self._calls.pop(request_id, None)
        if call is not None:
            call.cancel()

    async def embed(self, texts: Sequence[str], normalize: bool = True) -> list[list[float]]:
        try:
            resp = await self._stub.Embed(pb.EmbedRequest(texts=list(texts), normalize=normalize))
        except grpc.RpcError as e:
            raise _error(e) from e
        return [list(v.values) for v in resp.embeddings]

    def shutdown(self) -> None:
        for call in list(self._calls.values()):
            call.cancel()
        self._calls.clear()

    async def close(self) -> None:
        self.shutdown()
        await self.channel.close()
