"""The cache sidecar process: create_server (tests use port 0) and serve (the CLI entry)."""

from __future__ import annotations

from mintmesh.cache import servicer
from mintmesh.cache.config import CacheConfig
from mintmesh.cache.core import CacheCore
from mintmesh.cache.metrics import CacheMetrics
from mintmesh.cache.node import NodeCache
from mintmesh.services.common.server import Server, announce_ready, build_server, serve_until_signal
from mintmesh.services.common.tracing import setup_tracing


def create_core(config: CacheConfig) -> CacheCore:
    node = NodeCache(
        config.cache_dir,
        capacity_bytes=config.capacity_bytes,
        map_size=config.map_size,
        policy=config.policy,
    )
    try:
        return CacheCore(
            node,
            config.store_address,
            fetch_timeout_s=config.fetch_timeout_s,
            prefetch_concurrency=config.prefetch_concurrency,
            internal_token=config.internal_token,
        )
    except BaseException:
        node.close()
        raise


def create_server(config: CacheConfig, *, core: CacheCore | None = None) -> Server:
    """Open (or take) the node cache and serve it on config.host:config.port (0 = a free
    port), its metrics on config.metrics_port when set. The returned server closes the cache
    and its store channel when it stops."""
    core = core or create_core(config)

    def close() -> None:
        core.close()
        core.node.close()

    try:
        srv = build_server(
            add_servicers=lambda s: servicer.add_to_server(core, s),
            host=config.host,
            port=config.port,
            metrics_port=config.metrics_port,
            mesh_only=True,  # mesh peers only (by certificate, with a mesh identity)
        )
    except BaseException:
        close()
        raise
    CacheMetrics(core, srv.registry)
    srv.on_stop.append(close)
    return srv


def serve(config: CacheConfig) -> None:
    setup_tracing("mint-cache", config.otlp_endpoint)
    srv = create_server(config)
    addr = f"{config.host}:{srv.port}"
    serve_until_signal(
        srv, ready=lambda: announce_ready("cache", addr, metrics_port=srv.metrics_port)
    )
