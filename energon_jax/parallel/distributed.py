"""Joining a multi-process run: ``jax.distributed.initialize`` from flags or the environment.

Every process of a run calls ``initialize(DistributedConfig...)`` before touching a
device. Afterwards ``jax.devices()`` lists the devices of all processes and a mesh
built from it (``parallel/mesh.py``) spans them; each process runs the same jitted
step (multi-controller SPMD) and ``parallel/controller.py`` decides who schedules.

Where the three facts come from, first found wins:

- flags ``--coordinator-address HOST:PORT --num-processes N --process-id I``;
- ``ENERGON_COORDINATOR_ADDRESS``, ``ENERGON_NUM_PROCESSES``, ``ENERGON_PROCESS_ID``
  (set by ``energon launch``);
- jax's own ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``;
- otherwise jax's cluster auto-detection (Cloud TPU VMs, SLURM, Open MPI), which
  ``--distributed auto`` / ``ENERGON_DISTRIBUTED=auto`` asks for explicitly.

On CPU, cross-process collectives go through gloo. The heartbeat timeout is short
(``heartbeat_timeout_s``) so that when one process dies the others are told by the
coordination service and exit instead of waiting in a collective for ever.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import logging
import os
from collections.abc import Mapping

log = logging.getLogger(__name__)

ENV_ADDRESS = "ENERGON_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "ENERGON_NUM_PROCESSES"
ENV_PROCESS_ID = "ENERGON_PROCESS_ID"
ENV_MODE = "ENERGON_DISTRIBUTED"
_JAX_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How this process joins a run; all ``None`` and ``auto=False`` means a single process."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    auto: bool = False  # let jax detect the cluster (TPU pod slices)
    heartbeat_timeout_s: int = 10
    initialization_timeout_s: int = 120

    def __post_init__(self) -> None:
        if self.num_processes is not None and self.num_processes < 1:
            raise ValueError(f"num_processes={self.num_processes} must be >= 1")
        if self.process_id is not None:
            if self.process_id < 0:
                raise ValueError(f"process_id={self.process_id} must be >= 0")
            if self.num_processes is not None and self.process_id >= self.num_processes:
                raise ValueError(f"process_id={self.process_id} must be < num_processes={self.num_processes}")
        if self.coordinator_address is not None and ":" not in self.coordinator_address:
            raise ValueError(f"coordinator_address={self.coordinator_address!r} must be HOST:PORT")
        if self.heartbeat_timeout_s < 1:
            raise ValueError(f"heartbeat_timeout_s={self.heartbeat_timeout_s} must be >= 1")

    @property
    def enabled(self) -> bool:
        if self.auto:
            return True
        if self.num_processes is not None and self.num_processes > 1:
            return True
        return self.coordinator_address is not None and self.num_processes != 1


def _int_or_none(value: str | None, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} must be an integer") from None


def config_from_env(env: Mapping[str, str] | None = None) -> DistributedConfig:
    env = os.environ if env is None else env
    address = env.get(ENV_ADDRESS) or env.get(_JAX_ENV[0]) or None
    num = env.get(ENV_NUM_PROCESSES) or env.get(_JAX_ENV[1])
    pid = env.get(ENV_PROCESS_ID) or env.get(_JAX_ENV[2])
    return DistributedConfig(
        coordinator_address=address,
        num_processes=_int_or_none(num, "num_processes"),
        process_id=_int_or_none(pid, "process_id"),
        auto=env.get(ENV_MODE, "").lower() == "auto",
    )


def add_distributed_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags a command needs to join a multi-process run."""
    g = parser.add_argument_group("multi-process (jax.distributed)")
    g.add_argument("--coordinator-address", default=None, help="HOST:PORT of process 0's coordinator")
    g.add_argument("--num-processes", type=int, default=None, help="processes in the run")
    g.add_argument("--process-id", type=int, default=None, help="this process's index (0 schedules)")
    g.add_argument("--distributed", choices=("off", "auto"), default=None,
                   help="'auto': let jax detect the cluster (Cloud TPU pods, SLURM)")


def config_from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> DistributedConfig:
    """Flags first, then the environment (see the module docstring)."""
    base = config_from_env(env)
    mode = getattr(args, "distributed", None)
    if mode == "off":
        return DistributedConfig()
    return DistributedConfig(
        coordinator_address=getattr(args, "coordinator_address", None) or base.coordinator_address,
        num_processes=_first(getattr(args, "num_processes", None), base.num_processes),
        process_id=_first(getattr(args, "process_id", None), base.process_id),
        auto=mode == "auto" or base.auto,
    )


def _first(*values):
    return next((v for v in values if v is not None), None)


def initialize(config: DistributedConfig) -> bool:
    """Join the run described by ``config``; returns whether this is a multi-process run.

    Idempotent: a second call in an already-initialised process does nothing.
    """
    if not config.enabled:
        return False
    import jax  # here, not at module level: `energon launch` reads this module without starting jax

    if jax.distributed.is_initialized():
        return True
    # gloo must be chosen before the CPU backend starts; harmless on GPU/TPU.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = dict(
        coordinator_address=config.coordinator_address,
        num_processes=config.num_processes,
        process_id=config.process_id,
        initialization_timeout=config.initialization_timeout_s,
    )
    # Older jax releases lack the heartbeat knob; pass it only where it exists.
    if "heartbeat_timeout_seconds" in inspect.signature(jax.distributed.initialize).parameters:
        kwargs["heartbeat_timeout_seconds"] = config.heartbeat_timeout_s
    log.info("jax.distributed.initialize(%s)", kwargs)
    jax.distributed.initialize(**kwargs)
    log.info("process %d of %d: %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    return True


def initialize_from_env(env: Mapping[str, str] | None = None) -> bool:
    """``initialize(config_from_env())``: what a command started by ``energon launch`` calls."""
    return initialize(config_from_env(env))


def shutdown() -> None:
    import jax

    if jax.distributed.is_initialized():
        jax.distributed.shutdown()


def key_value_client():
    """The coordination service's client of this process (``jax.distributed``'s own), whose
    key-value store carries small messages between processes (the controller's step headers,
    ``controller.HeaderChannel``). jax has no public accessor for it; raises ``RuntimeError``
    when this process has not joined a run."""
    from jax._src import distributed as jax_distributed

    client = jax_distributed.global_state.client
    if client is None:
        raise RuntimeError("jax.distributed is not initialised: no key-value store to talk through")
    return client


def is_coordinator() -> bool:
    """Process 0 owns the scheduler and the API."""
    import jax

    return jax.process_index() == 0
