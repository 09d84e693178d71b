"""The device mesh and the rules that place parameters and KV pages on it.

A run's devices (all devices of all processes) form one mesh with axes
``("dp", "pp", "tp")``: data-parallel replicas, pipeline stages, tensor-parallel
shards. Model code never mentions devices: every parameter is born with
``logical_axes`` metadata (names from ``vocab, embed, heads, kv_heads, head_dim,
mlp, expert, norm, qkv``), and one table here, ``ShardingRules``, maps logical
axes to mesh axes. From that table the classic layouts fall out by themselves:

- column-parallel: ``q/k/v/gate/up`` kernels ``[D, N, H]`` / ``[D, F]`` split their
  output axis (``heads``, ``kv_heads``, ``mlp``) over ``tp``;
- row-parallel: ``o_proj`` ``[N, H, D]`` and ``down_proj`` ``[F, D]`` split their
  *input* axis (same logical names) over ``tp``; XLA inserts the all-reduce;
- vocabulary-parallel embedding and LM head: ``vocab -> tp``;
- experts: the MLP dim of each expert is split over ``tp`` (tensor parallelism
  inside every expert), or with ``expert_parallel=True`` (``Engine(...,
  expert_parallel=True)``, ``--expert-parallel``) whole experts are spread over
  ``tp``, which must then divide the number of experts.

KV heads when ``tp`` exceeds them (the documented rule): with ``K`` KV heads,
``K % tp == 0`` shards them over ``tp``; ``tp % K == 0`` (``tp > K``) replicates
them: every ``tp`` shard holds all ``K`` heads of the K/V projections and of the
KV pages and recomputes them (``K * H`` is small next to the ``N * H`` query
heads it serves, and the output is unchanged); anything else is an error. The
KV page pool ``[P, S, K, H]`` follows the same rule on its ``K`` axis.

A dimension that the mesh axis does not divide is an error naming the parameter,
except ``vocab`` (GPT-2's 50257): an uneven vocabulary is replicated rather than
sharded, so every tokenizer works at any ``tp``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from energon_jax.parallel.options import MESH_AXES, ParallelOptions

# Logical axes an uneven size may replicate instead of failing (see module docstring).
REPLICATE_IF_UNEVEN = frozenset({"vocab"})


def make_mesh(config: ParallelOptions, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``("dp", "pp", "tp")`` mesh over ``devices`` (default: every device of every process).

    With more devices than asked, the first ``dp * pp * tp`` are used on one process;
    across processes every device must be used, since every process runs the step.
    """
    devices = list(jax.devices() if devices is None else devices)
    wanted = config.num_devices
    if wanted > len(devices):
        raise ValueError(
            f"dp*pp*tp = {config.dp}*{config.pp}*{config.tp} = {wanted} devices asked, "
            f"but only {len(devices)} exist ({_describe(devices)})"
        )
    if wanted < len(devices) and jax.process_count() > 1:
        raise ValueError(
            f"dp*pp*tp = {wanted} must equal the {len(devices)} devices of all "
            f"{jax.process_count()} processes: every process takes part in each step"
        )
    types = (AxisType.Auto,) * len(MESH_AXES)  # GSPMD propagation, not explicit sharding-in-types
    if wanted == len(devices):
        # make_mesh orders devices by physical topology (rings on TPU slices).
        return jax.make_mesh(config.shape, MESH_AXES, axis_types=types, devices=devices)
    grid = np.asarray(devices[:wanted], dtype=object).reshape(config.shape)
    return Mesh(grid, MESH_AXES, axis_types=types)


def _describe(devices: Sequence[jax.Device]) -> str:
    kinds = sorted({d.platform for d in devices})
    procs = len({d.process_index for d in devices})
    return f"platform {'/'.join(kinds) or 'none'}, {procs} process(es)"


def kv_heads_axis(tp: int, num_kv_heads: int) -> str | None:
    """The mesh axis of the ``kv_heads`` logical axis: ``"tp"``, or ``None`` to replicate.

    ``K % tp == 0``: shard. ``tp % K == 0``: replicate (each shard keeps all ``K``
    heads; see the module docstring). Otherwise the heads cannot be laid out evenly.
    """
    if tp == 1:
        return None
    if num_kv_heads % tp == 0:
        return "tp"
    if tp % num_kv_heads == 0:
        return None
    raise ValueError(
        f"tp={tp} and num_kv_heads={num_kv_heads}: one must divide the other "
        f"(tp dividing the KV heads shards them, KV heads dividing tp replicates them)"
    )


def validate_model_parallelism(
    config: ParallelOptions,
    *,
    num_heads: int,
    num_kv_heads: int,
    num_layers: int,
    intermediate_size: int | None = None,
    num_experts: int | None = None,
) -> None:
    """Raise ``ValueError`` saying why ``config`` cannot run a model of this shape."""
    tp, pp = config.tp, config.pp
    if num_heads % tp:
        raise ValueError(f"tp={tp} must divide num_heads={num_heads} (query heads are split over tp)")
    kv_heads_axis(tp, num_kv_heads)
    if intermediate_size is not None and intermediate_size % tp:
        raise ValueError(f"tp={tp} must divide intermediate_size={intermediate_size} (the MLP is split over tp)")
    if pp > num_layers:
        raise ValueError(f"pp={pp} must be <= num_layers={num_layers} (each stage owns at least one layer)")
    if config.expert_parallel:  # whole experts per tp shard (else each expert's MLP follows the mlp rule)
        if num_experts is None:
            raise ValueError("expert_parallel=True needs a mixture-of-experts model; this one has no experts")
        if num_experts % tp:
            raise ValueError(f"tp={tp} must divide num_experts={num_experts} with expert_parallel=True "
                             "(whole experts are spread over tp)")


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis name -> mesh axis name (or ``None``: replicated)."""

    rules: tuple[tuple[str, str | None], ...]

    def __post_init__(self) -> None:
        for logical, mesh_axis in self.rules:
            if mesh_axis is not None and mesh_axis not in MESH_AXES:
                raise ValueError(f"rule {logical!r} -> {mesh_axis!r}: mesh axis must be one of {MESH_AXES}")

    def as_dict(self) -> dict[str, str | None]:
        return dict(self.rules)

    def mesh_axis(self, logical: str | None) -> str | None:
        if logical is None:
            return None
        return self.as_dict().get(logical)

    def partition_spec(
        self, logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, *, name: str = "array"
    ) -> PartitionSpec:
        """The spec of one array; a mesh axis is used at most once (first logical axis wins)."""
        if len(logical_axes) != len(shape):
            raise ValueError(f"{name}: logical_axes={tuple(logical_axes)} do not match shape={tuple(shape)}")
        used: set[str] = set()
        spec: list[str | None] = []
        for logical, size in zip(logical_axes, shape):
            axis = self.mesh_axis(logical)
            if axis is None or axis in used or mesh.shape[axis] == 1:
                spec.append(None)
                continue
            ways = mesh.shape[axis]
            if size % ways:
                if logical in REPLICATE_IF_UNEVEN:
                    spec.append(None)
                    continue
                raise ValueError(
                    f"{name}: logical axis {logical!r} has size {size}, not divisible by {axis}={ways}"
                )
            used.add(axis)
            spec.append(axis)
        return PartitionSpec(*spec)


def sharding_rules(tp: int, *, num_kv_heads: int, expert_parallel: bool = False) -> ShardingRules:
    """The default table for tensor parallelism over the ``tp`` mesh axis."""
    rules: dict[str, str | None] = {
        "vocab": "tp",  # vocabulary-parallel embedding and LM head
        "embed": None,  # the residual stream is replicated
        "heads": "tp",  # column-parallel q, row-parallel o
        "kv_heads": kv_heads_axis(tp, num_kv_heads),
        "head_dim": None,
        "mlp": "tp",  # column-parallel gate/up, row-parallel down
        "expert": None,
        "norm": None,
        "qkv": None,
    }
    if expert_parallel:
        # Whole experts per tp shard; the expert axis comes first in expert weights,
        # so it claims "tp" and their mlp axis stays whole (see partition_spec).
        rules["expert"] = "tp"
    return ShardingRules(tuple(rules.items()))


def _is_variable(x: object) -> bool:
    return isinstance(x, nnx.Variable)


def _path_name(path: tuple) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def state_shardings(state: nnx.State, mesh: Mesh, rules: ShardingRules) -> nnx.State:
    """A ``NamedSharding`` for every variable of an NNX state, from its ``logical_axes``.

    Variables without ``logical_axes`` (and non-array leaves) are replicated.
    """

    def one(path, var):
        value = var.get_value() if _is_variable(var) else var
        if not hasattr(value, "shape"):
            return None
        axes = var.get_metadata().get("logical_axes") if _is_variable(var) else None
        if axes is None:
            return NamedSharding(mesh, PartitionSpec())
        return NamedSharding(mesh, rules.partition_spec(axes, value.shape, mesh, name=_path_name(path)))

    return jax.tree_util.tree_map_with_path(one, state, is_leaf=_is_variable)


def _placed_state(state: nnx.State, mesh: Mesh, rules: ShardingRules) -> nnx.State:
    """``state`` with every array on ``mesh`` by ``rules`` (new variables; ``state`` is untouched)."""
    shardings = state_shardings(state, mesh, rules)

    def one(var, sh):
        if sh is None:
            return var
        if _is_variable(var):
            return var.replace(place(var.get_value(), sh))
        return place(var, sh)  # a plain array attribute (e.g. rope frequencies)

    return jax.tree.map(one, state, shardings, is_leaf=_is_variable)


def shard_model(model: nnx.Module, mesh: Mesh, rules: ShardingRules) -> nnx.Module:
    """Place ``model``'s parameters on ``mesh`` by ``rules``, in place; returns the model."""
    nnx.update(model, _placed_state(nnx.state(model), mesh, rules))
    return model


def placed_copy(model: nnx.Module, mesh: Mesh, rules: ShardingRules) -> nnx.Module:
    """A new module with ``model``'s parameters placed on ``mesh`` by ``rules``; ``model`` is untouched.

    Data-parallel replicas each take one (``data_parallel.py``); an array already placed
    exactly there is shared, not copied (see ``place``)."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, _placed_state(state, mesh, rules))


def replica_meshes(mesh: Mesh) -> list[Mesh]:
    """One ``(1, pp, tp)`` mesh per data-parallel replica: the slice ``mesh[r, :, :]``."""
    return [Mesh(mesh.devices[r : r + 1], MESH_AXES, axis_types=mesh.axis_types) for r in range(mesh.shape["dp"])]


def place(value, sharding: NamedSharding) -> jax.Array:
    """Put one array on ``sharding``; across processes each process gives the same full value.

    ``device_put`` cannot reach another process's devices, so there every process
    builds its own shards from its (identical) copy: same seed or same checkpoint.
    """
    already = isinstance(value, jax.Array) and isinstance(value.sharding, NamedSharding)
    if already and value.sharding.is_equivalent_to(sharding, value.ndim):
        return value  # already there (models.load(param_sharding=...)); may span other processes
    if jax.process_count() == 1:
        return jax.device_put(value, sharding)
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def param_sharding_fn(mesh: Mesh, rules: ShardingRules):
    """A ``models.load(..., param_sharding=...)`` callback: each weight is read straight into
    its shards, so no device ever holds a whole copy of a model that only fits sharded."""

    def for_param(path: tuple[str, ...], logical_axes: tuple, shape: tuple[int, ...]) -> NamedSharding:
        return NamedSharding(mesh, rules.partition_spec(logical_axes, shape, mesh, name=".".join(path)))

    return for_param


def kv_pages_sharding(mesh: Mesh, rules: ShardingRules) -> NamedSharding:
    """Sharding of one layer's KV pages ``[P, S, K, H]``: split by KV head (``K``) over ``tp``."""
    return NamedSharding(mesh, PartitionSpec(None, None, rules.mesh_axis("kv_heads"), None))


def replicated(mesh: Mesh) -> NamedSharding:
    """Step inputs (token ids, positions, page tables) are small and replicated."""
    return NamedSharding(mesh, PartitionSpec())
