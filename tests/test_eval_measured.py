"""`mint adapter eval REF --data FILE.jsonl`: evaluation measured on the cluster, through the
router, against a real mesh (the store, the executor and the router in-process, the cache
sidecar as its own process, as in test_metrics). The recorded nll_per_token equals what peft
computes for the same adapter and data; exact_match is 1.0 on the adapter's own greedy
continuations (made by peft) and lower on altered ones; the records carry the evaluator and the
file's sha256; an alias gate on exact_match admits or refuses promotion by the measured value.
The CLI runs as a real `python -m mintmesh.cli` process. Bad data files are one clean error
naming the file and the line, and record nothing."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import threading
import time

import pytest
import torch
from peft import PeftModel
from peft_util import make_peft_adapter, peft_greedy

from mintmesh.client import MintClient
from mintmesh.evaluate import DEFAULT_EVALUATOR, EXTRA_TOKENS, completion_span
from mintmesh.model import load_model
from mintmesh.services.executor.config import ExecutorConfig
from mintmesh.services.executor.server import create_server as create_executor
from mintmesh.services.router.config import RouterConfig
from mintmesh.services.router.server import create_server as create_router
from mintmesh.services.store.config import StoreConfig
from mintmesh.services.store.server import create_server as create_store

PROMPTS = [
    "Hello", "abc", "peft says", "mint", "LoRA", "Once upon a time", "1 2 3 4", "The quick",
    "zebra", "x", "Good morning", "q: what? a:", "adapters", "12345", "!", "hi there",
]  # fmt: skip
GREEDY_TOKENS = 10
OK = b'{"prompt": "a", "completion": "b"}\n'


def _ready_line(proc: subprocess.Popen, timeout: float = 60.0) -> str:
    line: list[str] = []
    t = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    t.start()
    t.join(timeout)
    assert line and line[0].startswith("READY "), f"no READY line: {line}"
    return line[0].split()[2]


@pytest.fixture(scope="module")
def mesh(tiny_model_dir, tmp_path_factory):
    store = create_store(
        StoreConfig(data_dir=tmp_path_factory.mktemp("store"), model_dir=tiny_model_dir)
    )
    node_dir = tmp_path_factory.mktemp("node")
    cache = subprocess.Popen(
        [sys.executable, "-m", "mintmesh.cache", "--cache-dir", str(node_dir)]
        + ["--store", store.address, "--port", "0", "--capacity-bytes", str(64 << 20)]
        + ["--insecure-mesh"],  # the in-process store here is plaintext
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("MINT_")},
    )
    executor = router = None
    try:
        cache_address = _ready_line(cache)
        executor, _ = create_executor(
            ExecutorConfig(
                model_dir=tiny_model_dir,
                cache_dir=node_dir,
                cache_address=cache_address,
                executor_id="exec-eval",
                max_batch_size=8,
                host_cache_bytes=16 << 20,
            )
        )
        router, _ = create_router(
            RouterConfig(
                store_address=store.address,
                executors=(executor.address,),
                port=0,
                health_interval_s=0.2,
            )
        )
        client = MintClient(router.address, timeout=60, retries=0)
        end = time.monotonic() + 30
        while not all(e.healthy for e in client.status().executors):
            assert time.monotonic() < end, "the executor never became healthy"
            time.sleep(0.05)
        yield {"address": router.address, "client": client}
        client.close()
    finally:
        if router is not None:
            router.stop(0)
        if executor is not None:
            executor.stop(grace=1.0)
        cache.terminate()
        try:
            cache.wait(timeout=30)
        except subprocess.TimeoutExpired:
            cache.kill()
            cache.wait()
        store.stop(0)


@pytest.fixture(scope="module")
def adapter(mesh, tiny_model_dir, tmp_path_factory):
    """A peft LoRA pushed as ev/chat@1, and peft's model with it."""
    d = make_peft_adapter(
        tiny_model_dir,
        tmp_path_factory.mktemp("a") / "chat",
        rank=8,
        targets=("q_proj", "v_proj", "o_proj"),
        seed=3,
    )
    rev = mesh["client"].push_adapter(d, "ev/chat")
    base, tok = load_model(tiny_model_dir)
    pm = PeftModel.from_pretrained(base, str(d)).eval()
    return rev, pm, tok


def _clean_prefix(toks: list[int]) -> str:
    """The longest prefix of greedy byte tokens that is whole UTF-8 text (the tiny backbone's
    tokenizer is byte-level: token id = byte, 256+ special)."""
    for m in range(len(toks), 0, -1):
        if all(t < 256 for t in toks[:m]):
            try:
                return bytes(toks[:m]).decode("utf-8")
            except UnicodeDecodeError:
                continue
    return ""


@pytest.fixture(scope="module")
def greedy(adapter):
    """(prompt, peft's greedy continuation as text) for the prompts whose continuation starts
    with at least two whole characters' worth of tokens."""
    _, pm, tok = adapter
    out = []
    for p in PROMPTS:
        toks, _ = peft_greedy(pm, "default", tok(p)["input_ids"], GREEDY_TOKENS)
        text = _clean_prefix(toks)
        if len(text.encode()) >= 2:
            out.append((p, text))
    assert len(out) >= 4, f"too few clean greedy continuations: {out}"
    return out[:6]


def _write(path, rows) -> str:
    path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in rows))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def peft_nll(pm, tok, rows) -> tuple[float, int]:
    """Summed completion NLL and token count by peft, with the tokens the executor makes of the
    text (the tokenizer with its special tokens, as Engine.encode) and mint's completion span."""
    total, count = 0.0, 0
    for p, c in rows:
        full = tok(p + c)["input_ids"]
        k = completion_span(tok(p)["input_ids"], full)
        with torch.no_grad():
            lg = pm(input_ids=torch.tensor([full])).logits[0].double()
        lp = torch.log_softmax(lg[:-1], -1).gather(1, torch.tensor(full[1:])[:, None])[:, 0]
        total -= float(lp[k - 1 :].sum())
        count += len(full) - k
    return total, count


def mint(mesh, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINT_")}
    env["COLUMNS"] = "200"
    return subprocess.run(
        [sys.executable, "-m", "mintmesh.cli", *args, "--router", mesh["address"]],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def _evals(mesh, ref: str) -> list:
    return list(mesh["client"].resolve(ref).evaluations)


def test_measured_metrics_equal_peft_and_gate_promotion(mesh, adapter, greedy, tmp_path):
    rev, pm, tok = adapter
    name = f"{rev.tenant}/{rev.name}"
    # Altered completions: all but the first miss; their NLL is measured all the same.
    other = [(p, c if i == 0 else "~" + c[::-1]) for i, (p, c) in enumerate(greedy)]
    good_file, other_file = tmp_path / "greedy.jsonl", tmp_path / "other.jsonl"
    good_sha, other_sha = _write(good_file, greedy), _write(other_file, other)

    before = len(_evals(mesh, rev.ref))  # other tests record on the same revision
    r = mint(mesh, "adapter", "alias", name, "prod", "--gate", "exact_match>=0.9")
    assert r.returncode == 0, r.stderr

    # 1. the altered data: exact_match 1/n, recorded; promotion refused by the gate.
    r = mint(mesh, "adapter", "eval", "ev/chat@latest", "--data", str(other_file), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1, r.stdout
    row = json.loads(lines[0])
    assert row["ref"] == rev.ref and row["digest"] == rev.digest
    assert row["dataset_digest"] == other_sha and row["examples"] == len(other)
    assert row["evaluator"] == DEFAULT_EVALUATOR
    m = row["metrics"]
    assert m["exact_match"] == pytest.approx(1 / len(other))
    nll, count = peft_nll(pm, tok, other)
    assert row["completion_tokens"] == count
    assert m["nll_per_token"] == pytest.approx(nll / count, abs=1e-4)
    assert m["perplexity"] == pytest.approx(math.exp(m["nll_per_token"]), rel=1e-12)
    recorded = {e.metric: e for e in _evals(mesh, rev.ref)[before:]}
    assert set(recorded) == {"nll_per_token", "perplexity", "exact_match"}
    for metric, e in recorded.items():
        assert e.value == m[metric] and e.evaluator == DEFAULT_EVALUATOR
        assert e.dataset_digest == other_sha and e.evaluated_at_unix_ms > 0
    r = mint(mesh, "adapter", "promote", rev.ref, "--alias", "prod")
    assert r.returncode == 1 and "FAILED_PRECONDITION" in r.stderr, r.stdout + r.stderr
    assert "exact_match" in r.stderr and "Traceback" not in r.stderr

    # 2. the adapter's own greedy continuations: exact_match 1.0; the gate now admits.
    r = mint(mesh, "adapter", "eval", rev.ref, "--data", str(good_file))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "exact_match" in r.stdout and f"{len(greedy)}/{len(greedy)}" in r.stdout, r.stdout
    assert "nll_per_token" in r.stdout and "perplexity" in r.stdout
    evals = _evals(mesh, rev.ref)[before:]
    assert len(evals) == 6
    latest = {e.metric: e for e in evals[3:]}
    assert latest["exact_match"].value == 1.0 and latest["exact_match"].dataset_digest == good_sha
    nll, count = peft_nll(pm, tok, greedy)
    assert latest["nll_per_token"].value == pytest.approx(nll / count, abs=1e-4)
    r = mint(mesh, "adapter", "promote", rev.ref, "--alias", "prod")
    assert r.returncode == 0, r.stdout + r.stderr
    assert mesh["client"].resolve(f"{name}@prod").revision == rev.revision


def test_the_recorded_form_still_works_and_the_two_forms_do_not_mix(mesh, adapter, tmp_path):
    rev, _, _ = adapter
    before = len(_evals(mesh, rev.ref))
    r = mint(mesh, "adapter", "eval", rev.ref, "accuracy=0.91", "--evaluator", "me")
    assert r.returncode == 0, r.stderr
    e = _evals(mesh, rev.ref)[-1]
    assert (e.metric, e.value, e.evaluator, e.dataset_digest) == ("accuracy", 0.91, "me", "")
    f = tmp_path / "d.jsonl"
    _write(f, [("a", "b")])
    r = mint(mesh, "adapter", "eval", rev.ref, "accuracy=0.5", "--data", str(f))
    assert r.returncode == 2 and "not both" in r.stderr, r.stderr
    assert len(_evals(mesh, rev.ref)) == before + 1


def test_exact_match_needs_only_the_completion_at_the_start(mesh, adapter, greedy, tmp_path):
    """In-process (mintmesh.evaluate, what the CLI runs): the generation runs EXTRA_TOKENS past
    the completion's token count and matches when it starts with the completion, so a shorter
    completion (a prefix of the greedy text) matches too; nothing is recorded until record()."""
    from mintmesh.evaluate import evaluate, read_dataset

    rev, _, _ = adapter
    p, c = greedy[0]
    f = tmp_path / "short.jsonl"
    _write(f, [(p, c[:1]), (p, c)])
    before = len(_evals(mesh, rev.ref))
    res = evaluate(mesh["client"], f"{rev.tenant}/{rev.name}", read_dataset(f), concurrency=2)
    assert res.revision.ref == rev.ref and res.exact_match == 1.0
    for ex, want in zip(res.examples, (c[:1], c), strict=True):
        assert ex.exact_match and ex.generated.startswith(want)
        assert ex.tokens == len(want.encode())  # byte-level: a token per byte
        assert len(ex.generated) <= ex.tokens + EXTRA_TOKENS  # max_tokens: <= a char a token
    assert [e.line for e in res.examples] == [1, 2]
    assert len(_evals(mesh, rev.ref)) == before


@pytest.mark.parametrize(
    "content, needles",
    [
        (None, ["no such file"]),
        (b"", ["no examples", "empty"]),
        (b"\n  \n", ["no examples", "blank"]),
        (OK + b'{"prompt": "a", "completion": \n', ["line 2", "not JSON"]),
        (OK + b'\n{"prompt": "a"}\n', ["line 3", '"completion"']),
        (b'{"completion": "b"}\n', ["line 1", '"prompt"']),
        (b'["a", "b"]\n', ["line 1", "JSON object"]),
        (b'{"prompt": "a", "completion": 3}\n', ["line 1", '"completion" must be a string']),
        (b'{"prompt": "a", "completion": ""}\n', ["line 1", '"completion" is empty']),
        (b'{"prompt": "a", "completion": "\xff"}\n', ["line 1", "UTF-8"]),
    ],
    ids=["missing", "empty", "blank", "not-json", "no-completion", "no-prompt", "not-object",
         "not-string", "empty-completion", "not-utf8"],
)  # fmt: skip
def test_bad_data_files_are_one_clean_error_naming_the_line(
    mesh, adapter, tmp_path, content, needles
):
    rev, _, _ = adapter
    f = tmp_path / "data.jsonl"
    if content is not None:
        f.write_bytes(content)
    before = len(_evals(mesh, rev.ref))
    r = mint(mesh, "adapter", "eval", rev.ref, "--data", str(f))
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert str(f) in r.stderr and "Traceback" not in r.stdout + r.stderr
    for n in needles:
        assert n in r.stderr, (n, r.stderr)
    assert len(_evals(mesh, rev.ref)) == before, "nothing recorded"


def test_unknown_ref_is_a_clean_error(mesh, tmp_path):
    f = tmp_path / "d.jsonl"
    _write(f, [("a", "b")])
    r = mint(mesh, "adapter", "eval", "ev/ghost@1", "--data", str(f))
    assert r.returncode == 1 and "NOT_FOUND" in r.stderr, r.stderr
    assert r.stderr.startswith("error: cannot evaluate ev/ghost@1: "), r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "prompt, full, k",
    [
        ([256, 72, 105], [256, 72, 105, 33], 3),  # the prompt's tokens are a prefix
        ([256, 72, 500], [256, 72, 501, 33], 2),  # a token merged across the boundary
        ([256], [256, 9], 1),
        ([7], [8, 9], 1),  # nothing in common: the first token has no logprob anyway
    ],
)
def test_the_completion_starts_past_the_common_prefix(prompt, full, k):
    assert completion_span(prompt, full) == k


def test_an_example_the_executor_refuses_is_named_by_its_line(mesh, adapter, tmp_path):
    rev, _, _ = adapter
    f = tmp_path / "long.jsonl"
    _write(f, [("a", "b"), ("x" * 5000, "y")])
    before = len(_evals(mesh, rev.ref))
    r = mint(mesh, "adapter", "eval", rev.ref, "--data", str(f))
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"cannot evaluate {rev.ref}: {f}, line 2: INVALID_ARGUMENT" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert len(_evals(mesh, rev.ref)) == before


def test_a_dataset_digest_must_be_a_sha256(mesh, adapter):
    import grpc

    rev, _, _ = adapter
    with pytest.raises(grpc.RpcError) as ei:
        mesh["client"].add_evaluation(rev.ref, "exact_match", 1.0, dataset_digest="abc")
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "dataset_digest 'abc'" in ei.value.details()
