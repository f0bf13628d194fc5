"""Where adapters come from, by digest: the node cache tier as the executor sees it.

A source returns the packed bytes of a digest: `SidecarSource` reads the node cache LMDB file
(read-only, NodeCacheReader) and, only when the adapter is not there, asks the node's cache
sidecar to fetch it (EnsureAdapter, with a deadline) before reading again; `PackedBytesSource`
is an in-process dict for tests and embedding. The host and device tiers above them are in
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
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import grpc

from mintmesh.errors import AdapterNotFound, FailedPrecondition, Unavailable

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


def _deliver(data: bytes | bytearray | memoryview, into: Into | None):
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
        return _deliver(data, into)

    def node_cache_digests(self) -> list[str]:
        return []  # an in-process dict, not a node cache

    def node_cache_reads(self) -> tuple[int, int] | None:
        return None

    def evict(self, digest: str) -> bool:
        return False  # not a cache: its bytes stay

    def close(self) -> None:
        pass


class SidecarSource(AdapterSource):
    """The production source: a read of the node's LMDB file, and on a miss EnsureAdapter on the
    node's cache sidecar (which fetches from the store and commits) and a second read.

    A hit costs no RPC: the read is a copy out of LMDB's memory map inside a short read
    transaction. The sidecar still learns of it (its eviction policy must see the adapter as
    used): hits are reported in batches, after the fact, by a background thread (RecordHits)."""

    # The sidecar verified every adapter against its digest before committing it.
    verified = True

    def __init__(
        self,
        cache_address: str,
        cache_dir: Path | str,
        *,
        timeout_s: float = 30.0,
        hit_report_interval_s: float = 0.05,
    ) -> None:
        from mintmesh.cache.reader import NodeCacheReader
        from mintmesh.services.common.server import mesh_channel
        from mintmesh.v1 import cache_pb2_grpc

        if not cache_address:
            raise ValueError("SidecarSource needs the cache sidecar's address (host:port)")
        self.cache_address = cache_address
        self.cache_dir = Path(cache_dir)
        self.timeout_s = float(timeout_s)
        self._channel = mesh_channel(cache_address, wait_for_ready=True)
        self._stub = cache_pb2_grpc.AdapterCacheStub(self._channel)
        self._reader = NodeCacheReader(self.cache_dir)
        self._listed: tuple[float, list[str]] | None = None
        self.reads_hit = 0  # served from the file without an RPC
        self.reads_ensured = 0  # needed EnsureAdapter first
        self._hits = _HitReporter(self._stub, cache_address, hit_report_interval_s)

    def fetch(
        self, digest: str, timeout: float | None = None, into: Into | None = None
    ) -> bytearray | memoryview:
        from mintmesh.services.common.errors import reraise_downstream
        from mintmesh.v1 import cache_pb2

        data = self._read(digest, into)
        if data is not None:
            self.reads_hit += 1
            self._hits.add(digest)
            return data
        t = self.timeout_s if timeout is None else max(0.001, min(timeout, self.timeout_s))
        try:
            resp = self._stub.EnsureAdapter(
                cache_pb2.EnsureAdapterRequest(digest=digest), timeout=t
            )
        except grpc.RpcError as e:
            what = f"EnsureAdapter({digest[:12]}…) on {self.cache_address}"
            raise reraise_downstream(e, what) from e
        self.reads_ensured += 1
        data = self._read(digest, into)
        if data is None:
            raise Unavailable(
                f"cache sidecar {self.cache_address} ensured adapter {digest[:12]}… "
                f"(hit={resp.hit}) but it is not in the node cache at {self._reader.path}; "
                "is --cache-dir the sidecar's directory?"
            )
        return data

    def _read(self, digest: str, into: Into | None):
        """One copy out of the LMDB map (inside a short read transaction): into a fresh
        bytearray, or into into(size)."""
        if into is None:
            return self._reader.read(digest)
        return self._reader.with_buffer(digest, lambda buf: _deliver(buf, into))

    @property
    def hits_reported(self) -> int:
        """Hits the sidecar has been told about (RecordHits) so far."""
        return self._hits.sent

    def flush_hits(self, timeout: float = 5.0) -> int:
        """Report the pending hits now; returns how many digests were sent."""
        return self._hits.flush(timeout)

    def node_cache_digests(self, timeout: float = 2.0) -> list[str]:
        """Digests in the node cache (the sidecar's Stats; the LMDB keys when Stats does not
        list them). Cached for a second: Status may be polled often."""
        now = time.monotonic()
        cached = self._listed
        if cached is not None and now - cached[0] < 1.0:
            return cached[1]
        from mintmesh.v1 import cache_pb2

        digests: list[str] = []
        try:
            resp = self._stub.Stats(cache_pb2.CacheStatsRequest(), timeout=timeout)
            digests = list(resp.digests)
            if not digests and resp.entries:
                digests = _lmdb_keys(self._reader)
        except grpc.RpcError as e:
            logger.warning("listing the node cache on %s failed: %s", self.cache_address, e)
            digests = _lmdb_keys(self._reader)
        self._listed = (now, digests)
        return digests

    def node_cache_reads(self) -> tuple[int, int] | None:
        return self.reads_hit, self.reads_ensured

    def evict(self, digest: str, timeout: float = 10.0) -> bool:
        """Remove digest from the node cache (unpinning it first): a deleted adapter."""
        from mintmesh.services.common.errors import reraise_downstream
        from mintmesh.v1 import cache_pb2

        try:
            self._stub.Unpin(cache_pb2.UnpinRequest(digest=digest), timeout=timeout)
            resp = self._stub.Evict(cache_pb2.EvictRequest(digest=digest), timeout=timeout)
        except grpc.RpcError as e:
            raise reraise_downstream(e, f"Evict({digest[:12]}…) on {self.cache_address}") from e
        self._listed = None
        return bool(resp.evicted)

    def close(self) -> None:
        self._hits.close()
        self._channel.close()


class _HitReporter:
    """Batches the digests read from the node cache without an RPC and reports them to the
    sidecar (RecordHits) every `interval` seconds from a daemon thread. Best effort: a report
    that fails is logged and dropped (it only feeds the eviction policy and Stats)."""

    MAX_PENDING = 4096

    def __init__(self, stub, address: str, interval: float) -> None:
        self._stub = stub
        self._address = address
        self._interval = max(0.001, float(interval))
        self._pending: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.sent = 0

    def add(self, digest: str) -> None:
        with self._lock:
            if len(self._pending) < self.MAX_PENDING or digest in self._pending:
                self._pending[digest] = self._pending.get(digest, 0) + 1
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="node-cache-hits", daemon=True
                )
                self._thread.start()

    def flush(self, timeout: float = 5.0) -> int:
        from mintmesh.v1 import cache_pb2

        with self._lock:
            pending, self._pending = self._pending, {}
        if not pending:
            return 0
        # One entry per hit, so the sidecar counts each of them.
        digests = [d for d, n in pending.items() for _ in range(n)]
        try:
            self._stub.RecordHits(cache_pb2.RecordHitsRequest(digests=digests), timeout=timeout)
        except grpc.RpcError as e:
            logger.warning(
                "reporting %d node-cache hits to %s failed: %s",
                len(digests),
                self._address,
                e.code().name,
            )
            return 0
        self.sent += len(digests)
        return len(digests)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.flush()

    def close(self) -> None:
        self._stop.set()
        t = self._thread
        if t is not None:
            t.join(2.0)
        self.flush(timeout=1.0)


def _lmdb_keys(reader) -> list[str]:
    """Every digest of the node cache, read from its file; [] when that fails."""
    try:
        return reader.digests()
    except Exception:  # a listing is informational; never fail Status over it
        logger.warning("listing the node cache LMDB keys failed", exc_info=True)
        return []
