"""`mint bench train` end to end at a tiny scale: every metric present, each one-repeat ratio
the ratio of the two times it pairs, each target's verdict its value against its threshold."""

from __future__ import annotations

import json

import pytest


def test_train_bench_runs_on_the_tiny_backbone(tiny_model_dir, capsys):
    from mintmesh.bench import train as bench

    argv = ["--preset", "tiny", "--model-dir", str(tiny_model_dir), "--runs", "3", "--seq-len",
            "16", "--repeats", "1", "--handoff-repeats", "1", "--serve-tokens", "24",
            "--json"]  # fmt: skip
    assert bench.main(argv) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["bench"] == "train" and res["device"] == "cpu"
    m = res["metrics"]
    rel = lambda a, b: pytest.approx(m[a] / m[b], rel=2e-2)  # noqa: E731
    assert m["batched_vs_serial"] == rel("peft_serial_step_s", "ours_step_s")
    assert m["handoff_vs_peft"] == rel("handoff_peft_ms", "handoff_ours_ms")
    assert m["serve_itl_p99_ratio"] == rel("serve_itl_p99_training_ms", "serve_itl_p99_alone_ms")
    assert m["train_tokens_per_s"] == pytest.approx(3 * 16 / m["ours_step_s"], rel=2e-2)
    assert m["train_steps_while_serving"][0] >= 1  # training really ran beside the stream
    for name, (op, thr) in bench.TARGETS.items():
        v = m[name]
        assert res["targets"][name]["met"] == (v >= thr if op == ">=" else v <= thr), name
