"""``energon launch --num-processes N -- CMD``: a local multi-process run.

Starts N copies of a command on 127.0.0.1, each joined to one ``jax.distributed`` run
(see ``energon_jax/parallel/launch.py``). Process 0 is the controller; the others
follow it. As with ``torchrun``, CMD is either an energon subcommand or a whole
command line:

    energon launch -n 2 --cpu-devices-per-process 2 -- generate --tp 4 "Hello"
    energon launch -n 2 --cpu-devices-per-process 2 -- energon generate --tp 4 "Hello"
    energon launch -n 2 -- python my_script.py        # any program (it reads ENERGON_*)

A first word that names an energon subcommand (``serve``, ``generate``, ...) runs it with
this interpreter; ``energon`` followed by one does the same; anything else is run as
given. ``--raw`` forces the last reading (a program named like a subcommand).
"""

from __future__ import annotations

import argparse
import sys

from energon_jax.parallel.launch import LaunchConfig, launch

NAME = "launch"
HELP = "run an energon command as N local processes of one jax.distributed run (development, tests)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-n", "--num-processes", type=int, required=True, help="processes to start")
    parser.add_argument("--port", type=int, default=0, help="coordinator port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--cpu-devices-per-process", type=int, default=None,
                        help="simulate this many CPU devices in each process (sets JAX_PLATFORMS=cpu)")
    parser.add_argument("--grace-seconds", type=float, default=10.0,
                        help="after a failure or a signal, how long processes get to exit before SIGKILL")
    parser.add_argument("--raw", action="store_true",
                        help="run the command as given even when its first word names an energon subcommand")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="-- then an energon subcommand (serve ...), energon SUBCOMMAND, or any command line")


def subcommands() -> frozenset[str]:
    """The energon subcommand names (the last part of each ``cli.COMMANDS`` module; a test
    checks them against the parser). Read without importing the modules: this process must
    not start jax before it forks the workers (``launch._can_preexec``)."""
    from energon_jax.cli import COMMANDS

    return frozenset(name.rsplit(".", 1)[-1] for name in COMMANDS)


def command_argv(command: list[str], *, raw: bool = False) -> list[str]:
    """The argv each process runs (see the module docstring for the three forms)."""
    rest = command[1:] if command and command[0] == "--" else list(command)
    if not rest:
        raise ValueError("no command given: write it after '--', e.g. energon launch -n 2 -- generate 'hi'")
    if raw:
        return rest
    if rest[0] == "energon":
        rest = rest[1:]
        if not rest or rest[0] not in subcommands():
            got = rest[0] if rest else "nothing"
            raise ValueError(f"'energon' must be followed by a subcommand ({', '.join(sorted(subcommands()))}), "
                             f"got {got}")
    elif rest[0] not in subcommands():
        return rest  # a whole command line: python script.py, bash -c ..., ./run.sh
    if rest[0] == NAME:
        raise ValueError("energon launch cannot launch itself")
    return [sys.executable, "-m", "energon_jax.cli", *rest]


def run(args: argparse.Namespace) -> int:
    try:
        argv = command_argv(args.command, raw=args.raw)
        config = LaunchConfig(
            num_processes=args.num_processes, port=args.port,
            cpu_devices_per_process=args.cpu_devices_per_process, grace_s=args.grace_seconds,
        )
    except ValueError as e:
        print(f"energon launch: {e}", file=sys.stderr)
        return 2
    return launch(argv, config)
