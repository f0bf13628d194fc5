"""The cache sidecar's Prometheus metrics: the node cache's counters, read at scrape time."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

from mintmesh.cache.core import CacheCore
from mintmesh.services.common.metrics import ReadAtScrape, counter, gauge


class CacheMetrics:
    def __init__(self, core: CacheCore, registry: CollectorRegistry) -> None:
        self.core = core
        registry.register(ReadAtScrape(self.collect))

    def collect(self) -> Iterator[Metric]:
        s = self.core.node.stats(digests=False)
        yield counter(
            "mint_cache_hits_total",
            "EnsureAdapter calls served from the node cache, and hits the executor read "
            "straight from the file (RecordHits).",
            s.hits,
        )
        yield counter(
            "mint_cache_misses_total", "EnsureAdapter calls that fetched from the store.", s.misses
        )
        yield counter("mint_cache_evictions_total", "Entries evicted to make room.", s.evictions)
        yield counter(
            "mint_cache_store_fetches_total",
            "Fetches sent to the store (misses, prefetches, pins).",
            self.core.store_fetches,
        )
        yield gauge("mint_cache_entries", "Adapters in the node cache.", s.entries)
        yield gauge("mint_cache_bytes_used", "Packed bytes held.", s.bytes)
        yield gauge("mint_cache_capacity_bytes", "The byte budget.", s.capacity_bytes)
        yield gauge(
            "mint_cache_pinned_entries", "Pinned adapters (never evicted).", s.pinned_entries
        )
        yield gauge("mint_cache_pinned_bytes", "Bytes of the pinned adapters.", s.pinned_bytes)
