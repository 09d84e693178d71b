"""Turning an OpenAI completion or chat body into engine requests (one ``Choice`` per prompt x n).

Every sampling field is checked before anything is tokenized, and every error names the
OpenAI field (``RequestError(param=...)``), so a bad body costs no engine work.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from serving.admission import RequestError
from serving.binding import EngineBinding
from serving.openai import generation as g
from serving.openai import protocol as p
from serving.openai.chat_template import ChatTemplateError
from serving.openai.service import OpenAIService


def _prompt_list(prompt: Any) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(x, int) for x in prompt):
        return [list(prompt)]
    return list(prompt)


async def completion_choices(
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


async def render_chat(service: OpenAIService, messages: Sequence[p.ChatMessage], add_generation_prompt: bool) -> str:
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


async def chat_choices(
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
    text = await render_chat(service, body.messages, body.add_generation_prompt)
    ids = await adm.tokenize(binding, text, field="messages", add_special_tokens=False)
    max_tokens = g.default_max_tokens(requested, len(ids), int(binding.engine.info.max_model_len))
    return [
        g.Choice(j, ids, g.make_params(binding, kwargs, max_tokens, j), cache_salt=body.cache_salt)
        for j in range(body.n)
    ]
