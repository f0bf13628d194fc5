"""The router's Prometheus metrics: placements and retries counted in RouterCore.generate, and
each executor's health as the checker last saw it, read at scrape time."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.metrics_core import Metric

from mintmesh.services.common.metrics import ReadAtScrape, gauge
from mintmesh.services.router.health import ExecutorSet


class RouterMetrics:
    """Counters of RouterCore (registered in its server's registry by register())."""

    def __init__(self, executors: Iterable[str] = ()) -> None:
        self.placements = Counter(
            "mint_router_placements",
            "Generate calls sent to each executor (a retried request counts on each it tried).",
            ["executor"],
            registry=None,
        )
        self.retries = Counter(
            "mint_router_retries",
            "Generate calls sent to an executor after the one before refused the request "
            "(failover on UNAVAILABLE or RESOURCE_EXHAUSTED before the first chunk).",
            ["executor"],
            registry=None,
        )
        for address in executors:  # every executor's series exists from the start, at 0
            self.placements.labels(address)
            self.retries.labels(address)

    def placed(self, address: str, *, retry: bool) -> None:
        self.placements.labels(address).inc()
        if retry:
            self.retries.labels(address).inc()

    def register(self, registry: CollectorRegistry, executors: ExecutorSet) -> None:
        registry.register(self.placements)
        registry.register(self.retries)

        def health() -> Iterator[Metric]:
            states = list(executors.executors.values())
            yield gauge(
                "mint_router_executor_healthy",
                "1 while the executor passes its health checks, else 0.",
                {st.address: float(st.healthy) for st in states},
                "executor",
            )
            yield gauge(
                "mint_router_executor_queue_depth",
                "The executor's queue depth in its last Status.",
                {st.address: st.status.queue_depth for st in states},
                "executor",
            )

        registry.register(ReadAtScrape(health))
