"""The OpenAI HTTP backend of the load generator: streamed ``/v1/completions`` over httpx.

Each work item becomes one ``POST /v1/completions`` with the prompt as token ids (so
the HTTP and gRPC runs of one seeded workload send the same tokens), ``stream: true``
and ``stream_options.include_usage``. The server-sent events are read as they arrive:
the first chunk with text is the first token (TTFT), each later one an inter-token gap,
and the final usage chunk gives the token count that TPOT divides by (as ``vllm bench
serve`` measures an OpenAI server). A status other than 200, an error object in the
stream, or a stream that stops before ``data: [DONE]`` is an error of that request;
``loadgen.check_response`` then judges the answer itself (aborted, empty, short).

The server speaks for itself here: anything that follows the OpenAI completions API
(``energon serve``'s HTTP port, vLLM, SGLang) can be measured with the same code.
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from serving.loadgen import Record, WorkItem, check_response, new_request_id


@dataclass(frozen=True)
class HttpTarget:
    base_url: str  # http://HOST:PORT (a trailing /v1 is accepted)
    model: str | None = None  # None: the first model the server lists
    api_key: str | None = field(default=None, repr=False)
    tls_ca: Path | None = None  # verify an https server against this CA
    tls_cert: Path | None = None  # client certificate (mutual TLS)
    tls_key: Path | None = None

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url={self.base_url!r} must start with http:// or https://")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")

    @property
    def root(self) -> str:
        url = self.base_url.rstrip("/")
        return url[: -len("/v1")] if url.endswith("/v1") else url


def completion_body(item: WorkItem, model: str) -> dict[str, Any]:
    """The streamed ``/v1/completions`` request for one work item (vLLM's extras for top_k and ignore_eos)."""
    p = item.params
    body: dict[str, Any] = {
        "model": model,
        "prompt": list(item.prompt),
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    for name in ("max_tokens", "temperature", "top_p", "top_k", "seed", "ignore_eos"):
        if p.HasField(name):
            body[name] = getattr(p, name)
    if p.stop:
        body["stop"] = list(p.stop)
    return body


def _error_text(raw: bytes) -> str:
    try:
        err = json.loads(raw)
        return str(err.get("error", {}).get("message") or err) if isinstance(err, dict) else str(err)
    except ValueError:
        return raw.decode(errors="replace")[:200]


class OpenAIBackend:
    """Sends work items to an OpenAI-compatible server (``loadgen.Backend``)."""

    def __init__(self, client: httpx.AsyncClient, model: str, headers: dict[str, str] | None = None) -> None:
        self.client, self.model, self._headers = client, model, headers or {}

    async def send(self, item: WorkItem, timeout_s: float | None = None) -> Record:
        rid = new_request_id(item.label)
        # The id goes out as vLLM's X-Request-Id header; the server may use its own.
        headers = {**self._headers, "X-Request-Id": rid}
        rec = Record(rid, label=item.label, sent=time.perf_counter())
        try:
            async with self.client.stream(
                "POST", "/v1/completions", json=completion_body(item, self.model), headers=headers,
                timeout=timeout_s,
            ) as resp:  # fmt: skip
                if resp.status_code != 200:
                    rec.error, rec.error_details = f"HTTP_{resp.status_code}", _error_text(await resp.aread())
                else:
                    await self._read_stream(resp, rec)
        except httpx.HTTPError as e:  # refused, reset, timed out
            rec.error, rec.error_details = type(e).__name__, str(e)
        rec.done = time.perf_counter()
        return check_response(rec, item)

    @staticmethod
    async def _read_stream(resp: httpx.Response, rec: Record) -> None:
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue  # blank separators, comments, event names
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                return
            now = time.perf_counter()
            chunk = json.loads(data)
            if "error" in chunk:
                rec.error, rec.error_details = "STREAM_ERROR", str(chunk["error"].get("message", chunk["error"]))
                return
            for choice in chunk.get("choices") or ():
                if choice.get("text"):
                    rec.text += choice["text"]
                    rec.token_times.append(now)
                if choice.get("finish_reason"):
                    rec.finish_reason = choice["finish_reason"]
            if chunk.get("usage"):
                rec.output_tokens = int(chunk["usage"]["completion_tokens"])
                rec.prompt_tokens = int(chunk["usage"]["prompt_tokens"])
        rec.error, rec.error_details = "INCOMPLETE", "the stream ended before data: [DONE]"


def _ssl(target: HttpTarget) -> ssl.SSLContext | bool:
    if target.tls_ca is None:
        return True  # the system's CAs (https) / unused (http)
    ctx = ssl.create_default_context(cafile=str(target.tls_ca))
    if target.tls_cert is not None:
        ctx.load_cert_chain(str(target.tls_cert), str(target.tls_key))
    return ctx


@asynccontextmanager
async def open_backend(target: HttpTarget) -> AsyncIterator[tuple[OpenAIBackend, dict[str, Any]]]:
    """An ``OpenAIBackend`` on one connection pool, and the served model's ``/v1/models`` entry."""
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    # No pool limit: an open-loop burst must not queue behind httpx's 100 connections.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=target.root, verify=_ssl(target), limits=limits, timeout=60.0) as client:
        try:
            resp = await client.get("/v1/models", headers=headers)
        except httpx.HTTPError as e:
            raise ValueError(f"cannot reach {target.root}/v1/models: {type(e).__name__}: {e}") from e
        if resp.status_code != 200:
            raise ValueError(f"GET {target.root}/v1/models: HTTP {resp.status_code}: {_error_text(resp.content)}")
        cards = resp.json().get("data") or []
        if not cards:
            raise ValueError(f"GET {target.root}/v1/models lists no model")
        if target.model is None:
            card = cards[0]
        else:
            card = next((c for c in cards if c.get("id") == target.model), None)
            if card is None:
                served = [c.get("id") for c in cards]
                raise ValueError(f"model={target.model!r} is not served by {target.root}; it serves {served}")
        yield OpenAIBackend(client, card["id"], headers), card
