"""The README's "A session" block, run verbatim: extracted by its marker, given to bash with
`set -euo pipefail` in a temporary directory, with .venv/bin first on PATH and MINT_ROUTER on a
free port (the block's `mint up` listens on that port, its other commands call it). The block
starts its own cluster and stops it; the test reads what each step printed. Also `mint adapter
example`, the step that writes the block's adapter, checked against peft itself."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MARKER = "<!-- readme-session -->"
VENV_BIN = REPO / ".venv" / "bin"


def session_block() -> str:
    text = README.read_text()
    assert text.count(MARKER) == 1, f"README.md must hold {MARKER!r} exactly once"
    m = re.search(re.escape(MARKER) + r"\s*```bash\n(.*?)^```", text, re.S | re.M)
    assert m, f"no ```bash block right after {MARKER!r} in README.md"
    return m.group(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(pgid: int, grace: float = 30.0) -> None:
    """SIGTERM what is left of the block's process group (a `mint up` drains its cluster on
    it), SIGKILL after grace."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.killpg(pgid, signal.SIGKILL)


def stop_strays(work: Path) -> list[int]:
    """SIGKILL any process still running with `work` on its command line (a cluster child whose
    `mint up` died without stopping it: they run in sessions of their own); their pids."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if str(work) in cmdline:
            found.append(int(proc.name))
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), signal.SIGKILL)
    return found


def test_session_block_is_found_and_needs_no_placeholders():
    block = session_block()
    assert "mint up" in block and "mint generate" in block
    assert "..." not in block, "the block must run as written"
    assert block.rstrip().splitlines()[-1].startswith("kill %1"), "it stops its cluster"


@pytest.mark.e2e
def test_readme_session_runs_verbatim(tmp_path):
    mint = VENV_BIN / "mint"
    assert mint.is_file(), f"{mint} missing: run `make install`"
    port = free_port()
    script = tmp_path / "session.sh"
    script.write_text("set -euo pipefail\n" + session_block())
    env = {k: v for k, v in os.environ.items() if k not in ("MINT_API_KEY", "MINT_ADMIN_KEY")}
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        MINT_ROUTER=f"127.0.0.1:{port}",
        MINT_HTTP_PORT=str(free_port()),  # the gateway `mint up` starts (default 8000)
        COLUMNS="200",  # rich: one table row per line
    )
    work = tmp_path / "work"
    work.mkdir()
    t0 = time.monotonic()
    proc = subprocess.Popen(
        ["bash", str(script)],
        cwd=work,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        stop_group(proc.pid)
        out, err = proc.communicate()
        pytest.fail(f"the session did not finish in 240 s\n{out[-3000:]}\n{err[-3000:]}")
    finally:
        stop_group(proc.pid)
        strays = stop_strays(work)
    took = time.monotonic() - t0
    print(f"README session: {took:.1f} s")
    detail = f"\n--- stdout\n{out[-4000:]}\n--- stderr\n{err[-4000:]}"
    assert proc.returncode == 0, f"exit {proc.returncode}{detail}"

    assert f"router listening on 127.0.0.1:{port}" in out, detail
    pushed = re.search(r"^alice/chat@1  digest ([0-9a-f]{16})…  rank 8 ", out, re.M)
    assert pushed, f"no push line{detail}"
    digest = pushed.group(1)
    assert "alice/chat@1: accuracy = 0.91 (1 evaluation(s))" in out, detail
    assert "alice/chat@prod -> alice/chat@1" in out, detail
    # generate --adapter alice/chat@prod: the router resolved the alias to the pushed revision.
    answered = re.search(
        rf"^alice/chat@1 \(digest {digest}\) on (executor-\d): 32 tokens, length$", err, re.M
    )
    assert answered, f"generate did not report alice/chat@1 (digest {digest}){detail}"
    # The revisions table: revision 1 carries the prod alias and the evaluation.
    rows = [
        [c.strip() for c in line.strip("│").split("│")]
        for line in out.splitlines()
        if line.startswith("│") and "accuracy=0.91" in line
    ]
    assert len(rows) == 1, f"no revision row with the evaluation{detail}"
    rev, aliases, state, *_, evals, short = rows[0]
    assert (rev, state, evals, short) == ("1", "ready", "accuracy=0.91", digest[:12]), rows
    assert "prod" in aliases.split(","), rows
    # export: the revision back as a PEFT directory; eval --data: measured and recorded.
    assert f"alice/chat@1  digest {digest}…  rank 8  float32  -> chat-export" in out, detail
    assert {p.name for p in (work / "chat-export").iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    for metric in ("nll_per_token", "perplexity", "exact_match"):
        assert re.search(rf"^│ {metric} +│ [0-9]", out, re.M), f"no {metric} row{detail}"
    assert "recorded as evaluations of alice/chat@1 by 'mint adapter eval'" in out, detail
    assert out.rstrip().endswith("cluster stopped"), f"no clean stop{detail}"
    assert not strays, f"processes outlived the session: {strays}"
    with socket.socket() as s:  # and the router is gone
        assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still served"


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers' deprecations, in peft
def test_adapter_example_writes_a_peft_lora_that_changes_the_model(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from typer.testing import CliRunner

    from mintmesh.cli import app
    from mintmesh.model import load_model
    from mintmesh.peft_io import read_peft_dir

    def example(out_dir: Path):
        res = CliRunner().invoke(
            app,
            ["adapter", "example", str(out_dir), "--model", str(tiny_model_dir), "--rank", "4",
             "--targets", "q_proj,o_proj", "--seed", "3"],
        )  # fmt: skip
        assert res.exit_code == 0, res.output
        assert str(out_dir.resolve()) in res.output
        return read_peft_dir(out_dir)  # what `mint adapter push` reads

    cfg_json, weights = example(tmp_path / "ex")
    assert '"r": 4' in cfg_json and len(weights) > 0
    base, tok = load_model(tiny_model_dir)
    ids = torch.tensor([tok("Hello there").input_ids])
    with torch.no_grad():
        before = base(ids).logits
        pm = PeftModel.from_pretrained(base, str(tmp_path / "ex")).eval()
        assert sorted(pm.peft_config["default"].target_modules) == ["o_proj", "q_proj"]
        after = pm(ids).logits
    assert (after - before).abs().max().item() > 1e-3, "the adapter must change the outputs"
    assert example(tmp_path / "again")[1] == weights, "seeded: the same bytes again"


def test_adapter_example_names_a_missing_module(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from mintmesh.cli import app

    res = CliRunner().invoke(
        app,
        ["adapter", "example", str(tmp_path / "x"), "--model", str(tiny_model_dir),
         "--targets", "no_such_proj"],
    )  # fmt: skip
    assert res.exit_code == 2, res.output
    assert "no_such_proj" in res.output and not (tmp_path / "x").exists()
    res = CliRunner().invoke(
        app, ["adapter", "example", str(tmp_path / "y"), "--model", str(tmp_path)]
    )
    assert res.exit_code == 2 and "has no config.json" in res.output
