"""The store's Prometheus metrics: its push/fetch counters and the catalog's size, read at
scrape time."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

from mintmesh.services.common.metrics import ReadAtScrape, counter, gauge
from mintmesh.services.store.core import StoreCore


class StoreMetrics:
    def __init__(self, core: StoreCore, registry: CollectorRegistry) -> None:
        self.core = core
        registry.register(ReadAtScrape(self.collect))

    def collect(self) -> Iterator[Metric]:
        st = self.core.stats()
        yield counter(
            "mint_store_pushes_total",
            "Revisions committed by a push (PushAdapter or PushAdapters).",
            st.pushes,
        )
        yield counter(
            "mint_store_push_failures_total", "Pushes refused or failed.", st.push_failures
        )
        yield counter("mint_store_fetches_total", "Adapters fetched (FetchAdapter).", st.fetches)
        yield counter("mint_store_merges_total", "Revisions made by MergeAdapters.", st.merges)
        adapters, revisions = self.core.catalog.counts()
        yield gauge("mint_store_adapters", "Adapters (tenant/name) in the catalog.", adapters)
        yield gauge("mint_store_revisions", "Revisions in the catalog.", revisions)
        yield gauge(
            "mint_store_catalog_bytes",
            "Bytes of the catalog's LMDB file in use.",
            self.core.catalog.used_bytes(),
        )
