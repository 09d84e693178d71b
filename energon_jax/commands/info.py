"""``energon info [--model PATH]``: what a checkpoint is and how much memory it needs.

Reads only ``config.json`` and builds the model abstractly (no weights are loaded), so
it is instant even for large checkpoints.
"""

from __future__ import annotations

import argparse
import math
import sys

NAME = "info"
HELP = "print a checkpoint's architecture, parameter count, dtype and memory needs"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="Hugging Face checkpoint directory (default: embedded demo)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="dtype the weights and KV cache would be held in (default: float32)")
    parser.add_argument("--max-model-len", type=int, default=None, help="default: the model's maximum")
    parser.add_argument("--max-num-seqs", type=int, default=32, help="concurrent sequences for the KV estimate")
    parser.add_argument("--page-size", type=int, default=16, help="tokens per KV page (default: 16)")
    parser.add_argument("--kv-cache-memory-fraction", type=float, default=0.9,
                        help="share of device memory for weights, a step and the KV pool (default: 0.9)")
    from energon_jax.commands.generate import add_disagg_arguments

    add_disagg_arguments(parser)  # prints the layout they would give


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def describe(path: str | None, dtype: str = "float32", max_model_len: int | None = None,
             max_num_seqs: int = 32, page_size: int = 16, kv_cache_memory_fraction: float = 0.9,
             device_stats: dict[str, int] | None = None) -> dict[str, object]:
    """The facts ``info`` prints, as a dict (tests read it)."""
    import jax
    import jax.numpy as jnp

    from energon_jax.engine import demo_model_path
    from models.loading import abstract_model, load_config, parse_dtype

    root = str(demo_model_path()) if path is None else path
    config = load_config(root)
    model = abstract_model(config, dtype)
    from flax import nnx

    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    n_params = sum(math.prod(p.shape) for p in params)
    itemsize = jnp.dtype(parse_dtype(dtype)).itemsize
    weight_bytes = sum(math.prod(p.shape) * jnp.dtype(p.dtype).itemsize for p in params)
    max_len = min(max_model_len or config.max_position_embeddings, config.max_position_embeddings)
    facts: dict[str, object] = {
        "model": root,
        "architecture": config.architecture,
        "parameters": n_params,
        "dtype": str(jnp.dtype(parse_dtype(dtype))),
        "weights_bytes": weight_bytes,
        "layers": config.num_layers,
        "hidden_size": config.hidden_size,
        "heads": f"{config.num_heads} query / {config.num_kv_heads} kv, head_dim {config.head_dim}",
        "vocab_size": config.vocab_size,
        "max_model_len": max_len,
        "encoder": config.is_encoder,
    }
    if not config.is_encoder:
        kv_per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * itemsize
        facts["kv_bytes_per_token"] = kv_per_token
        facts["kv_bytes_full"] = kv_per_token * max_len * max_num_seqs
        facts["kv_pool"] = _pool(facts, page_size, max_num_seqs, kv_cache_memory_fraction, device_stats)
    return facts


def _pool(facts: dict[str, object], page_size: int, max_num_seqs: int, fraction: float,
          device_stats: dict[str, int] | None) -> str:
    """The pool the engine would build on this machine's first device, as one line.

    With allocator statistics (an accelerator) the engine sizes the pool from memory; before
    loading, the step's working memory is unknown, so this is an upper bound the engine's
    profiled step lowers a little. Without them (the CPU): room for ``max_num_seqs`` sequences."""
    from energon_jax.memory_sizing import check_fraction, describe_pool, memory_stats

    import jax

    max_len = int(facts["max_model_len"])
    per_seq = -(-max_len // page_size)
    stats = device_stats if device_stats is not None else memory_stats(jax.devices()[0])
    if stats is None:
        pages = 1 + max_num_seqs * per_seq
        return f"{describe_pool(pages, page_size, max_len)} (explicit default: --max-num-seqs full sequences)"
    spare = check_fraction(fraction) * stats["bytes_limit"] - int(facts["weights_bytes"])
    pages = max(0, int(spare // (int(facts["kv_bytes_per_token"]) * page_size)))
    return (f"{describe_pool(pages, page_size, max_len)} (sized from device memory, "
            f"kv_cache_memory_fraction={fraction}: at most this, before the profiled step)")


def run(args: argparse.Namespace) -> int:
    from energon_jax.disagg import DisaggOptions

    try:
        f = describe(args.model, args.dtype, args.max_model_len, args.max_num_seqs, args.page_size,
                     args.kv_cache_memory_fraction)
        disagg = DisaggOptions.from_kwargs(getattr(args, "prefill_devices", None), getattr(args, "decode_devices", None),
                                           getattr(args, "prefill_tp", None), getattr(args, "decode_tp", None))
    except ValueError as e:
        print(f"energon info: {e}", file=sys.stderr)
        return 2
    rows = [
        ("model", f["model"]),
        ("architecture", f["architecture"]),
        ("parameters", f"{f['parameters']:,} ({f['parameters'] / 1e6:.1f}M)"),
        ("dtype", f["dtype"]),
        ("layers", f["layers"]),
        ("hidden size", f["hidden_size"]),
        ("attention", f["heads"]),
        ("vocab size", f["vocab_size"]),
        ("max model len", f["max_model_len"]),
        ("weights", _human(f["weights_bytes"])),
    ]
    if "kv_bytes_per_token" in f:
        rows.append(("KV cache / token", _human(f["kv_bytes_per_token"])))
        rows.append((f"KV cache, {args.max_num_seqs} seqs x max len", _human(f["kv_bytes_full"])))
        rows.append(("total (weights + that KV)", _human(f["weights_bytes"] + f["kv_bytes_full"])))
        rows.append(("KV pool", f["kv_pool"]))
    rows.append(("layout", "colocated (one device group)" if disagg is None
                 else f"{disagg.describe()}; one weight copy and one KV pool (as above) per group"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0
