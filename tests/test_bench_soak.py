"""`mint bench soak` at a tiny scale: a real cluster under load with a kill -9 every few
seconds; the JSON line's keys, the faults it injected and survived, and the invariants that must
hold at any scale (no wrong token, no acknowledged write lost, deleted ones gone)."""

from __future__ import annotations

import json

import pytest

from mintmesh.bench import soak


@pytest.mark.e2e
def test_bench_soak_tiny(tiny_model_dir, capsys):
    argv = ["--json", "--model-dir", str(tiny_model_dir), "--minutes", "0.3"]
    argv += ["--kill-every-s", "5", "--clients", "3"]
    rc = soak.main(argv)
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(out) == {"bench", "device", "params", "metrics", "targets"}
    m, t = out["metrics"], out["targets"]
    assert out["bench"] == "soak" and out["params"]["kill_every_s"] == 5
    assert m["requests"] > 50 and m["acknowledged_writes"] > 10
    assert len(m["kills"]) >= 2 and set(m["restarts"]) >= set(m["kills"][:2])
    assert m["wrong_tokens"] == 0 and t["wrong_tokens"]["met"]
    assert m["lost_acknowledged_writes"] == 0 and m["deleted_still_present"] == 0
    assert m["errors_unexpected"] == len(m["unexpected_examples"][:5]) or m["errors_unexpected"] > 5
    assert rc == (1 if m["errors_unexpected"] else 0)
    assert t["errors_unexpected"]["met"] == (m["errors_unexpected"] == 0)
    assert m["rss_growth_by_process"], "no process was sampled twice"
