from __future__ import annotations

import logging

from mintmesh.services.common import tls, tracing
from mintmesh.services.common.server import (
    Server,
    announce_ready,
    build_server,
    serve_until_signal,
)
from mintmesh.services.router.config import RouterConfig
from mintmesh.services.router.core import RouterCore
from mintmesh.services.router.servicer import RouterServicer, StoreProxy
from mintmesh.v1 import router_pb2, router_pb2_grpc, store_pb2

logger = logging.getLogger(__name__)


def create_server(
    config: RouterConfig, *, client_tls: tls.ServerTLS | None = None
) -> tuple[Server, RouterCore]:
    core = RouterCore(config)
    core.start()

    def add(server):
        router_pb2_grpc.add_RouterServicer_to_server(RouterServicer(core), server)
        server.add_generic_rpc_handlers((StoreProxy(core),))
        return [
            router_pb2.DESCRIPTOR.services_by_name["Router"].full_name,
            store_pb2.DESCRIPTOR.services_by_name["AdapterStore"].full_name,
        ]

    try:
        server = build_server(
            add_servicers=add,
            host=config.host,
            port=config.port,
            metrics_port=config.metrics_port,
            client_tls=client_tls,
            max_workers=config.max_workers,
        )
    except BaseException:
        core.stop()
        raise
    core.metrics.register(server.registry, core.executors)
    server.on_stop.append(core.stop)
    return server, core


def serve(config: RouterConfig, *, client_tls: tls.ServerTLS | None = None) -> None:
    tracing.setup_tracing("mint-router", config.otlp_endpoint)
    server, _core = create_server(config, client_tls=client_tls)
    addr = f"{config.host}:{server.port}"
    serve_until_signal(
        server, ready=lambda: announce_ready("router", addr, metrics_port=server.metrics_port)
    )
