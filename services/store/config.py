"""The store's configuration: read once at start (CLI flags over MINT_STORE_* over defaults)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StoreConfig:
    # Holds catalog.lmdb/, blobs/ and tmp/.
    data_dir: Path
    # The base model every upload is validated against (a Hugging Face directory).
    model_dir: Path
    host: str = "127.0.0.1"
    port: int = 0
    max_rank: int = 128
    max_upload_bytes: int = 256 * 1024 * 1024
    otlp_endpoint: str = ""

    def __post_init__(self) -> None:
        # Accept str paths from callers and env/CLI parsing alike.
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        object.__setattr__(self, "model_dir", Path(self.model_dir))
        if self.max_rank < 1:
            raise ValueError(f"max_rank {self.max_rank} must be >= 1")
        if self.max_upload_bytes < 1:
            raise ValueError(f"max_upload_bytes {self.max_upload_bytes} must be >= 1")
