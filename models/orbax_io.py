"""Model parameters as an orbax checkpoint: written by ``energon convert``, read by ``models.load``.

Layout of a converted directory::

    OUT_DIR/config.json, tokenizer files ...   copied from the Hugging Face checkpoint
    OUT_DIR/params/                             orbax (StandardCheckpointer), a nested dict of
                                                arrays keyed by the NNX parameter path
    OUT_DIR/energon_checkpoint.json            {"format": "orbax", "params": "params", "dtype": ...}

Restoring passes a target ``ShapeDtypeStruct`` with a sharding for every parameter, so
each device reads only its own shards from disk: a sharded restore never builds the
whole model on one device. The target dtype may differ from the saved one (orbax casts).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
from flax import nnx

from models.loading import ParamSharding, param_variables, target_sharding

MARKER = "energon_checkpoint.json"
PARAMS_DIR = "params"
FORMAT = "orbax"


def is_orbax_checkpoint(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def _nest(flat: dict[tuple, object]) -> dict:
    """``{("layers", 0, "q", "kernel"): x}`` -> ``{"layers": {"0": {"q": {"kernel": x}}}}``."""
    tree: dict = {}
    for path, leaf in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(str(key), {})
        node[str(path[-1])] = leaf
    return tree


def _leaf(tree: dict, path: tuple) -> object:
    for key in path:
        tree = tree[str(key)]
    return tree


def save_params(model: nnx.Module, out_dir: str | Path) -> Path:
    """Write ``model``'s parameters to ``out_dir/params`` and the marker file; returns ``out_dir``."""
    import orbax.checkpoint as ocp

    out = Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    variables = param_variables(model)
    tree = _nest({path: var.get_value() for path, var in variables.items()})
    dtypes = sorted({str(var.get_value().dtype) for var in variables.values()})
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(out / PARAMS_DIR, tree, force=True)
        ckptr.wait_until_finished()
    with open(out / MARKER, "w") as f:
        json.dump({"format": FORMAT, "params": PARAMS_DIR, "dtype": dtypes[0] if len(dtypes) == 1 else dtypes}, f)
    return out


def restore_into(model: nnx.Module, path: str | Path, *, param_sharding: ParamSharding | None = None) -> None:
    """Fill the abstract ``model`` in place from the orbax checkpoint in ``path``."""
    import orbax.checkpoint as ocp

    root = Path(path).absolute()
    with open(root / MARKER) as f:
        marker = json.load(f)
    if marker.get("format") != FORMAT:
        raise ValueError(f"{MARKER} in {str(root)!r} has format={marker.get('format')!r}; expected {FORMAT!r}")
    variables = param_variables(model)
    target = _nest({
        p: jax.ShapeDtypeStruct(
            v.get_value().shape, v.get_value().dtype, sharding=target_sharding(param_sharding, p, v)
        )
        for p, v in variables.items()
    })
    params_dir = root / marker.get("params", PARAMS_DIR)
    _check_saved_tree(params_dir, target)
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(params_dir, target)
    for p, var in variables.items():
        var.set_value(_leaf(restored, p))


def _check_saved_tree(params_dir: Path, target: dict) -> None:
    """Name missing / unexpected / mis-shaped parameters before orbax reads anything."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        saved = ckptr.metadata(params_dir)
    saved_tree = getattr(saved, "item_metadata", saved)
    saved_tree = getattr(saved_tree, "tree", saved_tree)
    want = {_dotted(k): v for k, v in jax.tree_util.tree_leaves_with_path(target)}
    have = {_dotted(k): v for k, v in jax.tree_util.tree_leaves_with_path(saved_tree)}
    missing = sorted(set(want) - set(have))
    if missing:
        raise ValueError(f"orbax checkpoint {str(params_dir)!r} is missing parameter(s): {', '.join(missing[:10])}")
    for key, spec in want.items():
        shape = tuple(getattr(have[key], "shape", ()))
        if shape != tuple(spec.shape):
            raise ValueError(
                f"shape mismatch for parameter {key}: orbax checkpoint has {shape}, model expects {tuple(spec.shape)}"
            )


def _dotted(keys: tuple) -> str:
    """``(DictKey('layers'), DictKey('0'), ...)`` -> ``"layers.0..."``."""
    return ".".join(str(getattr(k, "key", getattr(k, "name", k))) for k in keys)
