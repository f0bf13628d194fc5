"""Content-addressed blob directory: ``<root>/blobs/<2 hex>/<digest>``.

A blob is written to ``<root>/tmp/`` first (write, fsync), then renamed into place with
os.replace and the directory fsynced, so a blob path either does not exist or holds the
complete bytes that were written. Temp files left by a crash are removed by `sweep_tmp`.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

from mintmesh.identity import DIGEST_RE, check_digest

logger = logging.getLogger(__name__)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobStore:
    def __init__(self, root: Path | str):
        self.root = Path(root)
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
        with open(tmp, "wb") as f:
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
