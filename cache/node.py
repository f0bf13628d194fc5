"""The node cache: the sidecar's writable view of the node's LMDB file (see layout.py).

The sidecar process is the only writer: one NodeCache per cache directory (held with flock),
write transactions serialized by one lock. Every committed entry is a verified packed adapter
(its sha256 is its key). The byte budget (sum of entry sizes) holds after every put: the entries
the eviction policy names (unpinned only) are deleted in the same transaction that inserts the
new one. The executor reads the same file through reader.NodeCacheReader.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import lmdb

from mintmesh.cache import layout
from mintmesh.cache.policy import EvictionPolicy, LRUPolicy
from mintmesh.errors import AdapterNotFound, DigestMismatch, ResourceExhausted
from mintmesh.identity import check_digest

logger = logging.getLogger(__name__)

FETCH_WINDOW = 1024


@dataclass(frozen=True)
class CacheEntry:
    digest: str
    size_bytes: int
    added_ms: int
    pinned: bool = False

    def to_json(self) -> bytes:
        return json.dumps(
            {"size": self.size_bytes, "added_ms": self.added_ms, "pinned": self.pinned},
            sort_keys=True,
        ).encode()

    @classmethod
    def from_json(cls, digest: str, raw: bytes) -> CacheEntry:
        d = json.loads(bytes(raw))
        return cls(digest, int(d["size"]), int(d.get("added_ms", 0)), bool(d.get("pinned")))


@dataclass(frozen=True)
class CacheStats:
    bytes: int
    entries: int
    hits: int
    misses: int
    evictions: int
    fetch_p50_ms: float
    fetch_p99_ms: float
    capacity_bytes: int
    path: str


def _percentile(sorted_vals: list[float], q: float) -> float:
    if not sorted_vals:
        return 0.0
    i = min(len(sorted_vals) - 1, max(0, round(q * (len(sorted_vals) - 1))))
    return sorted_vals[i]


class NodeCache:
    """The only writer of a node's LMDB cache file."""

    def __init__(
        self,
        cache_dir: Path | str,
        *,
        capacity_bytes: int,
        map_size: int = layout.DEFAULT_MAP_SIZE,
        policy: EvictionPolicy | None = None,
    ):
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes {capacity_bytes} must be > 0")
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.path = layout.env_path(self.cache_dir)
        self.capacity_bytes = int(capacity_bytes)
        self.map_size = int(map_size)
        self._policy: EvictionPolicy = policy or LRUPolicy()
        self._write_lock = threading.Lock()  # serializes write transactions
        self._state_lock = threading.Lock()  # guards the index, policy and counters
        self._index: dict[str, CacheEntry] = {}
        self._bytes = 0
        self._hits = self._misses = self._evictions = 0
        self._fetch_ms: deque[float] = deque(maxlen=FETCH_WINDOW)
        self._lock_fd = _lock_dir(self.cache_dir)
        try:
            self._env = lmdb.open(
                str(self.path),
                map_size=self.map_size,
                max_dbs=layout.MAX_DBS,
                subdir=True,
                create=True,
                sync=True,
                metasync=True,
                lock=True,
                max_readers=512,
                readahead=False,
            )
            stale = self._env.reader_check()
            if stale:
                logger.info("cleared %d stale reader slot(s) in %s", stale, self.path)
            self._blobs = self._env.open_db(layout.DB_BLOBS)
            self._meta = self._env.open_db(layout.DB_META)
            self._load()
        except BaseException:
            os.close(self._lock_fd)
            raise
        logger.info(
            "node cache %s: %d entries, %d of %d bytes",
            self.path,
            len(self._index),
            self._bytes,
            self.capacity_bytes,
        )

    def close(self) -> None:
        if self._lock_fd >= 0:
            self._env.close()
            os.close(self._lock_fd)
            self._lock_fd = -1

    # -- startup ------------------------------------------------------------------------------

    def _load(self) -> None:
        """Rebuild the index from the file; repair entries without metadata or bytes; evict
        down to the budget (which may have shrunk since the last run)."""
        entries: list[CacheEntry] = []
        fix_meta: list[CacheEntry] = []
        drop_meta: list[bytes] = []
        with self._env.begin(buffers=True) as txn:
            metas = {bytes(k): bytes(v) for k, v in txn.cursor(db=self._meta)}
            for k, v in txn.cursor(db=self._blobs):
                digest = bytes(k).decode("ascii")
                raw = metas.pop(bytes(k), None)
                e = CacheEntry.from_json(digest, raw) if raw is not None else None
                if e is None or e.size_bytes != len(v):
                    e = CacheEntry(digest, len(v), e.added_ms if e else 0, bool(e and e.pinned))
                    fix_meta.append(e)
                entries.append(e)
            drop_meta = list(metas)
        if fix_meta or drop_meta:
            with self._env.begin(write=True) as txn:
                for e in fix_meta:
                    txn.put(layout.key(e.digest), e.to_json(), db=self._meta)
                for k in drop_meta:
                    txn.delete(k, db=self._meta)
            logger.warning(
                "repaired node cache metadata: %d rebuilt, %d dropped",
                len(fix_meta),
                len(drop_meta),
            )
        # Oldest first, so recency on restart follows insertion order.
        for e in sorted(entries, key=lambda e: (e.added_ms, e.digest)):
            self._index[e.digest] = e
            self._bytes += e.size_bytes
            self._policy.on_insert(e.digest, e.size_bytes)
        if self._bytes > self.capacity_bytes:
            with self._write_lock:
                with self._state_lock:
                    victims = self._pick_victims(0)
                if victims is None:
                    logger.warning(
                        "node cache holds %d bytes over its budget of %d and cannot evict "
                        "pinned entries",
                        self._bytes,
                        self.capacity_bytes,
                    )
                elif victims:
                    self._evict(victims)

    # -- writes -------------------------------------------------------------------------------

    def put(
        self, digest: str, data: bytes | bytearray | memoryview, *, pinned: bool = False
    ) -> bool:
        """Commit data under digest after verifying its sha256, evicting as needed to stay
        within the byte budget. Returns False if it was already present."""
        check_digest(digest)
        got = hashlib.sha256(data).hexdigest()
        if got != digest:
            raise DigestMismatch(
                f"bytes offered for digest {digest} hash to {got}; not committed",
                metadata={"digest": digest, "actual": got},
            )
        size = len(data)
        if size > self.capacity_bytes:
            raise ResourceExhausted(
                f"adapter {digest} is {size} bytes, more than the node cache capacity of "
                f"{self.capacity_bytes} bytes",
                retry_after_s=0.0,
            )
        with self._write_lock:
            with self._state_lock:
                if digest in self._index:
                    self._policy.on_hit(digest)
                    return False
            entry = CacheEntry(digest, size, time.time_ns() // 1_000_000, pinned)
            extra = 0
            while True:
                with self._state_lock:
                    victims = self._pick_victims(size, extra=extra)
                if victims is None:
                    raise self._no_room(digest, size, map_full=extra > 0)
                try:
                    with self._env.begin(write=True) as txn:
                        for v in victims:
                            txn.delete(layout.key(v), db=self._blobs)
                            txn.delete(layout.key(v), db=self._meta)
                        txn.put(layout.key(digest), data, db=self._blobs)
                        txn.put(layout.key(digest), entry.to_json(), db=self._meta)
                except lmdb.MapFullError:
                    # Pages freed inside the failed transaction are not reusable; commit the
                    # evictions on their own (plus one more each time) and try again.
                    extra += 1
                    with self._state_lock:
                        more = self._pick_victims(size, extra=extra)
                    if more is None:
                        raise self._no_room(digest, size, map_full=True) from None
                    logger.warning(
                        "node cache map is full (map_size %d): evicting %d entries to fit %s",
                        self.map_size,
                        len(more),
                        digest,
                    )
                    self._evict(more)
                    extra = 0
                    continue
                with self._state_lock:
                    self._drop(victims)
                    self._index[digest] = entry
                    self._bytes += size
                    self._policy.on_insert(digest, size)
                return True

    def delete(self, digest: str) -> bool:
        check_digest(digest)
        with self._write_lock:
            if digest not in self._index:
                return False
            self._evict([digest], count=False)
            return True

    def pin(self, digest: str, pinned: bool = True) -> None:
        """Exempt an entry from eviction (or make it evictable again with pinned=False)."""
        check_digest(digest)
        with self._write_lock:
            e = self._index.get(digest)
            if e is None:
                raise AdapterNotFound(f"digest {digest} is not in the node cache at {self.path}")
            e = CacheEntry(e.digest, e.size_bytes, e.added_ms, pinned)
            with self._env.begin(write=True) as txn:
                txn.put(layout.key(digest), e.to_json(), db=self._meta)
            with self._state_lock:
                self._index[digest] = e

    def unpin(self, digest: str) -> None:
        self.pin(digest, pinned=False)

    # -- reads --------------------------------------------------------------------------------

    def touch(self, digest: str) -> int | None:
        """The size of digest if present (a hit, refreshing its recency), else None (a miss)."""
        with self._state_lock:
            e = self._index.get(digest)
            if e is None:
                self._misses += 1
                return None
            self._hits += 1
            self._policy.on_hit(digest)
            return e.size_bytes

    def get(self, digest: str) -> bytes | None:
        """A copy of the bytes of digest (counted as a hit or a miss)."""
        if self.touch(digest) is None:
            return None
        with self._env.begin(db=self._blobs, buffers=True) as txn:
            buf = txn.get(layout.key(digest))
            return None if buf is None else bytes(buf)

    def size_of(self, digest: str) -> int | None:
        """The size of digest if present (no hit or miss counted)."""
        with self._state_lock:
            e = self._index.get(digest)
            return None if e is None else e.size_bytes

    def contains(self, digest: str) -> bool:
        with self._state_lock:
            return digest in self._index

    def entries(self) -> list[CacheEntry]:
        with self._state_lock:
            return list(self._index.values())

    def record_fetch(self, ms: float) -> None:
        with self._state_lock:
            self._fetch_ms.append(float(ms))

    def stats(self) -> CacheStats:
        with self._state_lock:
            window = sorted(self._fetch_ms)
            return CacheStats(
                bytes=self._bytes,
                entries=len(self._index),
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
                fetch_p50_ms=_percentile(window, 0.50),
                fetch_p99_ms=_percentile(window, 0.99),
                capacity_bytes=self.capacity_bytes,
                path=str(self.path),
            )

    # -- helpers ------------------------------------------------------------------------------

    def _pick_victims(self, size: int, *, extra: int = 0) -> list[str] | None:
        """Entries to evict so that size more bytes fit in the budget, plus `extra` more;
        None if the unpinned entries are not enough. Call with _state_lock held."""
        chosen: list[str] = []
        picked: set[str] = set()
        freed = 0

        def skip(d: str) -> bool:
            return d in picked or self._index[d].pinned

        while self._bytes - freed + size > self.capacity_bytes or len(chosen) < extra:
            v = self._policy.victim(skip)
            if v is None:
                return None
            chosen.append(v)
            picked.add(v)
            freed += self._index[v].size_bytes
        return chosen

    def _evict(self, victims: list[str], *, count: bool = True) -> None:
        """Delete victims in one committed transaction. Call with _write_lock held."""
        with self._env.begin(write=True) as txn:
            for v in victims:
                txn.delete(layout.key(v), db=self._blobs)
                txn.delete(layout.key(v), db=self._meta)
        with self._state_lock:
            self._drop(victims, count=count)

    def _drop(self, victims: list[str], *, count: bool = True) -> None:
        for v in victims:
            e = self._index.pop(v, None)
            if e is not None:
                self._bytes -= e.size_bytes
                self._policy.remove(v)
                if count:
                    self._evictions += 1
                    logger.debug("evicted %s (%d bytes)", v, e.size_bytes)

    def _no_room(self, digest: str, size: int, *, map_full: bool) -> ResourceExhausted:
        pinned = sum(e.size_bytes for e in self._index.values() if e.pinned)
        if map_full:
            return ResourceExhausted(
                f"node cache LMDB map at {self.path} is full (map_size {self.map_size} bytes) "
                f"and nothing more can be evicted to fit {digest} ({size} bytes); raise "
                "map_size or unpin adapters"
            )
        return ResourceExhausted(
            f"node cache budget of {self.capacity_bytes} bytes cannot fit {digest} ({size} "
            f"bytes): {pinned} bytes are pinned"
        )


def _lock_dir(cache_dir: Path) -> int:
    fd = os.open(cache_dir / "sidecar.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RuntimeError(
            f"cache dir {cache_dir} is in use by another cache sidecar (one writer per node)"
        ) from None
    return fd
