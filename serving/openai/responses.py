"""Answering a completion or chat request: one JSON body, or a stream of server-sent events.

Streams are framed by FastAPI's ``fastapi.sse`` (``format_sse_event``, ``EventSourceResponse``):
``data: {json}`` per chunk and ``data: [DONE]`` last. A stream whose client goes away is
cancelled by Starlette; its engine requests are aborted within one step (``_SSEResponse``
closes them even if the body never started). A non-streamed request whose client goes away
is cancelled too (``unless_disconnected``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from fastapi.sse import EventSourceResponse, format_sse_event

from serving.admission import EngineFailure, QueueFull, Unavailable
from serving.binding import EngineBinding
from serving.openai import errors
from serving.openai import generation as g
from serving.openai import protocol as p
from serving.openai.service import OpenAIService


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


async def unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
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


async def respond(
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
        return stream_response(service, body, choices, streams, rid, token_text, chat)
    states = g.new_states(choices)
    try:
        await unless_disconnected(request, g.run_to_end(streams, states))
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


def stream_response(
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
