"""One declaration per setting: each service's config dataclass is the only place a setting is
declared; its CLI flags come from it (services/common/config.py add_config_flags). Every field
has exactly one flag, a flag parses into the config, flags win over MINT_* variables which win
over defaults, and each service's real `--help` lists every field's flag and variable."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import subprocess
import sys
from pathlib import Path
from typing import get_args, get_type_hints

import pytest

from mintmesh.cache.config import CacheConfig
from mintmesh.services.common.config import (
    add_config_flags,
    config_flag,
    config_overrides,
    env_var,
    load_config,
)
from mintmesh.services.executor.config import ExecutorConfig
from mintmesh.services.gateway.config import GatewayConfig, TinkerConfig
from mintmesh.services.router.config import RouterConfig
from mintmesh.services.store.config import StoreConfig

# (the service's module, its config class, the env prefix, the flags' prefix)
CONFIGS = [
    pytest.param("mintmesh.services.executor", ExecutorConfig, "EXECUTOR", "", id="executor"),
    pytest.param("mintmesh.services.router", RouterConfig, "ROUTER", "", id="router"),
    pytest.param("mintmesh.services.store", StoreConfig, "STORE", "", id="store"),
    pytest.param("mintmesh.services.gateway", GatewayConfig, "GATEWAY", "", id="gateway"),
    pytest.param(
        "mintmesh.services.gateway", TinkerConfig, "GATEWAY_TINKER", "tinker-", id="gateway-tinker"
    ),
    pytest.param("mintmesh.cache", CacheConfig, "CACHE", "", id="cache"),
]
SERVICES = [
    "mintmesh.services.executor",
    "mintmesh.services.router",
    "mintmesh.services.store",
    "mintmesh.services.gateway",
    "mintmesh.cache",
]
# Flags that existed before the flags were generated, with the field each sets: scripts,
# compose.yaml, deploy/ and mint up (mintmesh/cluster.py) pass them.
RENAMED = {
    (ExecutorConfig, "cache_address"): "--cache",
    (RouterConfig, "store_address"): "--store",
    (RouterConfig, "executors"): "--executor",
    (GatewayConfig, "router_address"): "--router",
    (CacheConfig, "store_address"): "--store",
}


def parser_of(module: str) -> argparse.ArgumentParser:
    return importlib.import_module(module + ".__main__").build_parser()


def actions_by_dest(parser: argparse.ArgumentParser) -> dict[str, list[argparse.Action]]:
    out: dict[str, list[argparse.Action]] = {}
    for a in parser._actions:
        if a.option_strings:
            out.setdefault(a.dest, []).append(a)
    return out


def base(typ):
    """X for X | None, else typ."""
    args = get_args(typ)
    if len(args) == 2 and type(None) in args:
        return next(a for a in args if a is not type(None))
    return typ


@pytest.mark.parametrize(("module", "cls", "prefix", "flag_prefix"), CONFIGS)
def test_every_field_has_exactly_one_flag(module, cls, prefix, flag_prefix):
    by_dest = actions_by_dest(parser_of(module))
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        actions = by_dest.get(f.name, [])
        assert len(actions) == 1, f"{cls.__name__}.{f.name}: {len(actions)} flags"
        flag = config_flag(f, flag_prefix)
        assert flag == RENAMED.get((cls, f.name), "--" + flag_prefix + f.name.replace("_", "-"))
        expected = [flag]
        if hints[f.name] is bool:
            expected.append("--no-" + flag[2:])
        assert actions[0].option_strings == expected
        assert actions[0].default is None  # not given = load_config takes env or the default
        assert env_var(prefix, f.name) in actions[0].help
        assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help in its metadata"


def sample(f: dataclasses.Field, typ) -> tuple[list[str], object]:
    """(the value's argv after the flag, the value the field gets) for any field."""
    if "choices" in f.metadata:
        choice = sorted(f.metadata["choices"])[-1]
        return [choice], choice
    if typ is int:
        return ["7"], 7
    if typ is float:
        return ["2.5"], 2.5
    if typ is Path:
        return ["/some/dir"], Path("/some/dir")
    return ["v-" + f.name], "v-" + f.name


@pytest.mark.parametrize(("module", "cls", "prefix", "flag_prefix"), CONFIGS)
def test_each_flag_parses_into_its_field(module, cls, prefix, flag_prefix):
    parser = parser_of(module)
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag, typ = config_flag(f, flag_prefix), base(hints[f.name])
        if typ is bool:
            for argv, want in (([flag], True), (["--no-" + flag[2:]], False)):
                assert config_overrides(parser.parse_args(argv), cls)[f.name] is want
            continue
        if typ == tuple[str, ...]:
            args = parser.parse_args([flag, "a:1", flag, "b:2"])
            assert config_overrides(args, cls)[f.name] == ("a:1", "b:2")
            continue
        argv, want = sample(f, typ)
        got = config_overrides(parser.parse_args([flag, *argv]), cls)
        assert got[f.name] == want and type(got[f.name]) is type(want), f.name
        assert all(v is None for k, v in got.items() if k != f.name)


def test_flags_build_the_config():
    p = parser_of("mintmesh.services.executor")
    flags = {"--model-dir": "/m", "--cache": "127.0.0.1:9", "--max-batch-size": "8"}
    flags |= {"--training-slice-ms": "2.5", "--dense-kernels": "torch", "--metrics-port": "0"}
    args = p.parse_args([*(x for kv in flags.items() for x in kv), "--no-prefix-caching"])
    cfg = load_config(ExecutorConfig, "EXECUTOR", config_overrides(args, ExecutorConfig), {})
    assert cfg.model_dir == Path("/m") and cfg.cache_address == "127.0.0.1:9"
    assert cfg.max_batch_size == 8 and cfg.prefix_caching is False
    assert cfg.training_slice_ms == 2.5 and cfg.dense_kernels == "torch"
    assert cfg.metrics_port == 0
    assert cfg.max_step_tokens == 512 and cfg.fair_share_preemption is True  # defaults

    p = parser_of("mintmesh.services.router")
    args = p.parse_args(["--executor", "a:1", "--executor", "b:2", "--auth", "--port", "0"])
    cfg = load_config(RouterConfig, "ROUTER", config_overrides(args, RouterConfig), {})
    assert cfg.executors == ("a:1", "b:2") and cfg.auth is True and cfg.port == 0

    p = parser_of("mintmesh.services.gateway")
    args = p.parse_args(["--router", "r:1", "--tinker-poll-s", "5", "--no-tinker-pjwt-auth"])
    gw = load_config(GatewayConfig, "GATEWAY", config_overrides(args, GatewayConfig), {})
    tk = load_config(TinkerConfig, "GATEWAY_TINKER", config_overrides(args, TinkerConfig), {})
    assert gw.router_address == "r:1" and tk.poll_s == 5.0 and tk.pjwt_auth is False

    p = parser_of("mintmesh.cache")
    args = p.parse_args(["--cache-dir", "/c", "--store", "s:1", "--policy", "lru"])
    cfg = load_config(CacheConfig, "CACHE", config_overrides(args, CacheConfig), {})
    assert cfg.store_address == "s:1" and cfg.policy == "lru" and cfg.cache_dir == Path("/c")


def test_flag_over_env_over_default():
    p = parser_of("mintmesh.services.executor")

    def build(argv, env):
        over = config_overrides(p.parse_args(["--model-dir", "/m", *argv]), ExecutorConfig)
        return load_config(ExecutorConfig, "EXECUTOR", over, env)

    env = {"MINT_EXECUTOR_MAX_BATCH_SIZE": "8", "MINT_EXECUTOR_PREFIX_CACHING": "0"}
    assert build([], {}).max_batch_size == 32 and build([], {}).prefix_caching is True
    assert build([], env).max_batch_size == 8 and build([], env).prefix_caching is False
    cfg = build(["--max-batch-size", "9", "--prefix-caching"], env)
    assert cfg.max_batch_size == 9 and cfg.prefix_caching is True

    p = parser_of("mintmesh.services.router")
    env = {"MINT_ROUTER_EXECUTORS": "a:1, b:2", "MINT_ROUTER_AUTH": "1"}
    over = config_overrides(p.parse_args([]), RouterConfig)
    cfg = load_config(RouterConfig, "ROUTER", over, env)
    assert cfg.executors == ("a:1", "b:2") and cfg.auth is True
    over = config_overrides(p.parse_args(["--executor", "c:3", "--no-auth"]), RouterConfig)
    cfg = load_config(RouterConfig, "ROUTER", over, env)
    assert cfg.executors == ("c:3",) and cfg.auth is False


def test_unsupported_field_type_is_refused():
    @dataclasses.dataclass(frozen=True)
    class Odd:
        weights: dict = dataclasses.field(default_factory=dict)

    with pytest.raises(TypeError, match="Odd.weights"):
        add_config_flags(argparse.ArgumentParser(), Odd, "ODD")


def run_service(module: str, *argv: str, env: dict[str, str] | None = None):
    return subprocess.run(
        [sys.executable, "-m", module, *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )


@pytest.mark.parametrize("module", SERVICES)
def test_help_lists_every_field_flag(module):
    proc = run_service(module, "--help")
    assert proc.returncode == 0, proc.stderr
    for service, cls, prefix, flag_prefix in (p.values for p in CONFIGS):
        if service != module:
            continue
        for f in dataclasses.fields(cls):
            assert config_flag(f, flag_prefix) in proc.stdout, f.name
            assert env_var(prefix, f.name) in proc.stdout, f.name


def test_real_processes_take_flags_and_env():
    """A bad value through a generated flag, or through the environment, reaches the config's
    validation in the real process: a clean usage error, before anything is served."""
    proc = run_service(
        "mintmesh.services.router", "--insecure-mesh", "--port", "0", "--max-workers", "0"
    )
    assert proc.returncode == 2 and "max_workers=0 must be >= 1" in proc.stderr, proc.stderr
    proc = run_service(
        "mintmesh.services.router",
        "--insecure-mesh",
        "--port",
        "0",
        env={"MINT_ROUTER_MAX_WORKERS": "0"},
    )
    assert proc.returncode == 2 and "max_workers=0 must be >= 1" in proc.stderr, proc.stderr
    proc = run_service("mintmesh.services.gateway", "--port", "0", "--tinker-poll-s", "50")
    assert proc.returncode == 2 and "poll_s=50.0 must be in (0, 45)" in proc.stderr, proc.stderr
    proc = run_service(
        "mintmesh.services.gateway",
        "--port",
        "0",
        "--tinker-poll-s",
        "5",
        env={"MINT_GATEWAY_TINKER_POLL_S": "50", "MINT_GATEWAY_TINKER_MAX_SAMPLES": "0"},
    )
    # TinkerConfig checks poll_s first: the flag won over MINT_GATEWAY_TINKER_POLL_S.
    assert proc.returncode == 2 and "max_samples >= 1" in proc.stderr, proc.stderr
    assert "poll_s=" not in proc.stderr


def test_executor_torch_threads_rule(tiny_model_dir, base_info):
    """--torch-threads 0 (auto): one thread for a backbone whose decode GEMMs are too small to
    gain from a thread team (the tiny one), torch's default for a larger one; a set value wins;
    a negative one is refused."""
    import torch

    from mintmesh.model import BaseModelInfo
    from mintmesh.services.executor.server import PARALLEL_MIN_MACS, torch_threads

    cfg = ExecutorConfig(model_dir=tiny_model_dir, max_batch_size=32)
    assert torch_threads(cfg, base_info) == 1
    big = BaseModelInfo("f" * 64, "llama", {"model.layers.0.mlp.up_proj": (2816, 1024)}, 1)
    assert PARALLEL_MIN_MACS <= 32 * 2816 * 1024
    assert torch_threads(cfg, big) == torch.get_num_threads()
    assert torch_threads(dataclasses.replace(cfg, torch_threads=3), base_info) == 3
    with pytest.raises(ValueError, match="torch_threads=-1 must be >= 0"):
        ExecutorConfig(model_dir=tiny_model_dir, torch_threads=-1)


def test_executor_lora_threads_rule(tiny_model_dir):
    """--lora-threads 0 (auto): the kernels' default where torch has a thread team, one where
    torch runs on one thread (its team would spin for the LoRA ops alone); a set value wins; a
    negative one is refused; and serve() hands the result to the kernels' settings."""
    from mintmesh.kernels.settings import KernelSettings
    from mintmesh.services.executor.server import lora_threads

    cfg = ExecutorConfig(model_dir=tiny_model_dir)
    assert cfg.lora_threads == 0
    assert lora_threads(cfg, 1) == 1
    assert lora_threads(cfg, 2) == KernelSettings.lora_threads == 2
    assert lora_threads(cfg, 16) == 2
    assert lora_threads(dataclasses.replace(cfg, lora_threads=3), 1) == 3
    with pytest.raises(ValueError, match="lora_threads=-1 must be >= 0"):
        ExecutorConfig(model_dir=tiny_model_dir, lora_threads=-1)


def test_executor_attn_threads_rule(tiny_model_dir):
    """--attn-threads 0 (auto), as --lora-threads: the kernel's default (2) where torch has a
    thread team, one where torch runs on one thread; a set value wins; a negative one is
    refused."""
    from mintmesh.kernels.settings import KernelSettings
    from mintmesh.services.executor.server import attn_threads

    cfg = ExecutorConfig(model_dir=tiny_model_dir)
    assert cfg.attn_threads == 0
    assert attn_threads(cfg, 1) == 1
    assert attn_threads(cfg, 2) == KernelSettings.attn_threads == 2
    assert attn_threads(cfg, 16) == 2
    assert attn_threads(dataclasses.replace(cfg, attn_threads=3), 1) == 3
    with pytest.raises(ValueError, match="attn_threads=-1 must be >= 0"):
        ExecutorConfig(model_dir=tiny_model_dir, attn_threads=-1)


def test_executor_stream_message_budget_rule(tiny_model_dir):
    """--stream-messages-per-s: a stream's messages after its first are spaced by the running
    streams over the budget, at most --stream-max-interval-s (0.1 s by default); 0 turns the
    bound off; a negative or NaN budget, and a cap that is not a finite number > 0, are
    refused; both come from the environment as well."""
    from mintmesh.services.executor.requests import stream_interval

    cfg = ExecutorConfig(model_dir=tiny_model_dir)
    assert (cfg.stream_messages_per_s, cfg.stream_max_interval_s) == (500.0, 0.1)
    cap = cfg.stream_max_interval_s
    assert stream_interval(32, 500.0, cap) == pytest.approx(0.064)
    assert stream_interval(32, 1000.0, cap) == pytest.approx(0.032)
    assert stream_interval(1, 1000.0, cap) == pytest.approx(0.001)
    assert stream_interval(500, 1000.0, cap) == 0.1
    assert stream_interval(500, 1000.0, 0.45) == pytest.approx(0.45)
    assert stream_interval(32, 0.0, cap) == 0.0 and stream_interval(0, 1000.0, cap) == 0.0
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="stream_messages_per_s=.* must be >= 0"):
            ExecutorConfig(model_dir=tiny_model_dir, stream_messages_per_s=bad)
    for bad in (0.0, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="stream_max_interval_s=.* must be a finite number"):
            ExecutorConfig(model_dir=tiny_model_dir, stream_max_interval_s=bad)


def test_executor_training_run_idle_s(tiny_model_dir):
    """Idle training runs are dropped after 6 hours by default; 0 = never; negative or NaN is
    refused."""
    assert ExecutorConfig(model_dir=tiny_model_dir).training_run_idle_s == 6 * 3600.0
    assert (
        ExecutorConfig(model_dir=tiny_model_dir, training_run_idle_s=0.0).training_run_idle_s == 0
    )
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="training_run_idle_s .* must be >= 0"):
            ExecutorConfig(model_dir=tiny_model_dir, training_run_idle_s=bad)
