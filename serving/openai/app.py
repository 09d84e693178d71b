"""The OpenAI-compatible HTTP API: a FastAPI app over the shared admission path.

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``,
``POST /v1/embeddings``, ``POST /tokenize``, ``POST /detokenize`` (vLLM's bodies),
``GET /health`` (200 serving, 503 loading, draining or failed), ``GET /version``,
``GET /metrics`` (the server's Prometheus registry, HTTP request counters included).
Health, version and metrics need no API key (as gRPC health and the metrics port);
everything else needs ``Authorization: Bearer KEY`` when the server has a key.

Streams are server-sent events framed by FastAPI's ``fastapi.sse``
(``format_sse_event``, ``EventSourceResponse``): ``data: {json}`` per chunk and
``data: [DONE]`` last. A stream whose client goes away is cancelled by Starlette;
its engine requests are aborted within one step (``_SSEResponse`` closes them even
if the body never started).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.sse import EventSourceResponse, format_sse_event
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.admission import Admission, EngineFailure, QueueFull, RequestError, Unavailable, count_tokens
from serving.binding import EngineBinding
from serving.openai import errors
from serving.openai import generation as g
from serving.openai import protocol as p
from serving.openai.chat_template import ChatTemplate, ChatTemplateError
from serving.openai.errors import ApiError

log = logging.getLogger("energon.serving.openai")

DEMO_MODEL_NAME = "energon-demo"


class OpenAIService:
    """What the routes share: the admission path, the served name, the loaded model's template."""

    def __init__(
        self,
        admission: Admission,
        *,
        served_model_name: str,
        api_key: str | None = None,
        chat_template_file: Path | None = None,
    ) -> None:
        self.admission = admission
        self.model_name = served_model_name
        self._key = api_key.encode() if api_key else None
        self._chat_template_file = chat_template_file
        self.chat_template: ChatTemplate | None = None
        self.created = int(time.time())
        self.root = served_model_name

    def load_model_files(self, model_dir: str | None) -> None:
        """Called once the engine is loaded (off the event loop): the chat template, the root."""
        root = Path(model_dir) if model_dir else None
        self.chat_template = ChatTemplate.for_checkpoint(root, self._chat_template_file)
        if model_dir:
            self.root = str(model_dir)

    # -- checks every route makes ------------------------------------------------------------
    def authorize(self, request: Request) -> None:
        if self._key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), self._key):
            raise ApiError(401, "missing or invalid API key", type="authentication_error", code="invalid_api_key")

    def ready(self) -> EngineBinding:
        try:
            return self.admission.ready()
        except Unavailable as e:
            raise errors.from_admission(e) from e

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ApiError(
                404,
                f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                type="invalid_request_error",
                param="model",
                code="model_not_found",
            )


class _SSEResponse(EventSourceResponse):
    """An SSE response that runs ``on_close`` however it ends (even before its body starts)."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]]) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()


def _sse(model: Any) -> bytes:
    return format_sse_event(data_str=model.model_dump_json())


_DONE = format_sse_event(data_str="[DONE]")


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class ClientGone(Exception):
    """The client disconnected before its response was ready."""


async def _unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """Run ``work``; if the client disconnects first, cancel it (its engine requests abort)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        gone = not task.done()
        if gone:
            task.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
    if gone:
        raise ClientGone()
    return task.result()


def build_app(service: OpenAIService, metrics: Any, max_body_bytes: int = 4 * 1024 * 1024) -> FastAPI:
    """The FastAPI app; ``metrics`` is the server's ``ServingMetrics``; larger bodies get 413."""
    app = FastAPI(title="energon-jax OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(RequestValidationError, errors.validation_error_handler)
    app.add_exception_handler(ApiError, errors.api_error_handler)
    app.add_exception_handler(StarletteHTTPException, errors.http_exception_handler)
    app.add_exception_handler(Exception, errors.unexpected_error_handler)
    app.add_middleware(_BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(_RequestCounter, counter=metrics.http_requests)
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
                text = await _render_chat(service, body.messages, body.add_generation_prompt)
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
            vectors = await _unless_disconnected(request, binding.engine.embed(texts, normalize=True))
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

    # -- completions --------------------------------------------------------------------------------
    @app.post("/v1/completions", dependencies=auth, response_model=None)
    async def completions(body: p.CompletionRequest, request: Request) -> Response:
        binding = service.ready()
        service.check_model(body.model)
        renames = {"prompt_token_ids": "prompt"}
        try:
            choices = await _completion_choices(service, binding, body)
        except ValueError as e:
            adm.count("invalid")
            raise errors.from_value_error(e, renames) from e
        return await _respond(service, binding, request, body, choices, chat=False, renames=renames)

    @app.post("/v1/chat/completions", dependencies=auth, response_model=None)
    async def chat_completions(body: p.ChatCompletionRequest, request: Request) -> Response:
        binding = service.ready()
        service.check_model(body.model)
        renames = {"logprobs": "top_logprobs", "prompt_token_ids": "messages", "prompt": "messages"}
        if body.max_completion_tokens is not None:
            renames["max_tokens"] = "max_completion_tokens"
        try:
            choices = await _chat_choices(service, binding, body)
        except ValueError as e:
            adm.count("invalid")
            raise errors.from_value_error(e, renames) from e
        return await _respond(service, binding, request, body, choices, chat=True, renames=renames)

    return app


# -- building the engine requests ------------------------------------------------------------------


def _prompt_list(prompt: Any) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(x, int) for x in prompt):
        return [list(prompt)]
    return list(prompt)


async def _completion_choices(
    service: OpenAIService, binding: EngineBinding, body: p.CompletionRequest
) -> list[g.Choice]:
    adm = service.admission
    g.check_common(body, adm)
    if body.suffix is not None:
        raise RequestError("suffix is not supported by this server", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise RequestError(f"best_of={body.best_of!r} is not supported (only equal to n)", param="best_of")
    if body.echo and body.logprobs is not None:
        raise RequestError("echo with logprobs is not supported: prompt logprobs are not computed", param="echo")
    prompts = _prompt_list(body.prompt)
    adm.check_prompt_count(len(prompts))
    kwargs = g.sampling_kwargs(body, adm)
    if body.logprobs is not None:
        kwargs["logprobs"] = body.logprobs
    early = {} if body.max_tokens is None else {"max_tokens": body.max_tokens}
    binding.params_cls(**kwargs, **early)  # every sampling field checked before any tokenization
    max_model_len = int(binding.engine.info.max_model_len)
    choices = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            ids, echo = await adm.tokenize(binding, prompt, field="prompt"), prompt
        else:
            ids = list(prompt)
            if not ids:
                raise RequestError("prompt must not be empty", param="prompt")
            echo = await adm.detokenize(binding, ids, field="prompt") if body.echo else ""
        max_tokens = g.default_max_tokens(body.max_tokens, len(ids), max_model_len)
        for j in range(body.n):
            params = g.make_params(binding, kwargs, max_tokens, j)
            choices.append(g.Choice(i * body.n + j, ids, params, echo if body.echo else "", body.cache_salt))
    return choices


def _messages_as_dicts(messages: Sequence[p.ChatMessage]) -> list[dict[str, Any]]:
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise RequestError(
                        f"messages[{i}].content[{j}].type={part.type!r} is not supported (only 'text' parts)",
                        param=f"messages[{i}].content[{j}].type",
                    )
                texts.append(part.text)
            content = "\n".join(texts)
        entry: dict[str, Any] = {"role": m.role, "content": content if content is not None else ""}
        if m.name is not None:
            entry["name"] = m.name
        out.append(entry)
    return out


async def _render_chat(service: OpenAIService, messages: Sequence[p.ChatMessage], add_generation_prompt: bool) -> str:
    if service.chat_template is None:
        raise RequestError(
            f"model {service.model_name!r} has no chat template (no chat_template in tokenizer_config.json, "
            "no chat_template.jinja): use /v1/completions, or start the server with --chat-template FILE",
            param="messages",
        )
    if not messages:
        raise RequestError("messages must not be empty", param="messages")
    dicts = _messages_as_dicts(messages)
    service.admission.check_prompt_chars(sum(len(d["content"]) for d in dicts), "messages")
    template = service.chat_template
    try:
        return await asyncio.to_thread(template.render, dicts, add_generation_prompt=add_generation_prompt)
    except ChatTemplateError as e:
        raise RequestError(str(e), param="messages") from e


async def _chat_choices(
    service: OpenAIService, binding: EngineBinding, body: p.ChatCompletionRequest
) -> list[g.Choice]:
    adm = service.admission
    g.check_common(body, adm)
    if body.response_format is not None and body.response_format.type != "text":
        raise RequestError(
            f"response_format type={body.response_format.type!r} is not supported (only 'text')",
            param="response_format",
        )
    if body.tools:
        raise RequestError("tools are not supported by this server", param="tools")
    if body.top_logprobs is not None and not body.logprobs:
        raise RequestError("top_logprobs needs logprobs: true", param="top_logprobs")
    kwargs = g.sampling_kwargs(body, adm)
    if body.logprobs:
        kwargs["logprobs"] = body.top_logprobs or 0
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    early = {} if requested is None else {"max_tokens": requested}
    binding.params_cls(**kwargs, **early)  # every sampling field checked before rendering and tokenizing
    text = await _render_chat(service, body.messages, body.add_generation_prompt)
    ids = await adm.tokenize(binding, text, field="messages", add_special_tokens=False)
    max_tokens = g.default_max_tokens(requested, len(ids), int(binding.engine.info.max_model_len))
    return [
        g.Choice(j, ids, g.make_params(binding, kwargs, max_tokens, j), cache_salt=body.cache_salt)
        for j in range(body.n)
    ]


# -- responses --------------------------------------------------------------------------------------


async def _respond(
    service: OpenAIService,
    binding: EngineBinding,
    request: Request,
    body: Any,
    choices: list[g.Choice],
    *,
    chat: bool,
    renames: dict[str, str] | None = None,
) -> Response:
    adm = service.admission
    rid = g.new_id("chatcmpl" if chat else "cmpl")
    adm.enter()  # left when the response is done (for a stream: when its body ends or never starts)
    try:
        streams = await g.open_choices(adm, binding, choices, label=rid)
    except ValueError as e:
        adm.leave()
        raise errors.from_value_error(e, renames) from e
    except (QueueFull, Unavailable, EngineFailure) as e:
        adm.leave()
        raise errors.from_admission(e) from e
    except BaseException:
        adm.leave()
        raise
    token_text = g.TokenText(binding.engine.tokenizer)
    if body.stream:
        return _stream_response(service, body, choices, streams, rid, token_text, chat)
    states = g.new_states(choices)
    try:
        await _unless_disconnected(request, g.run_to_end(streams, states))
    except ClientGone:
        return Response(status_code=499)  # nobody reads it; nginx's code for "client closed request"
    except ValueError as e:
        raise errors.from_value_error(e, renames) from e
    except (QueueFull, Unavailable, EngineFailure) as e:
        raise errors.from_admission(e) from e
    finally:
        for s in streams:
            await s.aclose()
        adm.leave()
    usage = g.usage_of(states, body.n)
    created = g.now()
    if chat:
        top_n = body.top_logprobs or 0
        return JSONResponse(p.ChatCompletionResponse(
            id=rid, created=created, model=service.model_name, usage=usage,
            choices=[p.ChatChoice(
                index=s.choice.index, message=p.ChatMessageOut(content=s.text), finish_reason=s.finish_reason,
                logprobs=g.chat_logprobs(s, token_text, 0, len(s.token_ids), top_n) if body.logprobs else None,
            ) for s in states],
        ).model_dump(mode="json"))  # fmt: skip
    out = []
    for s in states:
        lp = None
        if body.logprobs is not None:
            lp, _ = g.completion_logprobs(s, token_text, 0, len(s.token_ids), len(s.choice.echo_text))
        out.append(p.CompletionChoice(
            index=s.choice.index, text=s.choice.echo_text + s.text, logprobs=lp, finish_reason=s.finish_reason
        ))  # fmt: skip
    resp = p.CompletionResponse(id=rid, created=created, model=service.model_name, choices=out, usage=usage)
    return JSONResponse(resp.model_dump(mode="json"))


def _stream_response(
    service: OpenAIService,
    body: Any,
    choices: list[g.Choice],
    streams: list[Any],
    rid: str,
    token_text: g.TokenText,
    chat: bool,
) -> Response:
    adm = service.admission
    created = g.now()
    model = service.model_name
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    closed = False

    async def close() -> None:
        nonlocal closed
        if closed:
            return
        closed = True
        try:  # each aclose aborts its request before its first await, so a cancelled close still aborts
            for s in streams:
                await s.aclose()
        finally:
            adm.leave()

    def chunk(state: g._ChoiceState, finished: bool) -> Any:
        start, end = state.pending_from, len(state.token_ids)
        text = state.text[len(state.sent_text) :]
        state.sent_text = state.text
        state.pending_from = end
        reason = state.finish_reason if finished else None
        if chat:
            lp = None
            if body.logprobs:
                lp = g.chat_logprobs(state, token_text, start, end, body.top_logprobs or 0)
            delta = p.ChatDelta(content=text) if text or not finished else p.ChatDelta()
            return p.ChatCompletionChunk(id=rid, created=created, model=model, choices=[
                p.ChatChunkChoice(index=state.choice.index, delta=delta, logprobs=lp, finish_reason=reason)
            ])  # fmt: skip
        lp = None
        if body.logprobs is not None:
            lp, state.offset = g.completion_logprobs(state, token_text, start, end, state.offset)
        return p.CompletionChunk(id=rid, created=created, model=model, choices=[
            p.CompletionChoice(index=state.choice.index, text=text, logprobs=lp, finish_reason=reason)
        ])  # fmt: skip

    async def events() -> AsyncIterator[bytes]:
        try:
            for c in choices:  # the opening chunk of each choice: the role (chat) or the echo
                if chat:
                    yield _sse(p.ChatCompletionChunk(id=rid, created=created, model=model, choices=[
                        p.ChatChunkChoice(index=c.index, delta=p.ChatDelta(role="assistant", content=""))
                    ]))  # fmt: skip
                elif c.echo_text:
                    yield _sse(p.CompletionChunk(id=rid, created=created, model=model, choices=[
                        p.CompletionChoice(index=c.index, text=c.echo_text)
                    ]))  # fmt: skip
            states = g.new_states(choices)
            try:
                async for state, finished in g.merged(streams, states):
                    if finished or state.text != state.sent_text:
                        yield _sse(chunk(state, finished))
            except (QueueFull, Unavailable, EngineFailure) as e:  # headers are sent: an error event
                yield _sse(p.ErrorResponse(error=errors.from_admission(e).body))
                yield _DONE
                return
            except ValueError as e:
                yield _sse(p.ErrorResponse(error=errors.from_value_error(e).body))
                yield _DONE
                return
            if include_usage:
                usage = g.usage_of(states, body.n)
                cls = p.ChatCompletionChunk if chat else p.CompletionChunk
                yield _sse(cls(id=rid, created=created, model=model, choices=[], usage=usage))
            yield _DONE
        finally:
            await close()

    return _SSEResponse(events(), close)


class _BodyLimit:
    """ASGI middleware: a body whose Content-Length exceeds the limit gets 413 before it is read."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self._app = app
        self._max = max_bytes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            length = dict(scope.get("headers") or ()).get(b"content-length", b"0")
            if length.isdigit() and int(length) > self._max:
                message = f"request body of {int(length)} bytes is larger than {self._max} (--max-message-bytes)"
                body = p.ErrorBody(message=message, type="invalid_request_error", code="request_too_large")
                await errors.error_response(413, body)(scope, receive, send)
                return
        await self._app(scope, receive, send)


class _RequestCounter:
    """ASGI middleware: count HTTP requests by method, route and status (no per-URL labels)."""

    def __init__(self, app: Any, counter: Any) -> None:
        self._app = app
        self._counter = counter

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        status = {"code": 500}

        async def send_counting(message: Any) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self._app(scope, receive, send_counting)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self._counter.labels(scope.get("method", ""), path, str(status["code"])).inc()
