"""python -m mintmesh.cache --cache-dir D --store HOST:PORT [--port 0]"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from mintmesh.cache.config import CacheConfig
from mintmesh.cache.policy import DEFAULT_POLICY, POLICIES
from mintmesh.services.common import tls
from mintmesh.services.common.config import load_config, private_files


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mintmesh.cache",
        description="The MinT mesh node cache sidecar (flags override MINT_CACHE_* variables).",
    )
    p.add_argument("--cache-dir", type=Path, help="node cache directory (MINT_CACHE_CACHE_DIR)")
    p.add_argument("--store", help="adapter store host:port (MINT_CACHE_STORE_ADDRESS)")
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port; 0 picks a free one (default 0)")
    p.add_argument("--capacity-bytes", type=int, help="byte budget (default 2 GiB)")
    p.add_argument("--map-size", type=int, help="LMDB map size (default 1 TiB, sparse)")
    p.add_argument("--fetch-timeout-s", type=float, help="store fetch timeout (default 30)")
    p.add_argument(
        "--policy",
        choices=sorted(POLICIES),
        help=f"eviction policy (MINT_CACHE_POLICY; default {DEFAULT_POLICY})",
    )
    p.add_argument(
        "--prefetch-concurrency", type=int, help="background fetches at once (default 4)"
    )
    p.add_argument("--otlp-endpoint", help="OTLP gRPC endpoint for traces (default: none)")
    p.add_argument(
        "--internal-token",
        help="the mesh's internal token for store calls (MINT_CACHE_INTERNAL_TOKEN)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus metrics on http://HOST:PORT/metrics; 0 picks a free port "
        "(MINT_CACHE_METRICS_PORT; default: none)",
    )
    p.add_argument("--log-level", default="INFO")
    tls.add_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    private_files()
    try:
        tls.setup_from(vars(args))
    except ValueError as e:
        p.error(str(e))
    if not args.otlp_endpoint:
        args.otlp_endpoint = os.environ.get("MINT_OTLP_ENDPOINT") or None
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    overrides = {
        "cache_dir": args.cache_dir,
        "store_address": args.store,
        "host": args.host,
        "port": args.port,
        "capacity_bytes": args.capacity_bytes,
        "map_size": args.map_size,
        "fetch_timeout_s": args.fetch_timeout_s,
        "policy": args.policy,
        "prefetch_concurrency": args.prefetch_concurrency,
        "otlp_endpoint": args.otlp_endpoint,
        "internal_token": args.internal_token,
        "metrics_port": args.metrics_port,
    }
    try:
        config = load_config(CacheConfig, "CACHE", overrides)
    except TypeError:
        p.error(
            "--cache-dir and --store (or MINT_CACHE_CACHE_DIR, MINT_CACHE_STORE_ADDRESS) "
            "are required"
        )
    except ValueError as e:
        p.error(str(e))
    from mintmesh.cache.server import serve

    serve(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
