"""`mint bench gateway`: the OpenAI HTTP gateway against gRPC straight to the router, side by side.

A local cluster (store, one cache sidecar + executor, router, gateway: mintmesh.cluster.LocalCluster
with executors=1) on the tiny backbone (--preset; cached under ~/.cache/mintmesh/PRESET or
--model-dir), one pushed rank-8 adapter ("bench/adapter", q/v) that every request uses. The same
fixed requests (short string prompts, greedy, exactly --max-tokens tokens each via ignore_eos) go
two ways:

- gRPC: grpc.aio RouterStub.Generate against the router (one channel, the admin key as
  "authorization: Bearer" metadata);
- HTTP: the openai SDK's AsyncOpenAI, streaming completions through the gateway (which makes the
  same Generate calls to the router), stream_options.include_usage for the token counts.

Each round sends its requests with a fixed concurrency (closed loop: C workers, each sending its
next request when the last one ended), at C = 1 (--requests-c1) and C = 16 (--requests). The CPUs
are shared and noisy, so rounds are paired and interleaved: for each of --repeats repeats and each
C, a gRPC round then an HTTP round, and every ratio is the median over repeats of the per-pair
ratio, with its min and max.

Per round: tokens/s (completion tokens over first send to last chunk), TTFT p50/p99 (send to the
first content chunk: the first chunk with a choice an OpenAI client sees, the first Generate chunk
with tokens over gRPC; each Generate chunk becomes one SSE chunk; nearest rank), and the
executor's decode steps (tokens/step = how full its batches were). Reported: the medians over
repeats of each; http_vs_grpc_tokens_per_s (C = 16; target >= 0.95) and _c1, with min/max;
http_ttft_overhead_ms (median over pairs of the HTTP minus the gRPC TTFT p50 at C = 1; no target).
The gateway adds work but no decode capacity: the gRPC path's tokens/s is the physical bound the
HTTP path can reach ("bound"). Every HTTP output text must equal the gRPC one of the same request
in the same pair ("outputs_identical" k/n); the bench exits 1 when one differs.

Progress goes to stderr; the last stdout line is one JSON object
{"bench": "gateway", "device", "params", "metrics", "targets"}.
    python -m mintmesh.bench.gateway --json [--model-dir DIR] [--requests 128] [--repeats 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from mintmesh.bench.common import ensure_model, percentile

ADAPTER = "bench/adapter"
RANK = 8
CONCURRENCIES = (1, 16)
TARGETS = {"http_vs_grpc_tokens_per_s": (">=", 0.95)}
WORDS = ("personal", "model", "adapter", "mesh", "tenant", "router", "token", "stream", "batch")


def _progress(msg: str) -> None:
    print(f"[bench gateway] {msg}", file=sys.stderr, flush=True)


def make_prompts(n: int) -> list[str]:
    """n fixed, distinct short prompts (18-60 bytes: the tiny backbone's tokens are bytes)."""
    out = []
    for i in range(n):
        words = [WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(1 + i % 6)]
        out.append(f"Request {i}: the {' '.join(words)} of user {i % 5} says")
    return out


@dataclass
class Result:
    text: str = ""
    tokens: int = 0
    ttft: float | None = None
    error: str = ""


@dataclass
class Round:
    results: list[Result] = field(default_factory=list)
    makespan: float = 0.0
    steps: int = 0
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds by process

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.results)

    def summary(self) -> dict:
        ttft = [r.ttft for r in self.results if r.ttft is not None]
        ms = lambda x: None if x is None else round(x * 1000, 2)  # noqa: E731
        return {
            "tokens_per_s": round(self.tokens / self.makespan, 2) if self.makespan else 0.0,
            "tokens": self.tokens,
            "makespan_s": round(self.makespan, 3),
            "ttft_p50_ms": ms(percentile(ttft, 0.50)),
            "ttft_p99_ms": ms(percentile(ttft, 0.99)),
            "executor_steps": self.steps,
            "tokens_per_step": round(self.tokens / self.steps, 2) if self.steps else None,
            "errors": sum(1 for r in self.results if r.error),
            "cpu_ms_per_token": {
                k: round(v * 1000 / self.tokens, 4) if self.tokens else None
                for k, v in self.cpu_s.items()
            },
            "busy_cores": round(sum(self.cpu_s.values()) / self.makespan, 2)
            if self.makespan and self.cpu_s
            else None,
        }


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds (user + system, all threads) of this process ("client") and each pid, from
    /proc; {} where there is no /proc."""
    try:
        tick = os.sysconf("SC_CLK_TCK")
        out = {"client": time.process_time()}
        for name, pid in pids.items():
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            out[name] = (int(fields[11]) + int(fields[12])) / tick
        return out
    except (OSError, ValueError, IndexError):
        return {}


async def _grpc_one(stub, md, prompt: str, sp, timeout: float) -> Result:
    import grpc

    from mintmesh.v1 import router_pb2

    res = Result()
    parts = []
    sent = time.perf_counter()
    try:
        call = stub.Generate(
            router_pb2.GenerateRequest(adapter=ADAPTER, prompt=prompt, sampling=sp),
            metadata=md,
            timeout=timeout,
        )
        async for resp in call:
            ch = resp.chunk
            if ch.token_ids and res.ttft is None:
                res.ttft = time.perf_counter() - sent
            parts.append(ch.text)
            if ch.HasField("usage"):
                res.tokens = ch.usage.completion_tokens
    except grpc.aio.AioRpcError as e:
        res.error = f"grpc {e.code().name}: {e.details()}"
    res.text = "".join(parts)
    return res


async def _http_one(client, prompt: str, max_tokens: int) -> Result:
    res = Result()
    parts = []
    sent = time.perf_counter()
    try:
        stream = await client.completions.create(
            model=ADAPTER,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        async for chunk in stream:
            if chunk.choices:  # one per Generate chunk (its text may be empty: a partial UTF-8)
                if res.ttft is None:
                    res.ttft = time.perf_counter() - sent
                parts.append(chunk.choices[0].text)
            if chunk.usage is not None:
                res.tokens = chunk.usage.completion_tokens
    except Exception as e:  # recorded, reported in the metrics
        res.error = f"http {type(e).__name__}: {e}"
    res.text = "".join(parts)
    return res


async def _round(send, prompts: list[str], concurrency: int, steps, pids=None) -> Round:
    """Closed loop: `concurrency` workers take the next prompt when their last one ended."""
    rnd = Round(results=[Result() for _ in prompts])
    nxt = iter(range(len(prompts)))

    async def worker():
        for i in nxt:
            rnd.results[i] = await send(prompts[i])

    s0 = await steps()
    c0 = cpu_seconds(pids or {})
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    rnd.makespan = time.perf_counter() - t0
    c1 = cpu_seconds(pids or {})
    rnd.cpu_s = {k: c1[k] - c0[k] for k in c0 if k in c1}
    rnd.steps = await steps() - s0
    return rnd


async def measure(cluster, args) -> tuple[list[dict], dict, str]:
    """The paired rounds: ([{c: {"grpc": summary, "http": summary}} per repeat], checks, device)."""
    import grpc
    import openai

    from mintmesh.client import sampling_params
    from mintmesh.v1 import executor_pb2, executor_pb2_grpc, router_pb2_grpc

    md = (("authorization", f"Bearer {cluster.admin_key}"),)
    sp = sampling_params(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    prompts = {1: make_prompts(args.requests_c1), 16: make_prompts(args.requests)}
    timeout = 600.0
    checks = {"identical": 0, "compared": 0, "first_mismatch": "", "errors": 0,
              "first_error": "", "short": 0}  # fmt: skip
    async with (
        grpc.aio.insecure_channel(cluster.router_address) as ch,
        cluster.mesh_channel(cluster.executor_addresses[0], aio=True) as ex_ch,
        openai.AsyncOpenAI(
            base_url=cluster.openai_base_url, api_key=cluster.admin_key, max_retries=0,
            timeout=timeout,
        ) as oai,
    ):  # fmt: skip
        stub = router_pb2_grpc.RouterStub(ch)
        ex = executor_pb2_grpc.ExecutorStub(ex_ch)

        async def status():
            return await ex.Status(executor_pb2.ExecutorStatusRequest(), timeout=10)

        async def steps() -> int:
            return (await status()).steps

        def grpc_send(p):
            return _grpc_one(stub, md, p, sp, timeout)

        def http_send(p):
            return _http_one(oai, p, args.max_tokens)

        device = (await status()).device
        pids = {
            name.split("-")[0]: child.proc.pid
            for name, child in cluster.children.items()
            if child.proc is not None and name in ("executor-0", "router", "gateway")
        }
        # Warm-up: the adapter's cold load, the first forwards, both paths' connections.
        for send in (grpc_send, http_send):
            await _round(send, prompts[16][:4], 4, steps)
        repeats = []
        for r in range(args.repeats):
            rep = {}
            for c in CONCURRENCIES:
                g = await _round(grpc_send, prompts[c], c, steps, pids)
                h = await _round(http_send, prompts[c], c, steps, pids)
                for i, (a, b) in enumerate(zip(g.results, h.results, strict=True)):
                    checks["compared"] += 1
                    same = not a.error and not b.error and a.text == b.text
                    checks["identical"] += same
                    if not same and not checks["first_mismatch"]:
                        checks["first_mismatch"] = (
                            f"repeat {r} c={c} request {i}: grpc {a.text!r} {a.error} / "
                            f"http {b.text!r} {b.error}"
                        )[:300]
                    for x in (a, b):
                        if x.error:
                            checks["errors"] += 1
                            checks["first_error"] = checks["first_error"] or x.error[:300]
                        elif x.tokens != args.max_tokens:
                            checks["short"] += 1
                rep[c] = {"grpc": g.summary(), "http": h.summary()}
                _progress(
                    f"repeat {r + 1}/{args.repeats} c={c}: grpc {rep[c]['grpc']['tokens_per_s']} "
                    f"tok/s ttft p50 {rep[c]['grpc']['ttft_p50_ms']} ms | http "
                    f"{rep[c]['http']['tokens_per_s']} tok/s ttft p50 "
                    f"{rep[c]['http']['ttft_p50_ms']} ms"
                )
            repeats.append(rep)
    return repeats, checks, device


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def derive(per_repeat: list[dict]) -> dict:
    """The reported metrics from the per-repeat figures (what the test recomputes)."""
    m: dict = {}
    for c in CONCURRENCIES:
        for path in ("grpc", "http"):
            for k in ("tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "tokens_per_step"):
                xs = [rep[f"{path}_{k}_c{c}"] for rep in per_repeat]
                if any(x is None for x in xs):
                    m[f"{path}_{k}_c{c}"] = None
                else:
                    m[f"{path}_{k}_c{c}"] = round(_median(xs), 2)
        ratios = [
            rep[f"http_tokens_per_s_c{c}"] / rep[f"grpc_tokens_per_s_c{c}"]
            for rep in per_repeat
            if rep[f"grpc_tokens_per_s_c{c}"]
        ]
        name = "http_vs_grpc_tokens_per_s" + ("" if c == 16 else f"_c{c}")
        if ratios:
            m[name] = round(_median(ratios), 3)
            m[f"{name}_min"] = round(min(ratios), 3)
            m[f"{name}_max"] = round(max(ratios), 3)
    overheads = [
        rep["http_ttft_p50_ms_c1"] - rep["grpc_ttft_p50_ms_c1"]
        for rep in per_repeat
        if rep["http_ttft_p50_ms_c1"] is not None and rep["grpc_ttft_p50_ms_c1"] is not None
    ]
    if overheads:
        m["http_ttft_overhead_ms"] = round(_median(overheads), 2)
        m["http_ttft_overhead_ms_min"] = round(min(overheads), 2)
        m["http_ttft_overhead_ms_max"] = round(max(overheads), 2)
    return m


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mint bench gateway", description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="print only the JSON line on stdout")
    p.add_argument("--preset", default="tiny", help="backbone preset (small: ~170M parameters)")
    p.add_argument("--model-dir", type=Path, default=None,
                   help="backbone directory (built there if missing; default "
                        "~/.cache/mintmesh/PRESET)")  # fmt: skip
    p.add_argument("--requests", type=int, default=128, help="requests per round at concurrency 16")
    p.add_argument("--requests-c1", type=int, default=None,
                   help="requests per round at concurrency 1 (default --requests / 4)")  # fmt: skip
    p.add_argument("--repeats", type=int, default=5, help="paired gRPC/HTTP rounds per concurrency")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per request (ignore_eos)")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch threads per process")
    p.add_argument("--data-dir", type=Path, default=None, help="cluster state (default: temp)")
    args = p.parse_args(argv)
    if args.requests_c1 is None:
        args.requests_c1 = max(1, args.requests // 4)
    if min(args.requests, args.requests_c1, args.repeats, args.max_tokens) < 1:
        p.error("--requests, --requests-c1, --repeats and --max-tokens must be >= 1")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    warnings.filterwarnings("ignore", category=FutureWarning)

    from mintmesh.client import MintClient
    from mintmesh.cluster import ClusterConfig, LocalCluster
    from mintmesh.model import base_model_info
    from mintmesh.synth import synth_peft_bytes

    t_start = time.perf_counter()
    load_start = [round(x, 2) for x in os.getloadavg()]
    model_dir = ensure_model(args.preset, args.model_dir)
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="mint-bench-gateway-"))
    env = {
        "MINT_EXECUTOR_DEVICE": args.device,
        "MINT_EXECUTOR_MAX_QUEUE": str(max(256, 2 * args.requests)),
        "OMP_NUM_THREADS": str(args.threads),
    }
    cluster = LocalCluster(
        ClusterConfig(
            model_dir=model_dir,
            data_dir=data_dir,
            executors=1,
            port=0,
            http_port=0,
            max_batch_size=args.max_batch_size,
            env=env,
        )
    )
    _progress(f"starting a local cluster ({args.preset} backbone, with the gateway) in {data_dir}")
    cluster.start()
    try:
        with MintClient(cluster.router_address, timeout=120, api_key=cluster.admin_key) as cl:
            cfg, weights = synth_peft_bytes(base_model_info(model_dir), rank=RANK, seed=1)
            cl.push_adapter_bytes(ADAPTER, cfg, weights, timeout=120)
        _progress(
            f"{args.repeats} repeats x (c=1: {args.requests_c1}, c=16: {args.requests} requests) "
            f"x (gRPC, HTTP), {args.max_tokens} tokens each"
        )
        repeats, checks, device = asyncio.run(measure(cluster, args))
    finally:
        cluster.stop()

    per_repeat = []
    for rep in repeats:
        row = {}
        for c, paths in rep.items():
            for path, s in paths.items():
                for k in ("tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "tokens_per_step"):
                    row[f"{path}_{k}_c{c}"] = s[k]
        per_repeat.append(row)
    metrics = derive(per_repeat)
    metrics["bound"] = "grpc_tokens_per_s_c16"
    metrics["bound_note"] = (
        "the gateway adds work (HTTP, JSON, SSE) but no decode capacity: the executor's "
        "throughput through gRPC on the same batch is the most the HTTP path can reach; "
        "cpu_ms_per_token shows where each path's CPU goes (client = this process's load "
        "generator), busy_cores how much of the machine's cores a round kept busy"
    )
    cpu: dict = {}
    busy: dict = {}
    for c in CONCURRENCIES:
        for path in ("grpc", "http"):
            runs = [rep[c][path] for rep in repeats]
            procs = sorted({k for r in runs for k in r["cpu_ms_per_token"]})
            cpu.setdefault(f"c{c}", {})[path] = {
                k: round(_median([r["cpu_ms_per_token"][k] for r in runs]), 4)
                for k in procs
                if all(r["cpu_ms_per_token"].get(k) is not None for r in runs)
            }
            if all(r["busy_cores"] is not None for r in runs):
                busy.setdefault(f"c{c}", {})[path] = round(
                    _median([r["busy_cores"] for r in runs]), 2
                )
    metrics["cpu_ms_per_token"] = cpu
    metrics["busy_cores"] = busy
    metrics["cpu_count"] = os.cpu_count()
    metrics["outputs_identical"] = f"{checks['identical']}/{checks['compared']}"
    if checks["first_mismatch"]:
        metrics["first_mismatch"] = checks["first_mismatch"]
    metrics["errors"] = checks["errors"]
    if checks["first_error"]:
        metrics["first_error"] = checks["first_error"]
    metrics["short_outputs"] = checks["short"]
    metrics["per_repeat"] = per_repeat
    metrics["loadavg_start"] = load_start
    metrics["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    metrics["wall_s"] = round(time.perf_counter() - t_start, 1)
    targets = {}
    for name, (op, thr) in TARGETS.items():
        val = metrics.get(name)
        targets[name] = {"target": f"{op} {thr}", "value": val,
                         "met": val is not None and val >= thr}  # fmt: skip
    params = {
        "preset": args.preset,
        "adapter": ADAPTER,
        "rank": RANK,
        "targets_modules": ["q_proj", "v_proj"],
        "concurrency": list(CONCURRENCIES),
        "requests_c1": args.requests_c1,
        "requests_c16": args.requests,
        "repeats": args.repeats,
        "max_tokens": args.max_tokens,
        "sampling": "greedy, ignore_eos",
        "max_batch_size": args.max_batch_size,
        "threads_per_process": args.threads,
        "note": (
            "paired interleaved rounds (gRPC then HTTP, per concurrency, per repeat); every "
            "figure is the median over repeats of the per-round value, every ratio the median "
            "of the per-pair ratios; TTFT = send to first content chunk; the load generator "
            "shares the 2 CPUs with the cluster"
        ),
    }
    out = {"bench": "gateway", "device": device, "params": params, "metrics": metrics,
           "targets": targets}  # fmt: skip
    if not args.json:
        for k, v in metrics.items():
            if k != "per_repeat":
                print(f"{k}: {v}")
    print(json.dumps(out))
    ok = checks["compared"] > 0 and checks["identical"] == checks["compared"]
    if not ok:
        _progress(f"outputs differ: {metrics['outputs_identical']} identical")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
