"""python -m mintmesh.services.store --data-dir D --model-dir M [--port 0]"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from mintmesh.services.common import tls
from mintmesh.services.common.config import load_config, private_files
from mintmesh.services.store.config import StoreConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mintmesh.services.store",
        description="The MinT mesh adapter store (flags override MINT_STORE_* variables).",
    )
    p.add_argument("--data-dir", type=Path, help="catalog and blobs (MINT_STORE_DATA_DIR)")
    p.add_argument("--model-dir", type=Path, help="base model directory (MINT_STORE_MODEL_DIR)")
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port; 0 picks a free one (default 0)")
    p.add_argument("--max-rank", type=int, help="largest LoRA rank accepted (default 128)")
    p.add_argument("--max-upload-bytes", type=int, help="largest upload (default 256 MiB)")
    p.add_argument("--otlp-endpoint", help="OTLP gRPC endpoint for traces (default: none)")
    p.add_argument(
        "--blob-url",
        help="blob store: a directory or an fsspec URL such as s3://bucket/prefix "
        "(MINT_STORE_BLOB_URL; default DATA_DIR/blobs)",
    )
    p.add_argument(
        "--auth",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="require API keys on every RPC (MINT_STORE_AUTH; default off)",
    )
    p.add_argument("--admin-key", help="the operator's API key (MINT_STORE_ADMIN_KEY)")
    p.add_argument(
        "--internal-token",
        help="shared secret of the mesh's services (MINT_STORE_INTERNAL_TOKEN)",
    )
    p.add_argument("--push-group-size", type=int, help="pushes per group commit (default 256)")
    p.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus metrics on http://HOST:PORT/metrics; 0 picks a free port "
        "(MINT_STORE_METRICS_PORT; default: none)",
    )
    p.add_argument(
        "--base-model-name",
        help="the base model's served name, e.g. its OpenAI model id (default: the model "
        "directory's name; MINT_STORE_BASE_MODEL_NAME)",
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
        "data_dir": args.data_dir,
        "model_dir": args.model_dir,
        "host": args.host,
        "port": args.port,
        "max_rank": args.max_rank,
        "max_upload_bytes": args.max_upload_bytes,
        "otlp_endpoint": args.otlp_endpoint,
        "blob_url": args.blob_url,
        "auth": args.auth,
        "admin_key": args.admin_key,
        "internal_token": args.internal_token,
        "push_group_size": args.push_group_size,
        "metrics_port": args.metrics_port,
        "base_model_name": args.base_model_name,
    }
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
