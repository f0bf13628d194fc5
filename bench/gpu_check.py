"""`make gpu-check`: on a machine with an NVIDIA GPU, the Triton kernels compiled and measured.

1. pytest tests/test_kernels_triton.py with MINTMESH_TEST_DEVICE=cuda and TRITON_INTERPRET
   unset: every kernel compiled for the GPU against the float32 oracle, real model sizes too;
2. `python -m mintmesh.bench.kernels --json --device cuda` (the kernel benchmark on CUDA);
3. the decode LoRA ops (per-row fused kernel, 64 rows with 64 distinct rank-16 adapters on
   Llama-7B-sized q/k/v/o layers, bfloat16): achieved memory bandwidth next to the device's peak;
4. the adapter tiers on the device: packed adapters through the executor's AdapterResidency
   (page-locked host arena, copies on the loader's own CUDA stream) into a device pool, every
   row compared with the packed weights, and the host -> device load time.

Without a GPU it prints why and exits 0. Budget: under 8 minutes in all.
    python -m mintmesh.bench.gpu_check [--skip-tests] [--skip-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

# Peak DRAM bandwidth (GB/s) by device name, when the driver does not report clock and bus width.
PEAK_GBPS = {
    "H200": 4800.0,
    "H100 SXM": 3350.0,
    "H100 PCIe": 2000.0,
    "H100": 3350.0,
    "A100-SXM4-80GB": 2039.0,
    "A100-SXM4-40GB": 1555.0,
    "A100 80GB PCIe": 1935.0,
    "A100": 1555.0,
    "L40S": 864.0,
    "L4": 300.0,
    "A10G": 600.0,
    "A10": 600.0,
    "RTX 4090": 1008.0,
    "RTX 3090": 936.0,
    "V100": 900.0,
    "T4": 320.0,
}


def _say(msg: str) -> None:
    print(f"[gpu-check] {msg}", flush=True)


def peak_bandwidth_gbps(device: torch.device) -> tuple[float | None, str]:
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9, "memory clock x bus width (DDR)"
    name = props.name
    for key, v in PEAK_GBPS.items():
        if key in name:
            return v, f"datasheet ({key})"
    return None, "unknown device"


def _copy_bandwidth_gbps(device: torch.device) -> float:
    """Achievable bandwidth: a 1 GiB device-to-device copy (read + write)."""
    a = torch.empty(2**28, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize(device)
    t = time.perf_counter()
    n = 10
    for _ in range(n):
        b.copy_(a)
    torch.cuda.synchronize(device)
    return 2 * a.numel() * 4 * n / (time.perf_counter() - t) / 1e9


def decode_bandwidth(device: torch.device) -> dict:
    """Time the decode LoRA ops (what apply_lora runs for a batch of 64 rows, 64 adapters)."""
    from mintmesh.kernels import AdapterPool, BatchMeta, apply_lora, backend_name
    from mintmesh.packed import ModuleWeights

    dtype = torch.bfloat16
    rank, n_ad, hidden = 16, 64, 4096
    shapes = {f"layers.{i}.{m}": (hidden, hidden) for i in range(4) for m in "qkvo"}
    pool = AdapterPool(
        shapes, max_adapters=n_ad, device=device, dtype=dtype, max_pages=n_ad * rank // 8
    )
    g = torch.Generator().manual_seed(0)
    for a in range(n_ad):
        mods = {
            n: ModuleWeights(
                A=torch.randn(rank, i, generator=g) * 0.01,
                B=torch.randn(o, rank, generator=g) * 0.01,
                alpha=2 * rank,
                scale=2.0,
            )
            for n, (o, i) in shapes.items()
        }
        pool.load(f"a{a}", mods)
    meta = BatchMeta.make().prepare(torch.arange(n_ad), device=device)
    x = torch.randn(n_ad, hidden, device=device, dtype=dtype)
    ys = {n: torch.zeros(n_ad, hidden, device=device, dtype=dtype) for n in shapes}

    def step():
        for n in shapes:
            apply_lora(ys[n], x, n, pool, meta)

    for _ in range(5):
        step()
    torch.cuda.synchronize(device)
    iters = 50
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        step()
    end.record()
    torch.cuda.synchronize(device)
    sec = start.elapsed_time(end) / 1e3 / iters / len(shapes)  # one layer call
    esize = 2
    weight_bytes = n_ad * rank * (hidden + hidden) * esize
    io_bytes = n_ad * hidden * esize * 3  # x read, y read + write
    gbps = (weight_bytes + io_bytes) / sec / 1e9
    return {
        "backend": backend_name(device),
        "us_per_layer": sec * 1e6,
        "bytes_per_layer": weight_bytes + io_bytes,
        "achieved_gbps": gbps,
    }


def residency_roundtrip(device: torch.device, n: int = 16, rank: int = 16) -> dict:
    """Load n packed adapters (q/k/v/o of 4 Llama-7B-sized layers) through AdapterResidency into
    a pool on `device`; check every module's rows against the packed weights. Returns the
    median ms of a load from the host tier (device pool evicted first) and whether all rows
    matched."""
    import hashlib
    import statistics

    from mintmesh.kernels import AdapterPool
    from mintmesh.packed import ModuleWeights, pack
    from mintmesh.services.executor.residency import AdapterResidency
    from mintmesh.services.executor.runner import AdapterDevice
    from mintmesh.services.executor.sources import PackedBytesSource

    hidden = 4096
    shapes = {f"layers.{i}.{m}": (hidden, hidden) for i in range(4) for m in "qkvo"}
    g = torch.Generator().manual_seed(1)
    src = PackedBytesSource()
    digests, weights = [], {}
    for _ in range(n):
        mods = {
            name: ModuleWeights(A=torch.randn(rank, i, generator=g),
                                B=torch.randn(o, rank, generator=g), alpha=rank, scale=1.0)
            for name, (o, i) in shapes.items()
        }  # fmt: skip
        data = pack(mods, base_fingerprint="f" * 64)
        d = src.add(data, hashlib.sha256(data).hexdigest())
        digests.append(d)
        weights[d] = mods
    pool = AdapterPool(shapes, max_adapters=n, device=device, max_rank=rank)
    res = AdapterResidency(AdapterDevice(pool), src, layer_shapes=shapes, base_fingerprint="f" * 64,
                           max_rank=rank, host_bytes=(n + 1) * len(data))  # fmt: skip
    for d in digests:  # node cache -> host -> device
        res.ensure(d)
        res.release(d)
    ok = True
    for d in digests:
        slot = pool.slot(d)
        for name, mw in weights[d].items():
            A, B, _ = pool.layer_weights(slot, name)
            ok &= torch.equal(A.cpu(), mw.A) and torch.equal(B.cpu(), mw.B)
    ms = []
    for d in digests:  # host tier -> device only
        res.evict(d)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        res.ensure(d)
        ms.append((time.perf_counter() - t0) * 1e3)
        res.release(d)
    return {
        "adapters": n,
        "adapter_bytes": len(data),
        "rows_match": bool(ok),
        "host_to_device_p50_ms": statistics.median(ms),
        "host_pinned": res.host.arena._t.is_pinned() if device.type == "cuda" else False,
    }


def _run(cmd: list[str], env: dict, timeout: int) -> tuple[int, str]:
    _say("$ " + " ".join(cmd))
    try:
        r = subprocess.run(cmd, cwd=REPO, env=env, timeout=timeout, capture_output=True, text=True)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or "") if isinstance(e.stdout, str) else ""
        return 124, out + f"\n(timed out after {timeout}s)"
    return r.returncode, r.stdout + r.stderr


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu-check", description=__doc__.split("\n")[0])
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--skip-bench", action="store_true")
    p.add_argument("--bench-args", default="", help="extra arguments for the kernel benchmark")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        _say(
            "no NVIDIA GPU here (torch.cuda.is_available() is False): nothing to check. "
            "On CPU, `pytest tests/test_kernels*.py` runs the kernels under the Triton "
            "interpreter."
        )
        return 0
    device = torch.device("cuda", torch.cuda.current_device())
    _say(f"device {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    try:
        import triton

        _say(f"triton {triton.__version__}")
    except ImportError as e:
        _say(f"triton does not import ({e}): the selector serves the reference ops")
    t0 = time.perf_counter()
    failed = []
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["MINTMESH_TEST_DEVICE"] = "cuda"
    if not args.skip_tests:
        rc, out = _run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
             "tests/test_kernels_triton.py"],
            env,
            timeout=240,
        )  # fmt: skip
        print("\n".join(out.strip().splitlines()[-25:]), flush=True)
        if rc != 0:
            failed.append("kernel tests")
    if not args.skip_bench:
        rc, out = _run(
            [sys.executable, "-m", "mintmesh.bench.kernels", "--json", "--device", "cuda",
             *args.bench_args.split()],
            env,
            timeout=300,
        )  # fmt: skip
        lines = [ln for ln in out.strip().splitlines() if ln.strip()]
        print("\n".join(lines[-12:-1]), flush=True)
        last = next((ln for ln in reversed(lines) if ln.startswith("{")), None)
        if rc != 0 or last is None:
            failed.append("kernel bench")
        else:
            res = json.loads(last)
            print(json.dumps(res), flush=True)
            for name, t in res.get("targets", {}).items():
                _say(f"  {name:28s} {t['value']!s:>24} {t['target']:>28}  "
                     f"{'met' if t['met'] else 'MISSED'}")  # fmt: skip
    bw = decode_bandwidth(device)
    peak, how = peak_bandwidth_gbps(device)
    copy = _copy_bandwidth_gbps(device)
    _say(
        f"decode LoRA ops ({bw['backend']}, 64 rows x 64 adapters, rank 16, 4096x4096, bf16): "
        f"{bw['us_per_layer']:.1f} us/layer, {bw['bytes_per_layer'] / 1e6:.2f} MB/layer"
    )
    peak_s = f"{peak:.0f} GB/s ({how})" if peak else "unknown"
    _say(
        f"achieved {bw['achieved_gbps']:.0f} GB/s; device peak {peak_s}; "
        f"device-to-device copy {copy:.0f} GB/s"
        + (f"; {100 * bw['achieved_gbps'] / peak:.0f}% of peak" if peak else "")
    )
    rt = residency_roundtrip(device)
    _say(
        f"adapter tiers: {rt['adapters']} adapters of {rt['adapter_bytes'] / 2**20:.1f} MiB "
        f"through the host arena (pinned: {rt['host_pinned']}) into the device pool; rows match: "
        f"{rt['rows_match']}; host -> device p50 {rt['host_to_device_p50_ms']:.2f} ms"
    )
    if not rt["rows_match"]:
        failed.append("adapter tiers")
    _say(f"done in {time.perf_counter() - t0:.0f}s" + (f"; FAILED: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
