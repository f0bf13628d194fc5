"""Service configuration: one frozen dataclass per service, built once at start from CLI flags
over MINT_* environment variables over defaults, then passed down. Library code never reads
os.environ."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar, get_args, get_type_hints

T = TypeVar("T")


def _convert(raw: str, typ: Any, name: str):
    args = get_args(typ)
    if len(args) == 2 and type(None) in args:  # X | None: "" is None
        if raw == "":
            return None
        typ = args[0] if args[1] is type(None) else args[1]
    if typ is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"{name}={raw!r} is not a boolean")
    if typ is int:
        return int(raw)
    if typ is float:
        return float(raw)
    if typ is Path:
        return Path(raw)
    if typ in (tuple[str, ...], list[str]):
        return tuple(p.strip() for p in raw.split(",") if p.strip())
    return raw


def check_metrics_port(port: int | None) -> None:
    """--metrics-port: None = no metrics endpoint, 0 = a free port, else the port."""
    if port is not None and not 0 <= int(port) <= 65535:
        raise ValueError(f"metrics_port {port} must be 0..65535 (0 = a free port)")


def load_config(
    cls: type[T],
    prefix: str,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> T:
    """cls(**defaults <- env MINT_<PREFIX>_<FIELD> <- overrides that are not None)."""
    env = os.environ if environ is None else environ
    hints = get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        key = f"MINT_{prefix}_{f.name}".upper() if prefix else f"MINT_{f.name}".upper()
        if key in env:
            try:
                values[f.name] = _convert(env[key], hints[f.name], key)
            except ValueError as e:
                raise ValueError(f"environment variable {key}={env[key]!r}: {e}") from e
    for k, v in (overrides or {}).items():
        if v is not None:
            values[k] = v
    return cls(**values)


def private_files() -> None:
    """Every file and directory this process creates from now on is its user's only (umask
    077): catalogs, caches, blobs, logs hold tenants' adapters and key hashes."""
    import os

    os.umask(0o077)
