"""The store's configuration: read once at start (CLI flags over MINT_STORE_* over defaults)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mintmesh.services.common.config import check_metrics_port


@dataclass(frozen=True)
class StoreConfig:
    # Holds catalog.lmdb/, blobs/ and tmp/.
    data_dir: Path = field(metadata={"help": "catalog and blobs directory"})
    # The base model every upload is validated against (a Hugging Face directory).
    model_dir: Path = field(metadata={"help": "base model directory"})
    host: str = field(default="127.0.0.1", metadata={"help": "bind address"})
    port: int = field(default=0, metadata={"help": "port; 0 picks a free one"})
    max_rank: int = field(default=128, metadata={"help": "largest LoRA rank accepted"})
    max_upload_bytes: int = field(
        default=256 * 1024 * 1024, metadata={"help": "largest upload", "default_help": "256 MiB"}
    )
    otlp_endpoint: str = field(
        default="", metadata={"help": "OTLP/gRPC endpoint for traces (else env MINT_OTLP_ENDPOINT)"}
    )
    # Blobs: "" = <data_dir>/blobs (local, atomic renames); or any fsspec URL, e.g.
    # "memory://mint" or "s3://bucket/prefix" (needs s3fs).
    blob_url: str = field(
        default="",
        metadata={
            "help": "blob store: a directory or an fsspec URL such as s3://bucket/prefix",
            "default_help": "DATA_DIR/blobs",
        },
    )
    # Require an API key (or the internal token) on every RPC.
    auth: bool = field(default=False, metadata={"help": "require API keys on every RPC"})
    # The operator's key (MINT_STORE_ADMIN_KEY / --admin-key); never stored.
    admin_key: str = field(default="", repr=False, metadata={"help": "the operator's API key"})
    # Shared secret of the mesh's services: with it, "x-mint-tenant" names the caller's tenant
    # (the router authenticates the client and passes the tenant on). "" = not accepted.
    internal_token: str = field(
        default="", repr=False, metadata={"help": "shared secret of the mesh's services"}
    )
    # Pushes per group commit in PushAdapters.
    push_group_size: int = field(default=256, metadata={"help": "pushes per group commit"})
    # At start, delete blobs no revision references (lists every blob: slow on object stores).
    sweep_orphans: bool = field(
        default=True,
        metadata={"help": "at start, delete blobs no revision references (slow on object stores)"},
    )
    # Prometheus endpoint (http://host:PORT/metrics): None = none, 0 = a free port.
    metrics_port: int | None = field(
        default=None,
        metadata={
            "help": "serve Prometheus metrics on http://HOST:PORT/metrics; 0 picks a free port"
        },
    )
    # The base model's served name (GetBaseModel.name; the OpenAI API's model id for it).
    # "" = the model directory's name.
    base_model_name: str = field(
        default="",
        metadata={
            "help": "the base model's served name, e.g. its OpenAI model id",
            "default_help": "the model directory's name",
        },
    )

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
