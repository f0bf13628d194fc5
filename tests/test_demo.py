"""`mint demo` (what `make demo` runs) finishes, prints its summary and leaves nothing running."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


def test_mint_demo_runs_and_summarizes(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mintmesh.cli",
            "demo",
            "--adapters",
            "60",
            "--data",
            str(tmp_path / "demo"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert "summary" in out
    assert "60 in" in out  # adapters pushed
    assert "clean shutdown" in out
    assert "(base model)" in out
    logs = tmp_path / "demo" / "logs"
    assert {p.name for p in logs.iterdir()} >= {"store.log", "router.log", "executor-0.log"}
