"""Content-addressed blob stores: ``<root>/blobs/<2 hex>/<digest>``, on a local directory (the
default) or at any fsspec URL (``memory://`` in tests, ``s3://bucket/prefix`` with s3fs).

Local directory: a blob is written to ``<root>/tmp/`` first (write, fsync), then renamed into
place with os.replace and the directory fsynced, so a blob path either does not exist or holds
the complete bytes that were written. Temp files left by a crash are removed by `sweep_tmp`.
`write_many` (group commit) writes a whole group of temp files, makes them durable with one
syncfs, renames them into place and syncs once more: the same guarantee, two syncs per group.

fsspec URL: a blob is one object PUT (whole or not at all on object stores and memory://), so
there is no temp step; an existing blob is not rewritten (same digest, same bytes).

Both deduplicate by digest: one blob per digest, however many revisions reference it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from mintmesh.identity import DIGEST_RE, check_digest

logger = logging.getLogger(__name__)


def _private(path: Path):
    """A new file open for writing that only this user may read (0600, whatever the umask)."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_libc: Any = None


def _syncfs(path: Path) -> bool:
    """Flush every dirty page of the filesystem holding path (Linux syncfs); False when the
    call is not available, so the caller falls back to per-file fsync."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.syncfs  # noqa: B018 - probe
        except (OSError, AttributeError):
            _libc = False
    if not _libc:
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs({path}) failed: {os.strerror(err)}")
    finally:
        os.close(fd)
    return True


class BlobStore:
    """Blobs in a local directory (atomic: temp file, fsync, rename, fsync dir)."""

    url: str

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.url = str(self.root.resolve())
        self.blob_dir = self.root / "blobs"
        self.tmp_dir = self.root / "tmp"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        check_digest(digest)
        return self.blob_dir / digest[:2] / digest

    def stage(self, data: bytes) -> Path:
        """Write data to a durable temp file; `install` moves it into place."""
        tmp = self.tmp_dir / f"{uuid.uuid4().hex}.tmp"
        with _private(tmp) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def install(self, staged: Path, digest: str) -> Path:
        """Atomically rename a staged file to the blob path of digest (replacing any blob there:
        same digest, same bytes, and a corrupt copy gets repaired)."""
        final = self.path(digest)
        final.parent.mkdir(exist_ok=True)
        os.replace(staged, final)
        _fsync_dir(final.parent)
        return final

    def discard(self, staged: Path) -> None:
        staged.unlink(missing_ok=True)

    def write(self, digest: str, data: bytes) -> Path:
        return self.install(self.stage(data), digest)

    def write_many(self, items: Iterable[tuple[str, bytes]]) -> int:
        """Write a group of blobs durably with two filesystem syncs in all (not one fsync per
        file and directory); returns how many were written. Atomic per blob, like `write`."""
        staged: list[tuple[Path, Path]] = []
        try:
            for digest, data in items:
                final = self.path(digest)
                tmp = self.tmp_dir / f"{uuid.uuid4().hex}.tmp"
                with _private(tmp) as f:
                    f.write(data)
                staged.append((tmp, final))
            if not staged:
                return 0
            if not _syncfs(self.tmp_dir):
                for tmp, _ in staged:
                    fd = os.open(tmp, os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
            dirs: set[Path] = set()
            for tmp, final in staged:
                if final.parent not in dirs:
                    final.parent.mkdir(exist_ok=True)
                    dirs.add(final.parent)
                os.replace(tmp, final)
            if not _syncfs(self.blob_dir):
                for d in dirs:
                    _fsync_dir(d)
            return len(staged)
        finally:
            for tmp, _ in staged:
                tmp.unlink(missing_ok=True)  # no-op once renamed

    def read(self, digest: str) -> bytes | None:
        """The bytes stored under digest (unverified), or None if there is no such blob."""
        try:
            return self.path(digest).read_bytes()
        except FileNotFoundError:
            return None

    def exists(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def delete(self, digest: str) -> bool:
        p = self.path(digest)
        try:
            p.unlink()
        except FileNotFoundError:
            return False
        _fsync_dir(p.parent)
        return True

    def digests(self) -> Iterator[str]:
        """Every blob digest on disk (files with other names are ignored)."""
        for sub in sorted(self.blob_dir.iterdir()):
            if not sub.is_dir():
                continue
            for f in sorted(sub.iterdir()):
                if DIGEST_RE.match(f.name) and f.name[:2] == sub.name:
                    yield f.name

    def usage(self) -> tuple[int, int, int]:
        """(blobs, logical bytes, allocated bytes on disk)."""
        n = size = alloc = 0
        for sub in os.scandir(self.blob_dir):
            if not sub.is_dir():
                continue
            for f in os.scandir(sub.path):
                st = f.stat()
                n += 1
                size += st.st_size
                alloc += st.st_blocks * 512
        return n, size, alloc

    def sweep_tmp(self) -> int:
        """Remove temp files left by pushes that never finished (call before serving)."""
        n = 0
        for f in self.tmp_dir.iterdir():
            if f.is_file():
                f.unlink(missing_ok=True)
                n += 1
        if n:
            logger.info("removed %d unfinished upload file(s) from %s", n, self.tmp_dir)
        return n


class FsspecBlobStore:
    """Blobs at an fsspec URL: one object per digest, written with a single PUT."""

    def __init__(self, url: str, **storage_options: Any):
        import fsspec

        self.url = url.rstrip("/")
        self.fs, root = fsspec.core.url_to_fs(self.url, **storage_options)
        self.root = root.rstrip("/")
        self.blob_dir = f"{self.root}/blobs"
        self.fs.makedirs(self.blob_dir, exist_ok=True)

    def path(self, digest: str) -> str:
        check_digest(digest)
        return f"{self.blob_dir}/{digest[:2]}/{digest}"

    # Staging keeps the bytes in memory: an object PUT is already all-or-nothing.
    def stage(self, data: bytes) -> bytes:
        return data

    def install(self, staged: bytes, digest: str) -> str:
        self.write(digest, staged)
        return self.path(digest)

    def discard(self, staged: bytes) -> None:
        return None

    def write(self, digest: str, data: bytes) -> str:
        p = self.path(digest)
        if not self.exists(digest):
            self.fs.pipe_file(p, data)
        return p

    def write_many(self, items: Iterable[tuple[str, bytes]]) -> int:
        todo = {self.path(d): data for d, data in items if not self.exists(d)}
        if todo:
            self.fs.pipe(todo)
        return len(todo)

    def read(self, digest: str) -> bytes | None:
        try:
            return self.fs.cat_file(self.path(digest))
        except FileNotFoundError:
            return None

    def exists(self, digest: str) -> bool:
        return bool(self.fs.exists(self.path(digest)))

    def delete(self, digest: str) -> bool:
        p = self.path(digest)
        try:
            self.fs.rm_file(p)
        except FileNotFoundError:
            return False
        return True

    def digests(self) -> Iterator[str]:
        try:
            found = self.fs.find(self.blob_dir)
        except FileNotFoundError:
            return
        for p in sorted(found):
            name = p.rstrip("/").rsplit("/", 1)[-1]
            if DIGEST_RE.match(name):
                yield name

    def usage(self) -> tuple[int, int, int]:
        n = size = 0
        for p, info in self.fs.find(self.blob_dir, detail=True).items():
            if DIGEST_RE.match(p.rsplit("/", 1)[-1]):
                n += 1
                size += int(info.get("size") or 0)
        return n, size, size

    def sweep_tmp(self) -> int:
        return 0


def open_blob_store(url: str, data_dir: Path) -> BlobStore | FsspecBlobStore:
    """The blob store for url: "" or a plain path or file:// = a local directory (atomic
    renames), anything else = fsspec (s3://... needs s3fs installed)."""
    if not url:
        return BlobStore(data_dir)
    if url.startswith("file://"):
        return BlobStore(url.removeprefix("file://"))
    if "://" not in url:
        return BlobStore(url)
    try:
        return FsspecBlobStore(url)
    except ImportError as e:
        raise ValueError(
            f"blob URL {url!r} needs the fsspec backend package ({e.name}); install it, e.g. "
            "`pip install s3fs` for s3://"
        ) from e
