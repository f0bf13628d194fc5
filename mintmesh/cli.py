"""`mint`: the MinT mesh command line.

    mint model init [--preset tiny|small] [DIR]
    mint up [--executors N] [--model DIR] [--data DIR] [--port P]
    mint serve store|cache|executor|router [FLAGS...]
    mint adapter push DIR --name TENANT/NAME | list [TENANT] | show REF | rm REF
    mint generate [--adapter REF] [--max-tokens N] [--temperature T] [--top-p P] [--json] PROMPT
    mint status
    mint demo
    mint bench NAME [--json] [ARGS...]

Every command that talks to a cluster takes --router ADDR (default: env MINT_ROUTER, else
127.0.0.1:50051).
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

app = typer.Typer(help="MinT mesh: millions of personal LoRA models on one shared backbone.",
                  no_args_is_help=True, add_completion=False)
model_app = typer.Typer(help="The backbone.", no_args_is_help=True)
adapter_app = typer.Typer(help="Adapters in the store.", no_args_is_help=True)
app.add_typer(model_app, name="model")
app.add_typer(adapter_app, name="adapter")

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
}


def _router(addr: str | None) -> str:
    return addr or os.environ.get("MINT_ROUTER") or DEFAULT_ROUTER


def _client(addr: str | None, timeout: float = 60.0):
    from mintmesh.client import MintClient

    return MintClient(_router(addr), timeout=timeout)


def _fail(msg: str, code: int = 1):
    console.print(f"[red]error:[/red] {msg}")
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
    }


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
    executors: int = typer.Option(2, "--executors", min=1, help="executor+sidecar pairs"),
    model: Path = typer.Option(None, "--model", help="Backbone dir (default: DATA/model, tiny)."),
    data: Path = typer.Option(Path("data"), "--data", help="State directory."),
    port: int = typer.Option(50051, "--port", help="Router port (0 = any free port)."),
    otlp_endpoint: str = typer.Option(
        "", "--otlp-endpoint", envvar="MINT_OTLP_ENDPOINT", help="Export traces via OTLP/gRPC."
    ),
):
    """Start a local cluster (store, router, N executor+sidecar pairs) until Ctrl-C/SIGTERM."""
    import signal
    import threading

    from mintmesh.cluster import ClusterConfig, ClusterError, LocalCluster

    logging.basicConfig(level=logging.INFO)
    model_dir = _ensure_model(model, data)
    cluster = LocalCluster(
        ClusterConfig(model_dir=model_dir, data_dir=data.resolve(), executors=executors,
                      port=port, otlp_endpoint=otlp_endpoint)
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
    sys.stdout.flush()
    try:
        while not stop.wait(0.5):
            dead = [c.name for c in cluster.children.values() if not c.alive]
            if dead:
                console.print(f"[red]{', '.join(dead)} exited[/red]; stopping the cluster")
                break
    finally:
        cluster.stop()
        out.print("cluster stopped")


def _ensure_model(model: Path | None, data: Path) -> Path:
    from mintmesh.model import init_model

    if model is not None:
        if not (model / "config.json").is_file():
            _fail(f"--model {model} has no config.json; build one with `mint model init`")
        return model.resolve()
    path = data / "model"
    if not (path / "config.json").is_file():
        with console.status("building the tiny backbone"):
            init_model("tiny", path)
    return path.resolve()


@app.command(context_settings=PASS_THROUGH)
def serve(
    ctx: typer.Context, service: str = typer.Argument(..., help="store|cache|executor|router")
):
    """Run one service in the foreground (the flags are the service's: try --help)."""
    if service not in SERVICES:
        _fail(f"unknown service {service!r}; choose one of {sorted(SERVICES)}")
    mod = importlib.import_module(SERVICES[service])
    raise typer.Exit(mod.main(list(ctx.args)) or 0)


@app.command()
@_rpc_guard
def status(router: str = RouterOpt, as_json: bool = typer.Option(False, "--json")):
    """The router's view: store health, executors, their residency."""
    with _client(router) as cl:
        st = cl.status()
    if as_json:
        from google.protobuf.json_format import MessageToDict

        out.print_json(json.dumps(MessageToDict(st)))
        return
    out.print(f"store {st.store_address}: {'healthy' if st.store_healthy else 'DOWN'}")
    t = Table("executor", "address", "healthy", "queue", "resident adapters")
    for e in st.executors:
        t.add_row(e.executor_id or "?", e.address, str(e.healthy), str(e.queue_depth),
                  str(len(e.resident_adapters)))
    out.print(t)


# -- adapters --------------------------------------------------------------------------------


@adapter_app.command("push")
@_rpc_guard
def adapter_push(
    directory: Path = typer.Argument(..., help="PEFT adapter directory."),
    name: str = typer.Option(..., "--name", help="tenant/name"),
    label: list[str] = typer.Option([], "--label", help="key=value (repeat)"),
    router: str = RouterOpt,
    as_json: bool = typer.Option(False, "--json"),
):
    """Upload a PEFT LoRA adapter as the next revision of NAME."""
    from mintmesh.errors import InvalidAdapter

    labels = {}
    for kv in label:
        if "=" not in kv:
            _fail(f"--label {kv!r} must be key=value")
        k, v = kv.split("=", 1)
        labels[k] = v
    try:
        with _client(router) as cl, console.status(f"pushing {directory}"):
            rev = cl.push_adapter(directory, name, labels=labels)
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
        out.print_json(json.dumps([
            {"name": f"{a.tenant}/{a.name}", "revisions": a.revision_count,
             "latest": _revision_dict(a.latest)} for a in items
        ]))
        return
    t = Table("adapter", "revisions", "latest", "rank", "targets", "digest")
    for a in items:
        t.add_row(f"{a.tenant}/{a.name}", str(a.revision_count), a.latest.ref,
                  str(a.latest.rank), ",".join(a.latest.target_modules), a.latest.digest[:12])
    out.print(t)


@adapter_app.command("show")
@_rpc_guard
def adapter_show(ref: str, router: str = RouterOpt):
    """Resolve REF and print its revision record as JSON."""
    with _client(router) as cl:
        rev = cl.resolve(ref)
    out.print_json(json.dumps(_revision_dict(rev)))


@adapter_app.command("rm")
@_rpc_guard
def adapter_rm(ref: str, router: str = RouterOpt):
    """Delete one revision (tenant/name@rev) or every revision (tenant/name)."""
    with _client(router) as cl:
        deleted = cl.delete(ref)
    for rev in deleted:
        out.print(f"deleted {rev.ref}")


# -- generation ------------------------------------------------------------------------------


@app.command()
@_rpc_guard
def generate(
    prompt: str = typer.Argument(...),
    adapter: str = typer.Option("", "--adapter", help="tenant/name[@rev]; none = base model"),
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

    sp = sampling_params(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                         top_k=top_k, seed=seed)
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
                res.finish_reason = common_pb2.FinishReason.Name(ch.finish_reason).removeprefix(
                    "FINISH_REASON_").lower()
            if ch.HasField("usage"):
                res.prompt_tokens = ch.usage.prompt_tokens
                res.completion_tokens = ch.usage.completion_tokens
    if as_json:
        print(json.dumps(res.to_json()))
    else:
        sys.stdout.write("\n")


# -- demo and benchmarks ---------------------------------------------------------------------


@app.command()
def demo(
    adapters: int = typer.Option(1000, "--adapters", help="How many adapters to push."),
    executors: int = typer.Option(2, "--executors", min=1),
    data: Path = typer.Option(None, "--data", help="State dir (default: a temporary one)."),
):
    """A local cluster on the tiny backbone, 1,000 pushed adapters, a mixed batch of
    generations through the router, a summary, clean shutdown."""
    from mintmesh.demo import run_demo

    logging.basicConfig(level=logging.WARNING)
    raise typer.Exit(run_demo(adapters=adapters, executors=executors, data=data))


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

        names = sorted(m.name.replace("_", "-") for m in pkgutil.iter_modules(b.__path__)
                       if m.name != "gpu_check")
        _fail(f"unknown benchmark {name!r}; available: {', '.join(names) or 'none'}")
    raise typer.Exit(mod.main(list(ctx.args)) or 0)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
