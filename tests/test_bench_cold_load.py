"""`mint bench cold-load` at a tiny scale: a real store and a real cache sidecar process (its own
LMDB), the host tier and the device pool; the JSON line's keys and the counters that say which
path each load took (node-cache hits made no EnsureAdapter RPC, and were reported in a batch)."""

from __future__ import annotations

import json

import pytest

from mintmesh.bench import cold_load


def test_bench_cold_load_tiny(tiny_model_dir, capsys):
    argv = ["--json", "--preset", "tiny", "--model-dir", str(tiny_model_dir), "--trials", "3"]
    assert cold_load.main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["bench"] == "cold-load" and out["params"]["trials"] == 3
    m = out["metrics"]
    for k in ("hit_load_p50_ms", "miss_load_p50_ms", "peft_load_p50_ms"):
        assert 0 < m[k] < 60_000, (k, m[k])
    assert m["hit_rpcs"] == 0 and m["hits_reported_to_sidecar"] == 3
    assert m["adapter_bytes"] > 0
    ratio = m["peft_load_p50_ms"] / m["hit_load_p50_ms"]
    assert m["hit_vs_peft"] == pytest.approx(ratio, rel=0.01, abs=0.01)
    assert m["targets"]["hit_vs_peft>=20"] == (m["hit_vs_peft"] >= 20)
