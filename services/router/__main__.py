"""python -m mintmesh.services.router --store ADDR --executor ADDR [--executor ADDR ...]"""

from __future__ import annotations

import argparse
import logging

from mintmesh.services.common import tls
from mintmesh.services.common.config import (
    add_config_flags,
    config_overrides,
    load_config,
    private_files,
)
from mintmesh.services.router.config import RouterConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mint serve router", description="The MinT mesh router.")
    add_config_flags(p, RouterConfig, "ROUTER")
    tls.add_flags(p, client_port=True)
    return p


def main(argv: list[str] | None = None) -> int:
    import os

    from mintmesh.services.router.server import serve

    parser = build_parser()
    args = vars(parser.parse_args(argv))
    private_files()
    try:
        client_tls = tls.setup_from(args)
    except ValueError as e:
        parser.error(str(e))
    overrides = config_overrides(args, RouterConfig)
    if not overrides.get("otlp_endpoint"):
        overrides["otlp_endpoint"] = os.environ.get("MINT_OTLP_ENDPOINT") or None
    try:
        cfg = load_config(RouterConfig, "ROUTER", overrides)
    except ValueError as e:
        parser.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s router %(levelname)s %(message)s")
    serve(cfg, client_tls=client_tls)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
