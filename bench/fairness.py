"""`mint bench fairness`: one tenant's lone request while another floods the cluster.

A local cluster (mintmesh.cluster.LocalCluster: store, one cache sidecar + executor, router; auth
and mutual TLS on) on the tiny backbone, so that every stream lands on the one executor. Tenant
A and tenant B each push an adapter. Measured: the time to first token (send to the first chunk
with tokens, through the router) of B's greedy request of --max-tokens tokens, the median of
--samples requests one after another, sent by this process while tenant A's streams come from a
child process of their own (A is another client: its 200 reader threads do not share B's
interpreter)

- idle: nothing else running;
- flood: while A holds --flood open streams of --flood-tokens tokens each, read as they come;
- unread: while A holds --unread streams it opened and never reads.

Repeats are paired and interleaved (idle, flood, unread, idle, ...); each ratio is the median
over repeats of (that round's TTFT / the same repeat's idle TTFT), with min and max.
flood_ttft_ratio target <= 3 (issue 14). The executor's own counters (fair-share preemptions,
paused streams) say which mechanism bounded it. The physical bound: B's TTFT cannot be lower
than one engine step carrying the full batch (reported as step_ms_under_flood, the executor's
mean step time during the flood).

The last stdout line is one JSON object {"bench": "fairness", "device", "params", "metrics",
"targets"}.
    python -m mintmesh.bench.fairness --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

from mintmesh.bench.common import ensure_model, progress


def _ttft(client, adapter: str, max_tokens: int) -> float:
    from mintmesh.client import sampling_params

    sp = sampling_params(max_tokens=max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    for ch in client.generate_stream("fair share", adapter=adapter, sampling=sp, timeout=120):
        if ch.token_ids:
            ttft = time.perf_counter() - t0
            break
    else:
        raise RuntimeError("B's request produced no token")
    return ttft


def _ttfts(client, adapter: str, max_tokens: int, samples: int) -> float:
    """The median TTFT of `samples` requests one after another (a single request's TTFT on
    a shared machine is mostly the scheduler's noise)."""
    out = []
    for _ in range(samples):
        out.append(_ttft(client, adapter, max_tokens))
        time.sleep(0.02)
    return statistics.median(out)


def _flood_child(address, key, adapter, n, tokens, read, opened, stop) -> None:
    """Tenant A's client, a process of its own (B's client does not share its interpreter):
    n streams through the router, each drained by a thread when read."""
    import grpc

    from mintmesh.client import sampling_params
    from mintmesh.v1 import router_pb2, router_pb2_grpc

    channel = grpc.insecure_channel(address)
    stub = router_pb2_grpc.RouterStub(channel)
    req = router_pb2.GenerateRequest(
        adapter=adapter,
        prompt="a flood of requests",
        sampling=sampling_params(max_tokens=tokens, ignore_eos=True),
    )
    md = [("authorization", f"Bearer {key}")]
    calls = [stub.Generate(req, timeout=600, metadata=md) for _ in range(n)]

    def drain(call) -> None:
        try:
            for _ in call:
                pass
        except Exception:  # noqa: BLE001 - cancelled at the end of the round
            pass

    threads = [threading.Thread(target=drain, args=(c,), daemon=True) for c in calls if read]
    for t in threads:
        t.start()
    opened.set()
    stop.wait(900)
    for c in calls:
        c.cancel()
    for t in threads:
        t.join(10)
    channel.close()


class Flood:
    """n streams of tenant A through the router, from a child process; read or never read."""

    def __init__(self, cluster, key: str, adapter: str, n: int, tokens: int, read: bool):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.opened, self.stop = ctx.Event(), ctx.Event()
        self.proc = ctx.Process(
            target=_flood_child,
            args=(cluster.router_address, key, adapter, n, tokens, read, self.opened, self.stop),
            daemon=True,
        )
        self.proc.start()
        if not self.opened.wait(120):
            self.close()
            raise RuntimeError("tenant A's flood process did not open its streams")

    def close(self) -> None:
        self.stop.set()
        self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(10)


def _executor_status(cluster):
    from mintmesh.v1 import executor_pb2, executor_pb2_grpc

    with cluster.mesh_channel(cluster.executor_addresses[0]) as ch:
        return executor_pb2_grpc.ExecutorStub(ch).Status(
            executor_pb2.ExecutorStatusRequest(), timeout=10
        )


def _wait_busy(cluster, want_running: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = _executor_status(cluster)
        if st.running >= want_running:
            return
        time.sleep(0.1)
    progress(f"fairness: the executor never ran {want_running} sequences at once")


def _wait_idle(cluster, timeout: float = 120.0) -> None:
    """Until the executor has let go of the last round's cancelled streams."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = _executor_status(cluster)
        if st.running == 0 and st.queue_depth == 0:
            return
        time.sleep(0.1)
    progress("fairness: the executor still holds streams of the last round")


def _ratio(xs: list[float], base: list[float]) -> dict:
    rs = [x / b for x, b in zip(xs, base, strict=True)]
    return {
        "median": round(statistics.median(rs), 3),
        "min": round(min(rs), 3),
        "max": round(max(rs), 3),
    }


def run(args) -> dict:
    from mintmesh.client import MintClient
    from mintmesh.cluster import ClusterConfig, LocalCluster
    from mintmesh.model import base_model_info
    from mintmesh.synth import synth_peft_bytes

    model_dir = ensure_model(args.preset, args.model_dir)
    info = base_model_info(model_dir)
    with tempfile.TemporaryDirectory(prefix="mint-fairness-") as tmp:
        cluster = LocalCluster(
            ClusterConfig(
                model_dir=model_dir,
                data_dir=Path(tmp),
                executors=1,
                port=0,
                http_port=None,
                max_batch_size=args.max_batch_size,
            )
        )
        progress("fairness: starting the cluster")
        cluster.start()
        try:
            with MintClient(cluster.router_address, timeout=60, api_key=cluster.admin_key) as adm:
                keys = {t: adm.create_tenant(t).api_key for t in ("fa", "fb")}
            for t, seed in (("fa", 1), ("fb", 2)):
                with MintClient(cluster.router_address, timeout=60, api_key=keys[t]) as cl:
                    cl.push_adapter_bytes(f"{t}/chat", *synth_peft_bytes(info, rank=8, seed=seed))
                    cl.prefetch(f"{t}/chat")
            b = MintClient(cluster.router_address, timeout=120, api_key=keys["fb"])
            _ttft(b, "fb/chat", args.max_tokens)  # warm
            idle, flood, unread, steps = [], [], [], []
            before = _executor_status(cluster)
            for rep in range(args.repeats):
                idle.append(_ttfts(b, "fb/chat", args.max_tokens, args.samples))
                f = Flood(cluster, keys["fa"], "fa/chat", args.flood, args.flood_tokens, True)
                try:
                    _wait_busy(cluster, min(args.flood, args.max_batch_size))
                    s0 = _executor_status(cluster)
                    t0 = time.perf_counter()
                    flood.append(_ttfts(b, "fb/chat", args.max_tokens, args.samples))
                    s1 = _executor_status(cluster)
                    dt = time.perf_counter() - t0
                    if s1.steps > s0.steps:
                        steps.append(dt / (s1.steps - s0.steps))
                finally:
                    f.close()
                    _wait_idle(cluster)
                f = Flood(cluster, keys["fa"], "fa/chat", args.unread, args.flood_tokens, False)
                try:
                    _wait_busy(cluster, min(args.unread, args.max_batch_size), timeout=20)
                    unread.append(_ttfts(b, "fb/chat", args.max_tokens, args.samples))
                finally:
                    f.close()
                    _wait_idle(cluster)
                progress(
                    f"fairness {rep + 1}/{args.repeats}: idle {idle[-1] * 1e3:.0f} ms, flood "
                    f"{flood[-1] * 1e3:.0f} ms, unread {unread[-1] * 1e3:.0f} ms"
                )
            after = _executor_status(cluster)
            b.close()
        finally:
            cluster.stop()
    fr, ur = _ratio(flood, idle), _ratio(unread, idle)
    metrics = {
        "idle_ttft_s": round(statistics.median(idle), 4),
        "flood_ttft_s": round(statistics.median(flood), 4),
        "unread_ttft_s": round(statistics.median(unread), 4),
        "flood_ttft_ratio": fr["median"],
        "flood_ttft_ratio_min": fr["min"],
        "flood_ttft_ratio_max": fr["max"],
        "unread_ttft_ratio": ur["median"],
        "unread_ttft_ratio_min": ur["min"],
        "unread_ttft_ratio_max": ur["max"],
        "step_ms_under_flood": round(statistics.median(steps) * 1e3, 2) if steps else None,
        # B's first token needs at least one step carrying A's full batch: the lowest ratio
        # any scheduler reaches here is about that step over the idle TTFT.
        "flood_ttft_ratio_bound": (
            round(statistics.median(steps) / statistics.median(idle), 3) if steps else None
        ),
        "preemptions": after.preemptions - before.preemptions,
    }
    return {
        "bench": "fairness",
        "device": "cpu",
        "params": {
            "flood": args.flood,
            "unread": args.unread,
            "flood_tokens": args.flood_tokens,
            "max_tokens": args.max_tokens,
            "max_batch_size": args.max_batch_size,
            "repeats": args.repeats,
            "samples": args.samples,
            "preset": args.preset,
        },
        "metrics": metrics,
        "targets": {"flood_ttft_ratio": {"target": 3.0, "met": fr["median"] <= 3.0}},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mint bench fairness", description=__doc__.split("\n")[0])
    p.add_argument("--flood", type=int, default=200, help="tenant A's streams, read")
    p.add_argument("--unread", type=int, default=100, help="tenant A's streams, never read")
    p.add_argument("--flood-tokens", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=8, help="tenant B's request")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--samples", type=int, default=5, help="B's requests per round (median)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--model-dir", type=Path, default=None)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    counts = (args.flood, args.unread, args.flood_tokens, args.max_tokens, args.repeats)
    if min(*counts, args.samples) < 1:
        p.error("counts must be >= 1")
    out = run(args)
    print(json.dumps(out) if args.json else json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
