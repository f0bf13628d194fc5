"""python -m mintmesh.services.gateway --router ADDR [--host H] [--port P]"""

from __future__ import annotations

import argparse
import logging
import os

from mintmesh.services.common.config import load_config, private_files
from mintmesh.services.gateway.config import GatewayConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mint serve gateway",
        description="The MinT mesh HTTP gateway: OpenAI's /v1 API over the router.",
    )
    p.add_argument("--router", dest="router_address", help="router address host:port")
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port; 0 picks a free one (default 8000)")
    p.add_argument("--metrics-port", type=int, help="Prometheus port; 0 = a free one")
    p.add_argument("--request-timeout-s", type=float, help="deadline of one request (600)")
    p.add_argument("--default-max-tokens", type=int, help="a chat's max_tokens when unset (512)")
    p.add_argument("--otlp-endpoint", help="OTLP/gRPC endpoint (default env MINT_OTLP_ENDPOINT)")
    p.add_argument("--tls-cert", help="serve HTTPS with this certificate (MINT_GATEWAY_TLS_CERT)")
    p.add_argument("--tls-key", help="its private key (MINT_GATEWAY_TLS_KEY)")
    p.add_argument("--log-level", default="INFO")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = vars(p.parse_args(argv))
    private_files()
    level = args.pop("log_level")
    if not args.get("otlp_endpoint"):
        args["otlp_endpoint"] = os.environ.get("MINT_OTLP_ENDPOINT") or None
    try:
        cfg = load_config(GatewayConfig, "GATEWAY", args)
    except ValueError as e:
        p.error(str(e))
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s gateway %(levelname)s %(name)s: %(message)s"
    )
    from mintmesh.services.gateway.server import serve

    serve(cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
