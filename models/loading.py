"""Loading Hugging Face safetensors checkpoints (or orbax ones written by ``energon convert``).

The story of one ``load(path)``:

1. read ``config.json``; its ``architectures`` picks the family module (``models/registry.py``)
   and the family turns the dict into its frozen ``ModelConfig``;
2. build the model *abstractly* (``nnx.eval_shape``): every parameter is a shape and a
   dtype, nothing is allocated yet;
3. the family's ``hf_weight_map(config)`` says, for every Hugging Face tensor name, which
   parameter it fills and how (transpose, reshape, one slice of a stacked parameter);
   names, shapes, missing and unexpected tensors are all checked from the safetensors
   headers before any tensor data is read;
4. tensors are read one at a time, transformed on the host, cast, and placed on their
   device(s) (``param_sharding`` picks the sharding of each), so the peak host memory is
   about one model, not two.

Pickle formats (``pytorch_model.bin``, ``*.pt``, ...) are refused: loading them runs
arbitrary code. The error says how to convert them to safetensors.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.config import ModelConfig
from models.registry import family_for

DTYPES: dict[str, jnp.dtype] = {
    "float32": jnp.dtype(jnp.float32),
    "bfloat16": jnp.dtype(jnp.bfloat16),
    "float16": jnp.dtype(jnp.float16),
}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
SAFETENSORS_INDEX = "model.safetensors.index.json"
# Buffers some exporters save beside the weights; they are recomputed here.
ALWAYS_IGNORED = (r"(.*\.)?rotary_emb\.inv_freq",)
# Show a progress bar when the checkpoint is at least this big.
PROGRESS_MIN_BYTES = 256 * 1024**2
# Reopen a safetensors file after reading this much from it (see _TensorReader).
REOPEN_BYTES = 64 * 1024**2

# ``(param path, logical axes, shape) -> Sharding | None`` (None: the default device).
ParamSharding = Callable[[tuple[str, ...], tuple, tuple[int, ...]], "jax.sharding.Sharding | None"]

CONVERT_HINT = (
    "Pickle checkpoints can run arbitrary code when loaded, so energon only reads safetensors "
    "and orbax. Convert it once, in an environment you trust, with transformers: "
    "python -c \"import transformers as t; m = t.AutoModelForCausalLM.from_pretrained('IN_DIR'); "
    "m.save_pretrained('OUT_DIR', safe_serialization=True)\" (use AutoModel for encoders such as "
    "BERT), copy the tokenizer files too, and load OUT_DIR (or run `energon convert OUT_DIR ORBAX_DIR`)."
)


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """Where one Hugging Face tensor goes in the NNX model, and how it is transformed on the way.

    ``path`` is the parameter's path in the model state (e.g. ``("layers", 0, "attn",
    "q_proj", "kernel")``). The transforms apply in order: ``transpose`` swaps the last
    two axes (torch ``Linear`` weights are ``[out, in]``, ours ``[in, out]``), then
    ``reshape``; ``index`` fills ``param[index]`` of a stacked parameter (e.g. one expert
    of ``[E, D, F]``). ``aliases`` are other names the same tensor has in some checkpoints.
    """

    hf_name: str
    path: tuple[str | int, ...]
    transpose: bool = False
    reshape: tuple[int, ...] | None = None
    index: int | None = None
    aliases: tuple[str, ...] = ()

    def transformed_shape(self, shape: tuple[int, ...]) -> tuple[int, ...] | None:
        """The shape after the transforms, or None when ``reshape`` cannot apply."""
        if self.transpose:
            if len(shape) < 2:
                return None
            shape = (*shape[:-2], shape[-1], shape[-2])
        if self.reshape is not None:
            if int(np.prod(shape)) != int(np.prod(self.reshape)):
                return None
            shape = tuple(self.reshape)
        return tuple(shape)

    def apply(self, array: np.ndarray) -> np.ndarray:
        if self.transpose:
            array = np.swapaxes(array, -1, -2)
        if self.reshape is not None:
            array = array.reshape(self.reshape)
        return array


def parse_dtype(dtype: str | jnp.dtype) -> jnp.dtype:
    """``"float32" | "bfloat16" | "float16"`` (or the matching dtype object) -> ``jnp.dtype``."""
    name = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
    if name not in DTYPES:
        raise ValueError(f"{dtype=} is not supported; supported: {', '.join(DTYPES)}")
    return DTYPES[name]


def read_hf_config(path: str | Path) -> dict:
    """``config.json`` of a checkpoint directory, as a dict."""
    path = Path(path)
    _refuse_pickle_file(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"checkpoint directory {str(path)!r} has no config.json")
    with open(config_file) as f:
        return json.load(f)


def load_config(path: str | Path) -> ModelConfig:
    """The model's frozen config from a checkpoint directory (HF or orbax)."""
    hf = read_hf_config(path)
    _, family = family_for(hf)
    return family.config_from_hf(hf)


def abstract_model(path_or_config: str | Path | ModelConfig, dtype: str | jnp.dtype = "float32") -> nnx.Module:
    """The model with every parameter a ``ShapeDtypeStruct``: nothing allocated."""
    config = path_or_config if isinstance(path_or_config, ModelConfig) else load_config(path_or_config)
    model_cls = model_class(config)
    jdtype = parse_dtype(dtype)
    return nnx.eval_shape(lambda: model_cls(config, dtype=jdtype, rngs=nnx.Rngs(0)))


def model_class(config: ModelConfig) -> type:
    """The NNX class of ``config.architecture``: the family module's class of that name."""
    _, family = family_for({"architectures": [config.architecture]})
    cls = getattr(family, config.architecture, None)
    if cls is None:
        raise ValueError(f"family module {family.__name__} has no class named {config.architecture!r}")
    return cls


def param_variables(model: nnx.Module) -> dict[tuple[str | int, ...], nnx.Variable]:
    """Every variable of ``model`` by its path in the state."""
    return {tuple(p): v for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Variable)}


def logical_axes(var: nnx.Variable) -> tuple:
    return tuple(var.get_metadata().get("logical_axes") or (None,) * len(var.get_value().shape))


def target_sharding(
    param_sharding: ParamSharding | None, path: tuple[str | int, ...], var: nnx.Variable
) -> jax.sharding.Sharding:
    """The sharding ``param_sharding`` asks for, or the default device."""
    sharding = None
    if param_sharding is not None:
        sharding = param_sharding(tuple(str(p) for p in path), logical_axes(var), tuple(var.get_value().shape))
    # local_devices: in a multi-process run jax.devices()[0] belongs to process 0.
    return sharding if sharding is not None else jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def load(
    path: str | Path, dtype: str | jnp.dtype = "float32", *, param_sharding: ParamSharding | None = None
) -> tuple[nnx.Module, ModelConfig]:
    """Load a checkpoint directory (Hugging Face safetensors or ``energon convert`` orbax).

    Returns ``(model, config)``; parameters are in ``dtype``, each placed with the sharding
    ``param_sharding(path, logical_axes, shape)`` returns (default device when None).
    """
    path = Path(path)
    config = load_config(path)
    model = abstract_model(config, dtype)
    from models import orbax_io  # orbax is imported only when needed

    if orbax_io.is_orbax_checkpoint(path):
        orbax_io.restore_into(model, path, param_sharding=param_sharding)
    else:
        _, family = family_for({"architectures": [config.architecture]})
        ignored = ALWAYS_IGNORED + tuple(getattr(family, "HF_IGNORED", ()))
        fill_from_safetensors(model, path, family.hf_weight_map(config), ignored=ignored, param_sharding=param_sharding)
    return model, config


# ---------------------------------------------------------------------------------------
# safetensors


def _refuse_pickle_file(path: Path) -> None:
    if path.is_file() and path.suffix in PICKLE_SUFFIXES:
        raise ValueError(f"refusing to load pickle file {str(path)!r}. {CONVERT_HINT}")


def safetensors_files(path: Path) -> dict[str, Path]:
    """Every tensor name of the checkpoint -> the safetensors file holding it."""
    from safetensors import safe_open

    index = path / SAFETENSORS_INDEX
    if index.is_file():
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {name: path / file for name, file in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ValueError(
                f"checkpoint {str(path)!r} has only pickle weights ({', '.join(pickles)}); refusing to load "
                f"pickle. {CONVERT_HINT}"
            )
        raise ValueError(f"checkpoint directory {str(path)!r} has no *.safetensors files")
    names: dict[str, Path] = {}
    for file in files:
        with safe_open(file, framework="flax") as f:
            for name in f.keys():
                names[name] = file
    return names


def _tensor_shapes(files: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(set(files.values())):
        with safe_open(file, framework="flax") as f:
            for name in f.keys():
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def _resolve_names(specs: Iterable[WeightSpec], available: dict[str, Path]) -> list[tuple[str, WeightSpec]]:
    """Each spec with the checkpoint name it reads; a missing tensor is an error."""
    resolved, missing = [], []
    for spec in specs:
        name = next((n for n in (spec.hf_name, *spec.aliases) if n in available), None)
        if name is None:
            missing.append(spec.hf_name)
        else:
            resolved.append((name, spec))
    if missing:
        shown = ", ".join(repr(m) for m in missing[:10])
        more = f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""
        raise ValueError(f"checkpoint is missing {len(missing)} tensor(s) the model needs: {shown}{more}")
    return resolved


def _check_coverage(
    resolved: list[tuple[str, WeightSpec]], variables: dict[tuple, nnx.Variable]
) -> None:
    """Every parameter gets exactly its data; shapes agree (checked from the headers)."""
    pieces: dict[tuple, set[int | None]] = {}
    for name, spec in resolved:
        if spec.path not in variables:
            raise ValueError(f"weight map sends tensor {name!r} to {spec.path}, which is not a model parameter")
        pieces.setdefault(spec.path, set()).add(spec.index)
    for path, var in variables.items():
        got = pieces.get(path)
        if got is None:
            raise ValueError(f"no checkpoint tensor maps to model parameter {'.'.join(map(str, path))}")
        if None not in got and got != set(range(var.get_value().shape[0])):
            raise ValueError(
                f"stacked parameter {'.'.join(map(str, path))} gets slices {sorted(got)}; "
                f"expected 0..{var.get_value().shape[0] - 1}"
            )


def _check_shape(name: str, shape: tuple[int, ...], spec: WeightSpec, var: nnx.Variable) -> None:
    target = tuple(var.get_value().shape)
    if spec.index is not None:
        target = target[1:]
    if spec.transformed_shape(shape) == target:
        return
    expected = target
    if spec.reshape is None and spec.transpose and len(target) >= 2:
        expected = (*target[:-2], target[-1], target[-2])  # what the checkpoint should hold
    how = f" (to be reshaped to {spec.reshape})" if spec.reshape is not None else ""
    raise ValueError(
        f"shape mismatch for tensor {name!r}: checkpoint has {shape}, model expects {expected}{how} "
        f"for parameter {'.'.join(map(str, spec.path))}"
    )


def _warn_unexpected(available: Iterable[str], used: set[str], ignored: tuple[str, ...]) -> None:
    patterns = [re.compile(p) for p in ignored]
    extra = sorted(n for n in available if n not in used and not any(p.fullmatch(n) for p in patterns))
    if extra:
        shown = ", ".join(repr(n) for n in extra[:10])
        more = f" (and {len(extra) - 10} more)" if len(extra) > 10 else ""
        warnings.warn(f"checkpoint has {len(extra)} unexpected tensor(s), ignored: {shown}{more}", stacklevel=3)


def _host_device() -> jax.Device | None:
    """A CPU device to read tensors onto (None: no CPU backend, use the default)."""
    try:
        return jax.devices("cpu")[0]
    except RuntimeError:
        return None


def fill_from_safetensors(
    model: nnx.Module,
    path: Path,
    specs: list[WeightSpec],
    *,
    ignored: tuple[str, ...] = ALWAYS_IGNORED,
    param_sharding: ParamSharding | None = None,
) -> None:
    """Fill the abstract ``model`` in place from the safetensors files in ``path``."""
    from tqdm.auto import tqdm

    files = safetensors_files(path)
    resolved = _resolve_names(specs, files)
    variables = param_variables(model)
    _check_coverage(resolved, variables)
    shapes = _tensor_shapes(files)
    for name, spec in resolved:
        _check_shape(name, shapes[name], spec, variables[spec.path])
    _warn_unexpected(files, {name for name, _ in resolved}, ignored)

    # Stacked parameters are assembled on the host one at a time, then placed.
    stacks: dict[tuple, tuple[np.ndarray, set[int]]] = {}
    by_file: dict[Path, list[tuple[str, WeightSpec]]] = {}
    for name, spec in resolved:
        by_file.setdefault(files[name], []).append((name, spec))
    total_bytes = sum(f.stat().st_size for f in by_file)
    show = total_bytes >= PROGRESS_MIN_BYTES
    with tqdm(total=len(resolved), desc="loading weights", unit="tensor", disable=not show) as bar:
        for file, entries in by_file.items():
            reader = _TensorReader(file)
            for name, spec in entries:
                var = variables[spec.path]
                array = spec.apply(reader.read(name)).astype(var.get_value().dtype, copy=False)
                if spec.index is None:
                    var.set_value(jax.device_put(array, target_sharding(param_sharding, spec.path, var)))
                else:
                    _fill_stacked(stacks, spec, var, array, param_sharding)
                del array
                bar.update(1)
            reader.close()


class _TensorReader:
    """Reads tensors of one safetensors file as numpy arrays, one at a time.

    safetensors memory-maps the file and every page read stays mapped (and counted in
    our resident memory) until the file is closed, so the file is reopened after every
    ``REOPEN_BYTES`` read: the mapped part never grows past that, whatever the file size.
    bfloat16 goes through the flax reader on the CPU device (numpy cannot read it).
    """

    def __init__(self, file: Path):
        self.file = file
        self.handles: dict[str, object] = {}  # framework -> open safe_open handle
        self.bytes_read = 0

    def _handle(self, framework: str):
        from safetensors import safe_open

        if framework not in self.handles:
            self.handles[framework] = safe_open(self.file, framework=framework)
        return self.handles[framework]

    def read(self, name: str) -> np.ndarray:
        if self._handle("numpy").get_slice(name).get_dtype() == "BF16":
            with jax.default_device(_host_device()):
                array = np.asarray(self._handle("flax").get_tensor(name))
        else:
            array = self._handle("numpy").get_tensor(name)
        self.bytes_read += array.nbytes
        if self.bytes_read >= REOPEN_BYTES:
            self.close()
        return array

    def close(self) -> None:
        self.handles.clear()  # dropping a handle unmaps its file
        self.bytes_read = 0


def _fill_stacked(stacks: dict, spec: WeightSpec, var: nnx.Variable, array: np.ndarray, param_sharding) -> None:
    shape = tuple(var.get_value().shape)
    if spec.path not in stacks:
        stacks[spec.path] = (np.empty(shape, array.dtype), set())
    buf, done = stacks[spec.path]
    buf[spec.index] = array
    done.add(spec.index)
    if len(done) == shape[0]:
        var.set_value(jax.device_put(buf, target_sharding(param_sharding, spec.path, var)))
        del stacks[spec.path]
