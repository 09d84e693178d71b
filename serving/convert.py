"""Translation between the wire messages and the runtime's Python objects.

Only fields the client set are passed to ``SamplingParams`` (proto3
``optional`` gives us presence), so an unset field takes the engine's default
and validation stays in one place, the runtime's ``SamplingParams``. Nothing
here truncates or clamps: a value the runtime refuses comes back as its
ValueError, which the server maps to INVALID_ARGUMENT.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from serving.protos.energon.v1 import inference_pb2 as pb

_SCALAR_FIELDS = (
    "max_tokens",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "ignore_eos",
    "logprobs",
    "skip_special_tokens",
    "min_tokens",
)


def params_from_proto(msg: pb.SamplingParams, params_cls: Callable[..., Any]) -> Any:
    """Build the runtime's SamplingParams from the fields the client set."""
    kwargs: dict[str, Any] = {name: getattr(msg, name) for name in _SCALAR_FIELDS if msg.HasField(name)}
    if msg.stop:
        kwargs["stop"] = list(msg.stop)
    if msg.stop_token_ids:
        kwargs["stop_token_ids"] = list(msg.stop_token_ids)
    return params_cls(**kwargs)


def params_to_proto(params: Any) -> pb.SamplingParams:
    """The runtime's SamplingParams on the wire, every field set (the inverse of ``params_from_proto``)."""
    msg = pb.SamplingParams(stop=list(params.stop), stop_token_ids=[int(t) for t in params.stop_token_ids])
    for name in _SCALAR_FIELDS:
        value = getattr(params, name)
        if value is not None:  # seed and logprobs are optional
            setattr(msg, name, value)
    return msg


def prompt_from_proto(req: pb.GenerateRequest) -> str | list[int]:
    which = req.WhichOneof("prompt")
    if which == "text":
        # Checked here because a tokenizer may turn "" into [bos], hiding the mistake.
        if not req.text:
            raise ValueError("prompt text='' must not be empty")
        return req.text
    if which == "token_ids":
        return list(req.token_ids.ids)
    raise ValueError("prompt must be set: give text or token_ids")


def _logprob_entry(token_id: int, entry: Any) -> pb.TokenLogprob:
    """One generated token's logprobs: a float, or a mapping token id -> logprob (top-N)."""
    if isinstance(entry, Mapping):
        top = sorted(entry.items(), key=lambda kv: -kv[1])
        return pb.TokenLogprob(
            token_id=token_id,
            logprob=float(entry.get(token_id, float("nan"))),
            top=[pb.TopLogprob(token_id=int(t), logprob=float(lp)) for t, lp in top],
        )
    return pb.TokenLogprob(token_id=token_id, logprob=float(entry))


def response_from_delta(request_id: str, delta: Any) -> pb.GenerateResponse:
    ids = [int(t) for t in delta.token_ids]
    resp = pb.GenerateResponse(request_id=request_id, text=delta.text, token_ids=ids)
    if delta.logprobs:
        resp.logprobs.extend(_logprob_entry(t, e) for t, e in zip(ids, delta.logprobs, strict=True))
    if delta.finished:
        resp.finish_reason = delta.finish_reason or ""
        if delta.usage is not None:
            resp.usage.prompt_tokens = int(delta.usage.prompt_tokens)
            resp.usage.completion_tokens = int(delta.usage.completion_tokens)
            resp.usage.cached_tokens = int(getattr(delta.usage, "cached_tokens", 0))
    return resp


def _layout_value(layout: Any, name: str) -> int:
    if layout is None:
        return 0
    value = layout.get(name, 0) if isinstance(layout, Mapping) else getattr(layout, name, 0)
    return int(value or 0)


def info_to_proto(info: Any) -> pb.ModelInfoResponse:
    layout = getattr(info, "layout", None)
    return pb.ModelInfoResponse(
        architecture=str(info.architecture),
        max_model_len=int(info.max_model_len),
        vocab_size=int(info.vocab_size),
        layout=pb.ParallelLayout(**{k: _layout_value(layout, k) for k in ("dp", "tp", "pp", "processes", "devices")}),
        model=str(getattr(info, "model", "") or ""),
    )


def embeddings_to_proto(vectors: Sequence[Sequence[float]]) -> pb.EmbedResponse:
    return pb.EmbedResponse(embeddings=[pb.Embedding(values=[float(v) for v in vec]) for vec in vectors])
