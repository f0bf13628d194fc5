"""Placement: rendezvous (highest random weight) hashing of the adapter digest over healthy
executors, with bounded loads (Mirrokni, Thorup, Zadimoghaddam): an executor already holding
more than (1 + eps) x its fair share of in-flight requests is passed over for the next choice.

Hashing the digest (not the name) keeps each revision's traffic on few nodes, so their caches
stay warm, and a re-pointed name moves with its new digest.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Sequence


def score(executor: str, key: str) -> int:
    h = hashlib.blake2b(f"{executor}|{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big")


def rendezvous_order(executors: Sequence[str], key: str) -> list[str]:
    """Executors by descending score for key: the first is the home, the rest the fallbacks."""
    return sorted(executors, key=lambda e: score(e, key), reverse=True)


class Placement:
    """In-flight counts per executor and the bounded-load choice."""

    def __init__(self, epsilon: float = 0.25):
        self.epsilon = epsilon
        self._inflight: dict[str, int] = {}
        self._lock = threading.Lock()

    def order(self, healthy: Sequence[str], key: str) -> list[str]:
        """Healthy executors in the order to try for key, bounded-load choice first."""
        ranked = rendezvous_order(healthy, key)
        if len(ranked) <= 1:
            return ranked
        with self._lock:
            total = sum(self._inflight.get(e, 0) for e in ranked)
            cap = math.ceil((1 + self.epsilon) * (total + 1) / len(ranked))
            under = [e for e in ranked if self._inflight.get(e, 0) < cap]
        over = [e for e in ranked if e not in under]
        return under + over

    def acquire(self, executor: str) -> None:
        with self._lock:
            self._inflight[executor] = self._inflight.get(executor, 0) + 1

    def release(self, executor: str) -> None:
        with self._lock:
            self._inflight[executor] = max(0, self._inflight.get(executor, 0) - 1)

    def inflight(self, executor: str) -> int:
        with self._lock:
            return self._inflight.get(executor, 0)
