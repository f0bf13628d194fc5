"""The executor's read-only view of the node cache: the same LMDB file the sidecar writes.

One Environment per process per path, opened lazily (after any fork). A read copies the packed
bytes out of LMDB's zero-copy buffer inside a short read transaction, so no reader holds a
transaction (and pins old pages) for longer than one memcpy.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import lmdb

from mintmesh.cache import layout

logger = logging.getLogger(__name__)
T = TypeVar("T")

_envs: dict[Path, lmdb.Environment] = {}
_envs_lock = threading.Lock()


def _open_readonly(path: Path) -> lmdb.Environment:
    with _envs_lock:
        env = _envs.get(path)
        if env is None:
            env = lmdb.open(
                str(path),
                readonly=True,
                lock=True,
                max_dbs=layout.MAX_DBS,
                subdir=True,
                create=False,
                readahead=False,
                max_readers=512,
                # 0 = adopt the map size the writer recorded in the file; a fixed size smaller
                # than the writer's fails with MDB_MAP_RESIZED once the data outgrows it.
                map_size=0,
            )
            _envs[path] = env
        return env


class NodeCacheReader:
    def __init__(self, cache_dir: Path | str):
        self.path = layout.env_path(cache_dir)
        self._env: lmdb.Environment | None = None
        self._db = None

    def _ensure(self) -> lmdb.Environment | None:
        if self._env is None:
            if not (self.path / "data.mdb").exists():
                return None
            env = _open_readonly(self.path)
            try:
                self._db = env.open_db(layout.DB_BLOBS, create=False)
            except lmdb.NotFoundError:
                return None
            self._env = env
        return self._env

    def with_buffer(self, digest: str, fn: Callable[[memoryview], T]) -> T | None:
        """Call fn on the zero-copy buffer of digest inside a read transaction; None if absent.
        fn must not keep the buffer: it is invalid after the transaction ends."""
        env = self._ensure()
        if env is None:
            return None
        with env.begin(db=self._db, buffers=True) as txn:
            buf = txn.get(layout.key(digest))
            if buf is None:
                return None
            return fn(buf)

    def read(self, digest: str) -> bytearray | None:
        """A private copy of the packed bytes of digest, or None if it is not in the cache."""
        return self.with_buffer(digest, bytearray)

    def digests(self) -> list[str]:
        """Every digest in the node cache (the keys of its blob table), [] before it exists."""
        env = self._ensure()
        if env is None:
            return []
        with env.begin(db=self._db) as txn:
            keys = txn.cursor().iternext(values=False)
            return [bytes(k).decode("ascii", "replace") for k in keys]

    def contains(self, digest: str) -> bool:
        return self.with_buffer(digest, lambda _b: True) is True
