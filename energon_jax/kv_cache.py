"""The host's view of the paged KV cache: which page belongs to whom, and which pages hold a known prefix.

The device pool itself is ``pallas_kernels.page_layout`` (one ``KVPages [P, S, K, H]`` per
layer); this module only hands out page numbers. ``PageAllocator`` is plain Python: the
scheduler asks it for pages when a request's tokens need room and gives them back in the
step the request finishes, is aborted or is preempted.

Page 0 (``NULL_PAGE``) is never handed out: padding tokens write their K/V there and page
tables are padded with it, so ``num_pages`` pages in the pool give ``num_pages - 1``
usable ones. Pages are handed out lowest number first, so allocation is deterministic
(tests can compute slots by hand) and freed pages are reused before untouched ones.

Automatic prefix caching (vLLM's block hashes, SGLang's radix sharing, on one allocator):

- Every full page of a sequence has a *block hash*, chained from its parent's:
  ``block_hash(parent, page's token ids, extra keys)`` (sha256; ``extra`` holds what changes
  the KV for the same tokens, e.g. a per-request ``cache_salt``). The chain's root is
  random per scheduler unless a seed is given, so hashes cannot be predicted from outside.
  A hash therefore names a whole prefix, never one page's tokens alone; partial pages get
  no hash and are never shared.
- Pages carry reference counts. ``register(page, h)`` publishes a full page whose K/V is
  written; ``match(hashes)`` finds the longest run of published pages for a chain;
  ``acquire`` takes a reference on them. A page whose count drops to zero keeps its hash
  and waits on an LRU list; it is counted as free, and ``allocate`` takes never-published
  pages first and evicts the least recently freed published page only when it must.
  A request frees its pages tail first, so a chain's tail is evicted before its head.
- ``num_used`` counts referenced pages only; ``num_free`` = untouched + cached-and-free.
"""

from __future__ import annotations

import hashlib
import heapq
import os
from collections import OrderedDict
from collections.abc import Iterable, Sequence

import numpy as np

from pallas_kernels.page_layout import NULL_PAGE, page_bytes

BlockHash = bytes


def prefix_cache_root(seed: int | None) -> BlockHash:
    """The parent hash of every chain's first page: random unless ``seed`` pins it (reproducible runs)."""
    if seed is None:
        return os.urandom(32)
    return hashlib.sha256(b"energon-prefix-cache-root:" + str(int(seed)).encode()).digest()


def block_hash(parent: BlockHash, token_ids: Sequence[int], extra: bytes = b"") -> BlockHash:
    """The hash of one full page: (parent hash, its token ids, extra keys), length-prefixed so no
    two different triples serialise the same."""
    h = hashlib.sha256(parent)
    h.update(len(token_ids).to_bytes(4, "little"))
    h.update(np.asarray(token_ids, np.int64).tobytes())
    h.update(len(extra).to_bytes(4, "little"))
    h.update(extra)
    return h.digest()


class PageAllocator:
    """Hands out page numbers ``1 .. num_pages - 1``; refcounted, with a prefix-cache index."""

    def __init__(self, num_pages: int, page_size: int) -> None:
        if num_pages < 2:
            raise ValueError(f"{num_pages=} must be >= 2 (page 0 is the reserved null page)")
        if page_size < 1:
            raise ValueError(f"{page_size=} must be >= 1")
        self.num_pages = num_pages
        self.page_size = page_size
        self._free: list[int] = [p for p in range(num_pages) if p != NULL_PAGE]  # never published; a heap
        self._ref: dict[int, int] = {}  # page -> references (> 0): the pages in use
        self._hash_of: dict[int, BlockHash] = {}  # published page -> its block hash
        self._page_of: dict[BlockHash, int] = {}  # block hash -> published page
        self._lru: OrderedDict[int, None] = OrderedDict()  # published, unreferenced; oldest first
        self.num_evictions = 0

    @property
    def num_usable(self) -> int:
        """Pages a request can ever get (the null page excluded)."""
        return self.num_pages - 1

    @property
    def num_free(self) -> int:
        """Pages an allocation may take: untouched ones and cached ones nobody references."""
        return len(self._free) + len(self._lru)

    @property
    def num_used(self) -> int:
        """Pages some request references (a shared page counts once)."""
        return len(self._ref)

    @property
    def num_cached(self) -> int:
        """Published pages (referenced or not) that a new request can hit."""
        return len(self._page_of)

    def pages_needed(self, num_tokens: int) -> int:
        """Pages that hold ``num_tokens`` tokens of one sequence."""
        return -(-num_tokens // self.page_size)

    def can_allocate(self, n_pages: int) -> bool:
        return n_pages <= self.num_free

    def allocate(self, n_pages: int) -> list[int]:
        """``n_pages`` free pages (untouched lowest first, then evicting cached pages least recently
        freed first); raises ``RuntimeError`` when the pool is short."""
        if n_pages < 0:
            raise ValueError(f"{n_pages=} must be >= 0")
        if n_pages > self.num_free:
            raise RuntimeError(f"cannot allocate {n_pages=}: only {self.num_free} of {self.num_usable} pages are free")
        pages = []
        for _ in range(n_pages):
            if self._free:
                page = heapq.heappop(self._free)
            else:
                page, _ = self._lru.popitem(last=False)
                del self._page_of[self._hash_of.pop(page)]
                self.num_evictions += 1
            self._ref[page] = 1
            pages.append(page)
        return pages

    def free(self, pages: Iterable[int]) -> None:
        """Drop one reference to each page; freeing a page that is not referenced is a bug and raises.

        Give a request's pages in position order: they are released tail first, so that the
        LRU list evicts a chain's tail before its head."""
        pages = list(pages)
        bad = [p for p in pages if p not in self._ref]
        if bad or len(set(pages)) != len(pages):
            raise RuntimeError(f"free({pages}): pages {bad or pages} are not allocated (double free?)")
        for p in reversed(pages):
            self._ref[p] -= 1
            if self._ref[p]:
                continue
            del self._ref[p]
            if p in self._hash_of:
                self._lru[p] = None  # newest end: evicted after everything freed before it
            else:
                heapq.heappush(self._free, p)

    def is_allocated(self, page: int) -> bool:
        return page in self._ref

    def ref_count(self, page: int) -> int:
        return self._ref.get(page, 0)

    def hash_of(self, page: int) -> BlockHash | None:
        """The block hash a page is published under (``None``: not a cache page)."""
        return self._hash_of.get(page)

    # -- prefix cache ---------------------------------------------------------------------
    def match(self, hashes: Iterable[BlockHash]) -> list[int]:
        """Published pages of the longest prefix of ``hashes`` (takes no reference)."""
        pages = []
        for h in hashes:
            page = self._page_of.get(h)
            if page is None:
                break
            pages.append(page)
        return pages

    def num_unreferenced(self, pages: Iterable[int]) -> int:
        """How many of ``pages`` sit on the free list (acquiring them uses up free pages)."""
        return sum(1 for p in pages if p not in self._ref)

    def acquire(self, pages: Iterable[int]) -> None:
        """Take one reference to each published page (a cache hit)."""
        for p in pages:
            if p not in self._hash_of:
                raise RuntimeError(f"acquire: page {p} is not a published cache page")
            if p in self._ref:
                self._ref[p] += 1
            else:
                del self._lru[p]
                self._ref[p] = 1

    def register(self, page: int, h: BlockHash) -> bool:
        """Publish a referenced full page whose K/V is written as holding the prefix ``h``.

        ``False`` (nothing changes) when another page already holds ``h`` (two requests
        computed the same prefix at once: the first one stays the cached copy) or when
        this page is already published."""
        if page not in self._ref:
            raise RuntimeError(f"register: page {page} is not allocated")
        if h in self._page_of or page in self._hash_of:
            return False
        self._page_of[h] = page
        self._hash_of[page] = h
        return True

    def reset_prefix_cache(self) -> int:
        """Forget every cached page nobody references; returns how many were dropped."""
        n = len(self._lru)
        for p in self._lru:
            del self._page_of[self._hash_of.pop(p)]
            heapq.heappush(self._free, p)
        self._lru.clear()
        return n


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
