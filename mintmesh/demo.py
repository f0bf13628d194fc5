"""`mint demo`: the whole path on one machine, in about a minute.

A local cluster (store, router, 2 executor+sidecar pairs) on the embedded tiny backbone;
1,000 adapters pushed through the router; a batch of generations with mixed adapters (and the
base) through the router; a summary; a clean shutdown.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

TARGET_SETS = (
    ("q_proj", "v_proj"),
    ("q_proj", "k_proj", "v_proj", "o_proj"),
    ("gate_proj", "up_proj", "down_proj"),
)
RANKS = (1, 2, 4, 8, 16)


def demo_adapter_name(i: int) -> str:
    return f"user{i % 100:03d}/persona-{i:05d}"


PROMPT = "Hello from MinT mesh!"
# Personal models: each user's adapter is trained on the cluster to answer the question with
# that user's own sentence.
QUESTION = "Who am I?"
PERSONAL = {
    "alice/me": " I am Alice.",
    "bob/me": " Bob here, hi!",
    "carol/me": " Carol, at home.",
}


def run_demo(
    adapters: int = 1000, executors: int = 2, data: Path | None = None, as_json: bool = False
) -> int:
    """Run the demo; as_json: its last line is one JSON object with what it did (the pushed and
    listed counts, each generation's adapter, digest, executor and token ids, each executor's
    health), for a test to check against an oracle."""
    from mintmesh.client import MintClient, sampling_params
    from mintmesh.cluster import ClusterConfig, LocalCluster
    from mintmesh.model import base_model_info, init_model
    from mintmesh.synth import synth_peft_bytes

    console = Console()
    own_tmp = data is None
    data_dir = Path(tempfile.mkdtemp(prefix="mint-demo-")) if own_tmp else Path(data)
    t_all = time.perf_counter()
    try:
        model_dir = data_dir / "model"
        if not (model_dir / "config.json").is_file():
            with console.status("building the tiny backbone"):
                init_model("tiny", model_dir)
        base = base_model_info(model_dir)
        cluster = LocalCluster(
            ClusterConfig(model_dir=model_dir, data_dir=data_dir, executors=executors, port=0)
        )
        with console.status(f"starting store, router, {executors} executor+sidecar pairs"):
            t0 = time.perf_counter()
            addr = cluster.start()
            start_s = time.perf_counter() - t0
        console.print(f"cluster up in {start_s:.1f}s; router on [bold]{addr}[/bold]")
        try:
            with MintClient(addr, timeout=60, api_key=cluster.admin_key) as cl:
                push_s = _push_all(console, cl, base, adapters, synth_peft_bytes)
                listed = sum(1 for _ in cl.list_adapters(page_size=500))
                rows, gen_s = _generate_mixed(cl, adapters, sampling_params)
                personal, train_s = _personal_models(console, cl, sampling_params)
                st = cl.status()
        finally:
            with console.status("stopping the cluster"):
                cluster.stop()
        ptable = Table(f"personal model: {QUESTION!r}", "answer (greedy)", "exact_match")
        for p in personal:
            ptable.add_row(p["adapter"], repr(p["text"]), f"{p['exact_match']:g}")
        console.print(ptable)
        table = Table("adapter", "executor", "tokens", "finish", "text (first 24 chars)")
        table.columns[0].no_wrap = True
        for r in rows:
            table.add_row(
                r.adapter or "(base model)",
                r.executor,
                str(len(r.token_ids)),
                r.finish_reason,
                repr(r.text[:24]),
            )
        console.print(table)
        tokens = sum(len(r.token_ids) for r in rows)
        summary = Table(title="summary", show_header=False)
        summary.add_row(
            "adapters pushed", f"{adapters} in {push_s:.1f}s ({adapters / max(push_s, 1e-9):.0f}/s)"
        )
        summary.add_row("adapters listed", str(listed))
        distinct = len({r.digest for r in rows if r.digest})
        summary.add_row(
            "generations",
            f"{len(rows)} requests, {distinct} distinct adapters "
            "(+ base), mixed in the executors' batches",
        )
        summary.add_row("tokens", f"{tokens} in {gen_s:.2f}s ({tokens / max(gen_s, 1e-9):.0f}/s)")
        summary.add_row(
            "personal models",
            f"{len(PERSONAL)} trained together on the cluster in {train_s:.1f}s, evaluated, "
            "promoted to @prod behind an exact_match gate",
        )
        for e in st.executors:
            summary.add_row(
                f"{e.executor_id} ({e.address})",
                f"{'healthy' if e.healthy else 'down'}, "
                f"{len(e.resident_adapters)} adapters resident",
            )
        summary.add_row("total", f"{time.perf_counter() - t_all:.1f}s, clean shutdown")
        console.print(summary)
        ok = listed == adapters and all(r.finish_reason for r in rows)
        ok = ok and all(p["text"] == p["sentence"] for p in personal if p["sentence"])
        if as_json:
            print(
                json.dumps(
                    {
                        "adapters_pushed": adapters,
                        "adapters_listed": listed,
                        "prompt": PROMPT,
                        "generations": [
                            {
                                "adapter": r.adapter,
                                "digest": r.digest,
                                "executor": r.executor,
                                "token_ids": list(r.token_ids),
                                "finish_reason": r.finish_reason,
                            }
                            for r in rows
                        ],
                        "executors": [
                            {
                                "id": e.executor_id,
                                "address": e.address,
                                "healthy": e.healthy,
                                "resident_adapters": len(e.resident_adapters),
                            }
                            for e in st.executors
                        ],
                        "personal": personal,
                        "clean_shutdown": True,
                        "ok": ok,
                    }
                )
            )
        return 0 if ok else 1
    finally:
        if own_tmp:
            shutil.rmtree(data_dir, ignore_errors=True)


def _push_all(console, cl, base, n: int, synth) -> float:
    cols = (TextColumn("pushing adapters"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())

    def push(i: int):
        cfg, weights = synth(
            base,
            rank=RANKS[i % len(RANKS)],
            targets=TARGET_SETS[i % len(TARGET_SETS)],
            seed=i,
            std=0.5,
        )
        return cl.push_adapter_bytes(demo_adapter_name(i), cfg, weights)

    t0 = time.perf_counter()
    with Progress(*cols, console=console) as prog, ThreadPoolExecutor(8) as pool:
        task = prog.add_task("push", total=n)
        for fut in as_completed([pool.submit(push, i) for i in range(n)]):
            fut.result()
            prog.advance(task)
    return time.perf_counter() - t0


def _generate_mixed(cl, n_adapters: int, sampling_params):
    picks = sorted({(i * 7919) % n_adapters for i in range(15)})
    refs = [demo_adapter_name(i) for i in picks] + [""]
    sp = sampling_params(max_tokens=24, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(refs)) as pool:
        futs = [pool.submit(cl.generate, PROMPT, adapter=r, sampling=sp) for r in refs]
        rows = [f.result() for f in futs]
    return rows, time.perf_counter() - t0


def _personal_models(console, cl, sampling_params) -> tuple[list[dict], float]:
    """Train PERSONAL's adapters at once (their runs share passes on the executors), measure
    each (mint adapter eval --data's metrics), promote it to @prod behind an exact_match gate,
    and ask each, and the base model, QUESTION greedily."""
    import hashlib
    import json
    from pathlib import Path

    import grpc

    from mintmesh import evaluate as ev
    from mintmesh import train as tr

    for name in PERSONAL:
        try:
            cl.create_tenant(name.split("/")[0])
        except grpc.RpcError as err:  # already there: a --data dir used again
            if err.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise

    def dataset(sentence: str) -> ev.Dataset:
        line = json.dumps({"prompt": QUESTION, "completion": sentence})
        ex = ev.Example(line=1, prompt=QUESTION, completion=sentence)
        return ev.Dataset(Path("<demo>"), hashlib.sha256(line.encode()).hexdigest(), (ex,))

    t0 = time.perf_counter()
    busy = console.status(f"training {len(PERSONAL)} personal adapters on the cluster")
    with busy, ThreadPoolExecutor(len(PERSONAL)) as pool:
        futs = {
            name: pool.submit(
                tr.train,
                cl,
                dataset(s),
                name,
                rank=16,
                targets=ALL_MODULES,
                steps=100,
                lr=1e-2,
                batch=1,
            )  # fmt: skip
            for name, s in PERSONAL.items()
        }
        trained = {name: f.result() for name, f in futs.items()}
    train_s = time.perf_counter() - t0
    out = []
    for name, sentence in PERSONAL.items():
        res = ev.evaluate(cl, trained[name].ref, dataset(sentence), concurrency=1)
        ev.record(cl, res)
        cl.set_gate(name, "prod", "exact_match", 0.9)
        cl.set_alias(name, "prod", int(trained[name].ref.rsplit("@", 1)[1]))
        n = res.completion_tokens
        text = cl.generate(QUESTION, adapter=f"{name}@prod",
                           sampling=sampling_params(max_tokens=n)).text  # fmt: skip
        out.append({"adapter": f"{name}@prod", "revision": trained[name].ref,
                    "sentence": sentence, "text": text,
                    "exact_match": res.metrics()["exact_match"],
                    "loss_first": trained[name].losses[0],
                    "loss_last": trained[name].losses[-1]})  # fmt: skip
    n = max(len(s) for s in PERSONAL.values())
    base = cl.generate(QUESTION, sampling=sampling_params(max_tokens=n)).text
    out.append({"adapter": "(base model)", "revision": "", "sentence": "", "text": base,
                "exact_match": 0.0, "loss_first": 0.0, "loss_last": 0.0})  # fmt: skip
    return out, train_s


ALL_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
