"""The install surface: generated stubs are fresh, the wheel holds only `mintmesh`, compose.yaml
is valid and runs real `mint` subcommands."""

from __future__ import annotations

import importlib
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_committed_stubs_match_protos(tmp_path):
    from mintmesh import protogen

    fresh = protogen.generate(tmp_path)
    assert fresh, "protoc generated nothing"
    committed = ROOT / "mintmesh" / "v1"
    for path in fresh:
        mine = committed / path.name
        assert mine.exists(), f"{path.name} is generated from protos/ but not committed"
        assert mine.read_bytes() == path.read_bytes(), (
            f"mintmesh/v1/{path.name} is stale: run `make protos`"
        )
    stale = {p.name for p in committed.glob("*_pb2*")} - {p.name for p in fresh}
    assert not stale, f"stubs without a proto: {sorted(stale)}"


def test_protos_follow_the_style():
    for proto in (ROOT / "protos" / "mintmesh" / "v1").glob("*.proto"):
        text = proto.read_text()
        assert "package mintmesh.v1;" in text, proto.name
        for line in text.splitlines():
            s = line.strip()
            if s.startswith("enum "):
                name = s.split()[1]
                # The first value of every enum is <NAME>_UNSPECIFIED = 0.
                body = text.split(s, 1)[1]
                first = next(x.strip() for x in body.splitlines()[1:] if "=" in x)
                assert first.endswith("_UNSPECIFIED = 0;"), f"{proto.name}: enum {name}: {first}"


def _shared_dir() -> Path | None:
    for cand in (ROOT.parent / "shared", ROOT / "shared"):
        if (cand / "schemas" / "compose-spec.json").is_file():
            return cand
    return None


def test_compose_is_valid_and_runs_real_commands():
    import json

    import jsonschema
    import yaml

    shared = _shared_dir()
    if shared is None:
        pytest.skip("shared/schemas/compose-spec.json is not beside this checkout")
    doc = yaml.safe_load((ROOT / "compose.yaml").read_text())
    schema = json.loads((shared / "schemas" / "compose-spec.json").read_text())
    jsonschema.validate(doc, schema)

    from typer.main import get_command

    from mintmesh.cli import SERVICES, app

    cli = get_command(app)
    services = doc["services"]
    kinds = {"store", "router", "otel-collector", "jaeger"}
    assert kinds <= set(services)
    assert sum(1 for s in services if s.startswith("executor-")) == 2
    checked = 0
    metrics_ports: dict[str, int] = {}  # compose service -> its --metrics-port
    for name, svc in services.items():
        if svc.get("image") != "mintmesh:latest":
            continue
        cmd = svc["command"]
        cmd = shlex.split(cmd) if isinstance(cmd, str) else cmd
        assert cmd[0] == "mint", f"{name}: command {cmd} does not run mint"
        group = cli
        args = cmd[1:]
        while hasattr(group, "commands") and args and args[0] in group.commands:
            group = group.commands[args[0]]
            args = args[1:]
        assert group is not cli, f"{name}: {cmd[1]!r} is not a mint subcommand"
        if group.name == "serve":
            svc_name, flags = args[0], args[1:]
            assert svc_name in SERVICES, f"{name}: unknown service {svc_name!r}"
            mod = importlib.import_module(SERVICES[svc_name])
            parsed = mod.build_parser().parse_args(flags)  # exits (SystemExit) on a bad flag
            assert parsed.metrics_port is not None, f"{name}: serves no metrics (--metrics-port)"
            metrics_ports[name] = parsed.metrics_port
        checked += 1
    assert checked >= 6
    for name in ("executor-0", "executor-1"):
        ex = services[name]
        cache = ex["pid"].removeprefix("service:")
        assert services[cache]["volumes"][0].split(":")[0] == ex["volumes"][0].split(":")[0]
    _check_prometheus_scrapes(doc, metrics_ports)
    _check_secure(services)


def _check_secure(services: dict) -> None:
    """compose runs as securely as `mint up`: API keys on, mutual TLS between every mesh
    service with a certificate the certs service makes, internal ports not published."""
    certs_cmd = services["certs"]["command"]
    made = {certs_cmd[i + 1] for i, a in enumerate(certs_cmd) if a == "--name"}
    for name, svc in services.items():
        cmd = svc.get("command") or []
        if svc.get("image") == "mintmesh:latest" and cmd[:2] == ["mint", "serve"]:
            kind = cmd[2]
            assert "--insecure-mesh" not in cmd, name
            env = svc.get("environment", {})
            if kind == "gateway":  # a client of the router, not a mesh peer
                assert "MINT_MESH_KEY" not in env
            else:
                assert env["MINT_MESH_CA"] == "/certs/ca.pem", name
                assert env["MINT_MESH_CERT"] == f"/certs/{name}.pem" and name in made, name
                assert env["MINT_MESH_KEY"] == f"/certs/{name}-key.pem", name
                assert "certs:/certs:ro" in svc["volumes"], name
            if kind in ("store", "router"):
                assert "--auth" in cmd, f"{name} runs with auth off"
            if kind in ("store", "router", "cache"):
                token = next(v for k, v in env.items() if k.endswith("_INTERNAL_TOKEN"))
                assert token.startswith("${MINT_INTERNAL_TOKEN:?"), (name, token)
            published = svc.get("ports", [])
            assert not published or kind in ("router", "gateway"), f"{name} publishes {published}"


def _check_prometheus_scrapes(doc: dict, metrics_ports: dict[str, int]) -> None:
    """Prometheus (its config from the file compose mounts) scrapes every mint service at its
    --metrics-port, and nothing that is not a service of compose.yaml."""
    import yaml

    assert len(metrics_ports) >= 6, metrics_ports
    prom = doc["services"]["prometheus"]
    (mount,) = [c for c in prom["configs"] if c["target"] == "/etc/prometheus/prometheus.yml"]
    assert f"--config.file={mount['target']}" in prom["command"]
    path = ROOT / doc["configs"][mount["source"]]["file"]
    cfg = yaml.safe_load(path.read_text())
    targets = [
        t
        for job in cfg["scrape_configs"]
        for sc in job.get("static_configs", [])
        for t in sc["targets"]
    ]
    want = {f"{name}:{port}" for name, port in metrics_ports.items()}
    assert want <= set(targets), f"{path.name} does not scrape {sorted(want - set(targets))}"
    strays = {t for t in targets if t.rsplit(":", 1)[0] not in doc["services"]}
    assert not strays, f"{path.name} scrapes {sorted(strays)}: not services of compose.yaml"
    assert len(targets) == len(set(targets)), f"{path.name} scrapes a target twice"


@pytest.mark.slow
def test_wheel_holds_only_the_mintmesh_namespace(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("mintmesh-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"mintmesh"}, f"wheel installs top-level packages {sorted(tops)}"
    for mod in (
        "mintmesh/services/router/core.py",
        "mintmesh/cache/reader.py",
        "mintmesh/kernels/api.py",
        "mintmesh/kernels/lora_cpu.cpp",
        "mintmesh/v1/store_pb2.py",
        "mintmesh/bench/__init__.py",
    ):
        assert mod in names, f"{mod} missing from the wheel"
