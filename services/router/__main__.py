"""python -m mintmesh.services.router --store ADDR --executor ADDR [--executor ADDR ...]"""

from __future__ import annotations

import argparse
import logging

from mintmesh.services.common import tls
from mintmesh.services.common.config import load_config, private_files
from mintmesh.services.router.config import RouterConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mint serve router", description="The MinT mesh router.")
    p.add_argument("--store", dest="store_address", help="store address host:port")
    p.add_argument(
        "--executor", dest="executors", action="append", help="executor address (repeat)"
    )
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--health-interval-s", type=float)
    p.add_argument("--otlp-endpoint", help="OTLP/gRPC endpoint (default env MINT_OTLP_ENDPOINT)")
    p.add_argument(
        "--auth",
        action="store_true",
        default=None,
        help="require API keys (checked through the store)",
    )
    p.add_argument(
        "--internal-token",
        help="the mesh's internal token, shared with the store (env MINT_ROUTER_INTERNAL_TOKEN)",
    )
    p.add_argument(
        "--max-workers", type=int, help="RPCs (open streams) served at once (default 1024)"
    )
    p.add_argument(
        "--auth-failures-per-minute",
        type=int,
        help="failed authentications per client address per minute before it is refused "
        "(default 30)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus metrics on http://HOST:PORT/metrics; 0 picks a free port "
        "(MINT_ROUTER_METRICS_PORT; default: none)",
    )
    tls.add_flags(p, client_port=True)
    return p


def main(argv: list[str] | None = None) -> int:
    import os

    from mintmesh.services.router.server import serve

    parser = build_parser()
    overrides = vars(parser.parse_args(argv))
    private_files()
    try:
        client_tls = tls.setup_from(overrides)
    except ValueError as e:
        parser.error(str(e))
    if overrides.get("executors"):
        overrides["executors"] = tuple(overrides["executors"])
    if not overrides.get("otlp_endpoint"):
        overrides["otlp_endpoint"] = os.environ.get("MINT_OTLP_ENDPOINT") or None
    cfg = load_config(RouterConfig, "ROUTER", overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s router %(levelname)s %(message)s")
    serve(cfg, client_tls=client_tls)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
