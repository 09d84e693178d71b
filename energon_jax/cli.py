"""The ``energon`` command line: one subcommand per module.

Each module named in ``COMMANDS`` exposes ``NAME`` (the subcommand), ``HELP``,
``add_arguments(parser)`` and ``run(args) -> int``. The modules are imported by name
so that ``serving`` (which depends on this package) can contribute ``serve``,
``client`` and ``bench`` without this package importing it at module level.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

COMMANDS = (
    "energon_jax.commands.generate",
    "energon_jax.commands.info",
    "energon_jax.commands.convert",
    "energon_jax.commands.launch",
    "serving.commands.serve",
    "serving.commands.client",
    "serving.commands.bench",
)


def _load_commands() -> list:
    modules = []
    for name in COMMANDS:
        try:
            modules.append(importlib.import_module(name))
        except ModuleNotFoundError as e:
            # Only a command module that is not part of this install is skipped;
            # a missing dependency inside it is a real error.
            if e.name != name:
                raise
    return modules


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="energon", description="energon-jax: a JAX inference runtime")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in _load_commands():
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
