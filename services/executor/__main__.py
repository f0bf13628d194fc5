"""`python -m mintmesh.services.executor --model-dir DIR [--cache-dir DIR --cache HOST:PORT]`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from mintmesh.services.common import tls
from mintmesh.services.common.config import load_config, private_files
from mintmesh.services.executor.config import ExecutorConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mintmesh.services.executor",
        description="Serve mixed-adapter batches on one resident backbone (mintmesh.v1.Executor); "
        "flags override MINT_EXECUTOR_* variables.",
    )
    p.add_argument("--model-dir", type=Path, help="local backbone directory (mint model init)")
    p.add_argument("--cache-dir", type=Path, help="the cache sidecar's node cache directory")
    p.add_argument("--cache", dest="cache_address", help="the cache sidecar's host:port")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--executor-id")
    p.add_argument("--device", help="torch device, e.g. cpu or cuda:0")
    p.add_argument("--dtype", help="float32, float16 or bfloat16")
    p.add_argument("--max-batch-size", type=int, help="sequences running at once")
    p.add_argument("--max-step-tokens", type=int, help="tokens through the model per step")
    p.add_argument("--max-adapters", type=int, help="adapter slots of the device pool")
    p.add_argument("--max-step-adapters", type=int, help="distinct adapters running at once")
    p.add_argument("--adapter-pool-bytes", type=int, help="device pool bytes (0 = default)")
    p.add_argument("--host-cache-bytes", type=int, help="host tier bytes")
    p.add_argument("--loader-threads", type=int)
    p.add_argument("--max-queue", type=int, help="waiting requests before RESOURCE_EXHAUSTED")
    p.add_argument("--max-queue-per-tenant", type=int, help="0 = max-queue")
    p.add_argument(
        "--no-fair-share-preemption",
        dest="fair_share_preemption",
        action="store_false",
        default=None,
        help="never preempt a tenant over its share of the batch for one under it",
    )
    p.add_argument(
        "--stream-buffer-outputs",
        type=int,
        help="unread outputs before a stream is paused (default 64; 0 = never)",
    )
    p.add_argument(
        "--stream-stall-timeout-s",
        type=float,
        help="a paused stream fails RESOURCE_EXHAUSTED after this long unread (default 60)",
    )
    p.add_argument("--kv-cache-bytes", type=int, help="paged KV cache bytes (0 = default)")
    p.add_argument("--kv-block-size", type=int, help="tokens per KV block")
    p.add_argument(
        "--prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="reuse cached KV blocks of a prompt's prefix (same adapter digest; default on)",
    )
    p.add_argument("--max-prompt-tokens", type=int, help="0 = the model's max positions - 1")
    p.add_argument(
        "--dense-kernels",
        choices=("auto", "onednn", "torch"),
        help="the backbone's Linears: auto (oneDNN packed on CPU fp32), onednn, torch",
    )
    p.add_argument("--max-rank", type=int, help="largest LoRA rank served (default 256)")
    p.add_argument(
        "--training-max-bytes",
        type=int,
        help="training runs' weights, gradients and AdamW state (default 256 MiB)",
    )
    p.add_argument(
        "--training-micro-tokens",
        type=int,
        help="while serving: tokens per training micro-batch (default 64)",
    )
    p.add_argument(
        "--training-slice-ms",
        type=float,
        help="while serving: the longest a training forward/backward holds the model before a "
        "serving step runs, at the next layer boundary (default 10)",
    )
    p.add_argument("--otlp-endpoint", help="OTLP/gRPC endpoint (default env MINT_OTLP_ENDPOINT)")
    p.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus metrics on http://HOST:PORT/metrics; 0 picks a free port "
        "(MINT_EXECUTOR_METRICS_PORT; default: none)",
    )
    p.add_argument("--log-level", default="INFO")
    tls.add_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    private_files()
    try:
        tls.setup_from(vars(args))
    except ValueError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    overrides = {k: v for k, v in vars(args).items() if k != "log_level"}
    if not overrides.get("otlp_endpoint"):
        overrides["otlp_endpoint"] = os.environ.get("MINT_OTLP_ENDPOINT") or None
    try:
        config = load_config(ExecutorConfig, "EXECUTOR", overrides)
    except TypeError as e:
        if "model_dir" in str(e):
            sys.stderr.write("error: --model-dir (or MINT_EXECUTOR_MODEL_DIR) is required\n")
            return 2
        raise
    except ValueError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    from mintmesh.services.executor.server import serve

    serve(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
