"""Training through the router's gRPC API against a real cluster (processes, auth on): a tenant
trains a personal adapter on the resident backbone, saves it as a revision (provenance:
training) and it serves at once, its greedy tokens those of peft with the same weights; runs of
several tenants share passes; another tenant's run is not found; bad input is refused with the
status and field named; a stream being served keeps going while a run trains."""

from __future__ import annotations

import threading

import grpc
import pytest
import torch
from peft_util import peft_greedy

from mintmesh.client import MintClient, sampling_params
from mintmesh.cluster import ClusterConfig, LocalCluster
from mintmesh.model import load_model
from mintmesh.v1 import common_pb2, executor_pb2, executor_pb2_grpc

pytestmark = pytest.mark.e2e
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPT, SENTENCE = "Who am I?", " I am Alice."


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, tmp_path_factory):
    c = LocalCluster(
        ClusterConfig(
            model_dir=tiny_model_dir,
            data_dir=tmp_path_factory.mktemp("train-cluster"),
            executors=2,
            port=0,
            http_port=0,
            env={"MINT_EXECUTOR_TRAINING_MAX_BYTES": str(2 << 20)},
        )
    )
    c.start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def keys(cluster):
    with MintClient(cluster.router_address, timeout=60, api_key=cluster.admin_key) as admin:
        return {t: admin.create_tenant(t).api_key for t in ("alice", "bob")}


def _client(cluster, key):
    return MintClient(cluster.router_address, timeout=120, retries=0, api_key=key)


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_model(tiny_model_dir)[1]


def _datum(tok, prompt, completion):
    p = tok(prompt)["input_ids"]
    c = tok(completion, add_special_tokens=False)["input_ids"]
    ids = p + c
    w = [0.0] * (len(p) - 1) + [1.0] * len(c)
    return {"input_ids": ids[:-1], "target_tokens": ids[1:], "weights": w}, p, c


def _executor_status(cluster):
    out = []
    for addr in cluster.executor_addresses:
        ch = cluster.mesh_channel(addr)
        out.append(executor_pb2_grpc.ExecutorStub(ch).Status(
            executor_pb2.ExecutorStatusRequest(), timeout=10))  # fmt: skip
        ch.close()
    return out


def test_train_save_and_serve_a_personal_adapter(cluster, keys, tok, tiny_model_dir, tmp_path):
    datum, p, c = _datum(tok, PROMPT, SENTENCE)
    with _client(cluster, keys["alice"]) as cl:
        run = cl.create_training_run(rank=16, targets=ALL, seed=1)
        assert run.trainable_parameters > 0 and run.executor.startswith("executor-")
        losses = []
        for _ in range(100):
            fb = cl.forward_backward(run.run_id, [datum])
            losses.append(fb.metrics["loss:sum"])
            step = cl.optim_step(run.run_id, learning_rate=1e-2, beta2=0.999, eps=1e-8)
        assert step.steps == 100
        assert losses[-1] < 0.25 * losses[0], losses[::10]
        assert len(fb.outputs) == 1 and len(fb.outputs[0].logprobs) == len(datum["input_ids"])
        saved = cl.save_run(run.run_id, "alice/me", labels={"kind": "personal"})
        # (@1 unless the README test, in a random order, saved alice/me first)
        assert saved.ref.startswith("alice/me@") and len(saved.digest) == 64
        rev = cl.resolve("alice/me")
        assert rev.digest == saved.digest
        assert rev.provenance.source == common_pb2.REVISION_SOURCE_TRAINING
        assert rev.provenance.data_digest == saved.data_digest and len(saved.data_digest) == 64
        assert rev.labels["mint.train.run"] == run.run_id and rev.labels["kind"] == "personal"
        assert rev.labels["mint.train.steps"] == "100"
        assert float(rev.labels["mint.train.last_loss"]) == pytest.approx(losses[-1], rel=1e-4)
        # It serves at once: the personal model says its user's sentence, the base does not.
        sp = sampling_params(max_tokens=len(c), ignore_eos=True)
        out = cl.generate(PROMPT, adapter="alice/me", sampling=sp)
        base = cl.generate(PROMPT, sampling=sp)
        data = cl.fetch(ref="alice/me")
    assert out.text == SENTENCE and base.text != SENTENCE
    # And its tokens are peft's with the saved weights (the revision's packed bytes, written
    # back as a PEFT directory).
    from peft import PeftModel

    from mintmesh.peft_io import export_peft_dir

    d = export_peft_dir(data, tmp_path / "me")

    pm = PeftModel.from_pretrained(load_model(tiny_model_dir)[0], str(d), adapter_name="me")
    want, _ = peft_greedy(pm, "me", p, len(c), stop_at_eos=False)
    assert out.token_ids == want
    # The same through the OpenAI API (the real SDK, the gateway): peft's tokens, as text.
    import openai

    oa = openai.OpenAI(base_url=cluster.openai_base_url, api_key=keys["alice"], max_retries=0)
    got = oa.completions.create(model=saved.ref, prompt=p, max_tokens=len(c), temperature=0,
                                extra_body={"ignore_eos": True})  # fmt: skip
    assert got.choices[0].text == tok.decode(want) == SENTENCE


def test_runs_of_several_tenants_share_passes_and_keep_their_own(cluster, keys, tok):
    datum, _, _ = _datum(tok, "Hi", " there, friend.")
    runs = {}
    for t in ("alice", "bob"):
        with _client(cluster, keys[t]) as cl:
            for i in range(2):
                r = cl.create_training_run(rank=4, targets=("q_proj", "v_proj"), seed=i,
                                           run_id=f"{t}-share-{i}")  # fmt: skip
                runs[r.run_id] = (t, r.executor)
    before = {
        s.executor_id: s.training_calls - s.training_batches for s in _executor_status(cluster)
    }
    results, errors = {}, []

    def go(run_id, tenant):
        try:
            with _client(cluster, keys[tenant]) as cl:
                for _ in range(6):
                    fb = cl.forward_backward(run_id, [datum])
                results[run_id] = fb.metrics["loss:sum"]
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=go, args=(r, t)) for r, (t, _) in runs.items()]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    # Same data, fresh B = 0: every run starts as the base model, so the same loss.
    assert len(set(round(v, 4) for v in results.values())) == 1
    after = {
        s.executor_id: s.training_calls - s.training_batches for s in _executor_status(cluster)
    }
    # Some calls were batched with others: fewer passes than calls on some executor.
    assert sum(after.values()) > sum(before.values())
    # Bob cannot touch alice's runs: not found, as for adapters.
    with _client(cluster, keys["bob"]) as cl:
        with pytest.raises(grpc.RpcError) as ei:
            cl.forward_backward("alice-share-0", [datum])
        assert ei.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as ei:
            cl.save_run("bob-share-0", "alice/stolen")
        assert ei.value.code() == grpc.StatusCode.PERMISSION_DENIED
    for run_id, (t, _) in runs.items():
        with _client(cluster, keys[t]) as cl:
            cl.drop_run(run_id)


@pytest.mark.parametrize(
    "make, code, needle",
    [
        (lambda d: {**d, "input_ids": [*d["input_ids"][:-1], 99999]},
         grpc.StatusCode.INVALID_ARGUMENT, "outside the vocabulary"),
        (lambda d: {**d, "weights": d["weights"][:-1]}, grpc.StatusCode.INVALID_ARGUMENT,
         "weights has"),
        (lambda d: {**d, "weights": [float("nan")] * len(d["weights"])},
         grpc.StatusCode.INVALID_ARGUMENT, "not finite"),
    ],
)  # fmt: skip
def test_bad_training_input_is_a_clean_status(cluster, keys, tok, make, code, needle):
    datum, _, _ = _datum(tok, "x", " y")
    with _client(cluster, keys["alice"]) as cl:
        run = cl.create_training_run(rank=2, targets=("q_proj",))
        try:
            with pytest.raises(grpc.RpcError) as ei:
                cl.forward_backward(run.run_id, [make(datum)])
            assert ei.value.code() == code and needle in ei.value.details()
        finally:
            cl.drop_run(run.run_id)


def test_bad_runs_and_steps_are_clean_statuses(cluster, keys, tok):
    datum, _, _ = _datum(tok, "x", " y")
    with _client(cluster, keys["alice"]) as cl:
        cases = [
            (lambda: cl.create_training_run(rank=999, targets=("q_proj",)),
             grpc.StatusCode.INVALID_ARGUMENT, "rank=999"),
            (lambda: cl.create_training_run(rank=2, targets=("lm_head",)),
             grpc.StatusCode.INVALID_ARGUMENT, "lm_head"),
            (lambda: cl.create_training_run(rank=256, targets=ALL),
             grpc.StatusCode.RESOURCE_EXHAUSTED, "training memory of this executor is full"),
            (lambda: cl.forward_backward("no-such-run", [datum]), grpc.StatusCode.NOT_FOUND,
             "no-such-run"),
        ]  # fmt: skip
        for call, code, needle in cases:
            with pytest.raises(grpc.RpcError) as ei:
                call()
            assert ei.value.code() == code and needle in ei.value.details(), ei.value.details()
        run = cl.create_training_run(rank=2, targets=("q_proj",))
        with pytest.raises(grpc.RpcError) as ei:
            cl.optim_step(run.run_id)
        assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "no gradients" in ei.value.details()
        cl.forward_backward(run.run_id, [datum])
        with pytest.raises(grpc.RpcError) as ei:
            cl.optim_step(run.run_id, learning_rate=-1.0)
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "learning_rate" in ei.value.details()
        with pytest.raises(grpc.RpcError) as ei:
            cl.forward_backward(run.run_id, [datum], loss_fn="mse")
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "mse" in ei.value.details()
        cl.drop_run(run.run_id)


def test_serving_keeps_streaming_while_a_run_trains(cluster, keys, tok):
    datum, _, _ = _datum(tok, "Serve", " and train at once, please.")
    with _client(cluster, keys["alice"]) as cl:
        run = cl.create_training_run(rank=8, targets=ALL, run_id="alongside")
        # One step first: the run's first call sets up what later ones reuse.
        cl.forward_backward(run.run_id, [datum])
        cl.optim_step(run.run_id, learning_rate=1e-3)
        sp = sampling_params(max_tokens=400, ignore_eos=True)
        want = cl.generate("a long answer", sampling=sp).token_ids
        got, done = [], threading.Event()

        def serve():  # three long streams one after another: ~1 s each here, alone
            for _ in range(3):
                ids = []
                for ch in cl.generate_stream("a long answer", sampling=sp):
                    ids.extend(ch.token_ids)
                got.append(ids)
            done.set()

        th = threading.Thread(target=serve)
        th.start()
        steps = 0
        while not done.is_set() and steps < 200:
            cl.forward_backward(run.run_id, [datum])
            cl.optim_step(run.run_id, learning_rate=1e-3)
            steps += 1
        th.join(120)
        cl.drop_run(run.run_id)
    assert got == [want] * 3  # the base model's exact tokens, interleaved with training
    assert steps >= 2  # and training really ran while it streamed
    assert torch.tensor(got).numel() == 3 * 400


def test_mint_adapter_train_cli_trains_saves_and_serves(cluster, keys, tmp_path):
    import hashlib
    import json
    import os
    import subprocess
    import sys

    data = tmp_path / "me.jsonl"
    data.write_text(json.dumps({"prompt": PROMPT, "completion": SENTENCE}) + "\n")
    env = {**os.environ, "MINT_API_KEY": keys["alice"], "MINT_ROUTER": cluster.router_address}

    def mint(*a):
        return subprocess.run([sys.executable, "-m", "mintmesh.cli", *a], capture_output=True,
                              text=True, timeout=300, env=env)  # fmt: skip

    runs_before = sum(s.training_runs for s in _executor_status(cluster))
    r = mint("adapter", "train", "--data", str(data), "--name", "alice/cli", "--rank", "16",
             "--targets", ",".join(ALL), "--steps", "100", "--lr", "1e-2", "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    obj = json.loads(r.stdout.strip().splitlines()[-1])
    assert obj["ref"].startswith("alice/cli@") and obj["steps"] == 100
    assert obj["last_loss"] < 0.25 * obj["first_loss"]
    assert obj["data_digest"] == hashlib.sha256(data.read_bytes()).hexdigest()
    with _client(cluster, keys["alice"]) as cl:
        rev = cl.resolve(obj["ref"])
        assert rev.provenance.source == common_pb2.REVISION_SOURCE_TRAINING
        assert rev.labels["mint.train.data"] == obj["data_digest"]
        n = len(cl.score(PROMPT + SENTENCE).token_ids) - len(cl.score(PROMPT).token_ids)
        out = cl.generate(PROMPT, adapter=obj["ref"], sampling=sampling_params(max_tokens=n))
    # The run is gone from the executors once saved.
    assert sum(s.training_runs for s in _executor_status(cluster)) == runs_before
    assert out.text.startswith(SENTENCE)
    # --from: the revision continues (its LoRA and its AdamW state: the saved training state).
    assert rev.state_digest
    r = mint("adapter", "train", "--data", str(data), "--name", "alice/cli", "--from",
             obj["ref"], "--steps", "2", "--lr", "1e-2", "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    more = json.loads(r.stdout.strip().splitlines()[-1])
    assert more["parent"] == obj["ref"] and more["ref"] != obj["ref"]
    assert more["first_loss"] < 0.5 * obj["first_loss"]  # it starts where the first ended
    with _client(cluster, keys["alice"]) as cl:
        cont = cl.resolve(more["ref"])
    assert cont.labels["mint.train.steps"] == "102"
    assert [p.ref for p in cont.provenance.parents] == [obj["ref"]]
    assert (cont.rank, sorted(cont.target_modules)) == (16, sorted(ALL))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    r = mint("adapter", "train", "--data", str(bad), "--name", "alice/bad")
    assert r.returncode == 1 and 'line 1: no "completion" field' in r.stderr
    r = mint("adapter", "train", "--data", str(data), "--name", "alice/bad", "--lr", "0")
    assert r.returncode == 2 and "--lr 0.0 must be a number > 0" in r.stderr


def test_readme_training_block_runs_verbatim(cluster, keys, tmp_path):
    import os
    import re
    import subprocess
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    marker = "<!-- readme-train -->"
    assert readme.count(marker) == 1
    block = re.search(re.escape(marker) + r"\s*```bash\n(.*?)^```", readme, re.S | re.M)[1]
    venv_bin = Path(__file__).resolve().parents[1] / ".venv" / "bin"
    env = {**os.environ, "MINT_API_KEY": keys["alice"], "MINT_ROUTER": cluster.router_address,
           "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"}  # fmt: skip
    r = subprocess.run(["bash", "-c", "set -euo pipefail\n" + block], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.search(r"alice/me@\d+: 100 steps, loss per completion token", r.stdout), r.stdout
    with _client(cluster, keys["alice"]) as cl:
        n = len(cl.score(PROMPT + SENTENCE).token_ids) - len(cl.score(PROMPT).token_ids)
        out = cl.generate(PROMPT, adapter="alice/me", sampling=sampling_params(max_tokens=n))
    assert out.text.startswith(SENTENCE)


def _train(cl, tok, name, sentence, steps=100):
    datum, _, _ = _datum(tok, PROMPT, sentence)
    run = cl.create_training_run(rank=16, targets=ALL, seed=3)
    try:
        for _ in range(steps):
            cl.forward_backward(run.run_id, [datum])
            cl.optim_step(run.run_id, learning_rate=1e-2, beta2=0.999, eps=1e-8)
        return cl.save_run(run.run_id, name)
    finally:
        cl.drop_run(run.run_id)


def test_lifecycle_train_eval_gate_serve_retrain_refused_rollback(cluster, keys, tok, tmp_path):
    """train -> save (@1, provenance training) -> measured eval -> promote to a gated alias ->
    serve (gRPC and the OpenAI API) -> train again (@2) -> its eval misses the gate -> promotion
    refused -> a rollback keeps serving @1's exact tokens."""
    import json

    import openai

    from mintmesh import evaluate as ev

    data = tmp_path / "alice.jsonl"
    data.write_text(json.dumps({"prompt": PROMPT, "completion": SENTENCE}) + "\n")
    dataset = ev.read_dataset(data)
    with _client(cluster, keys["alice"]) as cl:
        first = _train(cl, tok, "alice/life", SENTENCE)
        n1 = int(first.ref.rsplit("@", 1)[1])
        rev = cl.resolve(first.ref)
        assert rev.provenance.source == common_pb2.REVISION_SOURCE_TRAINING
        res = ev.evaluate(cl, first.ref, dataset, concurrency=1)
        ev.record(cl, res)
        assert res.metrics()["exact_match"] == 1.0
        cl.set_gate("alice/life", "prod", "exact_match", 0.9)
        cl.set_alias("alice/life", "prod", n1)
        n = res.completion_tokens
        sp = sampling_params(max_tokens=n)
        served = cl.generate(PROMPT, adapter="alice/life@prod", sampling=sp)
        assert served.text == SENTENCE and served.adapter == first.ref
        with openai.OpenAI(base_url=cluster.openai_base_url, api_key=keys["alice"],
                           max_retries=0) as oai:  # fmt: skip
            http = oai.completions.create(model="alice/life@prod", prompt=PROMPT, max_tokens=n,
                                          temperature=0)  # fmt: skip
        assert http.choices[0].text == SENTENCE
        # Train again on another sentence: @2 no longer says alice's.
        second = _train(cl, tok, "alice/life", " Something else.")
        n2 = int(second.ref.rsplit("@", 1)[1])
        assert n2 == n1 + 1
        res2 = ev.evaluate(cl, second.ref, dataset, concurrency=1)
        ev.record(cl, res2)
        assert res2.metrics()["exact_match"] == 0.0
        with pytest.raises(grpc.RpcError) as ei:
            cl.set_alias("alice/life", "prod", n2)
        assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "exact_match" in ei.value.details()
        # prod still serves @1, exactly.
        again = cl.generate(PROMPT, adapter="alice/life@prod", sampling=sp)
        assert again.token_ids == served.token_ids and again.adapter == first.ref
        # An ungated canary moved to @2 serves it; rolled back, it serves @1's exact tokens.
        cl.set_alias("alice/life", "canary", n2)
        assert cl.generate(PROMPT, adapter="alice/life@canary", sampling=sp).text != SENTENCE
        cl.rollback("alice/life", "canary")
        back = cl.generate(PROMPT, adapter="alice/life@canary", sampling=sp)
        assert back.token_ids == served.token_ids and back.adapter == first.ref
