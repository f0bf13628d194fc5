"""What the benchmarks share: progress on stderr, percentiles, and the preset backbone built
once."""

from __future__ import annotations

import sys
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
