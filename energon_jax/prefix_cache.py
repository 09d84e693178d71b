"""The scheduler's prefix-cache bookkeeping: which of a request's pages are hashed, hits, or published.

``kv_cache.PageAllocator`` owns the pages, their reference counts, the hash -> page index
and the LRU list; this class owns the per-request side, for one ``Scheduler``:

- ``hash_prompt`` when a request is queued: the block hash of every full prompt page,
  chained from the root (``kv_cache.block_hash``; extra keys: the request's ``cache_salt``).
- ``match`` at admission: the published pages of the longest cached prefix, at most
  ``num_tokens - 1`` tokens (the last known token is always fed, for its logits). A
  preempted request looks up its generated tokens too.
- ``publish`` in ``Scheduler.update``: the full pages among the tokens a finished step
  wrote. Never at ``schedule``: with a plan in flight, a page must not be a hit before the
  step that writes it is done.
- ``pending``: hashes that running requests hold but have not published (being computed);
  a waiting request whose next page is pending waits (SGLang's in-batch prefix sharing).

Counters for metrics: ``query_tokens`` (tokens of admitted requests looked up) and
``hit_tokens`` (tokens reused), so the hit rate is ``hit_tokens / query_tokens``.
"""

from __future__ import annotations

from collections.abc import Iterable

from energon_jax.kv_cache import PageAllocator, block_hash, prefix_cache_root
from energon_jax.request import Request


class PrefixCache:
    """Per-request prefix-cache state of one scheduler (see the module docstring)."""

    def __init__(self, allocator: PageAllocator, *, seed: int | None = None) -> None:
        self.allocator = allocator
        self.page_size = allocator.page_size
        self.root = prefix_cache_root(seed)
        self._published: dict[str, int] = {}  # request id -> leading pages that are hits or published
        self.query_tokens = 0
        self.hit_tokens = 0

    @staticmethod
    def extra_keys(req: Request) -> bytes:
        """What besides the tokens changes a page's K/V: the request's cache salt."""
        return b"" if req.cache_salt is None else b"salt:" + req.cache_salt.encode()

    def _hash_pages(self, req: Request, n_pages: int) -> None:
        """Extend ``req.block_hashes`` over its first ``n_pages`` full pages of known tokens."""
        ps, hashes, extra = self.page_size, req.block_hashes, self.extra_keys(req)
        for i in range(len(hashes), n_pages):
            hashes.append(block_hash(hashes[i - 1] if i else self.root, req.tokens(i * ps, (i + 1) * ps), extra))

    def hash_prompt(self, req: Request) -> None:
        self._hash_pages(req, len(req.prompt_token_ids) // self.page_size)

    def _limit(self, req: Request) -> int:
        """Pages of ``req`` that may be hits: all full pages before its last known token."""
        return (req.num_tokens - 1) // self.page_size

    def match(self, req: Request) -> list[int]:
        """Published pages of ``req``'s longest cached prefix (no reference taken)."""
        if not self.allocator.num_cached:
            return []
        limit = self._limit(req)
        self._hash_pages(req, limit)
        return self.allocator.match(req.block_hashes[:limit])

    def pending(self, running: Iterable[Request]) -> set[bytes]:
        """Block hashes that ``running`` requests hold but have not published yet."""
        out: set[bytes] = set()
        for req in running:
            done = self._published.get(req.request_id, 0)
            if done < len(req.block_hashes):
                out.update(req.block_hashes[done:])
        return out

    def waits_for(self, req: Request, num_hits: int, pending: set[bytes]) -> bool:
        """Whether ``req``'s first page past its cached prefix is one being computed."""
        return num_hits < self._limit(req) and req.block_hashes[num_hits] in pending

    def admitted(self, req: Request, num_hits: int, first: bool) -> None:
        """Record an admission that reused ``num_hits`` pages (``first``: never admitted before)."""
        cached = num_hits * self.page_size
        self._published[req.request_id] = num_hits
        self.query_tokens += req.num_tokens
        self.hit_tokens += cached
        if first:
            req.num_cached_tokens = cached

    def publish(self, req: Request, num_written: int) -> None:
        """Publish ``req``'s full pages among its first ``num_written`` tokens (their step is done)."""
        full = num_written // self.page_size
        done = self._published.get(req.request_id, 0)
        if full <= done:
            return
        self._hash_pages(req, full)
        for i in range(done, full):
            self.allocator.register(req.pages[i], req.block_hashes[i])  # False: a copy is cached already
        self._published[req.request_id] = full

    def forget(self, req: Request) -> None:
        """``req`` gave its pages back (finished or preempted)."""
        self._published.pop(req.request_id, None)
