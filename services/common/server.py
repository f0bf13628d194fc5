"""One place that assembles a gRPC server: servicers, health, reflection, interceptors
(tracing, metrics, errors), the port, the Prometheus endpoint, and graceful shutdown (drain,
then stop)."""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from mintmesh.services.common import metrics, tls, tracing
from mintmesh.services.common.errors import ErrorInterceptor

logger = logging.getLogger(__name__)

# Keep gRPC's default 4 MiB message limit; large payloads are streamed.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
CHUNK_BYTES = 64 * 1024


@dataclass
class Server:
    """A started gRPC server with its health servicer, its metrics registry (and their HTTP
    endpoint when asked for: metrics_port, None without one) and shutdown hooks."""

    grpc_server: grpc.Server
    port: int
    health: health.HealthServicer
    service_names: list[str]
    registry: CollectorRegistry = field(default_factory=metrics.new_registry)
    metrics_server: metrics.MetricsServer | None = None
    on_stop: list[Callable[[], None]] = field(default_factory=list)
    _stopped: threading.Event = field(default_factory=threading.Event)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_port(self) -> int | None:
        return self.metrics_server.port if self.metrics_server is not None else None

    @property
    def metrics_url(self) -> str | None:
        port = self.metrics_port
        return None if port is None else f"http://127.0.0.1:{port}/metrics"

    def set_serving(self, serving: bool) -> None:
        st = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        self.health.set("", st)
        for name in self.service_names:
            self.health.set(name, st)

    def stop(self, grace: float = 5.0) -> None:
        """Drain: report NOT_SERVING, refuse new RPCs, let running ones finish within grace."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.set_serving(False)
        self.grpc_server.stop(grace).wait()
        for fn in self.on_stop:
            try:
                fn()
            except Exception:
                logger.exception("shutdown hook failed")
        if self.metrics_server is not None:
            self.metrics_server.close()

    def wait(self) -> None:
        self.grpc_server.wait_for_termination()


def build_server(
    *,
    add_servicers: Callable[[grpc.Server], Iterable[str]],
    host: str = "127.0.0.1",
    port: int = 0,
    max_workers: int = 32,
    extra_interceptors: Iterable[grpc.ServerInterceptor] = (),
    metrics_port: int | None = None,
    mesh_only: bool = False,
    client_tls: tls.ServerTLS | None = None,
) -> Server:
    """Create, bind and start a server. `add_servicers(server)` registers the servicers and
    returns their full service names (for health and reflection). port=0 picks a free port.
    Every RPC is counted in the server's own registry (Server.registry, where the service adds
    its collectors); metrics_port serves it over HTTP on host (0 = a free port, None = none)."""
    registry = metrics.new_registry()
    interceptors = [
        *tracing.server_interceptors(),
        metrics.RpcMetricsInterceptor(registry),  # outside auth: refusals are counted too
        *extra_interceptors,
        ErrorInterceptor(),
    ]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ],
    )
    names = list(add_servicers(server))
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    # mesh_only (the store, sidecars, executors): mesh peers only, by certificate, once the
    # process has a mesh identity (services/common/tls.py); else the client port's TLS if any.
    creds = tls.server_credentials(mesh_only=mesh_only, client_tls=client_tls)
    if creds is not None:
        bound = server.add_secure_port(f"{host}:{port}", creds)
    else:
        bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"could not bind {host}:{port}")
    exposition = None
    if metrics_port is not None:
        try:
            exposition = metrics.start_metrics_server(registry, metrics_port, host)
        except BaseException:
            server.stop(None)
            raise
    server.start()
    srv = Server(
        grpc_server=server,
        port=bound,
        health=health_servicer,
        service_names=names,
        registry=registry,
        metrics_server=exposition,
    )
    srv.set_serving(True)
    logger.info("serving %s on %s:%d", ", ".join(names), host, bound)
    return srv


# After its signal a service has `grace` seconds to drain its RPCs, then exit_slack seconds for
# its shutdown hooks, the trace flush and the interpreter's exit (which joins every non-daemon
# thread). Past that it writes every thread's stack to stderr and exits with EXIT_STUCK: a hook
# or handler that never returns must not keep a stopped service (and its port) alive. Should
# that Python timer not run (a thread holding the GIL in native code, or a hang late in the
# interpreter's finalization), faulthandler's own C thread exits EXIT_BACKSTOP_S later with
# status 1.
EXIT_SLACK_S = 15.0
EXIT_STUCK = 3
EXIT_BACKSTOP_S = 5.0


def serve_until_signal(
    server: Server,
    grace: float = 5.0,
    exit_slack: float = EXIT_SLACK_S,
    ready: Callable[[], None] | None = None,
) -> None:
    """Block until SIGTERM or SIGINT, then drain and stop; the process exits at most
    grace + exit_slack seconds after the signal (exit_watchdog). ready (announce_ready) runs
    once the handlers are in place: a parent that signals as soon as it reads READY gets a
    drain, not the default action's instant death."""
    done = threading.Event()

    def _handler(signum, _frame):
        logger.info("received %s: draining", signal.Signals(signum).name)
        done.set()

    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)
    if ready is not None:
        ready()
    while not done.wait(0.5):
        pass
    exit_watchdog(grace + exit_slack)
    server.stop(grace)
    tracing.shutdown_tracing()


def exit_watchdog(after_s: float) -> threading.Timer:
    """End the process after_s seconds from now, should it still be running: a line saying so
    and the stacks of all threads (what was stuck) on stderr, then os._exit(EXIT_STUCK), from a
    daemon timer (daemon threads keep running while the interpreter joins the others at exit,
    so a thread that never ends is covered). It writes with os.write and faulthandler, taking
    no lock a stuck thread could hold. Backstop: faulthandler.dump_traceback_later, on a thread
    of its own that needs no GIL, dumps and exits (status 1) EXIT_BACKSTOP_S later."""
    fd = sys.__stderr__.fileno()

    def fire() -> None:
        try:
            msg = (
                f"still shutting down {after_s:.1f} s after the signal: every thread's stack "
                f"follows; exiting with status {EXIT_STUCK}\n"
            )
            os.write(fd, msg.encode())
            faulthandler.dump_traceback(file=fd, all_threads=True)
        finally:
            os._exit(EXIT_STUCK)

    faulthandler.dump_traceback_later(after_s + EXIT_BACKSTOP_S, exit=True, file=fd)
    timer = threading.Timer(after_s, fire)
    timer.name = "mint-exit-watchdog"
    timer.daemon = True
    timer.start()
    return timer


class _WaitForReady(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Every call waits for the channel to connect (within its deadline) instead of failing at
    once while the peer is down: a store or sidecar being restarted is waited for."""

    @staticmethod
    def _details(d):
        return d if d.wait_for_ready is not None else d._replace(wait_for_ready=True)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


# The store's reads: safe to send again when the store died under them (its restart is waited
# for); writes are not retried by the channel (a push whose answer was lost is the client's call).
STORE_READS = (
    "mintmesh.v1.AdapterStore/ResolveAdapter",
    "mintmesh.v1.AdapterStore/FetchAdapter",
    "mintmesh.v1.AdapterStore/ListAdapters",
    "mintmesh.v1.AdapterStore/ListRevisions",
    "mintmesh.v1.AdapterStore/GetBaseModel",
    "mintmesh.v1.AdapterStore/ListTenants",
    "mintmesh.v1.AdapterStore/Authenticate",
)


def _retry_config(methods: Iterable[str]) -> str:
    import json

    names = [dict(zip(("service", "method"), m.split("/"), strict=True)) for m in methods]
    policy = {
        "maxAttempts": 5,
        "initialBackoff": "0.1s",
        "maxBackoff": "1s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    return json.dumps({"methodConfig": [{"name": names, "retryPolicy": policy}]})


def mesh_channel(
    address: str,
    *,
    traced: bool = True,
    wait_for_ready: bool = False,
    idempotent: Iterable[str] = (),
) -> grpc.Channel:
    """A channel to a mesh peer. wait_for_ready: for a peer that has no stand-in (the store, a
    node's sidecar), calls wait out its restart within their deadlines; not for executors, where
    failing fast lets the router place the request elsewhere. idempotent ("service/method"):
    calls that gRPC sends again (up to 5 tries) when the peer drops them UNAVAILABLE before an
    answer, e.g. a store killed in the middle of a read."""
    retry = [("grpc.service_config", _retry_config(idempotent))] if idempotent else []
    creds, tls_options = tls.channel_credentials()
    options = [
        *retry,
        *tls_options,
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.enable_retries", 1),
        # Reconnect quickly to a restarted peer (gRPC's default backoff grows to 2 min).
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]
    if creds is not None:
        ch = grpc.secure_channel(address, creds, options=options)
    else:
        ch = grpc.insecure_channel(address, options=options)
    if wait_for_ready:
        ch = grpc.intercept_channel(ch, _WaitForReady())
    return tracing.traced_channel(ch) if traced else ch


def remaining_timeout(context: grpc.ServicerContext | None, default: float) -> float:
    """The time left on the caller's deadline (for downstream calls), capped at default."""
    if context is None:
        return default
    left = context.time_remaining()
    if left is None:
        return default
    return max(0.001, min(left, default))


def announce_ready(service: str, address: str, *, metrics_port: int | None = None) -> None:
    """The line a parent process (mint up, tests) waits for on stdout: "READY <service>
    <host:port>"; with a metrics endpoint, "METRICS <service> <host:metrics_port>" before it
    (so that a parent has both once it reads READY)."""
    import sys

    host = address.rpartition(":")[0]
    lines = f"METRICS {service} {host}:{metrics_port}\n" if metrics_port is not None else ""
    sys.stdout.write(f"{lines}READY {service} {address}\n")
    sys.stdout.flush()
