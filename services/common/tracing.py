"""OpenTelemetry for every service: one TracerProvider per process with its own service.name,
trace context carried in gRPC metadata by the grpc instrumentation's interceptors.

OTLP export (gRPC) happens only when an endpoint is configured (MINT_OTLP_ENDPOINT, read by the
CLI); otherwise spans are created, propagated and dropped.
"""

from __future__ import annotations

import collections
import logging

import grpc
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

logger = logging.getLogger(__name__)

_provider: TracerProvider | None = None


def setup_tracing(
    service_name: str,
    otlp_endpoint: str = "",
    *,
    exporter: SpanExporter | None = None,
) -> TracerProvider:
    """Install the process's TracerProvider (once; later calls return the first one)."""
    global _provider
    if _provider is not None:
        return _provider
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if exporter is None and otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=otlp_endpoint, insecure=True)
        logger.info("exporting traces of %s to %s", service_name, otlp_endpoint)
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=500))
    trace.set_tracer_provider(provider)
    _provider = provider
    return provider


def tracer_provider() -> TracerProvider | None:
    return _provider


def shutdown_tracing() -> None:
    if _provider is not None:
        try:
            _provider.force_flush(timeout_millis=5000)
            _provider.shutdown()
        except Exception:  # exporting is best effort at exit
            logger.warning("flushing traces at shutdown failed", exc_info=True)


def server_interceptors() -> list[grpc.ServerInterceptor]:
    from opentelemetry.instrumentation.grpc import server_interceptor

    return [server_interceptor(tracer_provider=_provider or trace.get_tracer_provider())]


def traced_channel(channel: grpc.Channel) -> grpc.Channel:
    """Wrap a client channel so every call carries the current trace context (and makes a
    client span). Calls stay grpc Calls (cancel(), code(), ...): the instrumentation's own
    client_interceptor is a grpcext interceptor, which grpc.intercept_channel refuses and whose
    server-streaming calls are plain generators."""
    return grpc.intercept_channel(channel, _TraceContextInterceptor())


class _CallDetails(
    collections.namedtuple(
        "_CallDetails",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    pass


class _TraceContextInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    def _call(self, continuation, details, request):
        tracer = (_provider or trace.get_tracer_provider()).get_tracer(__name__)
        span = tracer.start_span(
            str(details.method).lstrip("/"),
            kind=trace.SpanKind.CLIENT,
            attributes={"rpc.system": "grpc"},
        )
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span))
        metadata = [*(details.metadata or ()), *carrier.items()]
        try:
            call = continuation(
                _CallDetails(
                    details.method,
                    details.timeout,
                    metadata,
                    details.credentials,
                    getattr(details, "wait_for_ready", None),
                    getattr(details, "compression", None),
                ),
                request,
            )
        except BaseException:
            span.end()
            raise

        def done(c) -> None:
            code = c.code()
            if code is not None and code != grpc.StatusCode.OK:
                span.set_status(trace.Status(trace.StatusCode.ERROR, code.name))
            span.end()

        call.add_done_callback(done)
        return call

    intercept_unary_unary = _call
    intercept_unary_stream = _call
    intercept_stream_unary = _call
    intercept_stream_stream = _call
