"""The store process: create_server (tests use port 0) and serve (the CLI entry)."""

from __future__ import annotations

import logging

from mintmesh.services.common.server import Server, announce_ready, build_server, serve_until_signal
from mintmesh.services.common.tracing import setup_tracing
from mintmesh.services.store import servicer
from mintmesh.services.store.auth import AuthInterceptor
from mintmesh.services.store.config import StoreConfig
from mintmesh.services.store.core import StoreCore
from mintmesh.services.store.metrics import StoreMetrics

logger = logging.getLogger(__name__)


def create_server(config: StoreConfig, *, core: StoreCore | None = None) -> Server:
    """Open (or take) the store core, start serving on config.host:config.port (0 = a free
    port), its metrics on config.metrics_port when set. The returned server closes the core
    when it stops. Every AdapterStore call is authenticated by one interceptor (a no-op admin
    principal when config.auth is off)."""
    core = core or StoreCore(config)
    try:
        srv = build_server(
            add_servicers=lambda s: servicer.add_to_server(core, s),
            host=config.host,
            port=config.port,
            extra_interceptors=[AuthInterceptor(core.auth)],
            metrics_port=config.metrics_port,
            mesh_only=True,  # mesh peers only (by certificate, with a mesh identity)
        )
    except BaseException:
        core.close()
        raise
    StoreMetrics(core, srv.registry)
    srv.on_stop.append(core.close)
    return srv


def serve(config: StoreConfig) -> None:
    setup_tracing("mint-store", config.otlp_endpoint)
    srv = create_server(config)
    addr = f"{config.host}:{srv.port}"
    serve_until_signal(
        srv, ready=lambda: announce_ready("store", addr, metrics_port=srv.metrics_port)
    )
