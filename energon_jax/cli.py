"""The ``energon`` command line: one subcommand per module.

Each module named in ``COMMANDS`` exposes ``NAME`` (the subcommand), ``HELP``,
``add_arguments(parser)`` and ``run(args) -> int``. The modules are imported by name
so that ``serving`` (which depends on this package) can contribute ``serve``,
``client`` and ``bench`` without this package importing it at module level.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import sys
from collections.abc import Sequence

COMMANDS = (
    "energon_jax.commands.generate",
    "energon_jax.commands.info",
    "energon_jax.commands.convert",
    "energon_jax.commands.launch",
    "energon_jax.commands.plan",
    "serving.commands.serve",
    "serving.commands.client",
    "serving.commands.bench",
    "serving.commands.router",
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


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` to each option's help, except where it would say nothing.

    Skipped for flags (``store_true``: off unless given), for a default of None (the
    help says what happens then) and for help that already names its default.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.nargs == 0 or action.default is None or "default" in text.lower():
            return action.help
        if isinstance(action.default, (list, tuple)) and not action.default:
            return action.help  # an empty repeatable option
        return super()._get_help_string(action)

    def _format_action(self, action: argparse.Action) -> str:
        # argparse prints nothing after an option without help, not even its default.
        if not action.help and action.option_strings and action.nargs != 0 and action.default not in (None, []):
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)


def version() -> str:
    """The installed distribution's version (a source checkout run without install: unknown)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("energon-jax")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="energon", description="energon-jax: a JAX inference runtime", formatter_class=HelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in _load_commands():
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP, formatter_class=HelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
