"""Hugging Face activation names (``hidden_act`` / ``activation_function``) to JAX functions.

Only the names the supported families use; an unknown name is a ``ValueError`` listing
the known ones, raised when the config is read rather than in the middle of a forward.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def _gelu_exact(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=False)


def _gelu_tanh(x: jax.Array) -> jax.Array:
    # gelu_new, gelu_pytorch_tanh and gelu_fast are all the tanh approximation.
    return jax.nn.gelu(x, approximate=True)


def _quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": _gelu_exact,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "quick_gelu": _quick_gelu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


def check_activation(name: str, *, field: str = "hidden_act") -> str:
    """Return ``name`` if it is known, else raise a ``ValueError`` naming the config field."""
    if name not in ACTIVATIONS:
        raise ValueError(f"config {field}={name!r} is not supported; supported: {', '.join(sorted(ACTIVATIONS))}")
    return name


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    return ACTIVATIONS[check_activation(name)]
