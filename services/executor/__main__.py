"""`python -m mintmesh.services.executor --model-dir DIR [--cache-dir DIR --cache HOST:PORT]`."""

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
from mintmesh.services.executor.config import ExecutorConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mintmesh.services.executor",
        description="Serve mixed-adapter batches on one resident backbone (mintmesh.v1.Executor); "
        "flags override MINT_EXECUTOR_* variables.",
    )
    add_config_flags(p, ExecutorConfig, "EXECUTOR")
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
    overrides = config_overrides(args, ExecutorConfig)
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
