"""The node cache's LMDB layout, shared by the sidecar (the only writer) and the executor
(read-only). Keys are digests (64 lowercase hex chars, ascii); never names."""

from __future__ import annotations

from pathlib import Path

# Named databases inside the environment.
DB_BLOBS = b"blobs"  # digest -> packed adapter bytes
DB_META = b"meta"  # digest -> JSON entry metadata (size, added/used times, pinned), sidecar-owned
MAX_DBS = 8
# A huge map: the byte budget is enforced by the sidecar, not by the map size.
DEFAULT_MAP_SIZE = 1 << 40


def env_path(cache_dir: Path | str) -> Path:
    """The LMDB environment directory (holds data.mdb and lock.mdb) inside cache_dir."""
    return Path(cache_dir) / "adapters.lmdb"


def key(digest: str) -> bytes:
    return digest.encode("ascii")
