"""The OpenAI-compatible HTTP API: a FastAPI app over the shared admission path.

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``,
``POST /v1/embeddings``, ``POST /tokenize``, ``POST /detokenize`` (vLLM's bodies),
``GET /health`` (200 serving, 503 loading, draining or failed), ``GET /version``,
``GET /metrics`` (the server's Prometheus registry, HTTP request counters included).
Health, version and metrics need no API key (as gRPC health and the metrics port);
everything else needs ``Authorization: Bearer KEY`` when the server has a key.

The parts: ``service.py`` (what routes share), ``choices.py`` (bodies into engine
requests), ``responses.py`` (JSON and SSE answers), ``middleware.py``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.admission import RequestError, count_tokens
from serving.openai import errors
from serving.openai import generation as g
from serving.openai import protocol as p
from serving.openai.choices import chat_choices, completion_choices, render_chat
from serving.openai.errors import ApiError
from serving.openai.middleware import BodyLimit, RequestCounter
from serving.openai.responses import respond, unless_disconnected
from serving.openai.service import DEMO_MODEL_NAME, OpenAIService

__all__ = ["DEMO_MODEL_NAME", "OpenAIService", "build_app"]

log = logging.getLogger("energon.serving.openai")


def build_app(service: OpenAIService, metrics: Any, max_body_bytes: int = 4 * 1024 * 1024) -> FastAPI:
    """The FastAPI app; ``metrics`` is the server's ``ServingMetrics``; larger bodies get 413."""
    app = FastAPI(title="energon-jax OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(RequestValidationError, errors.validation_error_handler)
    app.add_exception_handler(ApiError, errors.api_error_handler)
    app.add_exception_handler(StarletteHTTPException, errors.http_exception_handler)
    app.add_exception_handler(Exception, errors.unexpected_error_handler)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(RequestCounter, counter=metrics.http_requests)
    adm = service.admission
    auth = [Depends(service.authorize)]

    # -- unauthenticated ------------------------------------------------------------------------
    @app.get("/health", response_model=p.HealthResponse)
    async def health() -> JSONResponse:
        status = adm.state
        return JSONResponse(p.HealthResponse(status=status).model_dump(), status_code=200 if adm.serving else 503)

    @app.get("/version", response_model=p.VersionResponse)
    async def version() -> p.VersionResponse:
        from energon_jax import __version__

        return p.VersionResponse(version=__version__)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # -- models, tokenizer ----------------------------------------------------------------------
    @app.get("/v1/models", dependencies=auth, response_model=p.ModelList)
    async def models() -> p.ModelList:
        binding = service.ready()
        card = p.ModelCard(
            id=service.model_name, created=service.created, root=service.root,
            max_model_len=int(binding.engine.info.max_model_len),
        )  # fmt: skip
        return p.ModelList(data=[card])

    @app.post("/tokenize", dependencies=auth, response_model=p.TokenizeResponse)
    async def tokenize(body: p.TokenizeRequest) -> p.TokenizeResponse:
        binding = service.ready()
        service.check_model(body.model)
        try:
            if (body.prompt is None) == (body.messages is None):
                raise RequestError("give exactly one of prompt or messages", param="prompt")
            if body.messages is not None:
                text = await render_chat(service, body.messages, body.add_generation_prompt)
                ids = await adm.tokenize(binding, text, field="messages", add_special_tokens=False)
            elif body.prompt == "":
                ids = []
            else:
                ids = await adm.tokenize(binding, body.prompt, add_special_tokens=body.add_special_tokens)
        except ValueError as e:
            raise errors.from_value_error(e) from e
        max_len = int(binding.engine.info.max_model_len)
        return p.TokenizeResponse(count=len(ids), max_model_len=max_len, tokens=[int(t) for t in ids])

    @app.post("/detokenize", dependencies=auth, response_model=p.DetokenizeResponse)
    async def detokenize(body: p.DetokenizeRequest) -> p.DetokenizeResponse:
        binding = service.ready()
        service.check_model(body.model)
        try:
            adm.check_prompt_chars(len(body.tokens), "tokens")
            return p.DetokenizeResponse(prompt=await adm.detokenize(binding, body.tokens))
        except ValueError as e:
            raise errors.from_value_error(e) from e

    # -- embeddings -----------------------------------------------------------------------------
    @app.post("/v1/embeddings", dependencies=auth, response_model=p.EmbeddingResponse)
    async def embeddings(body: p.EmbeddingRequest, request: Request) -> p.EmbeddingResponse:
        binding = service.ready()
        service.check_model(body.model)
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        try:
            if any(not isinstance(t, str) for t in texts):
                raise RequestError("input as token ids is not supported for embeddings: send text", param="input")
            adm.check_embed_texts(texts, "input")
        except ValueError as e:
            adm.count("invalid")
            raise errors.from_value_error(e) from e
        adm.enter()
        try:
            vectors = await unless_disconnected(request, binding.engine.embed(texts, normalize=True))
            tokenizer = binding.engine.tokenizer
            counts = await asyncio.to_thread(count_tokens, tokenizer, texts) if tokenizer else []
        except ValueError as e:
            raise errors.invalid(
                f"model {service.model_name!r} cannot produce embeddings: {e}", param="model"
            ) from e
        finally:
            adm.leave()
        data = [p.EmbeddingData(index=i, embedding=[float(v) for v in vec]) for i, vec in enumerate(vectors)]
        total = sum(counts)
        return p.EmbeddingResponse(
            data=data, model=service.model_name, usage=p.EmbeddingUsage(prompt_tokens=total, total_tokens=total)
        )

    # -- completions and chat -----------------------------------------------------------------------
    async def generate(
        body: Any, request: Request, build: Callable[..., Awaitable[list[g.Choice]]], *, chat: bool,
        renames: dict[str, str],
    ) -> Response:
        binding = service.ready()
        service.check_model(body.model)
        try:
            choices = await build(service, binding, body)
        except ValueError as e:
            adm.count("invalid")
            raise errors.from_value_error(e, renames) from e
        return await respond(service, binding, request, body, choices, chat=chat, renames=renames)

    @app.post("/v1/completions", dependencies=auth, response_model=None)
    async def completions(body: p.CompletionRequest, request: Request) -> Response:
        return await generate(body, request, completion_choices, chat=False, renames={"prompt_token_ids": "prompt"})

    @app.post("/v1/chat/completions", dependencies=auth, response_model=None)
    async def chat_completions(body: p.ChatCompletionRequest, request: Request) -> Response:
        renames = {"logprobs": "top_logprobs", "prompt_token_ids": "messages", "prompt": "messages"}
        if body.max_completion_tokens is not None:
            renames["max_tokens"] = "max_completion_tokens"
        return await generate(body, request, chat_choices, chat=True, renames=renames)

    return app
