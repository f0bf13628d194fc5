"""The store's catalog: adapter revisions, names, aliases and the digest reference index, in
one LMDB environment (metadata only; the bytes live in the blob directory).

Named databases (keys are ascii; names and tenants never contain '/', '@' or '|' beyond the one
separator, see mintmesh.identity):

    revisions  b"tenant/name@" + u32be(revision) -> RevisionRecord JSON
    names      b"tenant/name" -> {"count": live revisions, "aliases": {"latest": rev, ...}}
    counters   b"tenant/name" -> last revision number ever assigned (never reused, kept after
               deletes, so "alice/chat@3" can never name two different adapters)
    digests    b"<digest>|tenant/name@rev" -> b"" (who references a blob: dedup and refcount)

Every change is one write transaction, serialized by one lock per environment; a transaction
either commits whole or not at all, so a killed process leaves the catalog as of its last commit.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import lmdb

from mintmesh.errors import AdapterNotFound, InvalidArgument
from mintmesh.identity import AdapterRef, check_part

logger = logging.getLogger(__name__)

DB_REVISIONS = b"revisions"
DB_NAMES = b"names"
DB_COUNTERS = b"counters"
DB_DIGESTS = b"digests"
MAX_DBS = 8
DEFAULT_MAP_SIZE = 1 << 40
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
LATEST = "latest"


@dataclass(frozen=True)
class RevisionRecord:
    tenant: str
    name: str
    revision: int
    digest: str
    base_fingerprint: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    size_bytes: int
    created_at_ms: int
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def full_name(self) -> str:
        return f"{self.tenant}/{self.name}"

    @property
    def ref(self) -> str:
        return f"{self.tenant}/{self.name}@{self.revision}"

    def to_json(self) -> bytes:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> RevisionRecord:
        d = json.loads(bytes(raw))
        d["target_modules"] = tuple(d["target_modules"])
        return cls(**d)


@dataclass(frozen=True)
class AdapterSummary:
    tenant: str
    name: str
    revision_count: int
    latest: RevisionRecord


def _name_key(tenant: str, name: str) -> bytes:
    return f"{tenant}/{name}".encode("ascii")


def _rev_key(tenant: str, name: str, revision: int) -> bytes:
    return _name_key(tenant, name) + b"@" + int(revision).to_bytes(4, "big")


def _digest_key(digest: str, ref: str) -> bytes:
    return f"{digest}|{ref}".encode("ascii")


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def encode_page_token(last_name_key: bytes) -> str:
    return base64.urlsafe_b64encode(last_name_key).decode("ascii").rstrip("=")


def decode_page_token(token: str) -> bytes:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        text = raw.decode("ascii")
    except (binascii.Error, ValueError) as e:
        raise InvalidArgument(
            f"page_token {token!r} is not a token returned by ListAdapters"
        ) from e
    if text.count("/") != 1:
        raise InvalidArgument(f"page_token {token!r} is not a token returned by ListAdapters")
    return raw


# One Environment per process per path (LMDB's rule), shared by every Catalog on that path.
_envs: dict[Path, tuple[lmdb.Environment, threading.Lock, int]] = {}
_envs_lock = threading.Lock()


def _acquire_env(path: Path, map_size: int) -> tuple[lmdb.Environment, threading.Lock]:
    with _envs_lock:
        hit = _envs.get(path)
        if hit is not None:
            env, lock, n = hit
            _envs[path] = (env, lock, n + 1)
            return env, lock
        path.mkdir(parents=True, exist_ok=True)
        env = lmdb.open(
            str(path),
            map_size=map_size,
            max_dbs=MAX_DBS,
            subdir=True,
            sync=True,
            metasync=True,
            lock=True,
            max_readers=512,
            readahead=False,
        )
        stale = env.reader_check()
        if stale:
            logger.info("cleared %d stale reader slot(s) in %s", stale, path)
        lock = threading.Lock()
        _envs[path] = (env, lock, 1)
        return env, lock


def _release_env(path: Path) -> None:
    with _envs_lock:
        hit = _envs.get(path)
        if hit is None:
            return
        env, lock, n = hit
        if n > 1:
            _envs[path] = (env, lock, n - 1)
            return
        del _envs[path]
        env.close()


class Catalog:
    """Revision metadata in LMDB. Reads run in their own short transactions; writes are
    serialized by one lock and commit atomically."""

    def __init__(self, path: Path | str, *, map_size: int = DEFAULT_MAP_SIZE):
        self.path = Path(path).resolve()
        self._env, self._write_lock = _acquire_env(self.path, map_size)
        self._revs = self._env.open_db(DB_REVISIONS)
        self._names = self._env.open_db(DB_NAMES)
        self._counters = self._env.open_db(DB_COUNTERS)
        self._digests = self._env.open_db(DB_DIGESTS)
        self._closed = False

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            _release_env(self.path)

    # -- writes -------------------------------------------------------------------------------

    def add_revision(
        self,
        tenant: str,
        name: str,
        *,
        digest: str,
        base_fingerprint: str,
        rank: int,
        alpha: float,
        target_modules: list[str] | tuple[str, ...],
        size_bytes: int,
        labels: dict[str, str] | None = None,
    ) -> RevisionRecord:
        """Record the next revision of tenant/name (one transaction) and point `latest` at it."""
        nkey = _name_key(tenant, name)
        with self._write_lock, self._env.begin(write=True) as txn:
            raw = txn.get(nkey, db=self._counters)
            revision = (int(raw) if raw is not None else 0) + 1
            rec = RevisionRecord(
                tenant=tenant,
                name=name,
                revision=revision,
                digest=digest,
                base_fingerprint=base_fingerprint,
                rank=int(rank),
                alpha=float(alpha),
                target_modules=tuple(target_modules),
                size_bytes=int(size_bytes),
                created_at_ms=_now_ms(),
                labels=dict(labels or {}),
            )
            txn.put(nkey, str(revision).encode(), db=self._counters)
            txn.put(_rev_key(tenant, name, revision), rec.to_json(), db=self._revs)
            entry = self._name_entry(txn, nkey) or {"count": 0, "aliases": {}}
            entry["count"] += 1
            entry["aliases"][LATEST] = revision
            txn.put(nkey, json.dumps(entry, sort_keys=True).encode(), db=self._names)
            txn.put(_digest_key(digest, rec.ref), b"", db=self._digests)
        return rec

    def delete(self, ref: AdapterRef, *, whole: bool) -> tuple[list[RevisionRecord], list[str]]:
        """Delete every revision of ref's name (whole=True) or the one revision ref resolves to.
        Returns (deleted records, digests no revision references any more)."""
        nkey = _name_key(ref.tenant, ref.name)
        with self._write_lock, self._env.begin(write=True) as txn:
            entry = self._name_entry(txn, nkey)
            if entry is None:
                raise AdapterNotFound(
                    f"adapter {ref.full_name!r} not found", metadata={"ref": str(ref)}
                )
            if whole:
                doomed = list(self._iter_revisions(txn, ref.tenant, ref.name))
            else:
                doomed = [self._resolve_in(txn, ref, entry)]
            for rec in doomed:
                txn.delete(_rev_key(rec.tenant, rec.name, rec.revision), db=self._revs)
                txn.delete(_digest_key(rec.digest, rec.ref), db=self._digests)
            remaining = [] if whole else list(self._iter_revisions(txn, ref.tenant, ref.name))
            if remaining:
                entry["count"] = len(remaining)
                live = {r.revision for r in remaining}
                entry["aliases"] = {a: r for a, r in entry["aliases"].items() if r in live}
                entry["aliases"][LATEST] = max(live)
                txn.put(nkey, json.dumps(entry, sort_keys=True).encode(), db=self._names)
            else:
                txn.delete(nkey, db=self._names)
            orphans = sorted(
                {r.digest for r in doomed if not self._digest_referenced(txn, r.digest)}
            )
        return doomed, orphans

    # -- reads --------------------------------------------------------------------------------

    def resolve(self, ref: AdapterRef) -> RevisionRecord:
        """The revision a reference names: tenant/name (= @latest), @7, or @alias."""
        with self._env.begin() as txn:
            entry = self._name_entry(txn, _name_key(ref.tenant, ref.name))
            if entry is None:
                raise AdapterNotFound(
                    f"adapter {ref.full_name!r} not found", metadata={"ref": str(ref)}
                )
            return self._resolve_in(txn, ref, entry)

    def get(self, tenant: str, name: str, revision: int) -> RevisionRecord | None:
        with self._env.begin() as txn:
            raw = txn.get(_rev_key(tenant, name, revision), db=self._revs)
            return None if raw is None else RevisionRecord.from_json(raw)

    def revisions(self, tenant: str, name: str) -> list[RevisionRecord]:
        with self._env.begin() as txn:
            return list(self._iter_revisions(txn, tenant, name))

    def digest_referenced(self, digest: str) -> bool:
        with self._env.begin() as txn:
            return self._digest_referenced(txn, digest)

    def referenced_digests(self) -> set[str]:
        out: set[str] = set()
        with self._env.begin(db=self._digests) as txn:
            for k in txn.cursor().iternext(keys=True, values=False):
                out.add(bytes(k).split(b"|", 1)[0].decode("ascii"))
        return out

    def list_adapters(
        self, *, tenant: str = "", page_size: int = 0, page_token: str = ""
    ) -> tuple[list[AdapterSummary], str]:
        """One page of adapters (ordered by tenant/name), each with its latest revision, and the
        token of the next page ("" after the last page)."""
        if tenant:
            check_part("tenant", tenant)
        if page_size < 0:
            raise InvalidArgument(f"page_size {page_size} must be >= 0")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        prefix = f"{tenant}/".encode("ascii") if tenant else b""
        if page_token:
            after = decode_page_token(page_token)
            if prefix and not after.startswith(prefix):
                raise InvalidArgument(
                    f"page_token {page_token!r} does not belong to a listing of tenant {tenant!r}"
                )
            start = after + b"\x00"  # the smallest key after `after`
        else:
            start = prefix
        items: list[AdapterSummary] = []
        more = False
        with self._env.begin() as txn:
            cur = txn.cursor(db=self._names)
            if not cur.set_range(start):
                return [], ""
            for k, v in cur:
                k = bytes(k)
                if prefix and not k.startswith(prefix):
                    break
                if len(items) == size:
                    more = True
                    break
                entry = json.loads(bytes(v))
                t, n = k.decode("ascii").split("/", 1)
                raw = txn.get(_rev_key(t, n, entry["aliases"][LATEST]), db=self._revs)
                items.append(
                    AdapterSummary(
                        tenant=t,
                        name=n,
                        revision_count=int(entry["count"]),
                        latest=RevisionRecord.from_json(raw),
                    )
                )
        token = encode_page_token(_name_key(items[-1].tenant, items[-1].name)) if more else ""
        return items, token

    # -- helpers (inside a transaction) -------------------------------------------------------

    def _name_entry(self, txn: lmdb.Transaction, nkey: bytes) -> dict | None:
        raw = txn.get(nkey, db=self._names)
        return None if raw is None else json.loads(bytes(raw))

    def _iter_revisions(
        self, txn: lmdb.Transaction, tenant: str, name: str
    ) -> Iterator[RevisionRecord]:
        prefix = _name_key(tenant, name) + b"@"
        cur = txn.cursor(db=self._revs)
        if not cur.set_range(prefix):
            return
        for k, v in cur:
            if not bytes(k).startswith(prefix):
                break
            yield RevisionRecord.from_json(v)

    def _resolve_in(self, txn: lmdb.Transaction, ref: AdapterRef, entry: dict) -> RevisionRecord:
        latest = entry["aliases"][LATEST]
        if ref.revision is not None:
            revision = ref.revision
        else:
            alias = ref.alias or LATEST
            if alias not in entry["aliases"]:
                raise AdapterNotFound(
                    f"alias {alias!r} of adapter {ref.full_name!r} not found; it has aliases "
                    f"{sorted(entry['aliases'])}",
                    metadata={"ref": str(ref)},
                )
            revision = entry["aliases"][alias]
        raw = txn.get(_rev_key(ref.tenant, ref.name, revision), db=self._revs)
        if raw is None:
            raise AdapterNotFound(
                f"revision {revision} of adapter {ref.full_name!r} not found (latest is @{latest})",
                metadata={"ref": str(ref)},
            )
        return RevisionRecord.from_json(raw)

    def _digest_referenced(self, txn: lmdb.Transaction, digest: str) -> bool:
        prefix = f"{digest}|".encode("ascii")
        cur = txn.cursor(db=self._digests)
        return cur.set_range(prefix) and bytes(cur.key()).startswith(prefix)
