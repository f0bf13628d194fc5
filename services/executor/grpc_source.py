"""The executor's gRPC-speaking adapter source: SidecarSource reads the node cache LMDB file
(read-only, NodeCacheReader) and, only when the adapter is not there, asks the node's cache
sidecar to fetch it (EnsureAdapter, with a deadline) before reading again; hits are reported to
the sidecar in batches (RecordHits). gRPC failures become the domain's errors here
(services/common/errors.py's reraise_downstream): nothing below sees a grpc.RpcError. The
executor's server wires it in (sidecar_source); the AdapterSource interface is sources.py's.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import grpc

from mintmesh.errors import Unavailable
from mintmesh.services.common.errors import reraise_downstream
from mintmesh.services.executor.config import ExecutorConfig
from mintmesh.services.executor.sources import AdapterSource, Into, deliver

logger = logging.getLogger(__name__)

__all__ = ["SidecarSource", "sidecar_source"]


def sidecar_source(config: ExecutorConfig) -> SidecarSource | None:
    """The SidecarSource on config.cache_address (None when it is empty)."""
    if not config.cache_address:
        return None
    if config.cache_dir is None:
        raise ValueError(
            f"cache_address {config.cache_address!r} needs cache_dir, the sidecar's "
            "node cache directory"
        )
    return SidecarSource(config.cache_address, config.cache_dir, timeout_s=config.fetch_timeout_s)


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
        try:
            return self._fetch(digest, timeout, into)
        except grpc.RpcError as e:  # one that the RPCs below let through: a domain error too
            raise reraise_downstream(e, f"fetching adapter {digest[:12]}…") from e

    def _fetch(
        self, digest: str, timeout: float | None, into: Into | None
    ) -> bytearray | memoryview:
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
        return self._reader.with_buffer(digest, lambda buf: deliver(buf, into))

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
