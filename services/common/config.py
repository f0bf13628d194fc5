"""Service configuration: one frozen dataclass per service, built once at start from CLI flags
over MINT_* environment variables over defaults, then passed down. Library code never reads
os.environ.

The dataclass is the one declaration of a setting: its field gives the environment variable
(MINT_<PREFIX>_<FIELD>) and, through add_config_flags, the command-line flag (--field-name, its
type from the type hint; help text, another flag name, choices, metavar from its metadata:
dataclasses.field(metadata={"help": ..., "flag": "--cache", "choices": (...), "metavar": ...}))."""

from __future__ import annotations

import argparse
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


def env_var(prefix: str, name: str) -> str:
    """The environment variable of field `name` of the config with this prefix."""
    return f"MINT_{prefix}_{name}".upper() if prefix else f"MINT_{name}".upper()


def _unoptional(typ: Any) -> Any:
    args = get_args(typ)
    if len(args) == 2 and type(None) in args:
        return args[0] if args[1] is type(None) else args[1]
    return typ


def _is_str_tuple(typ: Any) -> bool:
    return typ in (tuple[str, ...], list[str])


def config_flag(f: dataclasses.Field, flag_prefix: str = "") -> str:
    """The command-line flag of config field f: metadata["flag"], else --<prefix><field-name>."""
    return f.metadata.get("flag") or "--" + flag_prefix + f.name.replace("_", "-")


def _default_text(f: dataclasses.Field) -> str:
    """The default, as --help shows it ("" = required: a field without one)."""
    if "default_help" in f.metadata:
        return str(f.metadata["default_help"])
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
        return ""
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None or value == "" or value == ():
        return "none"
    return str(value)


def add_config_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    prefix: str,
    *,
    flag_prefix: str = "",
) -> None:
    """One flag per field of config dataclass cls, dest = the field's name, default None (so
    that load_config takes it only when given): int, float, str, Path (and X | None: the same
    flag) take one value, bool is --flag/--no-flag, tuple[str, ...] a repeated flag. The help
    names the field's environment variable (MINT_<PREFIX>_<FIELD>) and default."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        typ = _unoptional(hints[f.name])
        kwargs: dict[str, Any] = {"dest": f.name, "default": None}
        if typ is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif _is_str_tuple(typ):
            kwargs["action"] = "append"
        elif typ in (int, float, Path):
            kwargs["type"] = typ
        elif typ is not str:
            raise TypeError(f"{cls.__name__}.{f.name}: no command-line flag for type {typ!r}")
        if "choices" in f.metadata:
            kwargs["choices"] = tuple(f.metadata["choices"])
        if "metavar" in f.metadata:
            kwargs["metavar"] = f.metadata["metavar"]
        text = f.metadata.get("help", f.name.replace("_", " "))
        env = env_var(prefix, f.name)
        if _is_str_tuple(typ):
            env += ", comma-separated"
        default = _default_text(f)
        default = f"default {default}" if default else "required"
        kwargs["help"] = f"{text} ({env}; {default})".replace("%", "%%")
        parser.add_argument(config_flag(f, flag_prefix), **kwargs)


def config_overrides(args: argparse.Namespace | Mapping[str, Any], cls: type) -> dict[str, Any]:
    """The values of cls's fields among parsed flags (None = not given), for load_config."""
    values = vars(args) if isinstance(args, argparse.Namespace) else args
    hints = get_type_hints(cls)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        v = values.get(f.name)
        if isinstance(v, list) and _is_str_tuple(_unoptional(hints[f.name])):
            v = tuple(v)
        out[f.name] = v
    return out


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
        key = env_var(prefix, f.name)
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
