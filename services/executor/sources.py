"""Where adapters come from, by digest: the node cache tier as the executor sees it.

A source returns the packed bytes of a digest: `SidecarSource` asks the node's cache sidecar to
make the adapter present (EnsureAdapter, with a deadline) and then copies it out of the node
cache LMDB file (read-only, NodeCacheReader); `PackedBytesSource` is an in-process dict for
tests and embedding. The host and device tiers above them are in residency.py.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import grpc

from mintmesh.errors import AdapterNotFound, FailedPrecondition, InvalidArgument, Unavailable

logger = logging.getLogger(__name__)

_DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")


def check_digest(digest: str) -> str:
    if not _DIGEST_RE.match(digest or ""):
        raise InvalidArgument(
            f"adapter digest {digest!r} is not a sha256 hex digest (64 lowercase hex chars)"
        )
    return digest


class AdapterSource(Protocol):
    def fetch(self, digest: str, timeout: float | None = None) -> bytes | bytearray:
        """The packed bytes of digest; AdapterNotFound when no tier has it."""
        ...


class NoSource:
    """An executor started without a cache sidecar: it serves the base model only."""

    def fetch(self, digest: str, timeout: float | None = None) -> bytes:
        raise FailedPrecondition(
            f"adapter {digest[:12]}… cannot be loaded: this executor has no adapter source "
            "(start it with --cache HOST:PORT and --cache-dir DIR); it serves the base model only"
        )


class PackedBytesSource:
    """An in-process source: digest -> packed bytes."""

    def __init__(self, adapters: Mapping[str, bytes] | None = None) -> None:
        self._data: dict[str, bytes] = dict(adapters or {})
        self._lock = threading.Lock()
        self.fetches = 0

    def add(self, data: bytes, digest: str | None = None) -> str:
        digest = digest or hashlib.sha256(data).hexdigest()
        with self._lock:
            self._data[digest] = bytes(data)
        return digest

    def fetch(self, digest: str, timeout: float | None = None) -> bytes:
        with self._lock:
            self.fetches += 1
            data = self._data.get(digest)
        if data is None:
            raise AdapterNotFound(f"adapter digest {digest} is not known to this source")
        return data


class SidecarSource:
    """The production source: EnsureAdapter on the node's cache sidecar (which fetches from the
    store on a miss and commits to the node LMDB), then a read of that LMDB file."""

    def __init__(
        self, cache_address: str, cache_dir: Path | str, *, timeout_s: float = 30.0
    ) -> None:
        from mintmesh.cache.reader import NodeCacheReader
        from mintmesh.services.common.server import insecure_channel
        from mintmesh.v1 import cache_pb2_grpc

        if not cache_address:
            raise ValueError("SidecarSource needs the cache sidecar's address (host:port)")
        self.cache_address = cache_address
        self.cache_dir = Path(cache_dir)
        self.timeout_s = float(timeout_s)
        self._channel = insecure_channel(cache_address)
        self._stub = cache_pb2_grpc.AdapterCacheStub(self._channel)
        self._reader = NodeCacheReader(self.cache_dir)
        self._listed: tuple[float, list[str]] | None = None

    def fetch(self, digest: str, timeout: float | None = None) -> bytearray:
        from mintmesh.services.common.errors import reraise_downstream
        from mintmesh.v1 import cache_pb2

        t = self.timeout_s if timeout is None else max(0.001, min(timeout, self.timeout_s))
        try:
            resp = self._stub.EnsureAdapter(
                cache_pb2.EnsureAdapterRequest(digest=digest), timeout=t
            )
        except grpc.RpcError as e:
            what = f"EnsureAdapter({digest[:12]}…) on {self.cache_address}"
            raise reraise_downstream(e, what) from e
        data = self._reader.read(digest)
        if data is None:
            raise Unavailable(
                f"cache sidecar {self.cache_address} ensured adapter {digest[:12]}… "
                f"(hit={resp.hit}) but it is not in the node cache at {self._reader.path}; "
                "is --cache-dir the sidecar's directory?"
            )
        return data

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
        self._channel.close()


def _lmdb_keys(reader) -> list[str]:
    """Every key of the node cache's blob table, read-only, through the reader's environment
    (one Environment per process per path)."""
    try:
        env = reader._ensure()
        if env is None:
            return []
        with env.begin(db=reader._db) as txn:
            keys = txn.cursor().iternext(values=False)
            return [bytes(k).decode("ascii", "replace") for k in keys]
    except Exception:  # a listing is informational; never fail Status over it
        logger.warning("listing the node cache LMDB keys failed", exc_info=True)
        return []
