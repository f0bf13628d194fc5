"""The sidecar's logic, without a server: ensure(digest) makes a packed adapter present in the
node cache, fetching it from the store on a miss (verified, single flight)."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import grpc

from mintmesh.cache.node import NodeCache
from mintmesh.errors import DigestMismatch, Unavailable
from mintmesh.identity import check_digest
from mintmesh.services.common.errors import reraise_downstream
from mintmesh.services.common.server import insecure_channel
from mintmesh.v1 import store_pb2, store_pb2_grpc

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EnsureResult:
    digest: str
    size_bytes: int
    # True when the adapter was already in the cache.
    hit: bool
    # Time spent fetching from the store (0 on a hit; the shared fetch's time for a caller that
    # waited on another caller's fetch of the same digest).
    fetch_ms: float = 0.0


class CacheCore:
    def __init__(
        self,
        node: NodeCache,
        store_address: str,
        *,
        fetch_timeout_s: float = 30.0,
        channel: grpc.Channel | None = None,
    ):
        self.node = node
        self.store_address = store_address
        self.fetch_timeout_s = fetch_timeout_s
        self._channel = channel or insecure_channel(store_address)
        self._owns_channel = channel is None
        self._store = store_pb2_grpc.AdapterStoreStub(self._channel)
        self._flights: dict[str, Future] = {}
        self._flights_lock = threading.Lock()
        self._fetches = 0

    def close(self) -> None:
        if self._owns_channel:
            self._channel.close()

    @property
    def store_fetches(self) -> int:
        """How many fetches this sidecar has sent to the store."""
        return self._fetches

    def ensure(self, digest: str, timeout: float | None = None) -> EnsureResult:
        """Make digest present in the node cache within timeout seconds. Concurrent calls for one
        digest share one fetch. Raises the store's error (NOT_FOUND stays NOT_FOUND) or
        DigestMismatch if the received bytes do not hash to digest (nothing is committed)."""
        check_digest(digest)
        timeout = self.fetch_timeout_s if timeout is None else timeout
        size = self.node.touch(digest)
        if size is not None:
            return EnsureResult(digest, size, hit=True)
        with self._flights_lock:
            flight = self._flights.get(digest)
            leader = flight is None
            if leader:
                if self.node.contains(digest):  # committed by a flight that just ended
                    return EnsureResult(digest, self.node.size_of(digest) or 0, hit=True)
                flight = Future()
                self._flights[digest] = flight
        if not leader:
            try:
                size, ms = flight.result(timeout=timeout)
            except FutureTimeout:
                raise Unavailable(
                    f"timed out after {timeout:.3f}s waiting for the fetch of {digest}"
                ) from None
            return EnsureResult(digest, size, hit=False, fetch_ms=ms)
        try:
            t0 = time.perf_counter()
            data = self._fetch(digest, timeout)
            self.node.put(digest, data)
            ms = (time.perf_counter() - t0) * 1000.0
            self.node.record_fetch(ms)
            flight.set_result((len(data), ms))
            logger.info("fetched %s (%d bytes) in %.1f ms", digest, len(data), ms)
            return EnsureResult(digest, len(data), hit=False, fetch_ms=ms)
        except BaseException as e:
            flight.set_exception(e)
            raise
        finally:
            with self._flights_lock:
                self._flights.pop(digest, None)

    def _fetch(self, digest: str, timeout: float) -> bytes:
        """The verified bytes of digest from the store."""
        with self._flights_lock:
            self._fetches += 1
        buf = bytearray()
        declared = -1
        stream = None
        try:
            stream = self._store.FetchAdapter(
                store_pb2.FetchAdapterRequest(digest=digest), timeout=timeout
            )
            for msg in stream:
                kind = msg.WhichOneof("payload")
                if kind == "header":
                    if msg.header.digest != digest:
                        raise DigestMismatch(
                            f"store answered the fetch of {digest} with digest "
                            f"{msg.header.digest!r}"
                        )
                    declared = int(msg.header.size_bytes)
                elif kind == "chunk":
                    if declared < 0:
                        raise DigestMismatch(f"store sent bytes of {digest} before its header")
                    buf += msg.chunk
                    if len(buf) > declared:
                        raise DigestMismatch(
                            f"store sent more than the {declared} bytes it declared for {digest}"
                        )
        except grpc.RpcError as err:
            raise reraise_downstream(err, f"fetch of {digest} from the store") from None
        except BaseException:
            if stream is not None:
                stream.cancel()
            raise
        if len(buf) != declared:
            raise DigestMismatch(
                f"store sent {len(buf)} bytes for {digest}, its header declared {declared}"
            )
        got = hashlib.sha256(buf).hexdigest()
        if got != digest:
            raise DigestMismatch(
                f"bytes received from the store for {digest} hash to {got}; not committed",
                metadata={"digest": digest, "actual": got},
            )
        return bytes(buf)
