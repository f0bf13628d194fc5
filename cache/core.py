"""The sidecar's logic, without a server: ensure(digest) makes a packed adapter present in the
node cache, fetching it from the store on a miss (verified, single flight)."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import grpc

from mintmesh.cache.node import NodeCache
from mintmesh.errors import AdapterNotFound, DigestMismatch, MintError, Unavailable
from mintmesh.identity import check_digest
from mintmesh.services.common.errors import reraise_downstream
from mintmesh.services.common.server import STORE_READS, mesh_channel
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


@dataclass(frozen=True)
class PrefetchResult:
    # Already in the cache.
    present: list[str]
    # Queued (or already being fetched) in the background.
    queued: list[str]
    # Not queued: the prefetch backlog was full.
    dropped: list[str]


class CacheCore:
    def __init__(
        self,
        node: NodeCache,
        store_address: str,
        *,
        fetch_timeout_s: float = 30.0,
        channel: grpc.Channel | None = None,
        prefetch_concurrency: int = 4,
        prefetch_backlog: int = 4096,
        internal_token: str = "",
    ):
        if prefetch_concurrency <= 0:
            raise ValueError(f"prefetch_concurrency {prefetch_concurrency} must be > 0")
        self.node = node
        self.store_address = store_address
        self.fetch_timeout_s = fetch_timeout_s
        # Store calls act as a mesh service (admin) when the store requires auth.
        self._metadata = [("x-mint-internal-token", internal_token)] if internal_token else []
        self._channel = channel or mesh_channel(
            store_address, wait_for_ready=True, idempotent=STORE_READS
        )
        self._owns_channel = channel is None
        self._store = store_pb2_grpc.AdapterStoreStub(self._channel)
        self._flights: dict[str, Future] = {}
        self._flights_lock = threading.Lock()
        self._fetches = 0
        # Background prefetches: at most prefetch_concurrency fetches at once, at most
        # prefetch_backlog digests waiting or running.
        self.prefetch_backlog = prefetch_backlog
        self._prefetcher = ThreadPoolExecutor(prefetch_concurrency, thread_name_prefix="prefetch")
        self._prefetching: set[str] = set()
        self._prefetch_lock = threading.Lock()
        self._closing = threading.Event()

    def close(self) -> None:
        """Stop prefetching (queued digests are dropped, running fetches cancelled) and close
        the store channel. The node cache stays open: its owner closes it after this."""
        self._closing.set()
        self._prefetcher.shutdown(wait=False, cancel_futures=True)
        if self._owns_channel:
            self._channel.close()  # fails the fetches in flight, so the wait below is short
        self._prefetcher.shutdown(wait=True)

    @property
    def store_fetches(self) -> int:
        """How many fetches this sidecar has sent to the store."""
        return self._fetches

    def ensure(
        self, digest: str, timeout: float | None = None, *, count: bool = True
    ) -> EnsureResult:
        """Make digest present in the node cache within timeout seconds. Concurrent calls for one
        digest share one fetch. Raises the store's error (NOT_FOUND stays NOT_FOUND) or
        DigestMismatch if the received bytes do not hash to digest (nothing is committed).
        count=False (prefetch, pin) counts no hit or miss."""
        check_digest(digest)
        timeout = self.fetch_timeout_s if timeout is None else timeout
        size = self.node.touch(digest) if count else self.node.size_of(digest)
        if size is not None:
            return EnsureResult(digest, size, hit=True)
        with self._flights_lock:
            flight = self._flights.get(digest)
            leader = flight is None
            if leader:
                size = self.node.size_of(digest)
                if size is not None:  # committed by a flight that just ended
                    return EnsureResult(digest, size, hit=True)
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
            self.node.put(digest, data, verified=True)  # _fetch checked the sha256
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

    # -- prefetch, pin, evict -------------------------------------------------------------------

    def prefetch(self, digests: Iterable[str]) -> PrefetchResult:
        """Queue background fetches (through the same single-flight path as ensure) of the
        digests not in the cache. Malformed digests fail the whole call (InvalidArgument);
        digests the store does not know are only logged when their fetch fails."""
        wanted = list(dict.fromkeys(check_digest(d) for d in digests))
        present: list[str] = []
        queued: list[str] = []
        dropped: list[str] = []
        if self._closing.is_set():
            raise Unavailable("the cache sidecar is shutting down; prefetch refused")
        for d in wanted:
            if self.node.contains(d):
                present.append(d)
                continue
            with self._prefetch_lock:
                if d in self._prefetching:
                    queued.append(d)
                    continue
                if len(self._prefetching) >= self.prefetch_backlog:
                    dropped.append(d)
                    continue
                self._prefetching.add(d)
            self.node.record_access(d)  # a prefetch predicts a request
            try:
                self._prefetcher.submit(self._prefetch_one, d)
            except RuntimeError:  # shut down meanwhile
                with self._prefetch_lock:
                    self._prefetching.discard(d)
                dropped.append(d)
                continue
            queued.append(d)
        if dropped:
            logger.warning(
                "prefetch backlog full (%d): dropped %d digests, first %s",
                self.prefetch_backlog,
                len(dropped),
                dropped[0],
            )
        return PrefetchResult(present, queued, dropped)

    def _prefetch_one(self, digest: str) -> None:
        try:
            if self._closing.is_set():
                return
            res = self.ensure(digest, count=False)
            if not res.hit:
                logger.debug("prefetched %s (%d bytes)", digest, res.size_bytes)
        except AdapterNotFound as e:
            logger.info("prefetch of %s skipped: %s", digest, e.message)
        except MintError as e:
            level = logging.DEBUG if self._closing.is_set() else logging.WARNING
            logger.log(level, "prefetch of %s failed: %s: %s", digest, type(e).__name__, e)
        except Exception:
            if not self._closing.is_set():
                logger.exception("prefetch of %s failed", digest)
        finally:
            with self._prefetch_lock:
                self._prefetching.discard(digest)

    def record_hits(self, digests: Iterable[str]) -> int:
        """Count hits the executor served straight from the node cache file (see RecordHits);
        returns how many digests were still cached. Malformed digests: InvalidArgument."""
        wanted = [check_digest(d) for d in digests]
        return sum(self.node.touch(d, miss=False) is not None for d in wanted)

    def prefetch_pending(self) -> int:
        """Digests queued or being fetched in the background."""
        with self._prefetch_lock:
            return len(self._prefetching)

    def pin(self, digest: str, *, fetch: bool = False, timeout: float | None = None) -> int:
        """Pin digest (never evicted until unpinned); with fetch=True fetch it first if it is
        not cached. Returns its size. Raises AdapterNotFound (not cached and fetch=False, or not
        in the store) and ResourceExhausted (the pinned entries would exceed the budget)."""
        check_digest(digest)
        if not fetch:
            self.node.pin(digest)
            return self.node.size_of(digest) or 0
        for _ in range(3):
            res = self.ensure(digest, timeout, count=False)
            try:
                self.node.pin(digest)
                return res.size_bytes
            except AdapterNotFound:  # evicted between the fetch and the pin: fetch again
                logger.info("%s was evicted before it could be pinned; fetching it again", digest)
        raise Unavailable(f"{digest} was evicted three times before it could be pinned")

    def unpin(self, digest: str) -> bool:
        """Make digest evictable again; whether it was pinned (False if it is not cached)."""
        return self.node.unpin(digest)

    def evict(self, digest: str) -> bool:
        """Drop digest from the node cache; False if it was not there. Raises
        FailedPrecondition (naming it) while it is pinned."""
        return self.node.delete(digest)

    def _fetch(self, digest: str, timeout: float) -> bytearray:
        """The verified bytes of digest from the store."""
        with self._flights_lock:
            self._fetches += 1
        buf = bytearray()
        declared = -1
        stream = None
        try:
            stream = self._store.FetchAdapter(
                store_pb2.FetchAdapterRequest(digest=digest),
                timeout=timeout,
                metadata=self._metadata,
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
        return buf
