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
    cache_dir: Path
    # host:port of the adapter store.
    store_address: str
    host: str = "127.0.0.1"
    port: int = 0
    # Budget for the packed bytes held (the sum of entry sizes, not the file size).
    capacity_bytes: int = 2 * 1024 * 1024 * 1024
    map_size: int = DEFAULT_MAP_SIZE
    fetch_timeout_s: float = 30.0
    otlp_endpoint: str = ""
    # Eviction policy: "s3fifo" | "wtinylfu" | "lru" (the default is chosen by
    # `mint bench cache-sim`).
    policy: str = DEFAULT_POLICY
    # Background fetches running at once for Prefetch.
    prefetch_concurrency: int = 4
    # The mesh's internal token, sent on store fetches when the store requires auth.
    internal_token: str = field(default="", repr=False)
    # Prometheus endpoint (http://host:PORT/metrics): None = none, 0 = a free port.
    metrics_port: int | None = None

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
