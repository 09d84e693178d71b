"""OpenAI's error shape, and the one mapping from runtime exceptions to HTTP statuses.

Every error leaves as ``{"error": {"message", "type", "param", "code"}}``:

- 400 ``invalid_request_error``: any ``ValueError`` (the runtime's ``SamplingParams``
  and prompt checks, the admission limits, the chat template), a body that is not
  a JSON object or has a field of the wrong type; ``param`` names the field, and a
  prompt that does not fit the context has ``code: "context_length_exceeded"``;
- 401 bad or missing API key; 404 unknown model or route; 429 queue full;
- 503 loading, draining, or after an engine failure.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.admission import EngineFailure, QueueFull, RequestError, Unavailable
from serving.openai.protocol import ErrorBody, ErrorResponse

log = logging.getLogger("energon.serving.openai")

_LEADING_NAME = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)")


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, *, type: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = ErrorBody(message=message, type=type, param=param, code=code)


def error_response(status: int, body: ErrorBody) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=body).model_dump(), status_code=status)


def invalid(message: str, param: str | None, code: str | None = None) -> ApiError:
    return ApiError(400, message, type="invalid_request_error", param=param, code=code)


def from_value_error(e: ValueError, renames: dict[str, str] | None = None) -> ApiError:
    """A runtime ValueError as a 400; the field it names (its leading ``name=``) becomes ``param``.

    ``renames`` maps the runtime's field names to the request's (``prompt_token_ids`` ->
    ``prompt``, chat's ``logprobs`` -> ``top_logprobs``, ...).
    """
    message = str(e)
    renames = renames or {}
    if isinstance(e, RequestError):
        return invalid(message, renames.get(e.param, e.param), e.code)
    if message.startswith("prompt length"):  # prompt + max_tokens beyond the context or the KV pool
        return invalid(message, renames.get("prompt", "prompt"), "context_length_exceeded")
    m = _LEADING_NAME.match(message)
    param = m.group(1) if m else None
    return invalid(message, renames.get(param, param) if param else None)


def from_admission(e: Exception) -> ApiError:
    if isinstance(e, QueueFull):
        return ApiError(429, str(e), type="rate_limit_error", code="queue_full")
    if isinstance(e, Unavailable):
        return ApiError(503, str(e), type="service_unavailable", code="unavailable")
    if isinstance(e, EngineFailure):
        return ApiError(503, str(e), type="service_unavailable", code="engine_failure")
    raise TypeError(f"not an admission error: {e!r}")


def _validation_param(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p != "body"]
    # Drop the union member names pydantic adds ("str", "list[int]", ...) after the field.
    field = []
    for p in parts:
        if p.isdigit() and field:
            field[-1] += f"[{p}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", p):
            field.append(p)
        else:
            break
    return ".".join(field) if field else None


async def validation_error_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {}
    kind = first.get("type", "")
    loc = tuple(first.get("loc", ()))
    if kind == "json_invalid":
        body = ErrorBody(message="request body is not valid JSON", type="invalid_request_error")
    elif kind in ("model_attributes_type", "dict_type", "model_type") and loc in ((), ("body",)):
        body = ErrorBody(message="request body must be a JSON object", type="invalid_request_error")
    else:
        param = _validation_param(loc)
        message = f"{param or 'body'}: {first.get('msg', 'invalid value')}"
        body = ErrorBody(message=message, type="invalid_request_error", param=param)
    return error_response(400, body)


async def api_error_handler(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.body)


async def http_exception_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return error_response(exc.status_code, ErrorBody(message=str(exc.detail), type=kind))


async def unexpected_error_handler(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error serving %s %s", request.method, request.url.path)
    return error_response(500, ErrorBody(message=f"internal error: {type(exc).__name__}", type="internal_error"))
