"""The persistent XLA compilation cache: a second start of the same model skips compiling.

JAX can write every compiled executable to a directory and read it back in the next
process whose program, shapes, devices and flags hash to the same key
(``jax_compilation_cache_dir``). By default it keeps only programs that took over a
second to compile; the step functions of a small model on the CPU compile faster
than that, so the thresholds are lowered to keep everything.

The CLI commands that build an engine (``energon serve``, ``energon generate``) call
``configure_from_args`` first thing, before any compile: the directory is
``--compile-cache DIR``, else ``$ENERGON_COMPILE_CACHE``, else
``$XDG_CACHE_HOME/energon-jax/xla`` (``~/.cache/energon-jax/xla``).
``--no-compile-cache`` (or ``ENERGON_COMPILE_CACHE=off``) turns it off.

JAX's configuration is process-wide by nature; this module only sets it from the
command line's entry point, never from library code that a user imports. The cache is
trusted input (it holds executables): keep it in a directory only you can write.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

ENV_VAR = "ENERGON_COMPILE_CACHE"
_OFF_VALUES = frozenset({"", "0", "off", "false", "no", "none"})
# The suffix JAX's file cache gives each executable (jax/_src/lru_cache.py); tests count them.
ENTRY_SUFFIX = "-cache"


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/energon-jax/xla``, or ``~/.cache/energon-jax/xla``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "energon-jax" / "xla"


def resolve_cache_dir(flag: str | Path | None, disabled: bool) -> Path | None:
    """The directory to use (None: no persistent cache): flag, then $ENERGON_COMPILE_CACHE, then the default."""
    if disabled:
        return None
    if flag is not None:
        if str(flag).strip() == "":
            raise ValueError("compile_cache='' must name a directory (use --no-compile-cache to turn it off)")
        return Path(flag).expanduser()
    env = os.environ.get(ENV_VAR)
    if env is not None:
        return None if env.strip().lower() in _OFF_VALUES else Path(env).expanduser()
    return default_cache_dir()


def enable(path: str | Path) -> Path:
    """Point JAX's persistent cache at ``path`` (created) and keep every executable there.

    Must run before the first compile of the process: JAX opens the cache lazily at the
    first compile and keeps that choice.
    """
    import jax

    cache = Path(path).expanduser()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"compile_cache={str(cache)!r} cannot be created: {e.strerror}") from e
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(cache))
    # Defaults skip programs that compile in under 1 s, i.e. most CPU step functions.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    # -1: no size floor, and JAX may not raise it behind our back (0 would let it).
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return cache


def disable() -> None:
    """No persistent cache for this process, whatever JAX's own flags or variables say."""
    import jax

    jax.config.update("jax_enable_compilation_cache", False)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--compile-cache DIR`` and ``--no-compile-cache``."""
    g = parser.add_argument_group("start-up")
    g.add_argument(
        "--compile-cache", default=None, metavar="DIR",
        help=f"persistent XLA compilation cache (default: ${ENV_VAR}, else {default_cache_dir()})",
    )  # fmt: skip
    g.add_argument("--no-compile-cache", action="store_true", help="compile everything afresh; write no cache")


def configure_from_args(args: argparse.Namespace) -> Path | None:
    """Apply the two flags (before any compile); returns the cache directory, None when off."""
    cache = resolve_cache_dir(args.compile_cache, args.no_compile_cache)
    if cache is None:
        disable()
        return None
    return enable(cache)


def count_entries(path: str | Path) -> int:
    """Executables stored under ``path`` (0 when it does not exist)."""
    root = Path(path)
    return sum(1 for p in root.rglob(f"*{ENTRY_SUFFIX}") if p.is_file()) if root.is_dir() else 0
