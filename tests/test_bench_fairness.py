"""`mint bench fairness` at a tiny scale: a real cluster, tenant A's streams (read, then never
read) and tenant B's lone request; the JSON line's keys, each ratio recomputed from its TTFTs,
and the target's "met" against its value."""

from __future__ import annotations

import json

import pytest

from mintmesh.bench import fairness


@pytest.mark.e2e
def test_bench_fairness_tiny(tiny_model_dir, capsys):
    argv = ["--json", "--model-dir", str(tiny_model_dir), "--flood", "12", "--unread", "6"]
    argv += ["--flood-tokens", "256", "--max-batch-size", "8", "--repeats", "1", "--samples", "2"]
    assert fairness.main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(out) == {"bench", "device", "params", "metrics", "targets"}
    m, t = out["metrics"], out["targets"]
    assert out["bench"] == "fairness" and out["params"]["flood"] == 12
    for k in ("idle_ttft_s", "flood_ttft_s", "unread_ttft_s"):
        assert 0 < m[k] < 60, (k, m[k])
    # One repeat: the median ratio is that repeat's ratio.
    assert m["flood_ttft_ratio"] == pytest.approx(m["flood_ttft_s"] / m["idle_ttft_s"], rel=0.01)
    assert m["unread_ttft_ratio"] == pytest.approx(m["unread_ttft_s"] / m["idle_ttft_s"], rel=0.01)
    assert m["flood_ttft_ratio_min"] == m["flood_ttft_ratio"] == m["flood_ttft_ratio_max"]
    assert t["flood_ttft_ratio"]["met"] == (m["flood_ttft_ratio"] <= 3.0)
    # A's 12 streams filled B's batch of 8 (256 tokens each: still full while B's samples run,
    # the executor being faster than A's 48-token streams once it paced their messages): B got
    # a slot by fair-share preemption.
    assert m["preemptions"] >= 1
