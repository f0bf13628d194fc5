"""python -m mintmesh.services.gateway --router ADDR [--host H] [--port P]"""

from __future__ import annotations

import argparse
import logging
import os

from mintmesh.services.common.config import (
    add_config_flags,
    config_overrides,
    load_config,
    private_files,
)
from mintmesh.services.gateway.config import GatewayConfig, TinkerConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mint serve gateway",
        description="The MinT mesh HTTP gateway: OpenAI's /v1 API over the router "
        "(flags override MINT_GATEWAY_* variables).",
    )
    add_config_flags(p, GatewayConfig, "GATEWAY")
    add_config_flags(
        p.add_argument_group("the Tinker API (/api/v1)"),
        TinkerConfig,
        "GATEWAY_TINKER",
        flag_prefix="tinker-",
    )
    p.add_argument("--log-level", default="INFO")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = vars(p.parse_args(argv))
    private_files()
    level = args.pop("log_level")
    overrides = config_overrides(args, GatewayConfig)
    if not overrides.get("otlp_endpoint"):
        overrides["otlp_endpoint"] = os.environ.get("MINT_OTLP_ENDPOINT") or None
    try:
        cfg = load_config(GatewayConfig, "GATEWAY", overrides)
        tinker = load_config(TinkerConfig, "GATEWAY_TINKER", config_overrides(args, TinkerConfig))
    except ValueError as e:
        p.error(str(e))
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s gateway %(levelname)s %(name)s: %(message)s"
    )
    from mintmesh.services.gateway.server import serve

    serve(cfg, tinker)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
