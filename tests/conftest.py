"""Shared fixtures: tiny random Hugging Face checkpoints, built once per test session.

``tiny_checkpoint("llama")`` returns the directory of a cached checkpoint for that
variant (see ``tests/hf_fixtures.py`` for the variants). Tests must not modify the
returned directory: copy it first (``shutil.copytree``) when a test needs to break it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# The CLI turns on JAX's persistent compilation cache by default (energon_jax/compile_cache.py):
# tests that run `energon ...` in this process or as subprocesses must neither write into the
# user's ~/.cache nor depend on what an earlier run left there. A test that wants it says so.
os.environ.setdefault("ENERGON_COMPILE_CACHE", "off")

from hf_fixtures import VARIANTS, make_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Callable[..., Path]:
    """A function ``(variant, *, max_shard_size=None) -> Path`` with a per-session cache."""
    cache: dict[tuple[str, str | int | None], Path] = {}

    def get(variant: str, *, max_shard_size: str | int | None = None) -> Path:
        if variant not in VARIANTS:
            raise ValueError(f"unknown {variant=}; known: {VARIANTS}")
        key = (variant, max_shard_size)
        if key not in cache:
            suffix = "" if max_shard_size is None else f"_shard{max_shard_size}"
            out = tmp_path_factory.mktemp(f"hf_{variant}{suffix}")
            cache[key] = make_tiny_checkpoint(out, variant, max_shard_size=max_shard_size)
        return cache[key]

    return get
