"""The store's logic, without gRPC: push (validate, then commit atomically; one at a time or in
groups), resolve, fetch (verified), list, delete, aliases and gates, evaluations, deprecation,
merges, tenants and API keys, base-model info. Every call that touches an adapter checks the
caller's tenant (mintmesh.services.store.auth.Principal).

Push order, so that nothing becomes visible unless the whole upload is valid:
header checks (and the caller's tenant) -> receive every byte (size, max_upload_bytes) -> sha256
vs the header -> validate_and_pack against the base model (in the requested storage format) ->
blob staged (temp file + fsync) -> under the commit lock: blob moved into place, then one catalog
transaction. A push that fails, is cut or is killed before that transaction commits leaves at
most a temp file or an unreferenced blob, which `StoreCore` removes at its next start.

Group commit (`push_many`, the PushAdapters RPC): each adapter is checked exactly as above; a
group of valid ones is then written with one blob sync (`write_many`) and recorded in one
catalog transaction, so a million small pushes do not pay one fsync and one LMDB commit each.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import math
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mintmesh import peft_io
from mintmesh.errors import (
    AdapterNotFound,
    BaseModelMismatch,
    DigestMismatch,
    InvalidAdapter,
    InvalidArgument,
    MintError,
    Unauthenticated,
    Unavailable,
)
from mintmesh.identity import DIGEST_RE, check_digest, check_part, parse_name
from mintmesh.model import BaseModelInfo, base_model_info
from mintmesh.packed import ModuleWeights, pack, storage_format, unpack
from mintmesh.peft_io import training_state_metadata
from mintmesh.services.store.auth import ADMIN, Authenticator, Principal, new_key
from mintmesh.services.store.blobs import open_blob_store
from mintmesh.services.store.catalog import (
    AT_LEAST,
    DEPRECATED,
    MERGE,
    READY,
    TRAINING,
    UPLOAD,
    AdapterInfo,
    AdapterSummary,
    Catalog,
    Evaluation,
    Gate,
    Parent,
    RevisionRecord,
    RevisionSpec,
    TenantRecord,
)
from mintmesh.services.store.config import StoreConfig

logger = logging.getLogger(__name__)

MAX_LABELS = 64
MAX_LABEL_KEY = 128
MAX_LABEL_VALUE = 1024
MAX_PARENTS = 64
MAX_MERGE_SOURCES = 64
# A training state (fp32 weights + two AdamW moments) may be this many times max_upload_bytes.
STATE_SIZE_FACTOR = 4
MAX_EVALUATOR = 256
LINEAR = "linear"


@dataclass(frozen=True)
class PushHeader:
    """The first message of a push: what the bytes that follow must be."""

    name: str
    adapter_config_json: str
    sha256: str
    size_bytes: int
    labels: Mapping[str, str] = field(default_factory=dict)
    base_fingerprint: str = ""
    # float32 | bfloat16 | float16 | int8 (or fp32, bf16, ...); "" keeps the upload's dtype.
    storage_format: str = ""
    # upload | training.
    source: str = UPLOAD
    # Provenance: references of the revisions this one derives from.
    parents: tuple[str, ...] = ()
    data_digest: str = ""
    # A training run's saved state, whose bytes follow the adapter's in the stream.
    state_sha256: str = ""
    state_size_bytes: int = 0


@dataclass(frozen=True)
class BaseModelSummary:
    fingerprint: str
    model_type: str
    target_modules: tuple[str, ...]
    max_rank: int


@dataclass(frozen=True)
class FetchResult:
    """Verified packed bytes of one digest."""

    digest: str
    data: bytes

    @property
    def size_bytes(self) -> int:
        return len(self.data)

    def chunks(self, chunk_bytes: int) -> Iterator[bytes]:
        mv = memoryview(self.data)
        for off in range(0, len(mv), chunk_bytes):
            yield bytes(mv[off : off + chunk_bytes])


@dataclass(frozen=True)
class DeleteResult:
    """The deleted revisions (state "deleted") and the digests whose blobs went with them (no
    remaining revision referenced them): caches and executors should drop those."""

    revisions: list[RevisionRecord]
    digests: list[str]


@dataclass(frozen=True)
class PushResult:
    """One adapter of a push_many: its position and either its revision or its error."""

    index: int
    record: RevisionRecord | None = None
    error: MintError | None = None


@dataclass(frozen=True)
class NewTenant:
    tenant: TenantRecord
    api_key: str
    key_id: str


@dataclass
class StoreStats:
    pushes: int = 0
    push_failures: int = 0
    fetches: int = 0
    merges: int = 0


@dataclass
class _Prepared:
    index: int
    spec: RevisionSpec
    data: bytes
    state: bytes = b""


class _Committer:
    """Commits push_many's groups on its own thread, one at a time and in order, so that the
    next group is validated while this one's blobs are written and synced (file I/O releases
    the GIL). At most two groups wait; results come back in submission order."""

    _DONE = object()

    def __init__(self, core: StoreCore, is_cancelled: Callable[[], bool] | None):
        self.core = core
        self.is_cancelled = is_cancelled
        self.todo: queue.Queue = queue.Queue(maxsize=2)
        self.results: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.pending = 0
        self._stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="push-commit", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.todo.get()
            if item is self._DONE:
                return
            group, refused = item
            if self._stopping.is_set() or self.error is not None:
                self.results.put(None)
                continue
            try:
                done = self.core._commit_group(group, self.is_cancelled)
                self.results.put(sorted(refused + done, key=lambda r: r.index))
            except BaseException as e:  # handed to the caller's thread
                self.error = e
                self.results.put(None)

    def submit(self, group: list[_Prepared], refused: list[PushResult]) -> None:
        self._raise()
        self.todo.put((group, refused))
        self.pending += 1

    def _take(self, block: bool) -> Iterator[list[PushResult]]:
        while self.pending:
            try:
                res = self.results.get(block=block)
            except queue.Empty:
                return
            self.pending -= 1
            self._raise()
            if res:
                yield res

    def ready(self) -> Iterator[list[PushResult]]:
        """Results of the groups committed so far (does not wait)."""
        yield from self._take(block=False)

    def finish(self) -> Iterator[list[PushResult]]:
        """Every remaining result, waiting for the commits."""
        yield from self._take(block=True)

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        self._stopping.set()
        self.todo.put(self._DONE)
        self.thread.join()


def merge_linear(
    parts: Sequence[tuple[Mapping[str, ModuleWeights], float]],
) -> dict[str, ModuleWeights]:
    """The exact weighted sum of LoRA deltas as one LoRA: per module, A = cat_i(A_i) and
    B = cat_i(w_i * s_i * B_i) with scale 1, so scale * B @ A = sum_i w_i * s_i * B_i @ A_i and
    the rank is the sum of the ranks (modules a part lacks contribute nothing)."""
    names = sorted(set().union(*(mods.keys() for mods, _ in parts)))
    out: dict[str, ModuleWeights] = {}
    for name in names:
        a_parts, b_parts = [], []
        for mods, w in parts:
            mw = mods.get(name)
            if mw is None:
                continue
            a_parts.append(mw.A.to(torch.float32))
            b_parts.append(mw.B.to(torch.float32) * float(w * mw.scale))
        shapes = {(int(a.shape[1]), int(b.shape[0])) for a, b in zip(a_parts, b_parts, strict=True)}
        if len(shapes) != 1:
            raise InvalidAdapter(f"module {name}: sources disagree on its shape ({sorted(shapes)})")
        a = torch.cat(a_parts, dim=0).contiguous()
        b = torch.cat(b_parts, dim=1).contiguous()
        out[name] = ModuleWeights(A=a, B=b, alpha=float(a.shape[0]), scale=1.0)
    return out


class StoreCore:
    """One per process per data_dir (the data dir is locked with flock while it is open)."""

    def __init__(self, config: StoreConfig, *, base: BaseModelInfo | None = None):
        self.config = config
        self.data_dir = Path(config.data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _lock_data_dir(self.data_dir)
        try:
            self.base = base or base_model_info(config.model_dir)
            self.blobs = open_blob_store(config.blob_url, self.data_dir)
            self.catalog = Catalog(self.data_dir / "catalog.lmdb")
            self.auth = Authenticator(
                self.catalog,
                enabled=config.auth,
                admin_key=config.admin_key,
                internal_token=config.internal_token,
            )
            self._commit_lock = threading.Lock()
            self._stats_lock = threading.Lock()
            self._stats = StoreStats()
            # Revocations, for peers that cache keys (WatchKeys): an epoch and who woke it.
            self._keys_changed = threading.Condition()
            self._key_epoch = 0
            self._last_revoked = ""
            self._recover()
        except BaseException:
            os.close(self._lock_fd)
            raise
        logger.info(
            "store at %s (blobs %s) validating against base %s… (max_rank %d, auth %s)",
            self.data_dir,
            self.blobs.url,
            self.base.fingerprint[:12],
            config.max_rank,
            "on" if config.auth else "off",
        )

    def close(self) -> None:
        if self._lock_fd >= 0:
            self.catalog.close()
            os.close(self._lock_fd)
            self._lock_fd = -1

    def _who(self, principal: Principal | None) -> Principal:
        if principal is not None:
            return principal
        if self.config.auth:
            raise Unauthenticated("no credentials: this store requires an API key")
        return ADMIN

    # -- startup ------------------------------------------------------------------------------

    def _recover(self) -> None:
        """Drop what unfinished pushes and deletes left behind: temp files and blobs that no
        revision references."""
        self.blobs.sweep_tmp()
        if not self.config.sweep_orphans:
            return
        referenced = self.catalog.referenced_digests()
        on_disk = set(self.blobs.digests())
        for d in sorted(on_disk - referenced):
            self.blobs.delete(d)
            logger.info("removed orphan blob %s (no revision references it)", d)
        missing = referenced - on_disk
        if missing:
            logger.warning(
                "%d referenced blob(s) are missing from %s, e.g. %s; fetching them will fail "
                "with DATA_LOSS",
                len(missing),
                self.blobs.url,
                sorted(missing)[0],
            )

    # -- push ---------------------------------------------------------------------------------

    def push(
        self,
        header: PushHeader,
        chunks: Iterable[bytes],
        *,
        is_cancelled: Callable[[], bool] | None = None,
        principal: Principal | None = None,
    ) -> RevisionRecord:
        """Validate an upload completely, then commit it as the next revision of its name."""
        try:
            rec = self._push(header, chunks, is_cancelled, self._who(principal))
        except BaseException:
            with self._stats_lock:
                self._stats.push_failures += 1
            raise
        with self._stats_lock:
            self._stats.pushes += 1
        logger.info("pushed %s (%s, %d bytes)", rec.ref, rec.digest[:12], rec.size_bytes)
        return rec

    def _push(
        self,
        header: PushHeader,
        chunks: Iterable[bytes],
        is_cancelled: Callable[[], bool] | None,
        who: Principal,
    ) -> RevisionRecord:
        ref, parents = self._check_header(header, who)
        weights, state = self._receive(header, chunks)
        prep = self._prepare(0, header, ref, parents, weights, state)
        del weights, state
        return self._commit_one(prep, is_cancelled)

    def _commit_one(
        self, prep: _Prepared, is_cancelled: Callable[[], bool] | None = None
    ) -> RevisionRecord:
        spec = prep.spec
        blobs = [(spec.digest, prep.data)]
        if prep.state:
            blobs.append((spec.state_digest, prep.state))
        staged = [(d, self.blobs.stage(data)) for d, data in blobs]
        try:
            with self._commit_lock:
                if is_cancelled is not None and is_cancelled():
                    full = f"{spec.tenant}/{spec.name}"
                    raise Unavailable(f"push of {full!r} was cancelled by the client")
                for d, st in staged:
                    self.blobs.install(st, d)
                try:
                    return self.catalog.add_revisions([spec])[0]
                except BaseException:
                    for d, _ in staged:
                        if not self.catalog.digest_referenced(d):
                            self.blobs.delete(d)
                    raise
        finally:
            for _, st in staged:
                self.blobs.discard(st)

    def _prepare(
        self,
        index: int,
        header: PushHeader,
        ref,
        parents: tuple[Parent, ...],
        weights: bytes,
        state: bytes = b"",
    ) -> _Prepared:
        packed = peft_io.validate_and_pack(
            header.adapter_config_json,
            weights,
            self.base,
            max_rank=self.config.max_rank,
            claimed_fingerprint=header.base_fingerprint,
            storage=header.storage_format or None,
        )
        spec = RevisionSpec(
            tenant=ref.tenant,
            name=ref.name,
            digest=packed.digest,
            base_fingerprint=self.base.fingerprint,
            rank=packed.max_rank,
            alpha=packed.alpha,
            target_modules=tuple(packed.target_modules),
            size_bytes=len(packed.data),
            labels=dict(header.labels),
            storage_format=packed.storage_format,
            source=header.source or UPLOAD,
            parents=parents,
            data_digest=header.data_digest,
            state_digest=header.state_sha256 if state else "",
            state_size_bytes=len(state),
        )
        if state:
            training_state_metadata(state)
        return _Prepared(index=index, spec=spec, data=packed.data, state=state)

    def push_many(
        self,
        items: Iterable[tuple[PushHeader, bytes]],
        *,
        principal: Principal | None = None,
        is_cancelled: Callable[[], bool] | None = None,
        group_size: int | None = None,
    ) -> Iterator[list[PushResult]]:
        """Push many adapters with group commit. Each is validated like `push`; valid ones are
        committed in groups (one blob sync, one catalog transaction). Yields, per group, the
        results (revision or error, with the adapter's index) of the group and of the adapters
        refused since the previous one. Validation of the next group overlaps the commit of
        the previous one (a committer thread). If `items` raises, adapters not yet handed to
        the committer are not committed."""
        who = self._who(principal)
        size = group_size or self.config.push_group_size
        committer = _Committer(self, is_cancelled)
        group: list[_Prepared] = []
        refused: list[PushResult] = []
        try:
            for index, (header, data) in enumerate(items):
                try:
                    ref, parents = self._check_header(header, who)
                    if header.state_sha256 or header.state_size_bytes:
                        raise InvalidArgument(
                            "a training state is pushed with PushAdapter, not PushAdapters"
                        )
                    weights, _ = self._receive(header, (data,))
                    group.append(self._prepare(index, header, ref, parents, weights))
                except MintError as e:
                    with self._stats_lock:
                        self._stats.push_failures += 1
                    refused.append(PushResult(index=index, error=e))
                if len(group) >= size:
                    committer.submit(group, refused)
                    group, refused = [], []
                yield from committer.ready()
            if group or refused:
                committer.submit(group, refused)
            yield from committer.finish()
        finally:
            committer.stop()

    def _commit_group(
        self, group: list[_Prepared], is_cancelled: Callable[[], bool] | None
    ) -> list[PushResult]:
        if not group:
            return []
        unique = {p.spec.digest: p.data for p in group}
        with self._commit_lock:
            if is_cancelled is not None and is_cancelled():
                raise Unavailable(
                    f"push of {len(group)} adapter(s) was cancelled by the client before commit"
                )
            self.blobs.write_many(unique.items())
            try:
                records = self.catalog.add_revisions([p.spec for p in group])
            except BaseException:
                for d in unique:
                    if not self.catalog.digest_referenced(d):
                        self.blobs.delete(d)
                raise
        with self._stats_lock:
            self._stats.pushes += len(records)
        logger.debug("committed a group of %d push(es)", len(records))
        return [PushResult(index=p.index, record=r) for p, r in zip(group, records, strict=True)]

    def _check_header(self, header: PushHeader, who: Principal) -> tuple:
        ref = parse_name(header.name)
        who.check_adapter(ref)
        sha = header.sha256
        if not isinstance(sha, str) or not DIGEST_RE.match(sha):
            raise InvalidAdapter(
                f"header sha256 {sha!r} is not a lowercase hex sha256 (64 characters) of the "
                "safetensors bytes"
            )
        size, limit = int(header.size_bytes), self.config.max_upload_bytes
        if size <= 0:
            raise InvalidAdapter(
                f"header size_bytes {size}: an upload must declare the size of its safetensors"
            )
        if size > limit:
            raise InvalidAdapter(
                f"upload of {size} bytes exceeds max_upload_bytes {limit} of this store"
            )
        if not header.adapter_config_json:
            raise InvalidAdapter("header adapter_config_json is empty")
        peft_io.parse_config(header.adapter_config_json)  # fail fast, before the bytes arrive
        fp = header.base_fingerprint
        if fp and fp != self.base.fingerprint:
            raise BaseModelMismatch(
                f"adapter was made for base model {fp[:12]}…, this store serves "
                f"{self.base.fingerprint[:12]}…"
            )
        _check_labels(header.labels)
        if header.storage_format:
            try:
                storage_format(header.storage_format)
            except ValueError as e:
                raise InvalidArgument(str(e)) from None
        if header.source and header.source not in (UPLOAD, TRAINING):
            raise InvalidArgument(
                f"push source {header.source!r} must be {UPLOAD!r} or {TRAINING!r} (merges are "
                "made with MergeAdapters)"
            )
        if header.data_digest and not DIGEST_RE.match(header.data_digest):
            raise InvalidArgument(
                f"data_digest {header.data_digest!r} is not a lowercase hex sha256"
            )
        if len(header.parents) > MAX_PARENTS:
            raise InvalidArgument(
                f"{len(header.parents)} parents exceed the limit of {MAX_PARENTS}"
            )
        state_size = int(header.state_size_bytes)
        if bool(header.state_sha256) != bool(state_size):
            raise InvalidArgument(
                "a training state needs both state_sha256 and state_size_bytes (or neither)"
            )
        if header.state_sha256 and not DIGEST_RE.match(header.state_sha256):
            raise InvalidArgument(
                f"state_sha256 {header.state_sha256!r} is not a lowercase hex sha256"
            )
        if state_size > STATE_SIZE_FACTOR * limit:
            raise InvalidArgument(
                f"training state of {state_size} bytes exceeds {STATE_SIZE_FACTOR} x "
                f"max_upload_bytes ({STATE_SIZE_FACTOR * limit}) of this store"
            )
        parents = []
        for p in header.parents:
            rec = self.resolve(p, principal=who)
            parents.append(Parent(ref=rec.ref, digest=rec.digest))
        return ref, tuple(parents)

    def _receive(self, header: PushHeader, chunks: Iterable[bytes]) -> tuple[bytes, bytes]:
        """(adapter bytes, training state bytes or b""): the stream carries size_bytes of the
        adapter, then state_size_bytes of its state; each is checked against its sha256."""
        size, state_size = int(header.size_bytes), int(header.state_size_bytes)
        total = size + state_size
        buf = bytearray()
        for chunk in chunks:
            if len(buf) + len(chunk) > total:
                raise InvalidAdapter(
                    f"received more than the {total} bytes the header declared "
                    f"({len(buf) + len(chunk)} so far)"
                )
            buf += chunk
        if len(buf) < total:
            raise InvalidAdapter(f"truncated: received {len(buf)} of {total} bytes")
        weights, state = bytes(buf[:size]), bytes(buf[size:])
        del buf
        for what, data, want in (("", weights, header.sha256),
                                 ("state ", state, header.state_sha256)):  # fmt: skip
            if not data:
                continue
            got = hashlib.sha256(data).hexdigest()
            if got != want:
                raise DigestMismatch(
                    f"sha256 of the {len(data)} received {what}bytes is {got}, the header says "
                    f"{want}",
                    metadata={"expected": want, "actual": got},
                )
        return weights, state

    # -- reads --------------------------------------------------------------------------------

    def resolve(self, ref: str, *, principal: Principal | None = None) -> RevisionRecord:
        parsed = self._who(principal).check_ref(ref)
        return self.catalog.resolve(parsed)

    def fetch(
        self,
        *,
        digest: str = "",
        ref: str = "",
        state: bool = False,
        principal: Principal | None = None,
    ) -> FetchResult:
        """The verified packed bytes of a digest or a reference (state: the reference's
        training state). Raises DigestMismatch (and returns nothing) when the stored blob does
        not hash to its digest."""
        who = self._who(principal)
        if bool(digest) == bool(ref):
            raise InvalidArgument(
                f"fetch needs exactly one of digest or ref (got digest={digest!r}, ref={ref!r})"
            )
        if state and not ref:
            raise InvalidArgument("a training state is fetched by ref, not by digest")
        if ref:
            rec = self.resolve(ref, principal=who)
            digest = rec.digest
            if state:
                if not rec.state_digest:
                    raise AdapterNotFound(
                        f"revision {rec.ref} holds no training state (save it with save_state)",
                        metadata={"ref": rec.ref},
                    )
                digest = rec.state_digest
        else:
            check_digest(digest)
            tenants = self.catalog.digest_tenants(digest)
            # Another tenant's digest reads exactly as an unknown one: the answer must not tell
            # a caller which digests exist.
            if not tenants or not (who.is_admin or who.tenant in tenants):
                raise AdapterNotFound(
                    f"no adapter revision of yours has digest {digest}",
                    metadata={"digest": digest},
                )
        with self._stats_lock:
            self._stats.fetches += 1
        return FetchResult(digest=digest, data=self._read_verified(digest))

    def _read_verified(self, digest: str) -> bytes:
        path = self.blobs.path(digest)
        data = self.blobs.read(digest)
        if data is None:
            raise DigestMismatch(
                f"blob of digest {digest} is missing from {path}", metadata={"digest": digest}
            )
        got = hashlib.sha256(data).hexdigest()
        if got != digest:
            logger.error("blob %s is corrupt: sha256 %s", path, got)
            raise DigestMismatch(
                f"stored blob of digest {digest} is corrupt (its sha256 is {got}); "
                "refusing to send it",
                metadata={"digest": digest, "actual": got},
            )
        return data

    def list_adapters(
        self,
        *,
        tenant: str = "",
        page_size: int = 0,
        page_token: str = "",
        name_prefix: str = "",
        label: str = "",
        principal: Principal | None = None,
    ) -> tuple[list[AdapterSummary], str]:
        who = self._who(principal)
        if not who.is_admin:
            if tenant and tenant != who.tenant:
                who.check(tenant, "the adapter list")
            tenant = who.tenant
        return self.catalog.list_adapters(
            tenant=tenant,
            page_size=page_size,
            page_token=page_token,
            name_prefix=name_prefix,
            label=label,
        )

    def list_revisions(
        self,
        name: str,
        *,
        page_size: int = 0,
        page_token: str = "",
        label: str = "",
        state: str = "",
        principal: Principal | None = None,
    ) -> tuple[list[RevisionRecord], str, AdapterInfo]:
        ref = parse_name(name)
        self._who(principal).check_adapter(ref)
        return self.catalog.list_revisions(
            ref.tenant,
            ref.name,
            page_size=page_size,
            page_token=page_token,
            label=label,
            state=state,
        )

    # -- lifecycle ----------------------------------------------------------------------------

    def delete(self, ref: str, *, principal: Principal | None = None) -> DeleteResult:
        """'tenant/name@rev' (or @alias) deletes one revision, 'tenant/name' every revision; a
        blob goes when no remaining revision references its digest."""
        parsed = self._who(principal).check_ref(ref)
        with self._commit_lock:
            doomed, orphans = self.catalog.delete(parsed, whole=parsed.selector is None)
            for d in orphans:
                self.blobs.delete(d)
        logger.info("deleted %s (%d revision(s), %d blob(s))", ref, len(doomed), len(orphans))
        return DeleteResult(revisions=doomed, digests=orphans)

    def set_alias(
        self,
        name: str,
        alias: str,
        revision: int = 0,
        *,
        rollback: bool = False,
        principal: Principal | None = None,
    ) -> tuple[RevisionRecord, int]:
        """Re-point alias of name at revision atomically: (the revision, the previous one)."""
        ref = parse_name(name)
        self._who(principal).check_adapter(ref)
        rec, prev = self.catalog.set_alias(
            ref.tenant, ref.name, alias, int(revision), rollback=rollback
        )
        logger.info(
            "%s %s@%s -> @%d (was @%d)",
            "rolled back" if rollback else "pointed",
            ref.full_name,
            alias,
            rec.revision,
            prev,
        )
        return rec, prev

    def delete_alias(self, name: str, alias: str, *, principal: Principal | None = None) -> int:
        ref = parse_name(name)
        self._who(principal).check_adapter(ref)
        return self.catalog.delete_alias(ref.tenant, ref.name, alias)

    def set_gate(
        self,
        name: str,
        alias: str,
        *,
        metric: str = "",
        threshold: float = 0.0,
        direction: str = AT_LEAST,
        clear: bool = False,
        principal: Principal | None = None,
    ) -> Gate | None:
        ref = parse_name(name)
        self._who(principal).check_adapter(ref)
        return self.catalog.set_gate(
            ref.tenant,
            ref.name,
            alias,
            metric=metric,
            threshold=threshold,
            direction=direction or AT_LEAST,
            clear=clear,
        )

    def add_evaluation(
        self,
        ref: str,
        metric: str,
        value: float,
        evaluator: str = "",
        *,
        dataset_digest: str = "",
        principal: Principal | None = None,
    ) -> RevisionRecord:
        parsed = self._who(principal).check_ref(ref)
        check_part("metric", metric)
        if dataset_digest and not DIGEST_RE.match(dataset_digest):
            raise InvalidArgument(
                f"dataset_digest {dataset_digest!r} of {metric!r} must be a sha256: 64 "
                "lowercase hex digits"
            )
        if not math.isfinite(value):
            raise InvalidArgument(f"evaluation value {value!r} of {metric!r} must be finite")
        if len(evaluator) > MAX_EVALUATOR:
            raise InvalidArgument(
                f"evaluator has {len(evaluator)} characters; the limit is {MAX_EVALUATOR}"
            )
        return self.catalog.add_evaluation(
            parsed,
            Evaluation(
                metric=metric,
                value=float(value),
                evaluator=evaluator,
                dataset_digest=dataset_digest,
            ),
        )

    def deprecate(
        self, ref: str, *, undo: bool = False, principal: Principal | None = None
    ) -> RevisionRecord:
        parsed = self._who(principal).check_ref(ref)
        return self.catalog.set_state(parsed, READY if undo else DEPRECATED)

    def merge(
        self,
        name: str,
        sources: Sequence[tuple[str, float]],
        *,
        method: str = LINEAR,
        storage: str = "",
        labels: Mapping[str, str] | None = None,
        principal: Principal | None = None,
    ) -> RevisionRecord:
        """A new revision of name: the exact weighted sum of the sources' deltas (see
        merge_linear), stored as `storage` (default float32), provenance = the sources."""
        who = self._who(principal)
        target = parse_name(name)
        who.check_adapter(target)
        if (method or LINEAR) != LINEAR:
            raise InvalidArgument(f"merge method {method!r} is not supported; use {LINEAR!r}")
        if not sources:
            raise InvalidArgument("a merge needs at least one source revision")
        if len(sources) > MAX_MERGE_SOURCES:
            raise InvalidArgument(
                f"{len(sources)} merge sources exceed the limit of {MAX_MERGE_SOURCES}"
            )
        _check_labels(labels or {})
        try:
            fmt = storage_format(storage) if storage else "float32"
        except ValueError as e:
            raise InvalidArgument(str(e)) from None
        parts: list[tuple[dict[str, ModuleWeights], float]] = []
        parents: list[Parent] = []
        peft_cfg: dict = {}
        for ref, weight in sources:
            if not math.isfinite(weight) or weight == 0:
                raise InvalidArgument(
                    f"merge weight {weight!r} of {ref!r} must be finite and non-zero"
                )
            rec = self.resolve(ref, principal=who)
            if rec.base_fingerprint != self.base.fingerprint:
                raise BaseModelMismatch(
                    f"{rec.ref} was made for base model {rec.base_fingerprint[:12]}…, this "
                    f"store serves {self.base.fingerprint[:12]}…; only adapters of one base "
                    "can be merged",
                    metadata={"ref": rec.ref},
                )
            header, modules = unpack(self._read_verified(rec.digest), copy=True)
            if header.base_fingerprint != self.base.fingerprint:
                raise BaseModelMismatch(
                    f"the bytes of {rec.ref} were packed for base model "
                    f"{header.base_fingerprint[:12]}…, not {self.base.fingerprint[:12]}…",
                    metadata={"ref": rec.ref},
                )
            peft_cfg = peft_cfg or dict(header.peft_config)
            parts.append((modules, float(weight)))
            parents.append(Parent(ref=rec.ref, digest=rec.digest, weight=float(weight)))
        merged = merge_linear(parts)
        for mod, mw in merged.items():
            if not (bool(torch.isfinite(mw.A).all()) and bool(torch.isfinite(mw.B).all())):
                raise InvalidArgument(
                    f"the merge's module {mod} is not finite (weights {[w for _, w in sources]} "
                    "overflow float32): use smaller weights"
                )
        too_big = {n: int(m.A.shape[0]) for n, m in merged.items()}
        worst = max(too_big, key=too_big.__getitem__)
        if too_big[worst] > self.config.max_rank:
            raise InvalidArgument(
                f"merged rank {too_big[worst]} of module {worst} (the sum of the sources' "
                f"ranks) exceeds max_rank {self.config.max_rank}"
            )
        leafs = sorted({n.rsplit(".", 1)[-1] for n in merged})
        r = max(too_big.values())
        peft_keep = {
            "r": r,
            "lora_alpha": float(r),
            "use_rslora": False,
            "target_modules": leafs,
        }
        if peft_cfg.get("base_model_name_or_path"):
            peft_keep["base_model_name_or_path"] = peft_cfg["base_model_name_or_path"]
        data = pack(
            merged, base_fingerprint=self.base.fingerprint, peft_config=peft_keep, storage=fmt
        )
        spec = RevisionSpec(
            tenant=target.tenant,
            name=target.name,
            digest=hashlib.sha256(data).hexdigest(),
            base_fingerprint=self.base.fingerprint,
            rank=r,
            alpha=float(r),
            target_modules=tuple(leafs),
            size_bytes=len(data),
            labels=dict(labels or {}),
            storage_format=fmt,
            source=MERGE,
            parents=tuple(parents),
            merge_method=LINEAR,
        )
        rec = self._commit_one(_Prepared(index=0, spec=spec, data=data))
        with self._stats_lock:
            self._stats.merges += 1
        logger.info("merged %s into %s (rank %d)", [p.ref for p in parents], rec.ref, r)
        return rec

    # -- tenants ------------------------------------------------------------------------------

    def create_tenant(self, tenant: str, *, principal: Principal | None = None) -> NewTenant:
        self._who(principal).require_admin(f"creating tenant {tenant!r}")
        check_part("tenant", tenant)
        key, rec = new_key(tenant)
        t = self.catalog.create_tenant(tenant, rec)
        logger.info("created tenant %r (key id %s)", tenant, rec.key_id)
        return NewTenant(tenant=t, api_key=key, key_id=rec.key_id)

    def create_api_key(
        self, tenant: str = "", *, admin: bool = False, principal: Principal | None = None
    ) -> tuple[str, str, str]:
        """(api key, key id, tenant): another key for tenant, or an admin key."""
        who = self._who(principal)
        if admin:
            who.require_admin("creating an admin key")
            tenant = ""
        else:
            check_part("tenant", tenant)
            who.check(tenant, "the API keys")
        key, rec = new_key(tenant, admin=admin)
        self.catalog.add_key(rec)
        logger.info("created %s key %s", "an admin" if admin else f"a {tenant!r}", rec.key_id)
        return key, rec.key_id, tenant

    def revoke_api_key(self, key_id: str, *, principal: Principal | None = None) -> None:
        who = self._who(principal)
        rec = self.catalog.get_key(key_id)
        if rec is not None:
            if rec.admin:
                who.require_admin("revoking an admin key")
            else:
                who.check(rec.tenant, "the API keys")
        self.catalog.revoke_key(key_id)
        with self._keys_changed:
            self._key_epoch += 1
            self._last_revoked = key_id
            self._keys_changed.notify_all()
        logger.info("revoked key %s", key_id)

    def key_epoch(self) -> tuple[int, str]:
        """(revocations so far, the last key revoked)."""
        with self._keys_changed:
            return self._key_epoch, self._last_revoked

    def wait_key_epoch(self, seen: int, timeout: float) -> tuple[int, str]:
        """key_epoch() once it differs from seen, or after timeout."""
        with self._keys_changed:
            self._keys_changed.wait_for(lambda: self._key_epoch != seen, timeout)
            return self._key_epoch, self._last_revoked

    def list_tenants(
        self, *, page_size: int = 0, page_token: str = "", principal: Principal | None = None
    ) -> tuple[list[TenantRecord], str]:
        who = self._who(principal)
        if who.is_admin:
            return self.catalog.list_tenants(page_size=page_size, page_token=page_token)
        own = self.catalog.get_tenant(who.tenant)
        return ([own] if own is not None and not page_token else []), ""

    def authenticate(self, api_key: str) -> Principal:
        return self.auth.verify_key(api_key)

    # -- info ---------------------------------------------------------------------------------

    def base_model(self) -> BaseModelSummary:
        return BaseModelSummary(
            fingerprint=self.base.fingerprint,
            model_type=self.base.model_type,
            target_modules=tuple(self.base.targetable()),
            max_rank=self.config.max_rank,
        )

    def stats(self) -> StoreStats:
        with self._stats_lock:
            return StoreStats(**vars(self._stats))


def _check_labels(labels: Mapping[str, str]) -> None:
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(f"{len(labels)} labels exceed the limit of {MAX_LABELS}")
    for k, v in labels.items():
        if not k or len(k) > MAX_LABEL_KEY or "=" in k or "|" in k:
            raise InvalidArgument(
                f"label key {k!r} must be 1-{MAX_LABEL_KEY} characters without '=' or '|'"
            )
        if len(v) > MAX_LABEL_VALUE:
            raise InvalidArgument(
                f"label {k!r} has a value of {len(v)} characters; the limit is {MAX_LABEL_VALUE}"
            )


def _lock_data_dir(data_dir: Path) -> int:
    fd = os.open(data_dir / "store.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RuntimeError(f"data dir {data_dir} is in use by another store") from None
    return fd
