"""What the benchmarks share: progress on stderr, percentiles, the preset backbone built once,
and this machine's rooflines measured now (GEMM peak, memory read bandwidth)."""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def percentile(xs: list[float], q: float) -> float | None:
    """The nearest-rank q-quantile (q in [0, 1]) of xs; None when xs is empty."""
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def ensure_model(preset: str, model_dir: Path | None) -> Path:
    """The preset backbone in model_dir (default ~/.cache/mintmesh/PRESET), built once."""
    from mintmesh.model import build_preset, model_ready

    d = model_dir or Path.home() / ".cache" / "mintmesh" / preset
    if not model_ready(d):
        progress(f"building the {preset} backbone in {d} (once)")
        build_preset(preset, d)
    return d


def _timed_on(fn, device) -> float:
    """Seconds fn takes on device (CUDA synchronized before and after)."""
    import torch

    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def gemm_peak(device="cpu", repeats: int = 10) -> float:
    """FLOP/s of a large float32 GEMM ([1024, 1024] @ [1024, 4096]) on this machine now, with
    torch's current threads: the best of `repeats` after a warm-up (a GEMM this size runs at
    the machine's practical compute roofline; model FLOPs/s over it is a roofline fraction)."""
    import torch

    a = torch.randn(1024, 1024, device=device)
    b = torch.randn(1024, 4096, device=device)
    torch.mm(a, b)
    best = min(_timed_on(lambda: torch.mm(a, b), device) for _ in range(repeats))
    return 2 * 1024 * 1024 * 4096 / best


def measure_read_bandwidth(device="cpu", nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Bytes per second this machine streams from memory now, with torch's threads: the median
    of `repeats` sums over a buffer far larger than the caches (the bound of work that reads
    each byte once and does ~1 FLOP per byte: the decode LoRA ops, a batch-1 decode step)."""
    import torch

    buf = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    return measure_tensor_read_bandwidth(buf, repeats)


def measure_tensor_read_bandwidth(t, repeats: int = 5) -> float:
    """Bytes per second a sum streams one tensor's memory at now (the median of `repeats`).

    A fresh buffer measures the machine; the memory a kernel reads measures that kernel's own
    bound: on a VM, two equal buffers of one process can stream at 37 and 60 GB/s (the host's
    backing of the guest's pages, not the code, sets the rate), so a kernel compared with a
    fresh buffer is judged by where each happens to sit."""
    t.sum()  # fault the pages in
    ts = [_timed_on(lambda: t.sum(), t.device) for _ in range(repeats)]
    return t.numel() * t.element_size() / statistics.median(ts)
