"""KV caches kept in memory between turns, found again by the tokens they hold.

Every cache knows its token ids (`KVCache.tokens`), so the next prompt of any conversation,
a chat's or a client's that resends its whole history, finds the cache that shares the
longest prefix with it, and reads only the rest (mlx-lm's `LRUPromptCache` idea: nearest
prefix wins). A taken cache leaves the pool while it is in use and comes back with the
answer's tokens in it; the least recently used go first when the pool passes its budget.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .cache import KVCache

DEFAULT_BUDGET_BYTES = 1 << 30
DEFAULT_MAX_ENTRIES = 8


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class PromptCaches:
    """A pool of KV caches, most recently used last; safe to share between threads."""

    def __init__(
        self,
        budget_bytes: int = DEFAULT_BUDGET_BYTES,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        min_share: float = 0.0,
    ):
        self.budget_bytes = budget_bytes
        self.max_entries = max_entries
        # A cache is taken (and cut to the shared prefix) only when that prefix is at least
        # this part of it; a shorter shared prefix (a server's conversations that share a
        # system prompt) is read from a copy, and the cache stays whole for its own
        # conversation.
        self.min_share = min_share
        self._entries: list[tuple[str | None, KVCache]] = []
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def take(self, prompt: Sequence[int], like: KVCache, key: str | None = None) -> KVCache | None:
        """Remove and return the cache sharing the longest prefix with `prompt` among those
        that can stand in for `like` (same layout and shapes), kept to that prefix; None when
        none shares a token. With `key` (a stored conversation's id) only that key's cache,
        without it only caches put without a key."""
        with self._lock:
            best, best_len = None, 0
            for i, (k, cache) in enumerate(self._entries):
                if k != key:  # a conversation's own cache, or one of the anonymous ones
                    continue
                if not cache.fits(like):
                    continue
                n = common_prefix(cache.tokens, prompt)
                if n > best_len:
                    best, best_len = i, n
            if best is None:
                return None
            _, cache = self._entries[best]
            if best_len < self.min_share * len(cache.tokens):
                self._entries.append(self._entries.pop(best))  # recently used
                return cache.copy_prefix(prompt)
            self._entries.pop(best)
        cache.keep_prefix(prompt)
        return cache

    def put(self, cache: KVCache, key: str | None = None) -> None:
        """Keep `cache` (an empty one is dropped); a cache with the same key is replaced."""
        if not cache.offset:
            return
        with self._lock:
            if key is not None:
                self._entries = [(k, c) for k, c in self._entries if k != key]
            self._entries.append((key, cache))
            while len(self._entries) > self.max_entries or (
                len(self._entries) > 1
                and sum(c.nbytes() for _, c in self._entries) > self.budget_bytes
            ):
                self._entries.pop(0)

    def forget(self, key: str) -> None:
        """Drop the caches kept under `key` (a deleted conversation's)."""
        with self._lock:
            self._entries = [(k, c) for k, c in self._entries if k != key]

    def clear(self) -> None:
        with self._lock:
            self._entries = []
