"""The cache sidecar's configuration: read once at start (CLI flags over MINT_CACHE_* over
defaults)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mintmesh.cache.layout import DEFAULT_MAP_SIZE
from mintmesh.cache.policy import DEFAULT_POLICY, POLICIES
from mintmesh.services.common.config import check_metrics_port


@dataclass(frozen=True)
class CacheConfig:
    # Holds the node's LMDB environment (layout.env_path(cache_dir)), shared with the executor.
    cache_dir: Path = field(metadata={"help": "node cache directory"})
    # host:port of the adapter store.
    store_address: str = field(
        metadata={"help": "adapter store host:port", "flag": "--store", "metavar": "HOST:PORT"}
    )
    host: str = field(default="127.0.0.1", metadata={"help": "bind address"})
    port: int = field(default=0, metadata={"help": "port; 0 picks a free one"})
    # Budget for the packed bytes held (the sum of entry sizes, not the file size).
    capacity_bytes: int = field(
        default=2 * 1024 * 1024 * 1024,
        metadata={"help": "byte budget of the packed adapters held", "default_help": "2 GiB"},
    )
    map_size: int = field(
        default=DEFAULT_MAP_SIZE,
        metadata={"help": "LMDB map size (sparse)", "default_help": "1 TiB"},
    )
    fetch_timeout_s: float = field(
        default=30.0, metadata={"help": "store fetch timeout, in seconds"}
    )
    otlp_endpoint: str = field(
        default="", metadata={"help": "OTLP/gRPC endpoint for traces (else env MINT_OTLP_ENDPOINT)"}
    )
    # Eviction policy: "s3fifo" | "wtinylfu" | "lru" (the default is chosen by
    # `mint bench cache-sim`).
    policy: str = field(
        default=DEFAULT_POLICY, metadata={"help": "eviction policy", "choices": sorted(POLICIES)}
    )
    # Background fetches running at once for Prefetch.
    prefetch_concurrency: int = field(default=4, metadata={"help": "background fetches at once"})
    # The mesh's internal token, sent on store fetches when the store requires auth.
    internal_token: str = field(
        default="", repr=False, metadata={"help": "the mesh's internal token for store calls"}
    )
    # Prometheus endpoint (http://host:PORT/metrics): None = none, 0 = a free port.
    metrics_port: int | None = field(
        default=None,
        metadata={
            "help": "serve Prometheus metrics on http://HOST:PORT/metrics; 0 picks a free port"
        },
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "cache_dir", Path(self.cache_dir))
        if self.capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes {self.capacity_bytes} must be > 0")
        if self.map_size <= 0:
            raise ValueError(f"map_size {self.map_size} must be > 0")
        if self.fetch_timeout_s <= 0:
            raise ValueError(f"fetch_timeout_s {self.fetch_timeout_s} must be > 0")
        if self.policy not in POLICIES:
            raise ValueError(
                f"eviction policy {self.policy!r} is unknown; choose one of {sorted(POLICIES)}"
            )
        if self.prefetch_concurrency <= 0:
            raise ValueError(f"prefetch_concurrency {self.prefetch_concurrency} must be > 0")
        check_metrics_port(self.metrics_port)
