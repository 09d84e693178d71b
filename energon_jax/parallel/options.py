"""``ParallelOptions``: the one frozen description of a run's parallel layout.

Built once at the edge (``Engine(tp=, pp=, dp=, ...)``, ``Engine.from_pretrained``, the
``--tp/--pp/--dp`` flags) and passed down unchanged: the mesh (``mesh.py``), the weight
loader's shard callback and the executor (``runtime.py``) all read this object, none
rebuilds it from loose keyword arguments.
"""

from __future__ import annotations

import dataclasses
from collections.abc import MutableMapping
from typing import Any

import numpy as np

MESH_AXES = ("dp", "pp", "tp")


@dataclasses.dataclass(frozen=True)
class ParallelOptions:
    """How a run splits its devices (``dp * pp * tp`` of them) and where its weights live."""

    dp: int = 1  # data-parallel replicas
    pp: int = 1  # pipeline stages
    tp: int = 1  # tensor-parallel shards
    offload: str | None = None  # "host" | "peer": stream layers to one compute device
    resident_layers: int | None = None  # with offload: layers on device at once (default 1)
    expert_parallel: bool = False  # MoE: whole experts per tp shard instead of each expert's MLP split

    def __post_init__(self) -> None:
        for name in MESH_AXES:
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        if not isinstance(self.expert_parallel, bool):
            raise ValueError(f"expert_parallel={self.expert_parallel!r} must be a bool")
        if self.expert_parallel and self.tp == 1:
            raise ValueError("expert_parallel=True spreads experts over tp: it needs tp > 1 (got tp=1)")
        if self.offload is None:
            if self.resident_layers is not None:
                raise ValueError(f"resident_layers={self.resident_layers} needs offload='host' or 'peer'")
            return
        from energon_jax.parallel.memory_pool import OffloadConfig

        OffloadConfig(self.offload, self.resident_layers if self.resident_layers is not None else 1)
        if self.shape != (1, 1, 1):
            raise ValueError(
                f"offload={self.offload!r} runs on one compute device: dp={self.dp}, pp={self.pp}, tp={self.tp} "
                "must all be 1"
            )

    @classmethod
    def resolve(cls, given: ParallelOptions | None, **shorthand: Any) -> ParallelOptions:
        """``given``, or the options spelled by the shorthand keywords (``Engine(tp=2)``); not both."""
        spelled = cls(**shorthand)
        if given is not None and not spelled.single_device:
            raise ValueError(f"give parallel={given} or tp/pp/dp/offload/expert_parallel, not both")
        return spelled if given is None else given

    @classmethod
    def take(cls, kwargs: MutableMapping[str, Any]) -> ParallelOptions:
        """The options named in ``kwargs`` (engine keyword arguments), removed from it."""
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{n: kwargs.pop(n) for n in names if n in kwargs})

    @property
    def num_devices(self) -> int:
        return self.dp * self.pp * self.tp

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.dp, self.pp, self.tp)

    @property
    def single_device(self) -> bool:
        """Nothing asked: one device, no mesh, no offload."""
        return self == ParallelOptions()
