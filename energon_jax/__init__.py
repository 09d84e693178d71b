"""energon-jax: a JAX/XLA inference runtime for transformer models."""

__version__ = "0.1.0"
