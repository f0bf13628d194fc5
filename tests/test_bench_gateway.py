"""`mint bench gateway` at a tiny scale: a real cluster with the gateway, a gRPC and an HTTP
round at each concurrency; the JSON line's keys, identical outputs, every reported figure
recomputed from the ones it is derived from, and the targets' "met" against their values."""

from __future__ import annotations

import json
import statistics

import pytest

from mintmesh.bench import gateway

PATH_KEYS = ("tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "tokens_per_step")
RATIOS = {"http_vs_grpc_tokens_per_s": 16, "http_vs_grpc_tokens_per_s_c1": 1}


def _close(a: float, b: float, tol: float = 1e-3) -> bool:
    return abs(a - b) <= tol


@pytest.mark.e2e
def test_bench_gateway_tiny(tiny_model_dir, tmp_path, capsys):
    argv = ["--json", "--model-dir", str(tiny_model_dir), "--requests", "4", "--repeats", "1",
            "--max-tokens", "4", "--data-dir", str(tmp_path / "cluster")]  # fmt: skip
    rc = gateway.main(argv)
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0
    assert set(out) == {"bench", "device", "params", "metrics", "targets"}
    assert out["bench"] == "gateway" and out["device"] == "cpu"
    p, m, t = out["params"], out["metrics"], out["targets"]
    assert p["requests_c16"] == 4 and p["requests_c1"] == 1 and p["repeats"] == 1
    assert p["max_tokens"] == 4 and p["concurrency"] == [1, 16]

    # Every request ran both ways, each with exactly max_tokens tokens, and the texts agree.
    n = 4 + 1
    assert m["outputs_identical"] == f"{n}/{n}"
    assert m["errors"] == 0 and m["short_outputs"] == 0
    assert m["bound"] == "grpc_tokens_per_s_c16" and m[m["bound"]] > 0
    assert len(m["loadavg_start"]) == 3 and len(m["loadavg_end"]) == 3
    # Where the CPU went, per path: the gateway works only on the HTTP path.
    for c in ("c1", "c16"):
        assert set(m["cpu_ms_per_token"][c]) == {"grpc", "http"}
        for path in ("grpc", "http"):
            assert {"client", "executor", "router", "gateway"} <= set(
                m["cpu_ms_per_token"][c][path]
            )
            assert m["busy_cores"][c][path] >= 0

    # The medians are those of the per-repeat figures (one repeat: the figures themselves).
    (rep,) = m["per_repeat"]
    for c in (1, 16):
        for path in ("grpc", "http"):
            for k in PATH_KEYS:
                key = f"{path}_{k}_c{c}"
                assert m[key] is not None and m[key] > 0, key
                assert _close(m[key], statistics.median([rep[key]]), 0.01), key
    # Each ratio from the reported medians (with one repeat, the median ratio is their ratio).
    for name, c in RATIOS.items():
        ratio = m[f"http_tokens_per_s_c{c}"] / m[f"grpc_tokens_per_s_c{c}"]
        assert _close(m[name], ratio), (name, m[name], ratio)
        assert m[f"{name}_min"] == m[name] == m[f"{name}_max"]
    overhead = m["http_ttft_p50_ms_c1"] - m["grpc_ttft_p50_ms_c1"]
    assert _close(m["http_ttft_overhead_ms"], overhead, 0.011)
    # TTFT p50 <= p99 on every path.
    for c in (1, 16):
        for path in ("grpc", "http"):
            assert m[f"{path}_ttft_p50_ms_c{c}"] <= m[f"{path}_ttft_p99_ms_c{c}"]

    # Targets: the value is the metric, "met" is value against target.
    assert set(t) == {"http_vs_grpc_tokens_per_s"}
    for name, entry in t.items():
        assert entry["value"] == m[name]
        op, thr = entry["target"].split()
        assert (op, float(thr)) == (">=", 0.95)
        assert entry["met"] == (entry["value"] >= float(thr))


def test_derive_medians_and_ratios_over_repeats():
    """Over several repeats: medians of each figure, median/min/max of the per-pair ratios."""
    reps = []
    figures = [(100, 90, 50, 40), (80, 84, 40, 38), (120, 96, 60, 45)]
    for i, (g16, h16, g1, h1) in enumerate(figures):
        row = {}
        for c, g, h in ((16, g16, h16), (1, g1, h1)):
            for path, v in (("grpc", g), ("http", h)):
                row[f"{path}_tokens_per_s_c{c}"] = float(v)
                row[f"{path}_ttft_p50_ms_c{c}"] = 10.0 + i + (5 if path == "http" else 0)
                row[f"{path}_ttft_p99_ms_c{c}"] = 20.0 + i
                row[f"{path}_tokens_per_step_c{c}"] = float(c)
        reps.append(row)
    m = gateway.derive(reps)
    assert m["grpc_tokens_per_s_c16"] == 100 and m["http_tokens_per_s_c16"] == 90
    assert m["http_vs_grpc_tokens_per_s"] == 0.9  # ratios 0.9, 1.05, 0.8
    assert m["http_vs_grpc_tokens_per_s_min"] == 0.8
    assert m["http_vs_grpc_tokens_per_s_max"] == 1.05
    assert m["http_vs_grpc_tokens_per_s_c1"] == 0.8  # ratios 0.8, 0.95, 0.75
    assert m["http_ttft_overhead_ms"] == 5.0
