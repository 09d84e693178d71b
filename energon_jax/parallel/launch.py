"""Start N processes of one command on this machine, wired into one jax.distributed run.

``energon launch --num-processes N -- CMD`` (an energon subcommand or a whole command
line, ``commands/launch.py``) is for development and tests, and for rehearsing a pod
(``examples/tpu_pod/launch.sh --local N``): it stands in for a cluster by running every
process on 127.0.0.1. Each child
gets ``ENERGON_COORDINATOR_ADDRESS`` (a free local port), ``ENERGON_NUM_PROCESSES``
and ``ENERGON_PROCESS_ID``; ``parallel/distributed.py`` turns those into
``jax.distributed.initialize``. With ``cpu_devices_per_process`` each child also
simulates that many CPU devices, so 2 processes x 2 devices make a 4-device mesh.

The launcher owns the children's lives, because a multi-controller run has no
partial success: one dead process leaves the others blocked in a collective.

- the first child to fail (non-zero exit or killed by a signal) is reported, the
  others are sent SIGTERM, then SIGKILL after ``grace_s``; its exit code is returned;
- SIGINT/SIGTERM sent to the launcher are forwarded to every child;
- when every child exits 0 the launcher returns 0; once one has exited 0 the rest
  get ``grace_s`` to follow before they are stopped and reported;
- on Linux each child is also tied to the launcher's life (``PR_SET_PDEATHSIG``),
  so killing the launcher with SIGKILL does not leave orphans. That needs code run
  between fork and exec, which is unsafe in a multi-threaded parent, so it is done
  only when the launcher is single-threaded and has not started jax (the ``energon
  launch`` command; not a test process that already runs jax).
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence

from energon_jax.parallel.distributed import ENV_ADDRESS, ENV_NUM_PROCESSES, ENV_PROCESS_ID

POLL_S = 0.05


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    num_processes: int
    host: str = "127.0.0.1"
    port: int = 0  # 0: pick a free port
    cpu_devices_per_process: int | None = None  # simulate this many CPU devices in each child
    grace_s: float = 10.0

    def __post_init__(self) -> None:
        if self.num_processes < 1:
            raise ValueError(f"num_processes={self.num_processes} must be >= 1")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port={self.port} must be in [0, 65535]")
        if self.cpu_devices_per_process is not None and self.cpu_devices_per_process < 1:
            raise ValueError(f"cpu_devices_per_process={self.cpu_devices_per_process} must be >= 1")
        if self.grace_s < 0:
            raise ValueError(f"grace_s={self.grace_s} must be >= 0")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def worker_env(base: Mapping[str, str], config: LaunchConfig, process_id: int, address: str) -> dict[str, str]:
    """The environment of child ``process_id``."""
    env = dict(base)
    env[ENV_ADDRESS] = address
    env[ENV_NUM_PROCESSES] = str(config.num_processes)
    env[ENV_PROCESS_ID] = str(process_id)
    if config.cpu_devices_per_process is not None:
        n = config.cpu_devices_per_process
        env["JAX_PLATFORMS"] = "cpu"
        env["JAX_NUM_CPU_DEVICES"] = str(n)
        flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
        env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={n}"])
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGKILL it when the launcher dies (Linux only)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _can_preexec() -> bool:
    return sys.platform.startswith("linux") and threading.active_count() == 1 and "jax" not in sys.modules


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _shell_code(code: int) -> int:
    return 128 - code if code < 0 else code


class _Children:
    def __init__(self, procs: list[subprocess.Popen]):
        self.procs = procs

    def alive(self) -> list[int]:
        return [i for i, p in enumerate(self.procs) if p.poll() is None]

    def signal_all(self, sig: int) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, sig)  # the child's own process group: grandchildren too
                except (ProcessLookupError, PermissionError):
                    pass

    def stop(self, grace_s: float) -> None:
        self.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while self.alive() and time.monotonic() < deadline:
            time.sleep(POLL_S)
        self.signal_all(signal.SIGKILL)
        for p in self.procs:
            p.wait()


def launch(
    argv: Sequence[str],
    config: LaunchConfig,
    *,
    env: Mapping[str, str] | None = None,
    log: Callable[[str], None] | None = None,
) -> int:
    """Run ``argv`` as ``config.num_processes`` processes; returns the run's exit code."""
    if not argv:
        raise ValueError("command is empty: give the command to run after '--'")
    say = log or (lambda msg: print(f"energon launch: {msg}", file=sys.stderr, flush=True))
    port = config.port or free_port(config.host)
    address = f"{config.host}:{port}"
    base = dict(os.environ if env is None else env)
    procs = []
    for i in range(config.num_processes):
        procs.append(subprocess.Popen(
            list(argv), env=worker_env(base, config, i, address), start_new_session=True,
            preexec_fn=_die_with_parent if _can_preexec() else None,
        ))
    say(f"started {config.num_processes} processes (coordinator {address}): "
        + ", ".join(f"{i}:pid {p.pid}" for i, p in enumerate(procs)))
    children = _Children(procs)
    received: list[int] = []
    restore = _forward_signals(children, received)
    try:
        return _supervise(children, config, received, say)
    finally:
        restore()
        children.stop(0.0 if not children.alive() else config.grace_s)


def _forward_signals(children: _Children, received: list[int]) -> Callable[[], None]:
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, _frame):
        received.append(signum)
        children.signal_all(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for s, h in old.items():
            signal.signal(s, h)

    return restore


def _supervise(children: _Children, config: LaunchConfig, received: list[int], say) -> int:
    first_clean_exit: float | None = None
    signalled_at: float | None = None
    while True:
        for i, p in enumerate(children.procs):
            code = p.poll()
            if code not in (None, 0) and not received:
                others = children.alive()
                say(f"process {i} (pid {p.pid}) failed: {describe_exit(code)}; "
                    f"stopping the other {len(others)} process(es)")
                children.stop(config.grace_s)
                return _shell_code(code)
        alive = children.alive()
        now = time.monotonic()
        if received:
            signalled_at = signalled_at or now
            if not alive:
                return 128 + received[0]
            if now - signalled_at > config.grace_s:
                say(f"processes {alive} ignored {signal.Signals(received[0]).name} for {config.grace_s}s; killing")
                children.stop(0.0)
                return 128 + received[0]
        elif not alive:
            return 0
        elif len(alive) < len(children.procs):
            first_clean_exit = first_clean_exit or now
            if now - first_clean_exit > config.grace_s:
                say(f"processes {alive} still running {config.grace_s}s after the others exited; stopping them")
                children.stop(config.grace_s)
                return 1
        time.sleep(POLL_S)
