"""The store's catalog: adapter revisions, names, aliases and gates, the digest and label
indexes, tenants and API keys, in one LMDB environment (metadata only; the bytes live in the
blob store).

Named databases (keys are ascii unless noted; names and tenants never contain '/', '@' or '|'
beyond the one separator, see mintmesh.identity):

    revisions  b"tenant/name@" + u32be(revision) -> RevisionRecord JSON (defaults omitted)
    names      b"tenant/name" -> {"count": live revisions, "aliases": {"latest": rev, ...},
               "gates": {alias: {"metric", "threshold", "direction"}},
               "history": {alias: [earlier revisions, oldest first]}}  (empty maps omitted)
    counters   b"tenant/name" -> last revision number ever assigned (never reused, kept after
               deletes, so "alice/chat@3" can never name two different adapters)
    digests    b"<digest>|tenant/name@rev" -> b"" (who references a blob: dedup and refcount;
               a revision's training state blob is referenced the same way)
    labels     utf-8 b"key=value|tenant/name@" + u32be(rev) -> b"" (label filter candidates;
               a value over 200 characters is indexed as "#" + its sha256)
    tenants    b"tenant" -> {"created_at_ms", "keys": live key count}
    keys       b"<key id>" -> {"tenant", "admin", "salt", "hash", "created_at_ms"}: API keys,
               hashed (never stored in plaintext)

A revision's bytes are immutable; its evaluations and state (ready/deprecated) are metadata that
change in place. Every change is one write transaction, serialized by one lock per environment;
a transaction either commits whole or not at all, so a killed process leaves the catalog as of
its last commit, and a reader sees an alias either before or after a re-pointing, never between.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import lmdb

from mintmesh.errors import (
    AdapterNotFound,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
)
from mintmesh.identity import AdapterRef, check_part

logger = logging.getLogger(__name__)

DB_REVISIONS = b"revisions"
DB_NAMES = b"names"
DB_COUNTERS = b"counters"
DB_DIGESTS = b"digests"
DB_LABELS = b"labels"
DB_TENANTS = b"tenants"
DB_KEYS = b"keys"
MAX_DBS = 16
DEFAULT_MAP_SIZE = 1 << 40
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
LATEST = "latest"
MAX_ALIAS_HISTORY = 16
MAX_EVALUATIONS = 1000
MAX_INDEXED_LABEL_VALUE = 200

READY, DEPRECATED, DELETED = "ready", "deprecated", "deleted"
STATES = (READY, DEPRECATED, DELETED)
UPLOAD, MERGE, TRAINING = "upload", "merge", "training"
SOURCES = (UPLOAD, MERGE, TRAINING)
AT_LEAST, AT_MOST = "at_least", "at_most"
DIRECTIONS = {AT_LEAST: ">=", AT_MOST: "<="}


class TenantNotFound(AdapterNotFound):
    """Unknown tenant or API key id (NOT_FOUND)."""

    reason = "TENANT_NOT_FOUND"


@dataclass(frozen=True)
class Parent:
    ref: str
    digest: str
    weight: float = 0.0


@dataclass(frozen=True)
class Evaluation:
    metric: str
    value: float
    evaluator: str = ""
    at_ms: int = 0
    # sha256 (hex) of the data it was measured on ("" = not stated).
    dataset_digest: str = ""

    def to_list(self) -> list:
        # The digest only when stated: records without one read as before.
        row = [self.metric, self.value, self.evaluator, self.at_ms]
        return [*row, self.dataset_digest] if self.dataset_digest else row


@dataclass(frozen=True)
class Gate:
    alias: str
    metric: str
    threshold: float
    direction: str = AT_LEAST

    def passes(self, value: float) -> bool:
        return value >= self.threshold if self.direction == AT_LEAST else value <= self.threshold

    def describe(self) -> str:
        return f"{self.metric} {DIRECTIONS[self.direction]} {self.threshold:g}"


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
    # float32 | bfloat16 | float16 | int8 ("" = pushed before formats were recorded).
    storage_format: str = ""
    state: str = READY
    source: str = UPLOAD
    parents: tuple[Parent, ...] = ()
    data_digest: str = ""
    merge_method: str = ""
    evaluations: tuple[Evaluation, ...] = ()
    # A training state kept with the revision (save_state): its blob's digest and size.
    state_digest: str = ""
    state_size_bytes: int = 0

    @property
    def full_name(self) -> str:
        return f"{self.tenant}/{self.name}"

    @property
    def ref(self) -> str:
        return f"{self.tenant}/{self.name}@{self.revision}"

    def latest_evaluation(self, metric: str) -> Evaluation | None:
        for ev in reversed(self.evaluations):
            if ev.metric == metric:
                return ev
        return None

    def to_json(self) -> bytes:
        d = {
            "tenant": self.tenant,
            "name": self.name,
            "revision": self.revision,
            "digest": self.digest,
            "base_fingerprint": self.base_fingerprint,
            "rank": self.rank,
            "alpha": self.alpha,
            "target_modules": list(self.target_modules),
            "size_bytes": self.size_bytes,
            "created_at_ms": self.created_at_ms,
            "labels": self.labels,
        }
        # New fields only when they differ from their defaults: small records, old readers ok.
        if self.storage_format:
            d["storage_format"] = self.storage_format
        if self.state != READY:
            d["state"] = self.state
        if self.source != UPLOAD:
            d["source"] = self.source
        if self.parents:
            d["parents"] = [[p.ref, p.digest, p.weight] for p in self.parents]
        if self.data_digest:
            d["data_digest"] = self.data_digest
        if self.merge_method:
            d["merge_method"] = self.merge_method
        if self.evaluations:
            d["evaluations"] = [e.to_list() for e in self.evaluations]
        if self.state_digest:
            d["state_digest"] = self.state_digest
            d["state_size_bytes"] = self.state_size_bytes
        return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes | memoryview) -> RevisionRecord:
        d = json.loads(bytes(raw))
        d["target_modules"] = tuple(d["target_modules"])
        if "parents" in d:
            d["parents"] = tuple(Parent(*p) for p in d["parents"])
        if "evaluations" in d:
            d["evaluations"] = tuple(Evaluation(*e) for e in d["evaluations"])
        return cls(**d)


@dataclass(frozen=True)
class RevisionSpec:
    """What a new revision records (the catalog assigns its number and time)."""

    tenant: str
    name: str
    digest: str
    base_fingerprint: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    size_bytes: int
    labels: dict[str, str] = field(default_factory=dict)
    storage_format: str = ""
    source: str = UPLOAD
    parents: tuple[Parent, ...] = ()
    data_digest: str = ""
    merge_method: str = ""
    state_digest: str = ""
    state_size_bytes: int = 0


@dataclass(frozen=True)
class AdapterSummary:
    tenant: str
    name: str
    revision_count: int
    latest: RevisionRecord
    aliases: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class AdapterInfo:
    """One adapter's aliases and gates."""

    tenant: str
    name: str
    revision_count: int
    aliases: dict[str, int]
    gates: tuple[Gate, ...]


@dataclass(frozen=True)
class TenantRecord:
    tenant: str
    created_at_ms: int
    key_count: int


@dataclass(frozen=True)
class KeyRecord:
    key_id: str
    tenant: str
    admin: bool
    salt: str
    hash: str
    created_at_ms: int


def _name_key(tenant: str, name: str) -> bytes:
    return f"{tenant}/{name}".encode("ascii")


def _rev_key(tenant: str, name: str, revision: int) -> bytes:
    return _name_key(tenant, name) + b"@" + int(revision).to_bytes(4, "big")


def _digest_key(digest: str, ref: str) -> bytes:
    return f"{digest}|{ref}".encode("ascii")


def label_index_value(value: str) -> str:
    if len(value) > MAX_INDEXED_LABEL_VALUE:
        return "#" + hashlib.sha256(value.encode()).hexdigest()
    return value


def _label_prefix(key: str, value: str) -> bytes:
    return f"{key}={label_index_value(value)}|".encode()


def _label_key(key: str, value: str, tenant: str, name: str, revision: int) -> bytes:
    return _label_prefix(key, value) + _rev_key(tenant, name, revision)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _dump(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def parse_label_filter(label: str) -> tuple[str, str | None]:
    """ "key=value" -> (key, value); "key" -> (key, None)."""
    if not label:
        raise InvalidArgument("label filter is empty")
    key, sep, value = label.partition("=")
    if not key:
        raise InvalidArgument(f"label filter {label!r} has no key; expected 'key=value' or 'key'")
    return key, (value if sep else None)


def _has_label(rec: RevisionRecord, key: str, value: str | None) -> bool:
    if key not in rec.labels:
        return False
    return value is None or rec.labels[key] == value


def encode_page_token(last_key: bytes) -> str:
    return base64.urlsafe_b64encode(last_key).decode("ascii").rstrip("=")


def _decode_token(token: str, what: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError) as e:
        raise InvalidArgument(f"page_token {token!r} is not a token returned by {what}") from e


def decode_page_token(token: str) -> bytes:
    raw = _decode_token(token, "ListAdapters")
    try:
        text = raw.decode("ascii")
    except ValueError:
        text = ""
    if text.count("/") != 1:
        raise InvalidArgument(f"page_token {token!r} is not a token returned by ListAdapters")
    return raw


def _page_size(page_size: int) -> int:
    if page_size < 0:
        raise InvalidArgument(f"page_size {page_size} must be >= 0")
    return min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def check_alias(alias: str) -> str:
    check_part("alias", alias)
    if alias.isdigit():
        raise InvalidArgument(f"alias {alias!r} is a number; an alias needs a letter")
    return alias


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
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
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
            mode=0o600,  # the data and lock files: this user's only
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
        self._labels = self._env.open_db(DB_LABELS)
        self._tenants = self._env.open_db(DB_TENANTS)
        self._keys = self._env.open_db(DB_KEYS)
        self._closed = False

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            _release_env(self.path)

    def used_bytes(self) -> int:
        """Bytes of the LMDB file in use (pages up to the last one written)."""
        info, stat = self._env.info(), self._env.stat()
        return (int(info["last_pgno"]) + 1) * int(stat["psize"])

    def counts(self) -> tuple[int, int]:
        """(adapters, revisions) in the catalog, from LMDB's own entry counts (no scan)."""
        with self._env.begin() as txn:
            return int(txn.stat(self._names)["entries"]), int(txn.stat(self._revs)["entries"])

    # -- revisions: writes --------------------------------------------------------------------

    def add_revisions(self, specs: Sequence[RevisionSpec]) -> list[RevisionRecord]:
        """Record many new revisions in one transaction (group commit): each gets the next
        number of its name, in order, and `latest` points at the last one of each name."""
        out: list[RevisionRecord] = []
        if not specs:
            return out
        now = _now_ms()
        with self._write_lock, self._env.begin(write=True) as txn:
            entries: dict[bytes, dict] = {}
            for s in specs:
                nkey = _name_key(s.tenant, s.name)
                raw = txn.get(nkey, db=self._counters)
                revision = (int(raw) if raw is not None else 0) + 1
                rec = RevisionRecord(
                    tenant=s.tenant,
                    name=s.name,
                    revision=revision,
                    digest=s.digest,
                    base_fingerprint=s.base_fingerprint,
                    rank=int(s.rank),
                    alpha=float(s.alpha),
                    target_modules=tuple(s.target_modules),
                    size_bytes=int(s.size_bytes),
                    created_at_ms=now,
                    labels=dict(s.labels),
                    storage_format=s.storage_format,
                    source=s.source,
                    parents=tuple(s.parents),
                    data_digest=s.data_digest,
                    merge_method=s.merge_method,
                    state_digest=s.state_digest,
                    state_size_bytes=int(s.state_size_bytes),
                )
                txn.put(nkey, str(revision).encode(), db=self._counters)
                txn.put(_rev_key(s.tenant, s.name, revision), rec.to_json(), db=self._revs)
                entry = entries.get(nkey)
                if entry is None:
                    entry = self._name_entry(txn, nkey) or {"count": 0, "aliases": {}}
                    entries[nkey] = entry
                entry["count"] += 1
                entry["aliases"][LATEST] = revision
                txn.put(_digest_key(s.digest, rec.ref), b"", db=self._digests)
                if s.state_digest:
                    txn.put(_digest_key(s.state_digest, rec.ref), b"", db=self._digests)
                for k, v in rec.labels.items():
                    txn.put(_label_key(k, v, s.tenant, s.name, revision), b"", db=self._labels)
                out.append(rec)
            for nkey, entry in entries.items():
                self._put_entry(txn, nkey, entry)
        return out

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
                if rec.state_digest:
                    txn.delete(_digest_key(rec.state_digest, rec.ref), db=self._digests)
                for k, v in rec.labels.items():
                    txn.delete(
                        _label_key(k, v, rec.tenant, rec.name, rec.revision), db=self._labels
                    )
            remaining = [] if whole else list(self._iter_revisions(txn, ref.tenant, ref.name))
            if remaining:
                entry["count"] = len(remaining)
                live = {r.revision for r in remaining}
                entry["aliases"] = {a: r for a, r in entry["aliases"].items() if r in live}
                entry["aliases"][LATEST] = max(live)
                hist = entry.get("history", {})
                entry["history"] = {
                    a: [r for r in h if r in live] for a, h in hist.items() if a in entry["aliases"]
                }
                self._put_entry(txn, nkey, entry)
            else:
                txn.delete(nkey, db=self._names)
            blobs = {r.digest for r in doomed} | {r.state_digest for r in doomed if r.state_digest}
            orphans = sorted(d for d in blobs if not self._digest_referenced(txn, d))
        doomed = [replace(r, state=DELETED) for r in doomed]
        return doomed, orphans

    def set_alias(
        self,
        tenant: str,
        name: str,
        alias: str,
        revision: int = 0,
        *,
        rollback: bool = False,
    ) -> tuple[RevisionRecord, int]:
        """Point alias at a revision in one transaction: (the revision, what the alias pointed
        at before or 0). rollback=True: revision 0 = the alias's previous revision (its history,
        else the highest live revision below the current one); an explicit revision must be
        earlier than the current one. A gated alias needs a passing evaluation (else
        FailedPrecondition naming the metric and threshold); a deprecated revision is refused."""
        check_alias(alias)
        full = f"{tenant}/{name}"
        nkey = _name_key(tenant, name)
        with self._write_lock, self._env.begin(write=True) as txn:
            entry = self._require_entry(txn, tenant, name)
            aliases = entry["aliases"]
            current = aliases.get(alias)
            history = list(entry.get("history", {}).get(alias, []))
            if rollback:
                if current is None:
                    raise AdapterNotFound(
                        f"alias {alias!r} of adapter {full!r} not found; it has aliases "
                        f"{sorted(aliases)}",
                        metadata={"ref": f"{full}@{alias}"},
                    )
                if revision:
                    if revision >= current:
                        raise InvalidArgument(
                            f"rollback target @{revision} is not earlier than @{current}, "
                            f"which {full}@{alias} points at"
                        )
                    target = revision
                else:
                    target = self._previous(txn, tenant, name, current, history)
                    if target is None:
                        raise FailedPrecondition(
                            f"alias {alias!r} of {full!r} has no earlier revision to roll back "
                            f"to (it points at @{current})",
                            metadata={"ref": f"{full}@{alias}"},
                        )
            else:
                if revision < 1:
                    raise InvalidArgument(f"revision {revision} must be >= 1")
                target = revision
            raw = txn.get(_rev_key(tenant, name, target), db=self._revs)
            if raw is None:
                raise AdapterNotFound(
                    f"revision {target} of adapter {full!r} not found",
                    metadata={"ref": f"{full}@{target}"},
                )
            rec = RevisionRecord.from_json(raw)
            if rec.state == DEPRECATED:
                raise FailedPrecondition(
                    f"{rec.ref} is deprecated; alias {alias!r} cannot point at it",
                    metadata={"ref": rec.ref, "alias": alias},
                )
            gate = self._gate(entry, alias)
            if gate is not None:
                self._check_gate(gate, rec, full)
            aliases[alias] = target
            if rollback:
                if target in history:
                    history = history[: history.index(target)]
            elif current is not None and current != target:
                history = (history + [current])[-MAX_ALIAS_HISTORY:]
            hist_all = entry.setdefault("history", {})
            if history:
                hist_all[alias] = history
            else:
                hist_all.pop(alias, None)
            self._put_entry(txn, nkey, entry)
        return rec, current or 0

    def delete_alias(self, tenant: str, name: str, alias: str) -> int:
        check_alias(alias)
        full = f"{tenant}/{name}"
        if alias == LATEST:
            raise InvalidArgument(
                f"alias 'latest' of {full!r} cannot be deleted; it follows pushes"
            )
        with self._write_lock, self._env.begin(write=True) as txn:
            entry = self._require_entry(txn, tenant, name)
            if alias not in entry["aliases"]:
                raise AdapterNotFound(
                    f"alias {alias!r} of adapter {full!r} not found; it has aliases "
                    f"{sorted(entry['aliases'])}",
                    metadata={"ref": f"{full}@{alias}"},
                )
            rev = entry["aliases"].pop(alias)
            entry.get("history", {}).pop(alias, None)
            self._put_entry(txn, _name_key(tenant, name), entry)
        return int(rev)

    def set_gate(
        self,
        tenant: str,
        name: str,
        alias: str,
        *,
        metric: str = "",
        threshold: float = 0.0,
        direction: str = AT_LEAST,
        clear: bool = False,
    ) -> Gate | None:
        """Require (metric, threshold, direction) before alias may point at a revision; with
        clear=True remove the requirement. The alias need not exist yet."""
        check_alias(alias)
        full = f"{tenant}/{name}"
        if alias == LATEST:
            raise InvalidArgument(
                f"alias 'latest' of {full!r} follows every push and cannot be gated; gate "
                "another alias (e.g. 'prod') and promote to it"
            )
        gate = None
        if not clear:
            check_part("metric", metric)
            if direction not in DIRECTIONS:
                raise InvalidArgument(
                    f"gate direction {direction!r} must be one of {sorted(DIRECTIONS)}"
                )
            if not math.isfinite(threshold):
                raise InvalidArgument(f"gate threshold {threshold!r} must be finite")
            gate = Gate(alias, metric, float(threshold), direction)
        with self._write_lock, self._env.begin(write=True) as txn:
            entry = self._require_entry(txn, tenant, name)
            gates = entry.setdefault("gates", {})
            if gate is None:
                if gates.pop(alias, None) is None:
                    raise AdapterNotFound(
                        f"alias {alias!r} of adapter {full!r} has no gate",
                        metadata={"ref": f"{full}@{alias}"},
                    )
            else:
                gates[alias] = {
                    "metric": gate.metric,
                    "threshold": gate.threshold,
                    "direction": gate.direction,
                }
            self._put_entry(txn, _name_key(tenant, name), entry)
        return gate

    def add_evaluation(self, ref: AdapterRef, evaluation: Evaluation) -> RevisionRecord:
        def change(rec: RevisionRecord) -> RevisionRecord:
            if len(rec.evaluations) >= MAX_EVALUATIONS:
                raise InvalidArgument(
                    f"{rec.ref} already has {len(rec.evaluations)} evaluations, the limit"
                )
            ev = replace(evaluation, at_ms=evaluation.at_ms or _now_ms())
            return replace(rec, evaluations=(*rec.evaluations, ev))

        return self._update(ref, change)

    def set_state(self, ref: AdapterRef, state: str) -> RevisionRecord:
        if state not in (READY, DEPRECATED):
            raise InvalidArgument(f"state {state!r} must be {READY!r} or {DEPRECATED!r}")
        return self._update(ref, lambda rec: replace(rec, state=state))

    def _update(
        self, ref: AdapterRef, change: Callable[[RevisionRecord], RevisionRecord]
    ) -> RevisionRecord:
        with self._write_lock, self._env.begin(write=True) as txn:
            entry = self._require_entry(txn, ref.tenant, ref.name)
            rec = change(self._resolve_in(txn, ref, entry))
            txn.put(_rev_key(rec.tenant, rec.name, rec.revision), rec.to_json(), db=self._revs)
        return rec

    # -- revisions: reads ---------------------------------------------------------------------

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

    def adapter_info(self, tenant: str, name: str) -> AdapterInfo:
        with self._env.begin() as txn:
            entry = self._require_entry(txn, tenant, name)
        return AdapterInfo(
            tenant=tenant,
            name=name,
            revision_count=int(entry["count"]),
            aliases=dict(entry["aliases"]),
            gates=tuple(
                self._gate(entry, a)
                for a in sorted(entry.get("gates", {}))  # type: ignore[misc]
            ),
        )

    def list_revisions(
        self,
        tenant: str,
        name: str,
        *,
        page_size: int = 0,
        page_token: str = "",
        label: str = "",
        state: str = "",
    ) -> tuple[list[RevisionRecord], str, AdapterInfo]:
        """One page of tenant/name's revisions (oldest first), filtered by label ("k=v" or "k")
        and state, the next page's token ("" after the last) and the adapter's aliases/gates."""
        size = _page_size(page_size)
        key, value = parse_label_filter(label) if label else ("", None)
        if state and state not in STATES:
            raise InvalidArgument(f"state {state!r} must be one of {list(STATES)}")
        after = 0
        if page_token:
            raw = _decode_token(page_token, "ListRevisions")
            try:
                text = raw.decode("ascii")
                after = int(text.removeprefix("rev:")) if text.startswith("rev:") else -1
            except ValueError:
                after = -1
            if after < 0:
                raise InvalidArgument(
                    f"page_token {page_token!r} is not a token returned by ListRevisions"
                )
        info = self.adapter_info(tenant, name)
        items: list[RevisionRecord] = []
        more = False
        with self._env.begin() as txn:
            cur = txn.cursor(db=self._revs)
            prefix = _name_key(tenant, name) + b"@"
            if cur.set_range(_rev_key(tenant, name, after + 1)):
                for k, v in cur:
                    if not bytes(k).startswith(prefix):
                        break
                    rec = RevisionRecord.from_json(v)
                    if key and not _has_label(rec, key, value):
                        continue
                    if state and rec.state != state:
                        continue
                    if len(items) == size:
                        more = True
                        break
                    items.append(rec)
        token = encode_page_token(f"rev:{items[-1].revision}".encode()) if more else ""
        return items, token, info

    def digest_referenced(self, digest: str) -> bool:
        with self._env.begin() as txn:
            return self._digest_referenced(txn, digest)

    def digest_tenants(self, digest: str, limit: int = 1000) -> set[str]:
        """Tenants with a live revision of this digest (at most `limit` index entries read)."""
        prefix = f"{digest}|".encode("ascii")
        out: set[str] = set()
        with self._env.begin() as txn:
            cur = txn.cursor(db=self._digests)
            if not cur.set_range(prefix):
                return out
            for i, k in enumerate(cur.iternext(keys=True, values=False)):
                k = bytes(k)
                if not k.startswith(prefix) or i >= limit:
                    break
                out.add(k[len(prefix) :].split(b"/", 1)[0].decode("ascii"))
        return out

    def referenced_digests(self) -> set[str]:
        out: set[str] = set()
        with self._env.begin(db=self._digests) as txn:
            for k in txn.cursor().iternext(keys=True, values=False):
                out.add(bytes(k).split(b"|", 1)[0].decode("ascii"))
        return out

    def list_adapters(
        self,
        *,
        tenant: str = "",
        page_size: int = 0,
        page_token: str = "",
        name_prefix: str = "",
        label: str = "",
    ) -> tuple[list[AdapterSummary], str]:
        """One page of adapters (ordered by tenant/name; with a label filter, by the label
        index), each with its latest revision, and the token of the next page ("" after the
        last page). name_prefix needs tenant; label is "key=value" on the latest revision."""
        if tenant:
            check_part("tenant", tenant)
        if name_prefix and not tenant:
            raise InvalidArgument(f"name_prefix {name_prefix!r} needs a tenant")
        if name_prefix:  # a prefix of a name is itself a well-formed name part
            check_part("name_prefix", name_prefix)
        size = _page_size(page_size)
        prefix = f"{tenant}/{name_prefix}".encode("ascii") if tenant else b""
        after = b""
        if page_token:
            after = decode_page_token(page_token)
            if prefix and not after.startswith(prefix):
                raise InvalidArgument(
                    f"page_token {page_token!r} does not belong to this listing of tenant "
                    f"{tenant!r}"
                )
        if label:
            key, value = parse_label_filter(label)
            if value is None:
                raise InvalidArgument(
                    f"label filter {label!r} of a listing must be 'key=value' (a bare key only "
                    "filters ListRevisions)"
                )
            items, more = self._list_by_label(key, value, prefix, after, size)
        else:
            items, more = self._list_by_name(prefix, after, size)
        token = encode_page_token(_name_key(items[-1].tenant, items[-1].name)) if more else ""
        return items, token

    def _summary(self, txn, t: str, n: str, entry: dict, latest: RevisionRecord | None = None):
        if latest is None:
            raw = txn.get(_rev_key(t, n, entry["aliases"][LATEST]), db=self._revs)
            latest = RevisionRecord.from_json(raw)
        return AdapterSummary(
            tenant=t,
            name=n,
            revision_count=int(entry["count"]),
            latest=latest,
            aliases=dict(entry["aliases"]),
        )

    def _list_by_name(
        self, prefix: bytes, after: bytes, size: int
    ) -> tuple[list[AdapterSummary], bool]:
        start = after + b"\x00" if after else prefix  # the smallest key after `after`
        items: list[AdapterSummary] = []
        with self._env.begin() as txn:
            cur = txn.cursor(db=self._names)
            if not cur.set_range(start):
                return [], False
            for k, v in cur:
                k = bytes(k)
                if prefix and not k.startswith(prefix):
                    break
                if len(items) == size:
                    return items, True
                t, n = k.decode("ascii").split("/", 1)
                items.append(self._summary(txn, t, n, json.loads(bytes(v))))
        return items, False

    def _list_by_label(
        self, key: str, value: str, prefix: bytes, after: bytes, size: int
    ) -> tuple[list[AdapterSummary], bool]:
        lp = _label_prefix(key, value)
        # Index order is by name + "@": resume past every entry of the last name listed.
        start = lp + (after + b"@\xff\xff\xff\xff\xff" if after else prefix)
        items: list[AdapterSummary] = []
        with self._env.begin() as txn:
            cur = txn.cursor(db=self._labels)
            if not cur.set_range(start):
                return [], False
            for k in cur.iternext(keys=True, values=False):
                k = bytes(k)
                if not k.startswith(lp + prefix):
                    break
                nkey, rev_b = k[len(lp) : -5], k[-4:]
                entry = self._name_entry(txn, nkey)
                if entry is None or entry["aliases"][LATEST] != int.from_bytes(rev_b, "big"):
                    continue
                t, n = nkey.decode("ascii").split("/", 1)
                raw = txn.get(_rev_key(t, n, entry["aliases"][LATEST]), db=self._revs)
                latest = RevisionRecord.from_json(raw)
                if latest.labels.get(key) != value:
                    continue  # an index collision ("a=b" + "c" vs "a" + "b=c")
                if len(items) == size:
                    return items, True
                items.append(self._summary(txn, t, n, entry, latest))
        return items, False

    # -- tenants and keys ---------------------------------------------------------------------

    def create_tenant(self, tenant: str, key: KeyRecord | None = None) -> TenantRecord:
        check_part("tenant", tenant)
        with self._write_lock, self._env.begin(write=True) as txn:
            if txn.get(tenant.encode("ascii"), db=self._tenants) is not None:
                raise AlreadyExists(
                    f"tenant {tenant!r} already exists", metadata={"tenant": tenant}
                )
            rec = {"created_at_ms": _now_ms(), "keys": 0}
            if key is not None:
                self._put_key(txn, key)
                rec["keys"] = 1
            txn.put(tenant.encode("ascii"), _dump(rec), db=self._tenants)
        return TenantRecord(tenant, rec["created_at_ms"], rec["keys"])

    def add_key(self, key: KeyRecord) -> None:
        with self._write_lock, self._env.begin(write=True) as txn:
            if not key.admin:
                raw = txn.get(key.tenant.encode("ascii"), db=self._tenants)
                if raw is None:
                    raise TenantNotFound(
                        f"tenant {key.tenant!r} not found", metadata={"tenant": key.tenant}
                    )
                rec = json.loads(bytes(raw))
                rec["keys"] = int(rec.get("keys", 0)) + 1
                txn.put(key.tenant.encode("ascii"), _dump(rec), db=self._tenants)
            self._put_key(txn, key)

    def _put_key(self, txn, key: KeyRecord) -> None:
        if not txn.put(
            key.key_id.encode("ascii"),
            _dump(
                {
                    "tenant": key.tenant,
                    "admin": key.admin,
                    "salt": key.salt,
                    "hash": key.hash,
                    "created_at_ms": key.created_at_ms,
                }
            ),
            db=self._keys,
            overwrite=False,
        ):
            raise AlreadyExists(f"API key id {key.key_id!r} exists already")

    def get_key(self, key_id: str) -> KeyRecord | None:
        try:
            k = key_id.encode("ascii")
        except UnicodeEncodeError:
            return None
        if not k or len(k) > 64:
            return None
        with self._env.begin() as txn:
            raw = txn.get(k, db=self._keys)
        if raw is None:
            return None
        d = json.loads(bytes(raw))
        return KeyRecord(key_id=key_id, **d)

    def revoke_key(self, key_id: str) -> KeyRecord:
        key = self.get_key(key_id)
        if key is None:
            raise TenantNotFound(f"API key id {key_id!r} not found", metadata={"key_id": key_id})
        with self._write_lock, self._env.begin(write=True) as txn:
            txn.delete(key_id.encode("ascii"), db=self._keys)
            raw = txn.get(key.tenant.encode("ascii"), db=self._tenants) if key.tenant else None
            if raw is not None:
                rec = json.loads(bytes(raw))
                rec["keys"] = max(0, int(rec.get("keys", 0)) - 1)
                txn.put(key.tenant.encode("ascii"), _dump(rec), db=self._tenants)
        return key

    def get_tenant(self, tenant: str) -> TenantRecord | None:
        with self._env.begin() as txn:
            raw = txn.get(tenant.encode("ascii"), db=self._tenants)
        if raw is None:
            return None
        d = json.loads(bytes(raw))
        return TenantRecord(tenant, int(d["created_at_ms"]), int(d.get("keys", 0)))

    def list_tenants(
        self, *, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[TenantRecord], str]:
        size = _page_size(page_size)
        start = b""
        if page_token:
            start = _decode_token(page_token, "ListTenants") + b"\x00"
        items: list[TenantRecord] = []
        more = False
        with self._env.begin() as txn:
            cur = txn.cursor(db=self._tenants)
            if cur.set_range(start):
                for k, v in cur:
                    if len(items) == size:
                        more = True
                        break
                    d = json.loads(bytes(v))
                    items.append(
                        TenantRecord(
                            bytes(k).decode("ascii"), int(d["created_at_ms"]), int(d.get("keys", 0))
                        )
                    )
        token = encode_page_token(items[-1].tenant.encode("ascii")) if more else ""
        return items, token

    def raw_items(self) -> Iterator[tuple[bytes, bytes, bytes]]:
        """(db name, key, value) of every record: for audits and tests (e.g. no plaintext key)."""
        for name, db in (
            (DB_REVISIONS, self._revs),
            (DB_NAMES, self._names),
            (DB_COUNTERS, self._counters),
            (DB_DIGESTS, self._digests),
            (DB_LABELS, self._labels),
            (DB_TENANTS, self._tenants),
            (DB_KEYS, self._keys),
        ):
            with self._env.begin(db=db) as txn:
                for k, v in txn.cursor():
                    yield name, bytes(k), bytes(v)

    # -- helpers (inside a transaction) -------------------------------------------------------

    def _name_entry(self, txn: lmdb.Transaction, nkey: bytes) -> dict | None:
        raw = txn.get(nkey, db=self._names)
        return None if raw is None else json.loads(bytes(raw))

    def _require_entry(self, txn: lmdb.Transaction, tenant: str, name: str) -> dict:
        entry = self._name_entry(txn, _name_key(tenant, name))
        if entry is None:
            full = f"{tenant}/{name}"
            raise AdapterNotFound(f"adapter {full!r} not found", metadata={"ref": full})
        return entry

    def _put_entry(self, txn: lmdb.Transaction, nkey: bytes, entry: dict) -> None:
        for k in ("gates", "history"):
            if k in entry and not entry[k]:
                del entry[k]
        txn.put(nkey, json.dumps(entry, sort_keys=True).encode(), db=self._names)

    @staticmethod
    def _gate(entry: dict, alias: str) -> Gate | None:
        g = entry.get("gates", {}).get(alias)
        if g is None:
            return None
        return Gate(alias, g["metric"], float(g["threshold"]), g.get("direction", AT_LEAST))

    @staticmethod
    def _check_gate(gate: Gate, rec: RevisionRecord, full: str) -> None:
        ev = rec.latest_evaluation(gate.metric)
        meta = {
            "ref": rec.ref,
            "alias": gate.alias,
            "metric": gate.metric,
            "threshold": f"{gate.threshold:g}",
            "direction": gate.direction,
        }
        if ev is None:
            raise FailedPrecondition(
                f"alias {gate.alias!r} of {full!r} requires an evaluation {gate.describe()}; "
                f"{rec.ref} has no {gate.metric!r} evaluation",
                metadata=meta,
            )
        if not gate.passes(ev.value):
            by = f" by {ev.evaluator!r}" if ev.evaluator else ""
            raise FailedPrecondition(
                f"alias {gate.alias!r} of {full!r} requires an evaluation {gate.describe()}; "
                f"{rec.ref} has {gate.metric} = {ev.value:g}{by}",
                metadata={**meta, "value": f"{ev.value:g}"},
            )

    def _previous(
        self, txn: lmdb.Transaction, tenant: str, name: str, current: int, history: list[int]
    ) -> int | None:
        for r in reversed(history):
            if r != current and txn.get(_rev_key(tenant, name, r), db=self._revs) is not None:
                return r
        cur = txn.cursor(db=self._revs)
        prefix = _name_key(tenant, name) + b"@"
        if cur.set_range(_rev_key(tenant, name, current)):
            if cur.prev() and bytes(cur.key()).startswith(prefix):
                return int.from_bytes(bytes(cur.key())[-4:], "big")
        elif cur.last() and bytes(cur.key()).startswith(prefix):
            r = int.from_bytes(bytes(cur.key())[-4:], "big")
            return r if r < current else None
        return None

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
