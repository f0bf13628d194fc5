"""Prometheus metrics, one way for every service: a registry per server (so several servers in
one process, as in the tests, never share counters), a server interceptor counting each RPC and
its latency by method and status code, the exposition over HTTP on --metrics-port, and the
collectors a service uses to export what its core already counts, read at scrape time.

    mint_rpc_requests_total{service,method,code}   finished RPCs (a server stream: when it ends)
    mint_rpc_latency_seconds{service,method}        until the status (a stream: its last message)
    mint_http_requests_total{route,method,status}   http_metrics(): for an HTTP front end
    mint_http_latency_seconds{route,method}
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import grpc
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest, start_http_server
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from mintmesh.services.common.errors import wrap_handler

logger = logging.getLogger(__name__)

# RPCs run from a millisecond (Resolve) to minutes (a long Generate stream).
RPC_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
)  # fmt: skip
CONTENT_TYPE = CONTENT_TYPE_LATEST


def new_registry() -> CollectorRegistry:
    """A registry of one server's metrics (not prometheus_client's process-wide REGISTRY)."""
    return CollectorRegistry(support_collectors_without_names=True)


def render(registry: CollectorRegistry) -> bytes:
    """The registry in Prometheus text format (serve it with CONTENT_TYPE)."""
    return generate_latest(registry)


# -- RPCs ---------------------------------------------------------------------------------------


def _code_name(context: grpc.ServicerContext, default: grpc.StatusCode) -> str:
    code = context.code()
    return (code if isinstance(code, grpc.StatusCode) else default).name


class RpcMetricsInterceptor(grpc.ServerInterceptor):
    """Counts every RPC once, when its status is decided: a unary handler when it returns or
    raises, a server stream when its generator ends (exhausted, failed or closed because the
    client went away: CANCELLED). The code is the one the handler set or aborted with, OK for a
    plain return, UNKNOWN for an exception nothing mapped (as gRPC reports it)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "mint_rpc_requests",
            "RPCs finished, by method and status code.",
            ["service", "method", "code"],
            registry=registry,
        )
        self.latency = Histogram(
            "mint_rpc_latency_seconds",
            "Seconds from the start of an RPC to its status (a server stream: to its end).",
            ["service", "method"],
            buckets=RPC_BUCKETS,
            registry=registry,
        )

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        service, _, method = handler_call_details.method.lstrip("/").rpartition("/")
        latency = self.latency.labels(service, method)
        requests = self.requests

        def record(t0: float, code: str) -> None:
            latency.observe(time.perf_counter() - t0)
            requests.labels(service, method, code).inc()

        def wrap_unary(fn):
            def inner(request, context):
                t0 = time.perf_counter()
                try:
                    resp = fn(request, context)
                except BaseException:
                    record(t0, _code_name(context, grpc.StatusCode.UNKNOWN))
                    raise
                record(t0, _code_name(context, grpc.StatusCode.OK))
                return resp

            return inner

        def wrap_stream(fn):
            def inner(request, context):
                t0 = time.perf_counter()
                try:
                    yield from fn(request, context)
                except GeneratorExit:
                    record(t0, grpc.StatusCode.CANCELLED.name)
                    raise
                except BaseException:
                    record(t0, _code_name(context, grpc.StatusCode.UNKNOWN))
                    raise
                record(t0, _code_name(context, grpc.StatusCode.OK))

            return inner

        return wrap_handler(handler, wrap_unary, wrap_stream)


# -- HTTP ---------------------------------------------------------------------------------------


_http: weakref.WeakKeyDictionary[CollectorRegistry, tuple[Counter, Histogram]] = (
    weakref.WeakKeyDictionary()
)
_http_lock = threading.Lock()


def http_metrics(registry: CollectorRegistry) -> tuple[Counter, Histogram]:
    """(requests, latency) of an HTTP server on registry, the same pair on every call:
    requests.labels(route, method, status).inc(); latency.labels(route, method).observe(s).
    route is the route's template (/v1/completions), never the raw path."""
    with _http_lock:
        pair = _http.get(registry)
        if pair is None:
            pair = (
                Counter(
                    "mint_http_requests",
                    "HTTP requests finished, by route, method and status.",
                    ["route", "method", "status"],
                    registry=registry,
                ),
                Histogram(
                    "mint_http_latency_seconds",
                    "Seconds from an HTTP request to the end of its response.",
                    ["route", "method"],
                    buckets=RPC_BUCKETS,
                    registry=registry,
                ),
            )
            _http[registry] = pair
        return pair


@dataclass
class MetricsServer:
    """The HTTP exposition (GET /metrics) of one registry, on a thread of its own."""

    port: int
    _httpd: object
    _thread: threading.Thread

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


def start_metrics_server(registry: CollectorRegistry, port: int, host: str) -> MetricsServer:
    """Serve registry on http://host:port/metrics (port 0 picks a free one: see .port)."""
    if not 0 <= port <= 65535:
        raise ValueError(f"metrics port {port} is not 0..65535")
    httpd, thread = start_http_server(port, addr=host, registry=registry)
    bound = int(httpd.server_port)
    logger.info("metrics on http://%s:%d/metrics", host, bound)
    return MetricsServer(port=bound, _httpd=httpd, _thread=thread)


# -- what a service exports from its own counters ------------------------------------------------


class ReadAtScrape:
    """A collector whose metrics fn() builds at each scrape from state the service keeps anyway
    (plain counters read without a lock: a scrape may see one step's worth of skew)."""

    def __init__(self, fn: Callable[[], Iterable[Metric]]) -> None:
        self._fn = fn

    def collect(self) -> Iterable[Metric]:
        try:
            yield from self._fn()
        except Exception:
            logger.exception("collecting metrics failed")


def counter(
    name: str, doc: str, value: float | dict[str, float], label: str | None = None
) -> CounterMetricFamily:
    """A counter family: one value, or {label value: value} under one label."""
    if label is None:
        return CounterMetricFamily(name, doc, value=value)
    fam = CounterMetricFamily(name, doc, labels=[label])
    for k, v in value.items():
        fam.add_metric([k], v)
    return fam


def gauge(
    name: str, doc: str, value: float | dict[str, float], label: str | None = None
) -> GaugeMetricFamily:
    """A gauge family: one value, or {label value: value} under one label."""
    if label is None:
        return GaugeMetricFamily(name, doc, value=value)
    fam = GaugeMetricFamily(name, doc, labels=[label])
    for k, v in value.items():
        fam.add_metric([k], v)
    return fam


class OneWriterHistogram:
    """A histogram observed by one thread only (the executor's step loop), without a lock: the
    writer bumps a bucket and the sum, a scrape reads them (a racing scrape may see a count
    without its sum for one observation). Exported through collect() like a family. With
    `label`, one histogram per value of it (`values`, fixed up front: observe(x, value))."""

    def __init__(
        self,
        name: str,
        doc: str,
        buckets: Sequence[float],
        label: str | None = None,
        values: Sequence[str] = (),
    ) -> None:
        if (label is None) != (not values):
            raise ValueError(f"histogram {name}: a label needs its values, and values a label")
        self.name, self.doc, self.label = name, doc, label
        self.bounds = tuple(sorted(float(b) for b in buckets))
        keys = tuple(values) if label is not None else ("",)
        # Per label value: the counts (the last one: above every bound) and the sum.
        self._counts = {k: [0] * (len(self.bounds) + 1) for k in keys}
        self._sums = dict.fromkeys(keys, 0.0)

    def observe(self, value: float, label_value: str = "") -> None:
        self._counts[label_value][bisect.bisect_left(self.bounds, value)] += 1
        self._sums[label_value] += value

    def family(self) -> HistogramMetricFamily:
        if self.label is None:
            return HistogramMetricFamily(
                self.name, self.doc, buckets=self._buckets(""), sum_value=self._sums[""]
            )
        fam = HistogramMetricFamily(self.name, self.doc, labels=[self.label])
        for k in self._counts:
            fam.add_metric([k], self._buckets(k), self._sums[k])
        return fam

    def _buckets(self, key: str) -> list[tuple[str, int]]:
        cum, buckets = 0, []
        for bound, n in zip((*self.bounds, float("inf")), list(self._counts[key]), strict=True):
            cum += n
            buckets.append((floatToGoString(bound), cum))
        return buckets
