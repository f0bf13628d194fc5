"""The node cache: the sidecar's writable view of the node's LMDB file (see layout.py).

The sidecar process is the only writer: one NodeCache per cache directory (held with flock),
write transactions serialized by one lock. Every committed entry is a verified packed adapter
(its sha256 is its key). The byte budget (sum of entry sizes) holds after every put: the entries
the eviction policy names (unpinned only) are deleted in the same transaction that inserts the
new one. The executor reads the same file through reader.NodeCacheReader.

LMDB is the truth. Each entry's metadata (size, pinned, insertion time, last use, hits since
insertion) lives in the meta db; the last-use and hit hints are written in batches (with the
next write transaction, or every `flush_interval_s`), so a crash loses at most that much of
them and never an entry. On open, the eviction policy is rebuilt from them: entries are replayed
coldest first with their hit count as a frequency hint (policy.on_load).

When the LMDB map or the disk is full, a put commits the evictions on their own (plus one more
entry each round) and retries; when nothing more can be evicted it raises ResourceExhausted. A
failed transaction aborts whole, so the file is never left half-written.
"""

from __future__ import annotations

import dataclasses
import errno
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
from mintmesh.cache.policy import DEFAULT_POLICY, EvictionPolicy, make_policy
from mintmesh.errors import AdapterNotFound, DigestMismatch, FailedPrecondition, ResourceExhausted
from mintmesh.identity import check_digest

logger = logging.getLogger(__name__)

FETCH_WINDOW = 1024
# Stats lists at most this many digests (64 hex chars each: ~2.2 MB, under the 4 MiB limit).
STATS_MAX_DIGESTS = 32768
MAX_HITS_HINT = 1 << 30


@dataclass
class CacheEntry:
    digest: str
    size_bytes: int
    added_ms: int
    pinned: bool = False
    # Hints for rebuilding the eviction policy after a restart (persisted in batches).
    used_ms: int = 0
    hits: int = 0

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "size": self.size_bytes,
                "added_ms": self.added_ms,
                "pinned": self.pinned,
                "used_ms": self.used_ms,
                "hits": self.hits,
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def from_json(cls, digest: str, raw: bytes) -> CacheEntry:
        d = json.loads(bytes(raw))
        added = int(d.get("added_ms", 0))
        return cls(
            digest,
            int(d["size"]),
            added,
            bool(d.get("pinned")),
            used_ms=int(d.get("used_ms", added)),
            hits=int(d.get("hits", 0)),
        )


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
    pinned_entries: int = 0
    pinned_bytes: int = 0
    policy: str = ""
    # Sorted; at most STATS_MAX_DIGESTS of them (entries says how many there are).
    digests: tuple[str, ...] = ()


def _percentile(sorted_vals: list[float], q: float) -> float:
    if not sorted_vals:
        return 0.0
    i = min(len(sorted_vals) - 1, max(0, round(q * (len(sorted_vals) - 1))))
    return sorted_vals[i]


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _space_error(exc: BaseException) -> str | None:
    """'map' if exc says the LMDB map is full, 'disk' if the disk is, else None."""
    if isinstance(exc, lmdb.MapFullError):
        return "map"
    if isinstance(exc, lmdb.DiskError):
        return "disk"
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return "disk"
    if isinstance(exc, lmdb.Error) and "No space left" in str(exc):
        return "disk"
    return None


class NodeCache:
    """The only writer of a node's LMDB cache file."""

    def __init__(
        self,
        cache_dir: Path | str,
        *,
        capacity_bytes: int,
        map_size: int = layout.DEFAULT_MAP_SIZE,
        policy: EvictionPolicy | str | None = None,
        flush_interval_s: float = 1.0,
    ):
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes {capacity_bytes} must be > 0")
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.path = layout.env_path(self.cache_dir)
        self.capacity_bytes = int(capacity_bytes)
        self.map_size = int(map_size)
        if policy is None or isinstance(policy, str):
            policy = make_policy(policy or DEFAULT_POLICY, self.capacity_bytes)
        self._policy: EvictionPolicy = policy
        self.policy_name: str = getattr(policy, "name", type(policy).__name__)
        self._write_lock = threading.Lock()  # serializes write transactions
        self._state_lock = threading.Lock()  # guards the index, policy and counters
        self._index: dict[str, CacheEntry] = {}
        self._bytes = 0
        self._pinned_bytes = 0
        self._pinned_entries = 0
        self._hits = self._misses = self._evictions = 0
        self._fetch_ms: deque[float] = deque(maxlen=FETCH_WINDOW)
        self._dirty: set[str] = set()  # entries whose use hints are not yet in the file
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None
        self._lock_fd = _lock_dir(self.cache_dir)
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
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
                mode=0o600,  # the data and lock files: this user's only
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
        if flush_interval_s > 0:
            self._flusher = threading.Thread(
                target=self._flush_loop,
                args=(flush_interval_s,),
                name="node-cache-hints",
                daemon=True,
            )
            self._flusher.start()
        logger.info(
            "node cache %s: %d entries, %d of %d bytes, %d pinned, policy %s",
            self.path,
            len(self._index),
            self._bytes,
            self.capacity_bytes,
            self._pinned_entries,
            self.policy_name,
        )

    def close(self) -> None:
        if self._lock_fd < 0:
            return
        self._stop.set()
        if self._flusher is not None:
            self._flusher.join()
        try:
            self.flush_hints()
        except lmdb.Error as e:
            logger.warning("could not write the use hints of %s on close: %s", self.path, e)
        self._env.close()
        os.close(self._lock_fd)
        self._lock_fd = -1

    # -- startup ------------------------------------------------------------------------------

    def _load(self) -> None:
        """Rebuild the index and the policy from the file; repair entries without metadata or
        bytes; evict down to the budget (which may have shrunk since the last run)."""
        entries: list[CacheEntry] = []
        fix_meta: list[CacheEntry] = []
        drop_meta: list[bytes] = []
        with self._env.begin(buffers=True) as txn:
            metas = {bytes(k): bytes(v) for k, v in txn.cursor(db=self._meta)}
            for k, v in txn.cursor(db=self._blobs):
                digest = bytes(k).decode("ascii")
                raw = metas.pop(bytes(k), None)
                try:
                    e = CacheEntry.from_json(digest, raw) if raw is not None else None
                except (ValueError, KeyError, TypeError):
                    e = None
                if e is None or e.size_bytes != len(v):
                    e = CacheEntry(
                        digest,
                        len(v),
                        e.added_ms if e else 0,
                        bool(e and e.pinned),
                        used_ms=e.used_ms if e else 0,
                        hits=e.hits if e else 0,
                    )
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
        # Coldest first (last use, then insertion), each with its hit count as a frequency hint.
        for e in sorted(entries, key=lambda e: (e.used_ms, e.added_ms, e.digest)):
            self._index[e.digest] = e
            self._bytes += e.size_bytes
            if e.pinned:
                self._pinned_bytes += e.size_bytes
                self._pinned_entries += 1
            self._policy.on_load(e.digest, e.size_bytes, e.hits)
        if self._bytes > self.capacity_bytes:
            with self._write_lock:
                with self._state_lock:
                    victims = self._take_victims(0)
                if victims is None:
                    logger.warning(
                        "node cache holds %d bytes over its budget of %d and cannot evict "
                        "pinned entries",
                        self._bytes,
                        self.capacity_bytes,
                    )
                elif victims:
                    self._commit_evictions(victims)
                    logger.info(
                        "evicted %d entries to fit the budget of %d bytes",
                        len(victims),
                        self.capacity_bytes,
                    )

    # -- writes -------------------------------------------------------------------------------

    def put(
        self,
        digest: str,
        data: bytes | bytearray | memoryview,
        *,
        pinned: bool = False,
        verified: bool = False,
    ) -> bool:
        """Commit data under digest after verifying its sha256 (unless the caller just did:
        verified=True), evicting as needed to stay within the byte budget (pinned entries never
        go). Returns False if it was already present (then pinned=True still pins it). Raises
        ResourceExhausted if it cannot fit: larger than the budget, the budget taken by pinned
        entries, or the map or disk full with nothing left to evict."""
        check_digest(digest)
        if not verified:
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
                present = digest in self._index
                if present:
                    self._policy.on_hit(digest)
                elif self._pinned_bytes + size > self.capacity_bytes:
                    raise self._no_room(digest, size, "budget")
                else:
                    victims = self._take_victims(size)
                    if victims is None:  # only if the policy lost track of entries
                        raise self._no_room(digest, size, "budget")
            if present:
                if pinned:
                    self._set_pinned(digest, True)
                return False
            now = _now_ms()
            entry = CacheEntry(digest, size, now, pinned, used_ms=now)
            while True:
                try:
                    with self._env.begin(write=True) as txn:
                        for v in victims:
                            txn.delete(layout.key(v), db=self._blobs)
                            txn.delete(layout.key(v), db=self._meta)
                        txn.put(layout.key(digest), data, db=self._blobs)
                        txn.put(layout.key(digest), entry.to_json(), db=self._meta)
                        hints = self._write_hints(txn)
                    break
                except (lmdb.Error, OSError) as e:  # lmdb.MapFullError, lmdb.DiskError, ENOSPC
                    kind = _space_error(e)
                    if kind is None:
                        self._restore(victims)
                        raise
                    victims = self._make_room(digest, size, kind, victims)
            with self._state_lock:
                self._drop(victims)
                self._dirty.difference_update(hints)
                self._index[digest] = entry
                self._bytes += size
                if pinned:
                    self._pinned_bytes += size
                    self._pinned_entries += 1
                self._policy.on_insert(digest, size)
            return True

    def _make_room(self, digest: str, size: int, kind: str, victims: list[str]) -> list[str]:
        """After a put failed with the map or disk full: commit the evictions already chosen on
        their own, plus one more entry (pages freed inside a failed transaction are not
        reusable), and return the victims of the retry (none). Raises ResourceExhausted when
        there is nothing left to evict. Call with _write_lock held."""
        with self._state_lock:
            more = self._take_victims(0, extra=1) or []
        doomed = victims + more
        if not doomed:
            raise self._no_room(digest, size, kind) from None
        logger.warning(
            "node cache %s is full (%s; map_size %d): evicting %d entries to fit %s",
            self.path,
            "LMDB map" if kind == "map" else "disk",
            self.map_size,
            len(doomed),
            digest,
        )
        try:
            self._commit_evictions(doomed)
        except (lmdb.Error, OSError) as e:
            if _space_error(e) is None:
                raise
            raise self._no_room(digest, size, kind) from e
        return []

    def delete(self, digest: str) -> bool:
        """Drop digest from the cache (an explicit evict). False if it was not there; raises
        FailedPrecondition if it is pinned."""
        check_digest(digest)
        with self._write_lock:
            with self._state_lock:
                e = self._index.get(digest)
                if e is None:
                    return False
                if e.pinned:
                    raise FailedPrecondition(
                        f"adapter {digest} is pinned in the node cache at {self.path}; unpin it "
                        "before evicting it",
                        metadata={"digest": digest},
                    )
                self._policy.remove(digest)
            self._commit_evictions([digest], count=False)
            return True

    def pin(self, digest: str, pinned: bool = True) -> bool:
        """Exempt an entry from eviction (or make it evictable again with pinned=False);
        returns whether it was pinned before. Raises AdapterNotFound if it is not in the cache
        and ResourceExhausted if the pinned entries would exceed the byte budget."""
        check_digest(digest)
        with self._write_lock:
            return self._set_pinned(digest, pinned)

    def unpin(self, digest: str) -> bool:
        """Make an entry evictable again; returns whether it was pinned (False if absent)."""
        check_digest(digest)
        with self._write_lock:
            if not self.contains(digest):
                return False
            return self._set_pinned(digest, False)

    def _set_pinned(self, digest: str, pinned: bool) -> bool:
        """Call with _write_lock held."""
        with self._state_lock:
            e = self._index.get(digest)
            if e is None:
                raise AdapterNotFound(f"digest {digest} is not in the node cache at {self.path}")
            was = e.pinned
            if was == pinned:
                return was
            if pinned and self._pinned_bytes + e.size_bytes > self.capacity_bytes:
                raise ResourceExhausted(
                    f"pinning {digest} ({e.size_bytes} bytes) would pin "
                    f"{self._pinned_bytes + e.size_bytes} bytes, more than the node cache "
                    f"budget of {self.capacity_bytes} bytes ({self._pinned_bytes} already "
                    "pinned)",
                    retry_after_s=0.0,
                    metadata={"digest": digest},
                )
            new = dataclasses.replace(e, pinned=pinned)
        try:
            with self._env.begin(write=True) as txn:
                txn.put(layout.key(digest), new.to_json(), db=self._meta)
        except (lmdb.Error, OSError) as err:
            kind = _space_error(err)
            if kind is None:
                raise
            raise self._no_room(digest, 0, kind) from err
        with self._state_lock:
            e = self._index.get(digest)
            if e is not None:  # nothing else writes while we hold the write lock
                e.pinned = pinned
                sign = 1 if pinned else -1
                self._pinned_bytes += sign * e.size_bytes
                self._pinned_entries += sign
        return was

    def flush_hints(self) -> int:
        """Write the pending last-use and hit hints to the file; returns how many."""
        with self._write_lock:
            with self._state_lock:
                if not self._dirty:
                    return 0
            with self._env.begin(write=True) as txn:
                written = self._write_hints(txn)
            with self._state_lock:
                self._dirty.difference_update(written)
            return len(written)

    def _write_hints(self, txn) -> list[str]:
        """Put the metadata of the entries with pending hints into txn; returns their digests
        (to clear once txn commits). Call with _write_lock held."""
        with self._state_lock:
            pending = [(d, self._index[d].to_json()) for d in self._dirty if d in self._index]
            stale = [d for d in self._dirty if d not in self._index]
            self._dirty.difference_update(stale)
        for d, raw in pending:
            txn.put(layout.key(d), raw, db=self._meta)
        return [d for d, _ in pending]

    def _flush_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.flush_hints()
            except (lmdb.Error, OSError) as e:  # the disk full, say: hints can wait
                logger.warning("could not write the use hints of %s: %s", self.path, e)
            except Exception:
                logger.exception("could not write the use hints of %s", self.path)

    # -- reads --------------------------------------------------------------------------------

    def touch(self, digest: str, *, miss: bool = True) -> int | None:
        """The size of digest if present (a hit, refreshing its recency), else None (a miss,
        which the policy's frequency sketch records; with miss=False nothing is recorded)."""
        with self._state_lock:
            e = self._index.get(digest)
            if e is None:
                if not miss:
                    return None
                self._misses += 1
                self._policy.record_access(digest)
                return None
            self._hits += 1
            self._policy.on_hit(digest)
            e.used_ms = _now_ms()
            if e.hits < MAX_HITS_HINT:
                e.hits += 1
            self._dirty.add(digest)
            return e.size_bytes

    def record_access(self, digest: str) -> None:
        """Tell the policy digest is wanted (a prefetch) without counting a hit or a miss."""
        with self._state_lock:
            if digest not in self._index:
                self._policy.record_access(digest)

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
        """Copies of the entries' records, in no particular order."""
        with self._state_lock:
            return [dataclasses.replace(e) for e in self._index.values()]

    def record_fetch(self, ms: float) -> None:
        with self._state_lock:
            self._fetch_ms.append(float(ms))

    def stats(self, *, digests: bool = True) -> CacheStats:
        """The counters, and (digests=True) the first STATS_MAX_DIGESTS digests held."""
        with self._state_lock:
            window = sorted(self._fetch_ms)
            listed = sorted(self._index)[:STATS_MAX_DIGESTS] if digests else []
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
                pinned_entries=self._pinned_entries,
                pinned_bytes=self._pinned_bytes,
                policy=self.policy_name,
                digests=tuple(listed),
            )

    # -- helpers ------------------------------------------------------------------------------

    def _take_victims(self, size: int, *, extra: int = 0) -> list[str] | None:
        """Detach from the policy the entries to evict so that size more bytes fit in the
        budget, plus `extra` more; None (and nothing detached) if the unpinned entries are not
        enough. The victims stay in the index until _drop. Call with _state_lock held."""
        index = self._index
        chosen: list[str] = []
        freed = 0

        def pinned(d) -> bool:
            e = index.get(d)
            return e is not None and e.pinned

        while self._bytes - freed + size > self.capacity_bytes or len(chosen) < extra:
            v = self._policy.victim(pinned)
            if v is None:
                self._restore(chosen, locked=True)
                return None
            e = index.get(v)
            if e is None:  # a policy bug: it named an entry the cache does not hold
                logger.error(
                    "eviction policy %s named %s, which is not cached", self.policy_name, v
                )
                continue
            chosen.append(v)
            freed += e.size_bytes
        return chosen

    def _restore(self, victims: list[str], *, locked: bool = False) -> None:
        """Give detached victims that were not evicted back to the policy."""
        if not victims:
            return
        if not locked:
            with self._state_lock:
                self._restore(victims, locked=True)
            return
        for v in victims:
            e = self._index.get(v)
            if e is not None:
                self._policy.on_load(v, e.size_bytes, e.hits)

    def _commit_evictions(self, victims: list[str], *, count: bool = True) -> None:
        """Delete detached victims in one committed transaction, or give them back to the
        policy if it fails. Call with _write_lock held."""
        try:
            with self._env.begin(write=True) as txn:
                for v in victims:
                    txn.delete(layout.key(v), db=self._blobs)
                    txn.delete(layout.key(v), db=self._meta)
        except BaseException:
            self._restore(victims)
            raise
        with self._state_lock:
            self._drop(victims, count=count)

    def _drop(self, victims: list[str], *, count: bool = True) -> None:
        """Forget committed evictions. Call with _state_lock held."""
        for v in victims:
            e = self._index.pop(v, None)
            if e is not None:
                self._bytes -= e.size_bytes
                self._dirty.discard(v)
                self._policy.remove(v)  # a no-op for detached victims
                if e.pinned:
                    self._pinned_bytes -= e.size_bytes
                    self._pinned_entries -= 1
                if count:
                    self._evictions += 1
                    logger.debug("evicted %s (%d bytes)", v, e.size_bytes)

    def _no_room(self, digest: str, size: int, kind: str) -> ResourceExhausted:
        if kind == "map":
            return ResourceExhausted(
                f"node cache LMDB map at {self.path} is full (map_size {self.map_size} bytes) "
                f"and nothing more can be evicted to fit {digest} ({size} bytes); raise "
                "map_size or unpin adapters",
                metadata={"digest": digest},
            )
        if kind == "disk":
            return ResourceExhausted(
                f"the disk under the node cache at {self.path} is full (no space left on "
                f"device) and nothing more can be evicted to fit {digest} ({size} bytes); "
                "free disk space or lower capacity_bytes",
                metadata={"digest": digest},
            )
        return ResourceExhausted(
            f"node cache budget of {self.capacity_bytes} bytes cannot fit {digest} ({size} "
            f"bytes): {self._pinned_bytes} bytes are pinned",
            metadata={"digest": digest},
        )


def _lock_dir(cache_dir: Path) -> int:
    fd = os.open(cache_dir / "sidecar.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RuntimeError(
            f"cache dir {cache_dir} is in use by another cache sidecar (one writer per node)"
        ) from None
    return fd
