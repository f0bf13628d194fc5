"""python -m mintmesh.services.store --data-dir D --model-dir M [--port 0]"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from mintmesh.services.common import tls
from mintmesh.services.common.config import (
    add_config_flags,
    config_overrides,
    load_config,
    private_files,
)
from mintmesh.services.store.config import StoreConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mintmesh.services.store",
        description="The MinT mesh adapter store (flags override MINT_STORE_* variables).",
    )
    add_config_flags(p, StoreConfig, "STORE")
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
    overrides = config_overrides(args, StoreConfig)
    try:
        config = load_config(StoreConfig, "STORE", overrides)
    except TypeError:
        p.error(
            "--data-dir and --model-dir (or MINT_STORE_DATA_DIR, MINT_STORE_MODEL_DIR) are required"
        )
    except ValueError as e:
        p.error(str(e))
    from mintmesh.services.store.server import serve

    serve(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
