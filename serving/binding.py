"""What the server needs from the runtime, bound once at start-up.

The server talks to an ``AsyncEngine`` (docs/architecture.md, "AsyncEngine")
and needs two more names from the same runtime: the ``SamplingParams`` class it
builds from the request (validation lives there, once) and the
``QueueFullError`` the engine raises when its bounded queue is full. Binding
them together lets the same server run over the real engine or over the mock
engine of the tests, without the server importing either by name.
"""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol


class AsyncEngineLike(Protocol):
    """The seam of docs/architecture.md, as the server uses it."""

    info: Any
    tokenizer: Any

    def start(self) -> None: ...
    def submit(self, prompt: str | Sequence[int], params: Any, *, request_id: str) -> AsyncIterator[Any]: ...
    def abort(self, request_id: str) -> None: ...
    async def embed(self, texts: Sequence[str], normalize: bool = ...) -> Any: ...
    @property
    def stats(self) -> Any: ...
    def shutdown(self) -> None: ...


@dataclass(frozen=True)
class EngineBinding:
    engine: AsyncEngineLike
    params_cls: Callable[..., Any]
    queue_full_error: type[Exception]


# A factory takes the model path (None: the runtime's default) and keyword
# arguments for the engine, and returns a binding whose engine is not started.
EngineFactory = Callable[[str | None, dict[str, Any]], EngineBinding]


def energon_binding(model: str | None, engine_kwargs: dict[str, Any]) -> EngineBinding:
    """The real runtime: ``energon_jax.AsyncEngine`` over ``model``."""
    from energon_jax.async_engine import AsyncEngine, QueueFullError
    from energon_jax.request import SamplingParams

    engine = AsyncEngine.from_pretrained(model, **engine_kwargs)
    return EngineBinding(engine=engine, params_cls=SamplingParams, queue_full_error=QueueFullError)


def load_factory(spec: str) -> EngineFactory:
    """Resolve ``"module:function"`` to an engine factory."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"engine factory {spec=} must look like 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:  # the module exists but one of its imports is missing: a real error
            raise
        raise ValueError(f"engine factory {spec=}: no module named {module_name!r}") from e
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"engine factory {spec=}: {attr!r} is not a callable in {module_name!r}")
    return factory
