"""Assemble and run the executor's gRPC server."""

from __future__ import annotations

import logging

import torch

from mintmesh.kernels.settings import SETTINGS, KernelSettings
from mintmesh.kernels.settings import configure as configure_kernels
from mintmesh.model import BaseModelInfo, base_model_info
from mintmesh.services.common.server import (
    Server,
    announce_ready,
    build_server,
    serve_until_signal,
)
from mintmesh.services.common.tracing import setup_tracing
from mintmesh.services.executor.config import ExecutorConfig
from mintmesh.services.executor.engine import Engine
from mintmesh.services.executor.grpc_source import sidecar_source
from mintmesh.services.executor.metrics import ExecutorMetrics
from mintmesh.services.executor.servicer import add_to_server
from mintmesh.services.executor.sources import AdapterSource

logger = logging.getLogger(__name__)


def create_server(
    config: ExecutorConfig,
    *,
    engine: Engine | None = None,
    source: AdapterSource | None = None,
    close_engine: bool = True,
) -> tuple[Server, Engine]:
    """Start an executor server on config.host:config.port (0 = a free port). Uses engine when
    given (else loads config.model_dir, with source or a SidecarSource on config.cache_address).
    Stopping the server drains it, then closes the engine unless close_engine is False. The
    engine's metrics go to the server's registry (on config.metrics_port when it is set)."""
    if engine is None:
        if source is None:
            source = sidecar_source(config)  # None without config.cache_address
        engine = Engine.from_config(config, source=source)
    # Every waiting and running stream holds a server thread: size the pool so that the
    # engine's queue bound (RESOURCE_EXHAUSTED), not gRPC's thread pool, is the backpressure.
    workers = config.max_queue + config.max_batch_size + 16
    server = build_server(
        add_servicers=lambda s: add_to_server(engine, s),
        host=config.host,
        port=config.port,
        max_workers=workers,
        metrics_port=config.metrics_port,
        mesh_only=True,  # mesh peers only (by certificate, with a mesh identity)
    )
    ExecutorMetrics(engine, server.registry)
    if close_engine:
        server.on_stop.append(engine.close)
    return server, engine


# The auto torch_threads rule: below this many multiply-adds in the decode step's largest GEMM,
# one thread. torch's thread team splits each op statically and waits for all of its threads,
# so on a machine shared with other processes (the router, the store, clients) one descheduled
# team thread stalls the whole op. Measured on the 2-core CI machine, tiny backbone, 32 decode
# rows: 4.0 ms per step at 2 threads and 4.4 ms at 1 when quiet, 21-43 ms (p90 110-158 ms) at
# 2 and 5 ms at 1 under load. Larger GEMMs gain from both cores (32 x 1024 x 2816: 1.3x).
PARALLEL_MIN_MACS = 1 << 24


def torch_threads(config: ExecutorConfig, info: BaseModelInfo) -> int:
    """torch's intra-op thread count for this executor (config.torch_threads; 0 = the rule
    above, decided once per process: changing it per step costs ~2 ms)."""
    if config.torch_threads:
        return config.torch_threads
    largest = max((o * i for o, i in info.linear_shapes.values()), default=0)
    if config.max_batch_size * largest < PARALLEL_MIN_MACS:
        return 1
    return torch.get_num_threads()


def lora_threads(config: ExecutorConfig, torch_threads: int) -> int:
    """The native LoRA kernels' thread count (config.lora_threads; 0 = auto): the kernels'
    default (KernelSettings.lora_threads), but one where torch runs on one thread. Where the
    backbone's GEMMs are too small for a thread team (the torch_threads rule), the LoRA ops,
    rank/hidden of them, are smaller still, and a team of two kept for them alone spins between
    the step's ~14 calls per layer: on the 2-core machine, tiny backbone, its second thread
    burned ~0.35 of a core under a 200-stream flood, and one thread cut tenant B's idle TTFT
    from 17.6-18.6 to 13.4-13.9 ms and the flooded engine step from 46 to 40-43 ms."""
    return _kernel_threads(config.lora_threads, KernelSettings.lora_threads, torch_threads)


def attn_threads(config: ExecutorConfig, torch_threads: int) -> int:
    """The native decode attention's thread count (config.attn_threads; 0 = auto): the kernel's
    default (KernelSettings.attn_threads), but one where torch runs on one thread, as for the
    LoRA kernels (a team of two kept for one call per layer would spin between them)."""
    return _kernel_threads(config.attn_threads, KernelSettings.attn_threads, torch_threads)


def _kernel_threads(configured: int, default: int, torch_threads: int) -> int:
    """A native kernel's thread count: the configured one, or (0, auto) its default, but one
    where torch runs on one thread."""
    if configured:
        return configured
    return 1 if torch_threads <= 1 else default


def serve(config: ExecutorConfig) -> None:
    """Run an executor until SIGTERM/SIGINT: stop accepting, finish running requests, stop."""
    setup_tracing("mint-executor", config.otlp_endpoint)
    threads = torch_threads(config, base_model_info(config.model_dir))
    configure_kernels(
        native=config.native_kernels,
        lora_threads=lora_threads(config, threads),
        attn_threads=attn_threads(config, threads),
    )
    torch.set_num_threads(threads)
    logger.info(
        "executor: torch on %d thread(s), the LoRA kernels on %d, decode attention on %d",
        torch.get_num_threads(),
        SETTINGS.lora_threads,
        SETTINGS.attn_threads,
    )
    server, engine = create_server(config)
    addr = f"{config.host}:{server.port}"
    # After the RPCs' 30 s, the engine's close drains for up to 30 s more and joins its
    # threads (step loop, loaders, training, source): about 55 s before the exit watchdog.
    serve_until_signal(
        server,
        grace=30.0,
        exit_slack=60.0,
        ready=lambda: announce_ready("executor", addr, metrics_port=server.metrics_port),
    )
