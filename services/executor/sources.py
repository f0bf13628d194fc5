"""Where adapters come from, by digest: the node cache tier as the executor sees it.

A source returns the packed bytes of a digest: `SidecarSource` (grpc_source.py, the one that
speaks gRPC, wired in by the server) reads the node cache LMDB file (read-only,
NodeCacheReader) and, only when the adapter is not there, asks the node's cache sidecar to
fetch it (EnsureAdapter, with a deadline) before reading again; `PackedBytesSource` is an
in-process dict for tests and embedding. The host and device tiers above them are in
residency.py.

A source whose `verified` is True hands out bytes already checked against their digest: the
sidecar hashes every adapter before it commits it to the node cache, so the executor does not
hash the same 4 MiB again on every load (3 ms of a ~2 ms fast path otherwise).

AdapterSource declares everything the residency tiers, the engine and the metrics ask of a
source (fetch, verified, node_cache_digests, node_cache_reads, evict, close); every source
implements all of it.
"""

from __future__ import annotations

import abc
import hashlib
import logging
import threading
from collections.abc import Callable, Mapping

from mintmesh.errors import AdapterNotFound, FailedPrecondition

logger = logging.getLogger(__name__)

# Where a source writes a fetched adapter: called once with its size, returns a writable
# buffer of that size (the host tier's staging region).
Into = Callable[[int], memoryview]


class AdapterSource(abc.ABC):
    """Where the executor's tiers get an adapter's packed bytes, by digest (the node cache as
    the executor sees it). Errors are the domain's (mintmesh.errors), whatever the transport."""

    # True when fetch() returns bytes already checked against their digest.
    verified: bool = False

    @abc.abstractmethod
    def fetch(
        self, digest: str, timeout: float | None = None, into: Into | None = None
    ) -> bytes | bytearray | memoryview:
        """The packed bytes of digest (written into into(size) and returned as that buffer,
        when into is given); AdapterNotFound when no tier has it."""

    @abc.abstractmethod
    def node_cache_digests(self) -> list[str]:
        """The digests in the node cache behind this source ([] when it has none)."""

    @abc.abstractmethod
    def node_cache_reads(self) -> tuple[int, int] | None:
        """(reads served from the node cache, reads that needed a fetch into it first); None
        when this source has no node cache."""

    @abc.abstractmethod
    def evict(self, digest: str) -> bool:
        """Remove digest from the node cache behind this source (a deleted adapter); whether
        it was removed."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release what the source holds (connections, threads); the engine is stopping."""


def deliver(data: bytes | bytearray | memoryview, into: Into | None):
    if into is None:
        return data
    dst = into(len(data))
    dst[:] = data
    return dst


class NoSource(AdapterSource):
    """An executor started without a cache sidecar: it serves the base model only."""

    verified = False

    def fetch(self, digest: str, timeout: float | None = None, into: Into | None = None) -> bytes:
        raise FailedPrecondition(
            f"adapter {digest[:12]}… cannot be loaded: this executor has no adapter source "
            "(start it with --cache HOST:PORT and --cache-dir DIR); it serves the base model only"
        )

    def node_cache_digests(self) -> list[str]:
        return []  # no node cache

    def node_cache_reads(self) -> tuple[int, int] | None:
        return None

    def evict(self, digest: str) -> bool:
        return False  # nothing is cached

    def close(self) -> None:
        pass


class PackedBytesSource(AdapterSource):
    """An in-process source: digest -> packed bytes. It is not a node cache: it lists no node
    cache digests, and evict() keeps the bytes (what was add()ed stays servable)."""

    verified = False  # anyone may add() bytes under any digest

    def __init__(self, adapters: Mapping[str, bytes] | None = None) -> None:
        self._data: dict[str, bytes] = dict(adapters or {})
        self._lock = threading.Lock()
        self.fetches = 0

    def add(self, data: bytes, digest: str | None = None) -> str:
        digest = digest or hashlib.sha256(data).hexdigest()
        with self._lock:
            self._data[digest] = bytes(data)
        return digest

    def fetch(
        self, digest: str, timeout: float | None = None, into: Into | None = None
    ) -> bytes | memoryview:
        with self._lock:
            self.fetches += 1
            data = self._data.get(digest)
        if data is None:
            raise AdapterNotFound(f"adapter digest {digest} is not known to this source")
        return deliver(data, into)

    def node_cache_digests(self) -> list[str]:
        return []  # an in-process dict, not a node cache

    def node_cache_reads(self) -> tuple[int, int] | None:
        return None

    def evict(self, digest: str) -> bool:
        return False  # not a cache: its bytes stay

    def close(self) -> None:
        pass


def __getattr__(name: str):
    # SidecarSource lives in grpc_source.py (it speaks gRPC); imported from here on demand only,
    # so importing sources.py (and residency.py) never imports grpc.
    if name == "SidecarSource":
        from mintmesh.services.executor.grpc_source import SidecarSource

        return SidecarSource
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
