"""Copying KV pages from one pool to another, device to device (``disagg.py`` moves a prefilled
request's pages from the prefill group's pool into the decode group's).

``PageMover.move(src, dst, src_pages, dst_pages)``: a jitted gather of the pages on the
source devices, ``jax.device_put`` of the result to the destination pool's own shardings
(a device-to-device copy: nothing goes through host numpy), and a jitted scatter into the
destination pages (the destination buffers are donated, so the pool is updated in place).
Page lists are padded to a power-of-two bucket with the null page, so one gather and one
scatter compile per bucket and never again. int8 pools move their scales with the pages:
the gather and scatter run over every leaf of the per-layer ``KVPages``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from pallas_kernels.page_layout import NULL_PAGE

logger = logging.getLogger(__name__)


def page_buckets(max_pages: int) -> tuple[int, ...]:
    """Page counts a transfer is padded to: powers of two up to the first that holds ``max_pages``."""
    out = [1]
    while out[-1] < max_pages:
        out.append(out[-1] * 2)
    return tuple(out)


@dataclasses.dataclass
class TransferStats:
    transfers: int = 0
    pages: int = 0  # pages moved (not counting bucket padding)
    bytes: int = 0  # bytes those pages hold, every layer, scales included


class PageMover:
    """Copies pages of one pool into pages of another, device to device.

    ``move(src, dst, src_pages, dst_pages)``: gather ``src[src_pages]`` on the source devices
    (``[n, S, K, H]`` per layer, scales ``[n, S, K]`` for int8 pages), ``jax.device_put`` the
    result to the destination pool's own shardings, scatter it into ``dst[dst_pages]``
    (the destination buffers are donated). Page lists are padded to a bucket with the
    null page, which padding reads from and writes to (page 0 holds nothing). Returns the
    new destination cache; nothing waits for the device."""

    def __init__(self, max_pages: int) -> None:
        self.buckets = page_buckets(max_pages)
        self._gather = jax.jit(lambda kv, idx: jax.tree.map(lambda a: a[idx], kv))
        self._scatter = jax.jit(
            lambda kv, idx, moved: jax.tree.map(lambda a, m: a.at[idx].set(m), kv, moved), donate_argnums=(0,)
        )
        self._seen: set[int] = set()
        self.num_compiles = 0  # page-count buckets compiled (a gather and a scatter each)
        self.stats = TransferStats()

    def bucket(self, n: int) -> int:
        for b in self.buckets:
            if n <= b:
                return b
        raise ValueError(f"a transfer of {n} pages is more than the largest bucket {self.buckets[-1]}")

    def _padded(self, pages: Sequence[int]) -> np.ndarray:
        b = self.bucket(len(pages))
        if b not in self._seen:  # jax.jit compiles once per shape; count and log it like the runner
            self._seen.add(b)
            self.num_compiles += 1
            logger.info("page transfer compiled for a bucket of %d pages", b)
        return np.asarray(list(pages) + [NULL_PAGE] * (b - len(pages)), np.int32)

    def gather(self, src: Any, pages: Sequence[int]) -> Any:
        """``src[pages]`` per leaf, padded to the bucket with the null page: ``[bucket, ...]``."""
        return self._gather(src, self._padded(pages))

    def scatter(self, dst: Any, pages: Sequence[int], moved: Any) -> Any:
        """Write ``moved`` (a ``gather`` result, on ``dst``'s devices) into ``dst[pages]``; padding
        rows go to the null page. ``dst`` is donated; returns the new cache."""
        return self._scatter(dst, self._padded(pages), moved)

    def move(self, src: Any, dst: Any, src_pages: Sequence[int], dst_pages: Sequence[int]) -> Any:
        if len(src_pages) != len(dst_pages):
            raise ValueError(f"{len(src_pages)} source pages for {len(dst_pages)} destination pages")
        moved = self.gather(src, src_pages)  # on the source group's devices
        moved = jax.device_put(moved, jax.tree.map(lambda a: a.sharding, dst))  # device to device
        return self.scatter(dst, dst_pages, moved)

    def warmup(self, src: Any, dst: Any) -> Any:
        """Compile every bucket by moving the null page onto itself; returns the new ``dst``."""
        for b in self.buckets:
            dst = self.move(src, dst, [NULL_PAGE] * b, [NULL_PAGE] * b)
        return dst
