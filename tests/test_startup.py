"""Start-up: the persistent compilation cache, the warm-up progress bar, ``--no-warmup``,
``energon --version`` and defaults in ``--help``."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tomllib

import pytest
from serving_harness import REPO, ServerProcess

from energon_jax import compile_cache
from energon_jax.cli import build_parser, main
from energon_jax.parallel.runtime import warm_up_with_progress

pytestmark = pytest.mark.timeout(180)


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_version_is_the_package_version(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    expected = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert capsys.readouterr().out.strip() == f"energon {expected}"


def test_help_shows_every_default(capsys) -> None:
    commands = _subcommands()
    assert {"generate", "serve", "bench"} <= set(commands)
    for name, parser in commands.items():
        for action in parser._actions:
            if not action.option_strings or action.nargs == 0 or action.default in (None, []):
                continue
            entry = parser.formatter_class(prog=name)._format_action(action)  # the option's lines in --help
            flag = action.option_strings[-1]
            assert "default" in entry, f"energon {name} --help: {flag} does not show its default:\n{entry}"
    serve = " ".join(commands["serve"].format_help().split())
    assert "(default: 50051)" in serve and "(default: INFO)" in serve
    generate = " ".join(commands["generate"].format_help().split())
    assert generate.count("(default: 128)") == 1  # a help that names its default gets no second one


def test_cache_dir_resolution(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv(compile_cache.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.resolve_cache_dir(None, False) == tmp_path / "xdg" / "energon-jax" / "xla"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compile_cache.resolve_cache_dir(None, False) == tmp_path / "home" / ".cache" / "energon-jax" / "xla"
    monkeypatch.setenv(compile_cache.ENV_VAR, str(tmp_path / "env"))
    assert compile_cache.resolve_cache_dir(None, False) == tmp_path / "env"
    assert compile_cache.resolve_cache_dir(tmp_path / "flag", False) == tmp_path / "flag"
    assert compile_cache.resolve_cache_dir(tmp_path / "flag", True) is None
    monkeypatch.setenv(compile_cache.ENV_VAR, "off")
    assert compile_cache.resolve_cache_dir(None, False) is None
    with pytest.raises(ValueError, match="compile_cache=''"):
        compile_cache.resolve_cache_dir("", False)


def _generate(cache: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "energon_jax.cli", "generate", "--compile-cache", cache, *extra]
    cmd += ["--max-tokens", "3", "--temperature", "0", "--no-prompt", "--max-model-len", "64", "Hello"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_second_start_hits_the_compilation_cache(tmp_path) -> None:
    cache = tmp_path / "xla"
    first = _generate(str(cache))
    assert first.returncode == 0, first.stderr
    entries = sorted(p.name for p in cache.iterdir())
    # The step function compiles in well under JAX's default 1 s threshold on the CPU:
    # without the lowered thresholds nothing of it would be stored.
    assert any(n.startswith("jit_step_fn-") for n in entries), entries
    second = _generate(str(cache))
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout
    assert sorted(p.name for p in cache.iterdir()) == entries  # every compile was a hit: nothing new


class _CountingRunner:
    """A runner stand-in: ``warmup`` walks the batches once per replica, as the real runners do."""

    def __init__(self, replicas: int) -> None:
        self.replicas = [object()] * replicas if replicas > 1 else ()
        self.seen: list[int] = []

    def warmup(self, batches) -> int:
        for _ in self.replicas or (None,):
            for batch in batches:
                self.seen.append(batch)
        return len(self.seen)


@pytest.mark.parametrize("replicas", [1, 3])
def test_warmup_shows_a_progress_bar_over_its_compiles(capfd, replicas) -> None:
    shapes = [5, 6, 7, 8]
    runner = _CountingRunner(replicas)
    assert warm_up_with_progress(runner, shapes) == len(shapes) * replicas
    assert runner.seen == shapes * replicas
    err = capfd.readouterr().err
    total = len(shapes) * replicas
    assert "warm-up compiles" in err and f"{total}/{total}" in err and f"{total + 1}/" not in err


def test_no_warmup_serves_without_compiling(tmp_path) -> None:
    cache = tmp_path / "xla"
    args = ["--no-warmup", "--compile-cache", str(cache), "--max-model-len", "64", "--http-port", "0"]
    with ServerProcess(*args, factory=None) as srv:
        srv.wait_serving(timeout_s=120)
        log = srv.log()
    assert "compiled step" not in log and "warm-up" not in log, log
    # Nothing compiled the step function: the cache holds no step executable.
    assert not any(p.name.startswith("jit_step_fn-") for p in cache.iterdir()) if cache.exists() else True
