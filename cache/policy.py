"""Eviction policies of the node cache. The NodeCache tells a policy what happened (insert,
hit, remove) and asks it for a victim; the policy holds no bytes and does no I/O, so a
scan-resistant policy (S3-FIFO, W-TinyLFU) can replace plain LRU without touching the cache."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol


class EvictionPolicy(Protocol):
    def on_insert(self, digest: str, size: int) -> None: ...

    def on_hit(self, digest: str) -> None: ...

    def remove(self, digest: str) -> None: ...

    def victim(self, skip: Callable[[str], bool]) -> str | None:
        """The entry to evict next, passing over those for which skip(digest) is true (pinned,
        already chosen); None when nothing is evictable."""
        ...


class LRUPolicy:
    """Least recently used first. Not thread-safe: the NodeCache calls it under its lock."""

    def __init__(self) -> None:
        self._order: OrderedDict[str, int] = OrderedDict()

    def on_insert(self, digest: str, size: int) -> None:
        self._order[digest] = size
        self._order.move_to_end(digest)

    def on_hit(self, digest: str) -> None:
        if digest in self._order:
            self._order.move_to_end(digest)

    def remove(self, digest: str) -> None:
        self._order.pop(digest, None)

    def victim(self, skip: Callable[[str], bool]) -> str | None:
        for digest in self._order:
            if not skip(digest):
                return digest
        return None

    def __len__(self) -> int:
        return len(self._order)
