"""The store's logic, without gRPC: push (validate, then commit atomically), resolve, fetch
(verified), list, delete, base-model info.

Push order, so that nothing becomes visible unless the whole upload is valid:
header checks -> receive every byte (size, max_upload_bytes) -> sha256 vs the header ->
validate_and_pack against the base model -> blob staged in tmp/ (fsync) -> under the commit
lock: blob renamed into place, then one catalog transaction. A push that fails, is cut or is
killed before that transaction commits leaves at most a temp file or an unreferenced blob, which
`StoreCore` removes at its next start.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mintmesh import peft_io
from mintmesh.errors import (
    AdapterNotFound,
    BaseModelMismatch,
    DigestMismatch,
    InvalidAdapter,
    InvalidArgument,
    Unavailable,
)
from mintmesh.identity import DIGEST_RE, check_digest, parse_name, parse_ref
from mintmesh.model import BaseModelInfo, base_model_info
from mintmesh.services.store.blobs import BlobStore
from mintmesh.services.store.catalog import AdapterSummary, Catalog, RevisionRecord
from mintmesh.services.store.config import StoreConfig

logger = logging.getLogger(__name__)

MAX_LABELS = 64
MAX_LABEL_KEY = 128
MAX_LABEL_VALUE = 1024


@dataclass(frozen=True)
class PushHeader:
    """The first message of a push: what the bytes that follow must be."""

    name: str
    adapter_config_json: str
    sha256: str
    size_bytes: int
    labels: Mapping[str, str] = field(default_factory=dict)
    base_fingerprint: str = ""


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


@dataclass
class StoreStats:
    pushes: int = 0
    push_failures: int = 0
    fetches: int = 0


class StoreCore:
    """One per process per data_dir (the data dir is locked with flock while it is open)."""

    def __init__(self, config: StoreConfig, *, base: BaseModelInfo | None = None):
        self.config = config
        self.data_dir = Path(config.data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _lock_data_dir(self.data_dir)
        try:
            self.base = base or base_model_info(config.model_dir)
            self.blobs = BlobStore(self.data_dir)
            self.catalog = Catalog(self.data_dir / "catalog.lmdb")
            self._commit_lock = threading.Lock()
            self._stats_lock = threading.Lock()
            self._stats = StoreStats()
            self._recover()
        except BaseException:
            os.close(self._lock_fd)
            raise
        logger.info(
            "store at %s validating against base %s… (max_rank %d)",
            self.data_dir,
            self.base.fingerprint[:12],
            config.max_rank,
        )

    def close(self) -> None:
        if self._lock_fd >= 0:
            self.catalog.close()
            os.close(self._lock_fd)
            self._lock_fd = -1

    # -- startup ------------------------------------------------------------------------------

    def _recover(self) -> None:
        """Drop what unfinished pushes and deletes left behind: temp files and blobs that no
        revision references."""
        self.blobs.sweep_tmp()
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
                self.blobs.blob_dir,
                sorted(missing)[0],
            )

    # -- push ---------------------------------------------------------------------------------

    def push(
        self,
        header: PushHeader,
        chunks: Iterable[bytes],
        *,
        is_cancelled: Callable[[], bool] | None = None,
    ) -> RevisionRecord:
        """Validate an upload completely, then commit it as the next revision of its name."""
        try:
            rec = self._push(header, chunks, is_cancelled)
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
    ) -> RevisionRecord:
        ref = self._check_header(header)
        weights = self._receive(header, chunks)
        packed = peft_io.validate_and_pack(
            header.adapter_config_json,
            weights,
            self.base,
            max_rank=self.config.max_rank,
            claimed_fingerprint=header.base_fingerprint,
        )
        del weights
        staged = self.blobs.stage(packed.data)
        try:
            with self._commit_lock:
                if is_cancelled is not None and is_cancelled():
                    raise Unavailable(f"push of {ref.full_name!r} was cancelled by the client")
                self.blobs.install(staged, packed.digest)
                try:
                    return self.catalog.add_revision(
                        ref.tenant,
                        ref.name,
                        digest=packed.digest,
                        base_fingerprint=self.base.fingerprint,
                        rank=packed.max_rank,
                        alpha=packed.alpha,
                        target_modules=packed.target_modules,
                        size_bytes=len(packed.data),
                        labels=dict(header.labels),
                    )
                except BaseException:
                    if not self.catalog.digest_referenced(packed.digest):
                        self.blobs.delete(packed.digest)
                    raise
        finally:
            self.blobs.discard(staged)

    def _check_header(self, header: PushHeader):
        ref = parse_name(header.name)
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
        if len(header.labels) > MAX_LABELS:
            raise InvalidArgument(f"{len(header.labels)} labels exceed the limit of {MAX_LABELS}")
        for k, v in header.labels.items():
            if not k or len(k) > MAX_LABEL_KEY:
                raise InvalidArgument(f"label key {k!r} must be 1-{MAX_LABEL_KEY} characters")
            if len(v) > MAX_LABEL_VALUE:
                raise InvalidArgument(
                    f"label {k!r} has a value of {len(v)} characters; the limit is "
                    f"{MAX_LABEL_VALUE}"
                )
        return ref

    def _receive(self, header: PushHeader, chunks: Iterable[bytes]) -> bytes:
        size = int(header.size_bytes)
        buf = bytearray()
        h = hashlib.sha256()
        for chunk in chunks:
            if len(buf) + len(chunk) > size:
                raise InvalidAdapter(
                    f"received more than the {size} bytes the header declared "
                    f"({len(buf) + len(chunk)} so far)"
                )
            h.update(chunk)
            buf += chunk
        if len(buf) < size:
            raise InvalidAdapter(f"truncated: received {len(buf)} of {size} bytes")
        got = h.hexdigest()
        if got != header.sha256:
            raise DigestMismatch(
                f"sha256 of the {len(buf)} received bytes is {got}, the header says "
                f"{header.sha256}",
                metadata={"expected": header.sha256, "actual": got},
            )
        return bytes(buf)

    # -- reads --------------------------------------------------------------------------------

    def resolve(self, ref: str) -> RevisionRecord:
        return self.catalog.resolve(parse_ref(ref))

    def fetch(self, *, digest: str = "", ref: str = "") -> FetchResult:
        """The verified packed bytes of a digest or a reference. Raises DigestMismatch (and
        returns nothing) when the stored blob does not hash to its digest."""
        if bool(digest) == bool(ref):
            raise InvalidArgument(
                f"fetch needs exactly one of digest or ref (got digest={digest!r}, ref={ref!r})"
            )
        if ref:
            digest = self.resolve(ref).digest
        else:
            check_digest(digest)
            if not self.catalog.digest_referenced(digest):
                raise AdapterNotFound(
                    f"no adapter revision has digest {digest}", metadata={"digest": digest}
                )
        with self._stats_lock:
            self._stats.fetches += 1
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
        return FetchResult(digest=digest, data=data)

    def list_adapters(
        self, *, tenant: str = "", page_size: int = 0, page_token: str = ""
    ) -> tuple[list[AdapterSummary], str]:
        return self.catalog.list_adapters(tenant=tenant, page_size=page_size, page_token=page_token)

    def delete(self, ref: str) -> list[RevisionRecord]:
        """'tenant/name@rev' (or @alias) deletes one revision, 'tenant/name' every revision; a
        blob goes when no remaining revision references its digest."""
        parsed = parse_ref(ref)
        with self._commit_lock:
            doomed, orphans = self.catalog.delete(parsed, whole=parsed.selector is None)
            for d in orphans:
                self.blobs.delete(d)
        logger.info("deleted %s (%d revision(s), %d blob(s))", ref, len(doomed), len(orphans))
        return doomed

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


def _lock_data_dir(data_dir: Path) -> int:
    fd = os.open(data_dir / "store.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RuntimeError(f"data dir {data_dir} is in use by another store") from None
    return fd
