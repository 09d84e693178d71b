"""energon-jax: a JAX/XLA inference runtime for transformer models.

``Engine`` (offline ``generate``, ``stream``, ``embed``) and ``AsyncEngine`` (the server's
seam) are imported lazily so that ``import energon_jax`` stays light for the CLI and for
modules that only need the request types.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from energon_jax.request import QueueFullError, RequestOutput, SamplingParams, StreamDelta

if TYPE_CHECKING:
    from energon_jax.async_engine import AsyncEngine
    from energon_jax.engine import Engine

__version__ = "0.1.0"

__all__ = ["AsyncEngine", "Engine", "QueueFullError", "RequestOutput", "SamplingParams", "StreamDelta"]


def __getattr__(name: str) -> Any:
    if name == "Engine":
        from energon_jax.engine import Engine

        return Engine
    if name == "AsyncEngine":
        from energon_jax.async_engine import AsyncEngine

        return AsyncEngine
    raise AttributeError(f"module 'energon_jax' has no attribute {name!r}")
