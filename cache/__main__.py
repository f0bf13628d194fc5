"""python -m mintmesh.cache --cache-dir D --store HOST:PORT [--port 0]"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from mintmesh.cache.config import CacheConfig
from mintmesh.services.common import tls
from mintmesh.services.common.config import (
    add_config_flags,
    config_overrides,
    load_config,
    private_files,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mintmesh.cache",
        description="The MinT mesh node cache sidecar (flags override MINT_CACHE_* variables).",
    )
    add_config_flags(p, CacheConfig, "CACHE")
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
    overrides = config_overrides(args, CacheConfig)
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
