"""`mint`: the MinT mesh command line.

    mint model init [--preset tiny|small] [DIR]
    mint up [--executors N] [--model DIR] [--data DIR] [--port P] [--admin-key K] [--no-auth]
    mint serve store|cache|executor|router [FLAGS...]
    mint adapter example DIR --model MODEL_DIR [--rank R] [--targets M,M] [--seed S]
    mint adapter push DIR --name TENANT/NAME [--storage fp32|bf16|fp16|int8] | list [TENANT]
                 | show REF | rm REF | prefetch REF... | revisions NAME
                 | alias NAME [ALIAS [REV]] | promote REF [--alias A] | rollback NAME [--alias A]
                 | merge REF[:W]... --name TENANT/NAME | eval REF METRIC=VALUE...
                 | eval REF --data FILE.jsonl | export REF DIR | deprecate REF
    mint tenant create NAME | list | key NAME | revoke KEY_ID | whoami
    mint generate [--adapter REF] [--max-tokens N] [--temperature T] [--top-p P] [--json] PROMPT
    mint status [--wait SECONDS] [--json]
    mint demo
    mint bench NAME [--json] [ARGS...]

Every command that talks to a cluster takes --router ADDR (default: env MINT_ROUTER, else
127.0.0.1:50051) and sends the API key in env MINT_API_KEY, when set; `mint up` listens on
MINT_ROUTER's port unless given --port.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="MinT mesh: millions of personal LoRA models on one shared backbone.",
    no_args_is_help=True,
    add_completion=False,
)
model_app = typer.Typer(help="The backbone.", no_args_is_help=True)
adapter_app = typer.Typer(help="Adapters in the store.", no_args_is_help=True)
tenant_app = typer.Typer(help="Tenants and their API keys.", no_args_is_help=True)
app.add_typer(model_app, name="model")
app.add_typer(adapter_app, name="adapter")
app.add_typer(tenant_app, name="tenant")

console = Console(stderr=True)
out = Console()

DEFAULT_ROUTER = "127.0.0.1:50051"
RouterOpt = typer.Option(None, "--router", help="Router address (env MINT_ROUTER).")
PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}

SERVICES = {
    "store": "mintmesh.services.store.__main__",
    "cache": "mintmesh.cache.__main__",
    "executor": "mintmesh.services.executor.__main__",
    "router": "mintmesh.services.router.__main__",
    "gateway": "mintmesh.services.gateway.__main__",
}


def _router(addr: str | None) -> str:
    return addr or os.environ.get("MINT_ROUTER") or DEFAULT_ROUTER


def _client(addr: str | None, timeout: float = 60.0, channel_options=None):
    """A client of the router with env MINT_API_KEY; a key gRPC could not send is a usage error
    (exit 2) before anything is sent."""
    from mintmesh.client import InvalidApiKey, MintClient, check_api_key

    key = os.environ.get("MINT_API_KEY")
    try:
        if key:
            check_api_key(key, "MINT_API_KEY")
        return MintClient(
            _router(addr), timeout=timeout, api_key=key, channel_options=channel_options
        )
    except InvalidApiKey as e:
        _fail(str(e), USAGE)


USAGE = 2  # exit code of a usage error (a bad argument, flag or environment variable)


def _fail(msg: str, code: int = 1):
    from rich.markup import escape

    console.print(f"[red]error:[/red] {escape(msg)}", soft_wrap=True, highlight=False)
    raise typer.Exit(code)


def _rpc_guard(fn):
    """Print a gRPC failure as one clear line (status and message) instead of a traceback."""
    import functools

    import grpc

    @functools.wraps(fn)
    def inner(*a, **kw):
        try:
            return fn(*a, **kw)
        except grpc.RpcError as err:
            _fail(f"{err.code().name}: {err.details()}")

    return inner


def _revision_dict(rev) -> dict:
    return {
        "ref": rev.ref,
        "tenant": rev.tenant,
        "name": rev.name,
        "revision": rev.revision,
        "digest": rev.digest,
        "rank": rev.rank,
        "alpha": rev.alpha,
        "target_modules": list(rev.target_modules),
        "size_bytes": rev.size_bytes,
        "created_at_unix_ms": rev.created_at_unix_ms,
        "base_fingerprint": rev.base_fingerprint,
        "labels": dict(rev.labels),
        "storage_format": _enum_name(_common().StorageFormat, rev.storage_format),
        "state": _enum_name(_common().RevisionState, rev.state),
        "provenance": {
            "source": _enum_name(_common().RevisionSource, rev.provenance.source),
            "parents": [
                {"ref": p.ref, "digest": p.digest, "weight": p.weight}
                for p in rev.provenance.parents
            ],
            "data_digest": rev.provenance.data_digest,
            "method": rev.provenance.method,
        },
        "evaluations": [
            {
                "metric": e.metric,
                "value": e.value,
                "evaluator": e.evaluator,
                "evaluated_at_unix_ms": e.evaluated_at_unix_ms,
                "dataset_digest": e.dataset_digest,
            }
            for e in rev.evaluations
        ],
    }


def _common():
    from mintmesh.v1 import common_pb2

    return common_pb2


def _enum_name(enum, value: int) -> str:
    """STORAGE_FORMAT_INT8 -> "int8"; 0 -> ""."""
    if not value:
        return ""
    name = enum.Name(value)
    return name.split("_", 2)[-1].lower() if name.count("_") >= 2 else name.lower()


# -- model -----------------------------------------------------------------------------------


@model_app.command("init")
def model_init(
    directory: Path = typer.Argument(None, help="Where to write it (default ./models/PRESET)."),
    preset: str = typer.Option("tiny", "--preset", help="tiny (tests) or small (~170M, benches)."),
):
    """Write the embedded Llama-family backbone (deterministic weights) and print its directory."""
    from mintmesh.model import PRESETS, init_model

    if preset not in PRESETS:
        _fail(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    target = directory or Path("models") / preset
    with console.status(f"building the {preset} backbone"):
        path = init_model(preset, target)
    out.print(str(path.resolve()))


# -- cluster ---------------------------------------------------------------------------------


@app.command()
def up(
    ctx: typer.Context,
    executors: int = typer.Option(2, "--executors", min=1, help="executor+sidecar pairs"),
    model: Path = typer.Option(None, "--model", help="Backbone dir (default: DATA/model, tiny)."),
    data: Path = typer.Option(Path("data"), "--data", help="State directory."),
    port: int = typer.Option(
        None,
        "--port",
        help="Router port (default: the port of $MINT_ROUTER, else 50051; 0 = any free port).",
    ),
    otlp_endpoint: str = typer.Option(
        "", "--otlp-endpoint", envvar="MINT_OTLP_ENDPOINT", help="Export traces via OTLP/gRPC."
    ),
    admin_key: str = typer.Option(
        "", "--admin-key", envvar="MINT_ADMIN_KEY", help="Admin key to use (default: a new one)."
    ),
    auth: bool = typer.Option(True, "--auth/--no-auth", help="Require API keys."),
    insecure_mesh: bool = typer.Option(
        False,
        "--insecure-mesh",
        help="Plaintext between the services, no certificates (development only; by default "
        "the services authenticate each other with a CA made under DATA/certs).",
    ),
    http_port: int = typer.Option(
        8000,
        "--http-port",
        min=-1,
        envvar="MINT_HTTP_PORT",
        help="The OpenAI API gateway's port (0 = any free port, -1 = no gateway).",
    ),
):
    """Start a local cluster (store, router, N executor+sidecar pairs, the HTTP gateway) until
    Ctrl-C/SIGTERM."""
    import signal
    import threading

    from mintmesh.client import InvalidApiKey, check_api_key
    from mintmesh.cluster import ClusterConfig, ClusterError, LocalCluster

    if admin_key:
        # By name: typer ships its own copy of click, whose ParameterSource is not click's.
        source = ctx.get_parameter_source("admin_key")
        from_env = getattr(source, "name", "") == "ENVIRONMENT"
        try:
            check_api_key(admin_key, "MINT_ADMIN_KEY" if from_env else "--admin-key")
        except InvalidApiKey as e:
            _fail(str(e), USAGE)
    if port is None:
        port = _port_of_router_env()
    logging.basicConfig(level=logging.INFO)
    model_dir = _ensure_model(model, data)
    cluster = LocalCluster(
        ClusterConfig(
            model_dir=model_dir,
            data_dir=data.resolve(),
            executors=executors,
            port=port,
            otlp_endpoint=otlp_endpoint,
            auth=auth,
            admin_key=admin_key,
            http_port=None if http_port < 0 else http_port,
            mesh_tls=not insecure_mesh,
        )
    )
    if insecure_mesh:
        console.print(
            "[bold red]--insecure-mesh: the services talk in plaintext and accept calls from "
            "anyone who can reach their ports. Development only.[/bold red]"
        )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        with console.status(f"starting store, router and {executors} executor(s)"):
            addr = cluster.start()
    except ClusterError as e:
        _fail(str(e))
    out.print(f"router listening on {addr}")
    for name, url in cluster.metrics_urls.items():
        out.print(f"metrics of {name}: {url}")
    if cluster.openai_base_url:
        out.print(f"OpenAI API on {cluster.openai_base_url}")
    if cluster.admin_key:
        out.print(f"admin key: {cluster.admin_key}")
        out.print(f"  export MINT_ROUTER={addr} MINT_API_KEY={cluster.admin_key}", soft_wrap=True)
    sys.stdout.flush()
    try:
        # The cluster restarts a child that dies (LocalCluster's supervisor); say so here.
        told = 0
        while not stop.wait(0.5):
            for what in cluster.events[told:]:
                console.print(f"[yellow]{what}[/yellow]")
            told = len(cluster.events)
    finally:
        cluster.stop()
        out.print("cluster stopped")


def _port_of_router_env() -> int:
    """The port of $MINT_ROUTER (HOST:PORT), so the other commands in this shell find the
    cluster; 50051 without it."""
    env = os.environ.get("MINT_ROUTER", "")
    if not env:
        return int(DEFAULT_ROUTER.rsplit(":", 1)[1])
    _, sep, port = env.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        _fail(f"MINT_ROUTER={env!r} must be HOST:PORT (mint up listens on its port)", USAGE)
    return int(port)


def _ensure_model(model: Path | None, data: Path) -> Path:
    from mintmesh.model import build_preset, model_ready

    if model is not None:
        if not (model / "config.json").is_file():
            _fail(f"--model {model} has no config.json; build one with `mint model init`")
        return model.resolve()
    path = data / "model"
    if not model_ready(path):
        with console.status("building the tiny backbone"):
            build_preset("tiny", path)
    return path.resolve()


@app.command()
def certs(
    directory: Path = typer.Argument(..., help="Where to write ca.pem and NAME.pem/NAME-key.pem."),
    names: list[str] = typer.Option(
        None,
        "--name",
        help="A service's name (repeat); default: store, router, cache-0, executor-0, cache-1, "
        "executor-1, operator (compose.yaml's services).",
    ),
    host: list[str] = typer.Option(None, "--host", help="Another name or IP in every cert."),
):
    """Make a mesh CA and one certificate per service, for the services' mutual TLS
    (--mesh-ca/--mesh-cert/--mesh-key; `mint up` makes its own)."""
    from mintmesh.services.common.tls import make_mesh_pki

    names = names or ["store", "router", "cache-0", "executor-0", "cache-1", "executor-1"]
    names += [] if "operator" in names else ["operator"]
    d = make_mesh_pki(directory, names, hosts=host or [])
    out.print(f"wrote the mesh CA and {len(names)} certificates to {d}")


@app.command(context_settings=PASS_THROUGH)
def serve(
    ctx: typer.Context,
    service: str = typer.Argument(..., help="store|cache|executor|router|gateway"),
):
    """Run one service in the foreground (the flags are the service's: try --help)."""
    if service not in SERVICES:
        _fail(f"unknown service {service!r}; choose one of {sorted(SERVICES)}")
    mod = importlib.import_module(SERVICES[service])
    raise typer.Exit(mod.main(list(ctx.args)) or 0)


@app.command()
@_rpc_guard
def status(
    router: str = RouterOpt,
    as_json: bool = typer.Option(False, "--json"),
    wait: float = typer.Option(
        0.0,
        "--wait",
        metavar="SECONDS",
        min=0,
        help="Wait up to SECONDS for the router, the store and every executor to serve "
        "(fails after that).",
    ),
):
    """The router's view: store health, executors, their residency."""
    if wait:
        # Reconnect quickly while the router is not up yet (gRPC's default backoff grows to
        # minutes).
        fast = [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 1000)]
        with _client(router, timeout=5.0, channel_options=fast) as cl:
            st = _wait_healthy(cl, wait)
    else:
        with _client(router) as cl:
            st = cl.status()
    if as_json:
        from google.protobuf.json_format import MessageToDict

        out.print_json(json.dumps(MessageToDict(st)))
        return
    where = f" {st.store_address}" if st.store_address else ""  # placement detail: admins only
    out.print(f"store{where}: {'healthy' if st.store_healthy else 'DOWN'}")
    t = Table("executor", "address", "healthy", "queue", "resident adapters")
    for e in st.executors:
        t.add_row(
            e.executor_id or "?",
            e.address,
            str(e.healthy),
            str(e.queue_depth),
            str(len(e.resident_adapters)),
        )
    out.print(t)


def _wait_healthy(cl, seconds: float):
    """The router's status once the store and every executor are healthy. UNAVAILABLE and
    DEADLINE_EXCEEDED mean "not up yet"; other RPC errors (a wrong key, say) are raised at once;
    after `seconds`, exit 1 with the last reason."""
    import time

    import grpc

    deadline = time.monotonic() + seconds
    while True:
        try:
            st = cl.status()
            down = [e.executor_id or e.address for e in st.executors if not e.healthy]
            if st.store_healthy and st.executors and not down:
                return st
            why = (
                "the store is down"
                if not st.store_healthy
                else f"executors not healthy: {', '.join(down)}"
                if down
                else "no executors"
            )
        except grpc.RpcError as err:
            if err.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise
            why = f"{err.code().name}: {err.details()}"
        if time.monotonic() >= deadline:
            _fail(f"the cluster at {cl.address} is not ready after {seconds:g}s ({why})")
        time.sleep(0.25)


# -- adapters --------------------------------------------------------------------------------


@adapter_app.command("example")
def adapter_example(
    directory: Path = typer.Argument(..., help="Where to write it (created if missing)."),
    model: Path = typer.Option(..., "--model", help="The backbone's directory."),
    rank: int = typer.Option(8, "--rank", min=1, help="LoRA rank."),
    targets: str = typer.Option("q_proj,v_proj", "--targets", help="Modules, comma-separated."),
    seed: int = typer.Option(0, "--seed", help="Seed of the weights."),
):
    """Write an example PEFT LoRA for the backbone in MODEL, ready for `mint adapter push`:
    peft's get_peft_model + save_pretrained, with seeded non-zero weights (so it changes the
    model's outputs, unlike a freshly initialised LoRA)."""
    if not (model / "config.json").is_file():
        _fail(f"--model {model} has no config.json; build one with `mint model init`", USAGE)
    modules = [t.strip() for t in targets.split(",") if t.strip()]
    if not modules:
        _fail(f"--targets {targets!r} names no module", USAGE)
    with console.status(f"writing a rank-{rank} LoRA on {','.join(modules)}"):
        try:
            path = _write_example_adapter(model, directory, rank, modules, seed)
        except ValueError as e:  # peft: a target module the base does not have
            _fail(f"--targets {targets!r}: {e}", USAGE)
    out.print(str(path.resolve()))


def _write_example_adapter(
    model_dir: Path, out_dir: Path, rank: int, targets: list[str], seed: int
) -> Path:
    import warnings

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers.utils import logging as hf_logging

    from mintmesh.model import load_model

    hf_logging.disable_progress_bar()
    base, _ = load_model(model_dir)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0)
    with warnings.catch_warnings():  # transformers' deprecations inside peft, not the user's
        warnings.simplefilter("ignore", FutureWarning)
        pm = get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            elif "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm.save_pretrained(out_dir)
    return out_dir


@adapter_app.command("push")
@_rpc_guard
def adapter_push(
    directory: Path = typer.Argument(..., help="PEFT adapter directory."),
    name: str = typer.Option(..., "--name", help="tenant/name"),
    label: list[str] = typer.Option([], "--label", help="key=value (repeat)"),
    storage: str = typer.Option(
        "", "--storage", help="fp32|bf16|fp16|int8 (default: the upload's dtype)"
    ),
    router: str = RouterOpt,
    as_json: bool = typer.Option(False, "--json"),
):
    """Upload a PEFT LoRA adapter as the next revision of NAME."""
    from mintmesh.errors import InvalidAdapter

    labels = _labels(label)
    _check_storage(storage)
    try:
        with _client(router) as cl, console.status(f"pushing {directory}"):
            rev = cl.push_adapter(directory, name, labels=labels, storage_format=storage)
    except InvalidAdapter as e:
        _fail(e.message)
    if as_json:
        out.print_json(json.dumps(_revision_dict(rev)))
    else:
        out.print(f"{rev.ref}  digest {rev.digest[:16]}…  rank {rev.rank}  {rev.size_bytes} bytes")


@adapter_app.command("list")
@_rpc_guard
def adapter_list(
    tenant: str = typer.Argument("", help="Only this tenant."),
    router: str = RouterOpt,
    as_json: bool = typer.Option(False, "--json"),
):
    """List adapters (latest revision of each)."""
    with _client(router) as cl:
        items = list(cl.list_adapters(tenant))
    if as_json:
        out.print_json(
            json.dumps(
                [
                    {
                        "name": f"{a.tenant}/{a.name}",
                        "revisions": a.revision_count,
                        "latest": _revision_dict(a.latest),
                    }
                    for a in items
                ]
            )
        )
        return
    t = Table("adapter", "revisions", "latest", "rank", "targets", "digest")
    for a in items:
        t.add_row(
            f"{a.tenant}/{a.name}",
            str(a.revision_count),
            a.latest.ref,
            str(a.latest.rank),
            ",".join(a.latest.target_modules),
            a.latest.digest[:12],
        )
    out.print(t)


@adapter_app.command("show")
@_rpc_guard
def adapter_show(ref: str, router: str = RouterOpt):
    """Resolve REF and print its revision record as JSON."""
    with _client(router) as cl:
        rev = cl.resolve(ref)
    out.print_json(json.dumps(_revision_dict(rev)))


@adapter_app.command("export")
@_rpc_guard
def adapter_export(
    ref: str = typer.Argument(..., help="tenant/name[@rev|@alias]"),
    directory: Path = typer.Argument(..., help="Where to write it (created if missing)."),
    force: bool = typer.Option(False, "--force", help="Overwrite adapter files already there."),
    router: str = RouterOpt,
    as_json: bool = typer.Option(False, "--json"),
):
    """Write a stored revision as a PEFT LoRA directory (adapter_config.json +
    adapter_model.safetensors) that peft's PeftModel.from_pretrained loads: float formats as
    stored, int8 as the float32 weights it dequantizes to (what the executors compute with)."""
    import grpc

    from mintmesh.errors import MintError
    from mintmesh.identity import parse_ref
    from mintmesh.peft_io import CONFIG_NAME, WEIGHTS_NAME

    try:
        parse_ref(ref)
    except MintError as e:
        _fail(e.message, USAGE)
    there = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if (directory / n).exists()]
    if there and not force:
        _fail(f"{directory} already holds {', '.join(there)}; pass --force to overwrite")
    if directory.exists() and not directory.is_dir():
        _fail(f"{directory} exists and is not a directory")
    with _client(router, timeout=600) as cl, console.status(f"fetching {ref}"):
        try:
            rev = cl.resolve(ref)
            data = cl.fetch(ref=rev.ref)  # tenant/name@N: the revision just resolved
        except grpc.RpcError as err:
            _fail(f"cannot export {ref}: {err.code().name}: {err.details()}")
        except ValueError as e:  # bytes that do not hash to the digest the store sent
            _fail(f"cannot export {ref}: {e}")
    _export_files(rev, data, directory, as_json)


def _export_files(rev, data: bytes, directory: Path, as_json: bool) -> None:
    import hashlib

    from mintmesh.errors import InvalidAdapter
    from mintmesh.packed import read_header
    from mintmesh.peft_io import CONFIG_NAME, WEIGHTS_NAME, packed_to_peft

    if hashlib.sha256(data).hexdigest() != rev.digest:
        _fail(f"the bytes fetched for {rev.ref} do not hash to its digest {rev.digest}")
    try:
        header = read_header(data)
        config_json, weights = packed_to_peft(data)
    except InvalidAdapter as e:
        _fail(f"{rev.ref}: {e.message}")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_NAME).write_text(config_json)
    (directory / WEIGHTS_NAME).write_bytes(weights)
    stored = header.storage_format
    dtype = "float32" if header.quantized else stored
    if as_json:
        print(
            json.dumps(
                {
                    "ref": rev.ref,
                    "digest": rev.digest,
                    "base_fingerprint": header.base_fingerprint,
                    "storage_format": stored,
                    "dtype": dtype,
                    "dir": str(directory),
                    "files": [CONFIG_NAME, WEIGHTS_NAME],
                }
            )
        )
        return
    how = f"{stored} -> {dtype}" if dtype != stored else stored
    out.print(
        f"{rev.ref}  digest {rev.digest[:16]}…  rank {rev.rank}  {how}  -> {directory}",
        highlight=False,
    )


@adapter_app.command("prefetch")
@_rpc_guard
def adapter_prefetch(
    refs: list[str],
    router: str = RouterOpt,
    as_json: bool = typer.Option(False, "--json"),
):
    """Warm adapters before their requests: each executor that would serve one starts loading
    it (node cache -> host -> device) in the background."""
    with _client(router) as cl:
        placements = cl.prefetch(*refs)
    rows = [
        {"adapter": p.adapter, "digest": p.digest, "executor": p.executor,
         "resident": p.resident, "dropped": p.dropped}
        for p in placements
    ]  # fmt: skip
    if as_json:
        out.print_json(json.dumps(rows))
        return
    for r in rows:
        state = "resident" if r["resident"] else "dropped" if r["dropped"] else "loading"
        out.print(f"{r['adapter']} {r['digest'][:12]} -> {r['executor']}: {state}")


@adapter_app.command("rm")
@_rpc_guard
def adapter_rm(ref: str, router: str = RouterOpt):
    """Delete one revision (tenant/name@rev) or every revision (tenant/name)."""
    with _client(router) as cl:
        resp = cl.delete_adapter(ref)
    for rev in resp.deleted:
        out.print(f"deleted {rev.ref}")
    for d in resp.deleted_digests:
        out.print(f"removed blob {d}")


def _labels(pairs: list[str]) -> dict[str, str]:
    labels = {}
    for kv in pairs:
        if "=" not in kv:
            _fail(f"--label {kv!r} must be key=value")
        k, v = kv.split("=", 1)
        labels[k] = v
    return labels


def _check_storage(storage: str) -> None:
    from mintmesh.packed import storage_format

    if storage:
        try:
            storage_format(storage)
        except ValueError as e:
            _fail(str(e))


def _print_revision(rev, as_json: bool, what: str = "") -> None:
    if as_json:
        out.print_json(json.dumps(_revision_dict(rev)))
    else:
        out.print(
            f"{what}{rev.ref}  digest {rev.digest[:16]}…  rank {rev.rank}  "
            f"{_enum_name(_common().StorageFormat, rev.storage_format) or '?'}  "
            f"{rev.size_bytes} bytes"
        )


@adapter_app.command("revisions")
@_rpc_guard
def adapter_revisions(
    name: str = typer.Argument(..., help="tenant/name"),
    label: str = typer.Option("", "--label", help="key=value or key"),
    state: str = typer.Option("", "--state", help="ready|deprecated"),
    router: str = RouterOpt,
    as_json: bool = typer.Option(False, "--json"),
):
    """Every revision of NAME with its state, format, provenance and evaluations; its aliases
    and gates."""
    states = {"": 0, "ready": 1, "deprecated": 2}
    if state not in states:
        _fail(f"--state {state!r} must be one of {sorted(s for s in states if s)}")
    with _client(router) as cl, console.status(f"listing revisions of {name}"):
        res = cl.revisions(name, label=label, state=states[state])
    gates = [
        {
            "alias": g.alias,
            "metric": g.metric,
            "threshold": g.threshold,
            "direction": _enum_name(_gate_enum(), g.direction),
        }
        for g in res.gates
    ]
    if as_json:
        out.print_json(
            json.dumps(
                {
                    "name": name,
                    "aliases": res.aliases,
                    "gates": gates,
                    "revisions": [_revision_dict(r) for r in res.revisions],
                }
            )
        )
        return
    by_rev: dict[int, list[str]] = {}
    for a, r in res.aliases.items():
        by_rev.setdefault(r, []).append(a)
    t = Table(
        "rev", "aliases", "state", "format", "rank", "bytes", "source", "evaluations", "digest"
    )
    for r in res.revisions:
        evals = ", ".join(f"{e.metric}={e.value:g}" for e in r.evaluations)
        t.add_row(
            str(r.revision),
            ",".join(sorted(by_rev.get(r.revision, []))),
            _enum_name(_common().RevisionState, r.state),
            _enum_name(_common().StorageFormat, r.storage_format),
            str(r.rank),
            str(r.size_bytes),
            _enum_name(_common().RevisionSource, r.provenance.source),
            evals,
            r.digest[:12],
        )
    out.print(t)
    for g in gates:
        op = ">=" if g["direction"] == "at_least" else "<="
        out.print(f"gate: {g['alias']} needs {g['metric']} {op} {g['threshold']:g}")


def _gate_enum():
    from mintmesh.v1 import store_pb2

    return store_pb2.GateDirection


def _parse_gate(text: str) -> tuple[str, str, float]:
    """'accuracy>=0.9' -> (metric, direction, threshold)."""
    for op, direction in ((">=", "at_least"), ("<=", "at_most")):
        if op in text:
            metric, _, thr = text.partition(op)
            try:
                return metric.strip(), direction, float(thr)
            except ValueError:
                break
    _fail(f"--gate {text!r} must look like 'metric>=0.9' or 'metric<=1.5'")
    raise AssertionError("unreachable")


@adapter_app.command("alias")
@_rpc_guard
def adapter_alias(
    name: str = typer.Argument(..., help="tenant/name"),
    alias: str = typer.Argument("", help="Alias to set, delete or gate."),
    revision: int = typer.Argument(0, help="Revision to point ALIAS at."),
    delete: bool = typer.Option(False, "--delete", help="Delete ALIAS."),
    gate: str = typer.Option("", "--gate", help="Require an evaluation, e.g. 'accuracy>=0.9'."),
    clear_gate: bool = typer.Option(False, "--clear-gate", help="Remove ALIAS's gate."),
    router: str = RouterOpt,
    as_json: bool = typer.Option(False, "--json"),
):
    """Show NAME's aliases, point ALIAS at REVISION (atomically), delete it, or gate it."""
    with _client(router) as cl:
        if not alias:
            res = cl.revisions(name, page_size=1)
            if as_json:
                out.print_json(json.dumps(res.aliases))
            else:
                for a, r in sorted(res.aliases.items()):
                    out.print(f"{name}@{a} -> @{r}")
            return
        if gate or clear_gate:
            if clear_gate:
                cl.set_gate(name, alias, clear=True)
                out.print(f"{name}@{alias}: gate removed")
            else:
                metric, direction, thr = _parse_gate(gate)
                cl.set_gate(name, alias, metric, thr, direction)
                out.print(f"{name}@{alias}: needs {gate}")
            if not revision and not delete:
                return
        if delete:
            rev = cl.delete_alias(name, alias)
            out.print(f"deleted {name}@{alias} (it pointed at @{rev})")
            return
        if not revision:
            _fail("give a REVISION to point the alias at (or --delete / --gate)")
        resp = cl.set_alias(name, alias, revision)
    _print_alias(name, alias, resp, as_json)


def _print_alias(name: str, alias: str, resp, as_json: bool) -> None:
    if as_json:
        out.print_json(
            json.dumps(
                {
                    "alias": f"{name}@{alias}",
                    "revision": _revision_dict(resp.revision),
                    "previous_revision": resp.previous_revision,
                }
            )
        )
        return
    was = f" (was @{resp.previous_revision})" if resp.previous_revision else ""
    out.print(f"{name}@{alias} -> {resp.revision.ref}{was}")


@adapter_app.command("promote")
@_rpc_guard
def adapter_promote(
    ref: str = typer.Argument(..., help="tenant/name@rev to promote"),
    alias: str = typer.Option("prod", "--alias", help="Alias to point at it."),
    to: str = typer.Option("", "--to", hidden=True, help="The same as --alias (older form)."),
    router: str = RouterOpt,
    as_json: bool = typer.Option(False, "--json"),
):
    """Point an alias (default prod) at REF; a gated alias needs a passing evaluation."""
    from mintmesh.errors import MintError
    from mintmesh.identity import parse_ref

    try:
        parsed = parse_ref(ref)
    except MintError as e:
        _fail(e.message)
    if to and alias not in ("prod", to):
        _fail(f"--alias {alias!r} and --to {to!r} name different aliases; give one", USAGE)
    alias = to or alias
    with _client(router) as cl:
        rev = parsed.revision or cl.resolve(ref).revision
        resp = cl.set_alias(parsed.full_name, alias, rev)
    _print_alias(parsed.full_name, alias, resp, as_json)


@adapter_app.command("rollback")
@_rpc_guard
def adapter_rollback(
    name: str = typer.Argument(..., help="tenant/name"),
    alias: str = typer.Option("prod", "--alias", help="Alias to roll back."),
    to: int = typer.Option(0, "--to", help="Earlier revision (default: the previous one)."),
    router: str = RouterOpt,
    as_json: bool = typer.Option(False, "--json"),
):
    """Re-point ALIAS to an earlier revision: the one it pointed at before, or --to REV."""
    with _client(router) as cl:
        resp = cl.rollback(name, alias, to)
    _print_alias(name, alias, resp, as_json)


@adapter_app.command("merge")
@_rpc_guard
def adapter_merge(
    sources: list[str] = typer.Argument(..., help="REF[:WEIGHT] (weight default 1)"),
    name: str = typer.Option(..., "--name", help="tenant/name of the merged revision"),
    storage: str = typer.Option("", "--storage", help="fp32|bf16|fp16|int8 (default fp32)"),
    label: list[str] = typer.Option([], "--label", help="key=value (repeat)"),
    router: str = RouterOpt,
    as_json: bool = typer.Option(False, "--json"),
):
    """A new revision of NAME: the exact weighted sum of the sources' deltas (rank = sum)."""
    pairs = []
    for src in sources:
        ref, w = src.rsplit(":", 1) if ":" in src else (src, "1")
        try:
            pairs.append((ref, float(w)))
        except ValueError:
            _fail(f"merge source {src!r} must be REF or REF:WEIGHT")
    _check_storage(storage)
    with _client(router, timeout=600) as cl, console.status(f"merging {len(pairs)} revisions"):
        rev = cl.merge(name, pairs, storage_format=storage, labels=_labels(label))
    _print_revision(rev, as_json, "merged into ")


@adapter_app.command("eval")
@_rpc_guard
def adapter_eval(
    ref: str = typer.Argument(..., help="tenant/name@rev"),
    evaluations: list[str] = typer.Argument(
        None, metavar="METRIC=VALUE", help="One or more, e.g. accuracy=0.91", show_default=False
    ),
    data: Path = typer.Option(
        None,
        "--data",
        metavar="FILE.jsonl",
        help='Measure on the cluster instead: one {"prompt": ..., "completion": ...} per line; '
        "records nll_per_token, perplexity and exact_match with the file's sha256.",
    ),
    concurrency: int = typer.Option(4, "--concurrency", min=1, help="Examples in flight."),
    metric: str = typer.Option("", "--metric", hidden=True, help="Older form: with --value."),
    value: float = typer.Option(None, "--value", hidden=True),
    evaluator: str = typer.Option(
        "", "--evaluator", help="Who or what measured it (--data: 'mint adapter eval')."
    ),
    router: str = RouterOpt,
    as_json: bool = typer.Option(False, "--json"),
):
    """Record evaluations (METRIC=VALUE, e.g. accuracy=0.91) of one revision, or measure them
    with --data: per-token NLL and perplexity of each completion (Router.Score) and greedy exact
    match (Router.Generate), computed by the executors."""
    pairs = [_metric_value(e) for e in evaluations or []]
    if metric or value is not None:
        if not metric or value is None:
            _fail("--metric and --value go together (or give METRIC=VALUE)", USAGE)
        pairs.append((metric, value))
    if data is not None:
        if pairs:
            _fail(f"give METRIC=VALUE or --data {data}, not both", USAGE)
        _eval_measured(ref, data, concurrency, evaluator, router, as_json)
        return
    if not pairs:
        _fail(
            f"give at least one METRIC=VALUE to record for {ref}, e.g. accuracy=0.91 "
            "(or --data FILE.jsonl to measure)",
            USAGE,
        )
    with _client(router) as cl:
        for m, v in pairs:
            rev = cl.add_evaluation(ref, m, v, evaluator)
            if not as_json:
                out.print(f"{rev.ref}: {m} = {v:g} ({len(rev.evaluations)} evaluation(s))")
    if as_json:
        out.print_json(json.dumps(_revision_dict(rev)))


def _eval_measured(
    ref: str, data: Path, concurrency: int, evaluator: str, router: str | None, as_json: bool
) -> None:
    """`mint adapter eval REF --data FILE`: measure (mintmesh.evaluate), record, report."""
    import grpc
    from rich.progress import Progress

    from mintmesh import evaluate as ev
    from mintmesh.errors import MintError
    from mintmesh.identity import parse_ref

    try:
        parse_ref(ref)
    except MintError as e:
        _fail(e.message, USAGE)
    try:
        dataset = ev.read_dataset(data)
    except ev.DatasetError as e:
        _fail(str(e))
    evaluator = evaluator or ev.DEFAULT_EVALUATOR
    n = len(dataset.examples)
    with _client(router, timeout=600) as cl:
        try:
            with Progress(
                console=console, transient=True, disable=not console.is_terminal
            ) as progress:
                task = progress.add_task(f"evaluating {ref} on {n} examples", total=n)
                res = ev.evaluate(
                    cl,
                    ref,
                    dataset,
                    concurrency=concurrency,
                    on_example=lambda _: progress.advance(task),
                )
            rev = ev.record(cl, res, evaluator)
        except ev.EvalError as e:
            _fail(f"cannot evaluate {ref}: {e}")
        except grpc.RpcError as err:
            _fail(f"cannot evaluate {ref}: {err.code().name}: {err.details()}")
    metrics = res.metrics()
    if as_json:
        row = {
            "ref": rev.ref,
            "digest": rev.digest,
            "data": str(data),
            "dataset_digest": dataset.sha256,
            "examples": n,
            "completion_tokens": res.completion_tokens,
            "evaluator": evaluator,
            "metrics": metrics,
        }
        print(json.dumps(row))
        return
    out.print(
        f"{rev.ref} on {data} ({n} examples, {res.completion_tokens} completion tokens, "
        f"sha256 {dataset.sha256[:12]}…)",
        highlight=False,
    )
    t = Table("metric", "value")
    t.add_row("nll_per_token", f"{metrics['nll_per_token']:.6g}")
    t.add_row("perplexity", f"{metrics['perplexity']:.6g}")
    matched = sum(e.exact_match for e in res.examples)
    t.add_row("exact_match", f"{metrics['exact_match']:.6g} ({matched}/{n})")
    out.print(t)
    out.print(f"recorded as evaluations of {rev.ref} by {evaluator!r}", highlight=False)


def _metric_value(text: str) -> tuple[str, float]:
    """'accuracy=0.91' -> ("accuracy", 0.91)."""
    import math

    metric, sep, val = text.partition("=")
    try:
        value = float(val)
    except ValueError:
        value = math.nan
    if not sep or not metric.strip() or not math.isfinite(value):
        _fail(
            f"evaluation {text!r} must be METRIC=VALUE with a finite number: accuracy=0.91", USAGE
        )
    return metric.strip(), value


@adapter_app.command("train")
@_rpc_guard
def adapter_train(
    data: Path = typer.Option(
        ..., "--data", metavar="FILE.jsonl", help='One {"prompt": ..., "completion": ...} per line.'
    ),
    name: str = typer.Option(..., "--name", help="TENANT/NAME: the revision it saves as."),
    base: bool = typer.Option(True, "--base", help="Start from the base model (a fresh LoRA)."),
    from_ref: str = typer.Option(
        "",
        "--from",
        metavar="REF",
        help="Start from this revision instead (its rank, alpha and targets; its optimizer "
        "state too when it was saved with one).",
    ),
    rank: int = typer.Option(8, "--rank", min=1),
    alpha: float = typer.Option(None, "--alpha", help="LoRA alpha (default 2 x rank)."),
    targets: str = typer.Option("q_proj,k_proj,v_proj,o_proj", "--targets"),
    steps: int = typer.Option(50, "--steps", min=1),
    lr: float = typer.Option(1e-3, "--lr", help="AdamW learning rate."),
    batch: int = typer.Option(8, "--batch", min=1, help="Examples per step."),
    seed: int = typer.Option(0, "--seed"),
    router: str = RouterOpt,
    as_json: bool = typer.Option(False, "--json"),
):
    """Fine-tune a LoRA on the cluster (the resident backbone trains it, no copy of the base)
    from prompt/completion pairs, and save it as a new revision of NAME (provenance training)."""
    import math

    import grpc
    from rich.progress import BarColumn, Progress, TextColumn

    from mintmesh import evaluate as ev
    from mintmesh import train as tr
    from mintmesh.errors import MintError
    from mintmesh.identity import parse_name

    try:
        parse_name(name)
    except MintError as e:
        _fail(e.message, USAGE)
    if not math.isfinite(lr) or lr <= 0:
        _fail(f"--lr {lr} must be a number > 0", USAGE)
    try:
        dataset = ev.read_dataset(data)
    except ev.DatasetError as e:
        _fail(str(e))
    mods = tuple(t.strip() for t in targets.split(",") if t.strip())
    with _client(router, timeout=600) as cl:
        cols = (
            TextColumn("training {task.description}"),
            BarColumn(),
            TextColumn("step {task.completed}/{task.total}  loss {task.fields[loss]}"),
        )
        try:
            with Progress(*cols, console=console, transient=True,
                          disable=not console.is_terminal) as progress:  # fmt: skip
                task = progress.add_task(name, total=steps, loss="-")

                def step(k: int, loss: float) -> None:
                    progress.update(task, completed=k, loss=f"{loss:.4f}")

                res = tr.train(
                    cl, dataset, name, rank=rank, alpha=alpha, targets=mods, steps=steps,
                    lr=lr, batch=batch, seed=seed, on_step=step, from_ref=from_ref,
                )  # fmt: skip
        except ev.EvalError as e:
            _fail(f"cannot train {name}: {e}")
        except grpc.RpcError as err:
            _fail(f"cannot train {name}: {err.code().name}: {err.details()}")
    if as_json:
        print(json.dumps({"ref": res.ref, "digest": res.digest, "run_id": res.run_id,
                          "steps": res.steps, "parent": res.parent, "first_loss": res.losses[0],
                          "last_loss": res.losses[-1], "data_digest": dataset.sha256}))  # fmt: skip
        return
    out.print(
        f"{res.ref}: {res.steps} steps, loss per completion token {res.losses[0]:.4f} -> "
        f"{res.losses[-1]:.4f} (digest {res.digest[:12]}…)",
        highlight=False,
    )


@adapter_app.command("deprecate")
@_rpc_guard
def adapter_deprecate(
    ref: str = typer.Argument(..., help="tenant/name@rev"),
    undo: bool = typer.Option(False, "--undo", help="Make it ready again."),
    router: str = RouterOpt,
):
    """Mark a revision deprecated (still resolvable by number; no alias may point at it)."""
    with _client(router) as cl:
        rev = cl.deprecate(ref, undo=undo)
    out.print(f"{rev.ref}: {_enum_name(_common().RevisionState, rev.state)}")


# -- tenants ---------------------------------------------------------------------------------


@tenant_app.command("create")
@_rpc_guard
def tenant_create(
    tenant: str = typer.Argument(...),
    router: str = RouterOpt,
    as_json: bool = typer.Option(False, "--json"),
):
    """Create a tenant (admin key needed) and print its first API key (shown only once)."""
    with _client(router) as cl:
        resp = cl.create_tenant(tenant)
    if as_json:
        print(json.dumps({"tenant": resp.tenant, "api_key": resp.api_key, "key_id": resp.key_id}))
    else:
        console.print(f"created tenant {resp.tenant}; its API key (shown once):")
        print(resp.api_key)


@tenant_app.command("list")
@_rpc_guard
def tenant_list(router: str = RouterOpt, as_json: bool = typer.Option(False, "--json")):
    """Tenants (an admin sees all, a tenant itself)."""
    with _client(router) as cl, console.status("listing tenants"):
        items = list(cl.list_tenants())
    if as_json:
        out.print_json(
            json.dumps(
                [
                    {
                        "tenant": t.tenant,
                        "created_at_unix_ms": t.created_at_unix_ms,
                        "key_count": t.key_count,
                    }
                    for t in items
                ]
            )
        )
        return
    t = Table("tenant", "keys", "created (unix ms)")
    for x in items:
        t.add_row(x.tenant, str(x.key_count), str(x.created_at_unix_ms))
    out.print(t)


@tenant_app.command("key")
@_rpc_guard
def tenant_key(
    tenant: str = typer.Argument("", help="Tenant (omit with --admin)."),
    admin: bool = typer.Option(False, "--admin", help="An operator key (admin only)."),
    router: str = RouterOpt,
):
    """Issue another API key for TENANT (or an admin key) and print it (shown only once)."""
    if not tenant and not admin:
        _fail("give a TENANT or --admin")
    with _client(router) as cl:
        resp = cl.create_api_key(tenant, admin=admin)
    console.print(f"key {resp.key_id} for {'admin' if admin else resp.tenant} (shown once):")
    print(resp.api_key)


@tenant_app.command("revoke")
@_rpc_guard
def tenant_revoke(key_id: str = typer.Argument(...), router: str = RouterOpt):
    """Revoke an API key by its id (the 12 hex characters after 'mint_')."""
    with _client(router) as cl:
        cl.revoke_api_key(key_id)
    out.print(f"revoked {key_id}")


@tenant_app.command("whoami")
@_rpc_guard
def tenant_whoami(router: str = RouterOpt):
    """Who MINT_API_KEY stands for."""
    with _client(router) as cl:
        who = cl.authenticate()
    out.print("admin" if who.is_admin else f"tenant {who.tenant}")


# -- generation ------------------------------------------------------------------------------


@app.command()
@_rpc_guard
def generate(
    prompt: str = typer.Argument(...),
    adapter: str = typer.Option("", "--adapter", help="tenant/name\\[@rev]; none = base model"),
    max_tokens: int = typer.Option(64, "--max-tokens"),
    temperature: float = typer.Option(0.0, "--temperature"),
    top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(0, "--top-k"),
    seed: int = typer.Option(None, "--seed"),
    as_json: bool = typer.Option(False, "--json", help="Last line: one JSON object."),
    router: str = RouterOpt,
):
    """Generate through the router, streaming tokens as they come."""
    from mintmesh.client import GenerateResult, sampling_params
    from mintmesh.v1 import common_pb2

    sp = sampling_params(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed
    )
    res = GenerateResult("", [], "", "", "", "")
    with _client(router, timeout=600) as cl:
        for ch in cl.generate_stream(prompt, adapter=adapter, sampling=sp):
            if ch.HasField("adapter") and ch.adapter.digest:
                res.adapter, res.digest = ch.adapter.ref, ch.adapter.digest
            res.executor = ch.executor or res.executor
            res.token_ids.extend(ch.token_ids)
            res.text += ch.text
            if not as_json:
                sys.stdout.write(ch.text)
                sys.stdout.flush()
            if ch.finish_reason:
                res.finish_reason = (
                    common_pb2.FinishReason.Name(ch.finish_reason)
                    .removeprefix("FINISH_REASON_")
                    .lower()
                )
            if ch.HasField("usage"):
                res.prompt_tokens = ch.usage.prompt_tokens
                res.completion_tokens = ch.usage.completion_tokens
    if as_json:
        print(json.dumps(res.to_json()))
    else:
        sys.stdout.write("\n")
        sys.stdout.flush()
        who = f"{res.adapter} (digest {res.digest[:16]})" if res.adapter else "the base model"
        console.print(
            f"{who} on {res.executor or '?'}: {res.completion_tokens} tokens, "
            f"{res.finish_reason or '?'}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )


# -- demo and benchmarks ---------------------------------------------------------------------


@app.command()
def demo(
    adapters: int = typer.Option(1000, "--adapters", help="How many adapters to push."),
    executors: int = typer.Option(2, "--executors", min=1),
    data: Path = typer.Option(None, "--data", help="State dir (default: a temporary one)."),
    as_json: bool = typer.Option(
        False, "--json", help="End with one JSON line: what was pushed, generated and by whom."
    ),
):
    """A local cluster on the tiny backbone, 1,000 pushed adapters, a mixed batch of
    generations through the router, a summary, clean shutdown."""
    from mintmesh.demo import run_demo

    logging.basicConfig(level=logging.WARNING)
    raise typer.Exit(run_demo(adapters=adapters, executors=executors, data=data, as_json=as_json))


@app.command(context_settings=PASS_THROUGH)
def bench(ctx: typer.Context, name: str = typer.Argument(..., help="e.g. kernels")):
    """Run a benchmark; with --json its last line is one JSON object."""
    mod_name = "mintmesh.bench." + name.replace("-", "_")
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name != mod_name:
            raise
        import pkgutil

        import mintmesh.bench as b

        names = sorted(
            m.name.replace("_", "-")
            for m in pkgutil.iter_modules(b.__path__)
            if m.name not in ("gpu_check", "common")
        )
        _fail(f"unknown benchmark {name!r}; available: {', '.join(names) or 'none'}")
    raise typer.Exit(mod.main(list(ctx.args)) or 0)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
