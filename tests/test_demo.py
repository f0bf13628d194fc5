"""`mint demo` (what `make demo` runs): it pushes and lists every adapter, each mixed-batch
generation is what peft computes for that adapter alone, every executor is healthy, and when
it exits nothing is left listening."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
from peft_util import peft_greedy, peft_model_with

from mintmesh.demo import RANKS, TARGET_SETS, demo_adapter_name
from mintmesh.model import base_model_info, load_model
from mintmesh.synth import synth_peft_bytes

pytestmark = pytest.mark.e2e
N = 60


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    data = tmp_path_factory.mktemp("demo")
    r = subprocess.run(
        [sys.executable, "-m", "mintmesh.cli", "demo", "--adapters", str(N), "--json"]
        + ["--data", str(data)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return data, r.stdout, json.loads(r.stdout.strip().splitlines()[-1])


def test_demo_pushes_lists_and_shuts_down_cleanly(demo_run):
    data, out, obj = demo_run
    assert obj["adapters_pushed"] == obj["adapters_listed"] == N and obj["ok"]
    assert [e["id"] for e in obj["executors"]] == ["executor-0", "executor-1"]
    assert all(e["healthy"] for e in obj["executors"])
    # The human summary says the same numbers.
    assert f"{N} in" in out and "clean shutdown" in out and "(base model)" in out
    logs = data / "logs"
    assert {p.name for p in logs.iterdir()} >= {"store.log", "router.log", "executor-0.log"}
    # Nothing still listens where the executors were.
    for e in obj["executors"]:
        host, port = e["address"].rsplit(":", 1)
        with socket.socket() as s:
            assert s.connect_ex((host, int(port))) != 0, f"{e['address']} still listening"


def test_the_demos_personal_models_say_their_users_sentences(demo_run):
    from mintmesh.demo import PERSONAL

    _, out, obj = demo_run
    rows = {p["adapter"]: p for p in obj["personal"]}
    assert set(rows) == {f"{n}@prod" for n in PERSONAL} | {"(base model)"}
    for name, sentence in PERSONAL.items():
        p = rows[f"{name}@prod"]
        assert p["text"] == sentence and p["exact_match"] == 1.0, p
        assert p["revision"].startswith(f"{name}@") and p["loss_last"] < 0.25 * p["loss_first"]
        assert repr(sentence) in out  # the table shows it
    base = rows["(base model)"]["text"]
    assert all(not base.startswith(s) for s in PERSONAL.values())


def test_each_demo_generation_is_its_adapters_peft_output(demo_run, tmp_path):
    data, _, obj = demo_run
    model_dir = data / "model"
    base = base_model_info(model_dir)
    gens = obj["generations"]
    by_ref = {g["adapter"].split("@")[0]: g for g in gens if g["adapter"]}
    assert len(by_ref) == 15 and sum(1 for g in gens if not g["adapter"]) == 1
    dirs = {}
    for ref in by_ref:
        i = int(ref.rsplit("-", 1)[1])
        assert ref == demo_adapter_name(i)
        cfg, weights = synth_peft_bytes(
            base, rank=RANKS[i % len(RANKS)], targets=TARGET_SETS[i % len(TARGET_SETS)], seed=i,
            std=0.5,
        )  # fmt: skip
        d = tmp_path / ref.replace("/", "__")
        d.mkdir()
        (d / "adapter_config.json").write_text(cfg)
        (d / "adapter_model.safetensors").write_bytes(weights)
        dirs[d.name] = d
    pm = peft_model_with(model_dir, dirs)
    _, tok = load_model(model_dir)
    ids = tok(obj["prompt"])["input_ids"]
    base_tokens, _ = peft_greedy(pm, None, ids, 24, stop_at_eos=False)
    (base_gen,) = [g for g in gens if not g["adapter"]]
    assert base_gen["token_ids"] == base_tokens
    changed = 0
    for ref, g in by_ref.items():
        want, _ = peft_greedy(pm, ref.replace("/", "__"), ids, 24, stop_at_eos=False)
        assert g["token_ids"] == want, ref
        assert len(g["digest"]) == 64 and g["executor"] in {"executor-0", "executor-1"}
        changed += want != base_tokens
    # The adapters are strong enough that the oracle tells them from the base.
    assert changed >= 12, changed
