"""``energon convert HF_DIR OUT_DIR``: a Hugging Face safetensors checkpoint to an orbax one.

The parameters are loaded tensor by tensor (``models.load``), optionally cast
(``--dtype``), and written as an orbax checkpoint under ``OUT_DIR/params``; every
non-weight file of ``HF_DIR`` (``config.json``, ``generation_config.json``, tokenizer
files) is copied beside them, so ``OUT_DIR`` loads anywhere ``HF_DIR`` did and a sharded
restore reads only each device's shards.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

NAME = "convert"
HELP = "convert a Hugging Face safetensors checkpoint to an orbax checkpoint (config and tokenizer copied)"

# Weight files are rewritten as orbax, never copied (pickles are refused by the loader).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".msgpack", ".h5")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("hf_dir", help="Hugging Face checkpoint directory (config.json + *.safetensors)")
    parser.add_argument("out_dir", help="output directory (created; must be empty unless --overwrite)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="dtype of the saved parameters (default: float32)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT_DIR")


def copy_side_files(hf_dir: Path, out_dir: Path) -> list[str]:
    """Copy config, generation config and tokenizer files; returns the names copied."""
    copied = []
    for src in sorted(hf_dir.iterdir()):
        if not src.is_file() or src.suffix in _WEIGHT_SUFFIXES or src.name in _WEIGHT_INDEXES:
            continue
        shutil.copy2(src, out_dir / src.name)
        copied.append(src.name)
    return copied


def convert(hf_dir: str | Path, out_dir: str | Path, *, dtype: str = "float32", overwrite: bool = False) -> Path:
    """Write the orbax checkpoint; returns ``out_dir``."""
    # Submodule imports: they work even where an old editable install made `models` a namespace package.
    from models.loading import load
    from models.orbax_io import save_params

    hf_dir, out = Path(hf_dir), Path(out_dir)
    if not hf_dir.is_dir():
        raise ValueError(f"hf_dir={str(hf_dir)!r} is not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"out_dir={str(out)!r} is not empty; pass --overwrite to write into it")
    # Parameters stay in host memory: a model bigger than one accelerator still converts.
    model, _ = load(hf_dir, dtype, param_sharding=_on_host())
    out.mkdir(parents=True, exist_ok=True)
    copy_side_files(hf_dir, out)
    save_params(model, out)
    return out


def _on_host():
    """A ``param_sharding`` that keeps every parameter on the CPU device (None: no CPU backend)."""
    import jax

    try:
        cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    except RuntimeError:
        return None
    return lambda path, axes, shape: cpu


def run(args: argparse.Namespace) -> int:
    try:
        out = convert(args.hf_dir, args.out_dir, dtype=args.dtype, overwrite=args.overwrite)
    except ValueError as e:
        print(f"energon convert: {e}", file=sys.stderr)
        return 2
    print(f"wrote orbax checkpoint to {out}")
    return 0
