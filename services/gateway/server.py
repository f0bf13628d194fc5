"""Run the gateway: uvicorn on a socket bound first (so port 0 works and the READY line names
the real port), traces like every service, and graceful shutdown on SIGTERM / SIGINT."""

from __future__ import annotations

import asyncio
import logging
import socket

from mintmesh.services.common.server import announce_ready
from mintmesh.services.common.tracing import setup_tracing, shutdown_tracing
from mintmesh.services.gateway.app import create_app
from mintmesh.services.gateway.config import GatewayConfig, TinkerConfig

logger = logging.getLogger(__name__)


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets of that protocol, and with
    # Nagle on each SSE event waits for the client's delayed ACK (~40 ms per stream).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def make_server(config: GatewayConfig, tinker: TinkerConfig | None = None):
    """(uvicorn.Server, bound socket): not started."""
    import uvicorn

    app = create_app(config, tinker=tinker)
    sock = bind(config.host, config.port)
    ucfg = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=10,
        lifespan="on",
        ssl_certfile=config.tls_cert or None,
        ssl_keyfile=config.tls_key or None,
    )
    return uvicorn.Server(ucfg), sock


def serve(config: GatewayConfig, tinker: TinkerConfig | None = None) -> None:
    """tinker: the Tinker API's config (None = from MINT_GATEWAY_TINKER_* and defaults)."""
    setup_tracing("mint-gateway", config.otlp_endpoint)
    server, sock = make_server(config, tinker)
    port = sock.getsockname()[1]
    metrics_server = None
    if config.metrics_port is not None:
        from mintmesh.services.common import metrics

        metrics_server = metrics.start_metrics_server(
            server.config.app.state.registry, config.metrics_port, config.host
        )
    scheme = "https" if config.tls_cert else "http"
    logger.info(
        "gateway on %s://%s:%d -> router %s", scheme, config.host, port, config.router_address
    )

    async def main() -> None:
        started = asyncio.ensure_future(server.serve(sockets=[sock]))
        while not server.started and not started.done():
            await asyncio.sleep(0.01)
        if server.started:
            announce_ready(
                "gateway",
                f"{config.host}:{port}",
                metrics_port=metrics_server.port if metrics_server else None,
            )
        await started

    try:
        asyncio.run(main())
    finally:
        if metrics_server is not None:
            metrics_server.close()
        shutdown_tracing()
