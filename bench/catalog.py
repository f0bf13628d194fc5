"""Catalog at scale: push N rank-1 adapters through the real push path, then resolve.

    mint bench catalog [--adapters 1000000] [--workers 1] [--group-size 256] [--json]

On the tiny backbone (mintmesh.model.init_model("tiny")): a store and a router run in this
process (create_server, ports picked freely); worker processes build N distinct rank-1 PEFT
adapters (q_proj and v_proj of every layer, seeded random weights) and stream them to the
store's PushAdapters RPC, which validates each like a single push and commits them in groups
(one blob sync and one catalog transaction per group). Then:

- resolve latency in-process: StoreCore.resolve on random refs ("t/n", "t/n@1", "t/n@latest"),
  no RPC;
- resolve latency over gRPC through the router (the router proxies AdapterStore calls to the
  store; it needs no executors for resolves).

Metrics: adapters, ingest_per_s, resolve_p50_us, resolve_p99_us, resolve_rpc_p50_us,
resolve_rpc_p99_us, catalog_bytes_per_adapter (LMDB pages in use / N), blob_bytes_per_adapter
(stored bytes / N; blob_disk_bytes_per_adapter counts filesystem blocks), wall_s. The last line
of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)

TARGETS = ("q_proj", "v_proj")
CONFIG_JSON = json.dumps(
    {"peft_type": "LORA", "r": 1, "lora_alpha": 2.0, "target_modules": list(TARGETS)}
)
CHUNK = 64 * 1024


def adapter_name(i: int, tenants: int) -> str:
    return f"t{i % tenants:04d}/a{i:07d}"


def make_weights(i: int, shapes: list[tuple[str, int, int]], seed: int) -> bytes:
    """A distinct rank-1 PEFT safetensors file for adapter i."""
    import numpy as np
    from safetensors.numpy import save

    rng = np.random.default_rng([seed, i])
    tensors = {}
    for mod, out_f, in_f in shapes:
        key = f"base_model.model.{mod}"
        tensors[f"{key}.lora_A.weight"] = rng.standard_normal(
            (1, in_f), dtype=np.float32
        ) / np.float32(in_f**0.5)
        tensors[f"{key}.lora_B.weight"] = rng.standard_normal((out_f, 1), dtype=np.float32)
    return save(tensors)


def _push_worker(
    address: str,
    start: int,
    stop: int,
    step: int,
    tenants: int,
    shapes: list[tuple[str, int, int]],
    seed: int,
    progress: mp.Queue,
) -> None:
    """Stream adapters start, start+step, ... < stop to PushAdapters (whole, several to a
    message of <= 64 KiB); report (ok, errors, first error) increments on the progress queue
    after each committed group, then None."""
    import hashlib

    import grpc

    from mintmesh.v1 import store_pb2, store_pb2_grpc

    def requests():
        batch: list = []
        size = 0
        for i in range(start, stop, step):
            w = make_weights(i, shapes, seed)
            if batch and size + len(w) > CHUNK:
                yield store_pb2.PushAdaptersRequest(inline=store_pb2.InlineAdapters(adapters=batch))
                batch, size = [], 0
            header = store_pb2.PushHeader(
                name=adapter_name(i, tenants),
                adapter_config_json=CONFIG_JSON,
                sha256=hashlib.sha256(w).hexdigest(),
                size_bytes=len(w),
            )
            batch.append(store_pb2.InlineAdapter(header=header, data=w))
            size += len(w)
        if batch:
            yield store_pb2.PushAdaptersRequest(inline=store_pb2.InlineAdapters(adapters=batch))

    ok = errors = 0
    first_error = ""
    with grpc.insecure_channel(address) as ch:
        stub = store_pb2_grpc.AdapterStoreStub(ch)
        for resp in stub.PushAdapters(requests(), timeout=24 * 3600):
            for r in resp.results:
                if r.HasField("error"):
                    errors += 1
                    first_error = first_error or f"{r.error.code}: {r.error.message}"
                else:
                    ok += 1
            progress.put((ok, errors, first_error))
            ok = errors = 0
    progress.put((ok, errors, first_error))
    progress.put(None)


def _percentiles(samples_ns: list[int]) -> tuple[float, float]:
    s = sorted(samples_ns)
    p50 = s[len(s) // 2]
    p99 = s[min(len(s) - 1, int(len(s) * 0.99))]
    return p50 / 1e3, p99 / 1e3


def _refs(n: int, tenants: int, count: int, rng: random.Random) -> list[str]:
    forms = ("", "@1", "@latest")
    return [adapter_name(rng.randrange(n), tenants) + rng.choice(forms) for _ in range(count)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mint bench catalog", description=__doc__.split("\n")[0])
    p.add_argument("--adapters", type=int, default=1_000_000)
    p.add_argument("--tenants", type=int, default=1000)
    p.add_argument("--workers", type=int, default=1, help="pushing processes (streams)")
    p.add_argument("--group-size", type=int, default=512, help="pushes per group commit")
    p.add_argument("--samples", type=int, default=20000, help="in-process resolves timed")
    p.add_argument("--rpc-samples", type=int, default=2000, help="resolves timed via the router")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", type=Path, help="keep the store here (default: a temp dir)")
    p.add_argument("--model-dir", type=Path, help="tiny backbone (default: built in data dir)")
    p.add_argument("--json", action="store_true", help="last stdout line: one JSON object")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.adapters < 1:
        raise SystemExit(f"--adapters {args.adapters} must be >= 1")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    t_start = time.perf_counter()
    tmp = None
    root = args.data_dir
    if root is None:
        tmp = tempfile.mkdtemp(prefix="mint-bench-catalog-")
        root = Path(tmp)
    try:
        metrics = _run(args, root)
        metrics["wall_s"] = round(time.perf_counter() - t_start, 2)
        result = {
            "bench": "catalog",
            "device": "cpu",
            "params": {
                "adapters": args.adapters,
                "tenants": args.tenants,
                "workers": args.workers,
                "group_size": args.group_size,
                "samples": args.samples,
                "rpc_samples": args.rpc_samples,
                "rank": 1,
                "targets": list(TARGETS),
                "backbone": "tiny",
            },
            "metrics": metrics,
        }
        if not args.json:
            for k, v in metrics.items():
                print(f"{k:>28}: {v}")
        print(json.dumps(result), flush=True)
    finally:
        if tmp is not None:
            # Not timed: unlinking a million files takes long on some filesystems.
            shutil.rmtree(tmp, ignore_errors=True)
    return 0 if metrics["push_errors"] == 0 else 1


def _run(args, root: Path) -> dict:
    from mintmesh.client import MintClient
    from mintmesh.model import base_model_info, init_model
    from mintmesh.services.router.config import RouterConfig
    from mintmesh.services.router.server import create_server as create_router
    from mintmesh.services.store.config import StoreConfig
    from mintmesh.services.store.core import StoreCore
    from mintmesh.services.store.server import create_server as create_store

    model_dir = args.model_dir
    if model_dir is None:
        model_dir = root / "model"
        if not (model_dir / "config.json").is_file():
            init_model("tiny", model_dir)
    base = base_model_info(model_dir)
    shapes = sorted(
        (mod, out_f, in_f)
        for mod, (out_f, in_f) in base.linear_shapes.items()
        if mod.rsplit(".", 1)[-1] in TARGETS
    )
    cfg = StoreConfig(
        data_dir=root / "store",
        model_dir=model_dir,
        max_rank=16,
        push_group_size=args.group_size,
    )
    core = StoreCore(cfg, base=base)
    store = create_store(cfg, core=core)
    router, _ = create_router(
        RouterConfig(store_address=store.address, executors=(), port=0, health_interval_s=5.0)
    )
    try:
        n = args.adapters
        ingest_s, ok, errors, first_error = _ingest(args, store.address, shapes)
        if errors:
            logger.error("%d push(es) failed, e.g. %s", errors, first_error)

        rng = random.Random(args.seed)
        refs = _refs(n, args.tenants, args.samples, rng)
        for r in refs[:200]:  # warm up
            core.resolve(r)
        samples = []
        for r in refs:
            t0 = time.perf_counter_ns()
            core.resolve(r)
            samples.append(time.perf_counter_ns() - t0)
        p50, p99 = _percentiles(samples)

        rpc_refs = _refs(n, args.tenants, args.rpc_samples, rng)
        rpc_samples = []
        with MintClient(f"127.0.0.1:{router.port}", timeout=10.0) as cl:
            cl.wait_ready(10)
            for r in rpc_refs[:100]:
                cl.resolve(r)
            for r in rpc_refs:
                t0 = time.perf_counter_ns()
                cl.resolve(r)
                rpc_samples.append(time.perf_counter_ns() - t0)
        rp50, rp99 = _percentiles(rpc_samples)

        blobs, blob_bytes, blob_alloc = core.blobs.usage()
        return {
            "adapters": ok,
            "push_errors": errors,
            "ingest_s": round(ingest_s, 2),
            "ingest_per_s": round(ok / ingest_s, 1),
            "resolve_p50_us": round(p50, 1),
            "resolve_p99_us": round(p99, 1),
            "resolve_rpc_p50_us": round(rp50, 1),
            "resolve_rpc_p99_us": round(rp99, 1),
            "catalog_bytes_per_adapter": round(core.catalog.used_bytes() / max(ok, 1), 1),
            "blob_bytes_per_adapter": round(blob_bytes / max(ok, 1), 1),
            "blob_disk_bytes_per_adapter": round(blob_alloc / max(ok, 1), 1),
            "blobs": blobs,
        }
    finally:
        router.stop(0)
        store.stop(0)


def _ingest(args, address: str, shapes) -> tuple[float, int, int, str]:
    ctx = mp.get_context("spawn")
    progress: mp.Queue = ctx.Queue()
    w = max(1, args.workers)
    procs = [
        ctx.Process(
            target=_push_worker,
            args=(address, k, args.adapters, w, args.tenants, shapes, args.seed, progress),
            daemon=True,
        )
        for k in range(w)
    ]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    ok = errors = 0
    first_error = ""
    done = 0
    bar = _Progress(args.adapters)
    try:
        while done < w:
            item = progress.get()
            if item is None:
                done += 1
                continue
            ok += item[0]
            errors += item[1]
            first_error = first_error or item[2]
            bar.update(ok + errors)
    finally:
        bar.close()
        for p in procs:
            p.join(60)
    elapsed = time.perf_counter() - t0
    bad = [p.exitcode for p in procs if p.exitcode]
    if bad:
        raise RuntimeError(f"push worker(s) exited with {bad}")
    return elapsed, ok, errors, first_error


class _Progress:
    """A rich progress bar on a terminal, a log line every 10% otherwise."""

    def __init__(self, total: int):
        self.total = total
        self.t0 = time.perf_counter()
        self._next = 0.1
        self._bar = None
        if sys.stderr.isatty():
            from rich.progress import Progress

            self._bar = Progress(transient=True)
            self._bar.start()
            self._task = self._bar.add_task("pushing adapters", total=total)

    def update(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=n)
        elif n >= self._next * self.total:
            rate = n / max(time.perf_counter() - self.t0, 1e-9)
            sys.stderr.write(f"pushed {n}/{self.total} ({rate:.0f}/s)\n")
            sys.stderr.flush()
            while self._next * self.total <= n:
                self._next += 0.1

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


if __name__ == "__main__":
    sys.exit(main())
