"""The host's view of the paged KV cache: which page belongs to whom.

The device pool itself is ``pallas_kernels.page_layout`` (one ``KVPages [P, S, K, H]`` per
layer); this module only hands out page numbers. ``PageAllocator`` is plain Python: the
scheduler asks it for pages when a request's tokens need room and gives them back in the
step the request finishes, is aborted or is preempted.

Page 0 (``NULL_PAGE``) is never handed out: padding tokens write their K/V there and page
tables are padded with it, so ``num_pages`` pages in the pool give ``num_pages - 1``
usable ones. Pages are handed out lowest number first, so allocation is deterministic
(tests can compute slots by hand) and freed pages are reused before untouched ones.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable

from pallas_kernels.page_layout import NULL_PAGE, page_bytes


class PageAllocator:
    """Hands out page numbers ``1 .. num_pages - 1`` from a free pool."""

    def __init__(self, num_pages: int, page_size: int) -> None:
        if num_pages < 2:
            raise ValueError(f"{num_pages=} must be >= 2 (page 0 is the reserved null page)")
        if page_size < 1:
            raise ValueError(f"{page_size=} must be >= 1")
        self.num_pages = num_pages
        self.page_size = page_size
        self._free: list[int] = [p for p in range(num_pages) if p != NULL_PAGE]  # a heap (sorted = valid)
        self._used: set[int] = set()

    @property
    def num_usable(self) -> int:
        """Pages a request can ever get (the null page excluded)."""
        return self.num_pages - 1

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def pages_needed(self, num_tokens: int) -> int:
        """Pages that hold ``num_tokens`` tokens of one sequence."""
        return -(-num_tokens // self.page_size)

    def can_allocate(self, n_pages: int) -> bool:
        return n_pages <= len(self._free)

    def allocate(self, n_pages: int) -> list[int]:
        """``n_pages`` free pages, lowest first; raises ``RuntimeError`` when the pool is short."""
        if n_pages < 0:
            raise ValueError(f"{n_pages=} must be >= 0")
        if n_pages > len(self._free):
            raise RuntimeError(f"cannot allocate {n_pages=}: only {self.num_free} of {self.num_usable} pages are free")
        pages = [heapq.heappop(self._free) for _ in range(n_pages)]
        self._used.update(pages)
        return pages

    def free(self, pages: Iterable[int]) -> None:
        """Return pages to the pool. Freeing a page that is not allocated is a bug and raises."""
        pages = list(pages)
        bad = [p for p in pages if p not in self._used]
        if bad or len(set(pages)) != len(pages):
            raise RuntimeError(f"free({pages}): pages {bad or pages} are not allocated (double free?)")
        for p in pages:
            self._used.remove(p)
            heapq.heappush(self._free, p)

    def is_allocated(self, page: int) -> bool:
        return page in self._used


def kv_cache_pages_for_bytes(
    budget_bytes: int, num_layers: int, page_size: int, num_kv_heads: int, head_dim: int, dtype: object
) -> int:
    """How many pages (null page included) fit in ``budget_bytes`` across all layers."""
    per_page = num_layers * page_bytes(page_size, num_kv_heads, head_dim, dtype)
    num_pages = int(budget_bytes) // per_page
    if num_pages < 2:
        raise ValueError(
            f"kv_cache_bytes={budget_bytes} holds {num_pages} pages of {per_page} bytes "
            f"({num_layers=}, {page_size=}, {num_kv_heads=}, {head_dim=}, {dtype=}); need >= 2 (page 0 is reserved)"
        )
    return num_pages
