"""Sizing the KV page pool from device memory, as vLLM's ``gpu_memory_utilization`` does.

On an accelerator the pool takes what is left of ``kv_cache_memory_fraction`` of each
device's memory once the weights and the largest step's temporaries are counted:

1. the engine builds its runner with a provisional pool (room for one ``max_model_len``
   sequence) and runs the largest step shape once on dummy inputs (the profile);
2. each device reports its memory limit and its peak bytes in use (weights, the
   provisional pool and the step's working memory: everything the real run needs);
3. what one page costs on each device is read off the provisional pool's shards (so
   tensor-parallel head splits, pipeline stages and replicas are all counted as placed);
4. the pool grows by the pages the tightest device can still hold.

The CPU backend reports no memory statistics, so there the engine keeps its explicit
default (room for ``max_num_seqs`` full sequences). Nothing here imports the engine.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np

DEFAULT_KV_CACHE_MEMORY_FRACTION = 0.9


@dataclasses.dataclass(frozen=True)
class DeviceMemory:
    """One device after the profiled step: bytes it may use, its peak, and its share of the pool."""

    device: str
    limit: int  # bytes the allocator may hand out on this device
    peak: int  # peak bytes in use during the profile (weights + provisional pool + step temporaries)
    kv_bytes: int  # bytes of the provisional pool that live on this device


def check_fraction(kv_cache_memory_fraction: float) -> float:
    f = kv_cache_memory_fraction
    if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < f <= 1.0:
        raise ValueError(f"kv_cache_memory_fraction={f!r} must be a number in (0, 1]")
    return float(f)


def memory_stats(device: Any) -> dict[str, int] | None:
    """The device allocator's statistics, or None where the backend keeps none (the CPU)."""
    try:
        stats = device.memory_stats()
    except (AttributeError, NotImplementedError, RuntimeError):
        return None
    if not stats or "bytes_limit" not in stats:
        return None
    return stats


def kv_bytes_by_device(kv_tree: Any) -> dict[Any, int]:
    """Bytes of every array of ``kv_tree`` per device, from the arrays' own shards."""
    out: dict[Any, int] = {}
    for leaf in jax.tree.leaves(kv_tree):
        for shard in getattr(leaf, "addressable_shards", ()):
            out[shard.device] = out.get(shard.device, 0) + int(shard.data.nbytes)
    return out


def device_memory(kv_tree: Any) -> list[DeviceMemory] | None:
    """Memory of every device that holds part of the pool; None if any of them keeps no stats."""
    out = []
    for device, kv_bytes in kv_bytes_by_device(kv_tree).items():
        stats = memory_stats(device)
        if stats is None:
            return None
        peak = int(stats.get("peak_bytes_in_use", stats.get("bytes_in_use", 0)))
        out.append(DeviceMemory(str(device), int(stats["bytes_limit"]), peak, kv_bytes))
    return out or None


def pages_for_memory(memories: Iterable[DeviceMemory], *, provisional_pages: int, fraction: float) -> int:
    """Pages (null page included) the pool may hold so that no device passes ``fraction`` of its limit.

    Each device's peak already includes the provisional pool, so the pool may grow by
    what is left under ``fraction * limit``, in that device's pages."""
    fraction = check_fraction(fraction)
    if provisional_pages < 2:
        raise ValueError(f"{provisional_pages=} must be >= 2")
    best: int | None = None
    for m in memories:
        if m.kv_bytes <= 0:
            continue
        per_page = m.kv_bytes / provisional_pages
        spare = fraction * m.limit - m.peak
        pages = provisional_pages + math.floor(spare / per_page)
        best = pages if best is None else min(best, pages)
    if best is None:
        raise ValueError("no device holds any part of the KV pool: cannot size it from memory")
    return best


def describe_pool(num_pages: int, page_size: int, max_model_len: int) -> str:
    """One line for logs and ``energon info``: pages, tokens, and full-length sequences they hold."""
    usable = max(0, num_pages - 1)  # page 0 is the reserved null page
    tokens = usable * page_size
    per_seq = -(-max_model_len // page_size)
    return (
        f"{usable} pages x {page_size} tokens = {tokens} tokens; "
        f"{usable // per_seq} sequences of max_model_len={max_model_len} at once"
    )


def pool_pages_from_memory(runner: Any, buckets: Any, provisional_pages: int, fraction: float) -> int:
    """Profile the largest step shape on a runner built with a provisional pool; the pages
    device memory allows (every dp replica's devices counted; dummy rows write only the null page)."""
    from energon_jax.batch import warmup_batches

    largest = max(warmup_batches(buckets), key=lambda b: (np.shape(b.input_ids)[0], np.shape(b.logits_indices)[0]))
    runners = list(getattr(runner, "replicas", [runner]))
    for one in runners:
        one.step(largest)
    memories = device_memory([r.kv_cache for r in runners])
    if memories is None:
        raise RuntimeError("a device of the KV pool stopped reporting memory statistics during the profile")
    num_pages = pages_for_memory(memories, provisional_pages=provisional_pages, fraction=fraction)
    tight = min(memories, key=lambda m: fraction * m.limit - m.peak)
    logging.getLogger(__name__).info(
        "KV pool sized from memory: %d pages (kv_cache_memory_fraction=%.2f of %d bytes on %s, whose "
        "profiled peak is %d bytes)", num_pages, fraction, tight.limit, tight.device, tight.peak,
    )
    return num_pages
