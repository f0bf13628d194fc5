"""The store's configuration: read once at start (CLI flags over MINT_STORE_* over defaults)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mintmesh.services.common.config import check_metrics_port


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
    # Blobs: "" = <data_dir>/blobs (local, atomic renames); or any fsspec URL, e.g.
    # "memory://mint" or "s3://bucket/prefix" (needs s3fs).
    blob_url: str = ""
    # Require an API key (or the internal token) on every RPC.
    auth: bool = False
    # The operator's key (MINT_STORE_ADMIN_KEY / --admin-key); never stored.
    admin_key: str = field(default="", repr=False)
    # Shared secret of the mesh's services: with it, "x-mint-tenant" names the caller's tenant
    # (the router authenticates the client and passes the tenant on). "" = not accepted.
    internal_token: str = field(default="", repr=False)
    # Pushes per group commit in PushAdapters.
    push_group_size: int = 256
    # At start, delete blobs no revision references (lists every blob: slow on object stores).
    sweep_orphans: bool = True
    # Prometheus endpoint (http://host:PORT/metrics): None = none, 0 = a free port.
    metrics_port: int | None = None
    # The base model's served name (GetBaseModel.name; the OpenAI API's model id for it).
    # "" = the model directory's name.
    base_model_name: str = ""

    def __post_init__(self) -> None:
        # Accept str paths from callers and env/CLI parsing alike.
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        object.__setattr__(self, "model_dir", Path(self.model_dir))
        if self.max_rank < 1:
            raise ValueError(f"max_rank {self.max_rank} must be >= 1")
        if self.max_upload_bytes < 1:
            raise ValueError(f"max_upload_bytes {self.max_upload_bytes} must be >= 1")
        if self.push_group_size < 1:
            raise ValueError(f"push_group_size {self.push_group_size} must be >= 1")
        check_metrics_port(self.metrics_port)
        if self.auth and not self.admin_key and not self.internal_token:
            raise ValueError(
                "auth is on but neither admin_key nor internal_token is set: nobody could "
                "create the first tenant (set MINT_STORE_ADMIN_KEY or --admin-key)"
            )
        if self.admin_key and len(self.admin_key) < 16:
            raise ValueError(f"admin_key must be at least 16 characters, got {len(self.admin_key)}")
        if self.internal_token and len(self.internal_token) < 16:
            raise ValueError(
                f"internal_token must be at least 16 characters, got {len(self.internal_token)}"
            )
