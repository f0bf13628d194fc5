"""The Tinker API (/api/v1 on the gateway), driven by the UNMODIFIED tinker SDK 0.38.0 against a
real cluster (processes, auth on): the spec's minimal user script (ServiceClient ->
create_lora_training_client -> forward_backward(cross_entropy) -> optim_step ->
save_weights_for_sampler -> sampling client) trains, saves a revision of the caller's tenant and
samples it; the numbers are the mesh's own (greedy tokens = Router.Generate on the revision,
forward logprobs = Router.Score); bad input is the SDK's user error at once; another tenant's
path is not found; keys without tml- are refused by the SDK itself, tml- keys not ours by us."""

from __future__ import annotations

import time
import warnings

import grpc
import httpx2 as httpx
import pytest

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402

from mintmesh.client import MintClient, sampling_params  # noqa: E402

pytestmark = pytest.mark.e2e
TEXTS = ("Hello there, friend.", "The cat sat on the mat.", "Tinker on a mesh.")


@pytest.fixture(scope="module")
def cluster(tinker_cluster):
    return tinker_cluster


@pytest.fixture(scope="module")
def keys(cluster):
    with MintClient(cluster.router_address, timeout=60, api_key=cluster.admin_key) as admin:
        return {t: admin.create_tenant(t).api_key for t in ("alice", "bob")}


@pytest.fixture(scope="module")
def base_url(cluster):
    """What `mint up` prints for the OpenAI API, without /v1: the gateway's root."""
    return cluster.openai_base_url.removesuffix("/v1")


def _service(base_url, key):
    return tinker.ServiceClient(base_url=base_url, api_key=key)


def _data(tok):
    seqs = [tok.encode(t) for t in TEXTS]
    return seqs, [
        types.Datum(
            model_input=types.ModelInput.from_ints(s[:-1]),
            loss_fn_inputs={"target_tokens": s[1:], "weights": [1.0] * (len(s) - 1)},
        )
        for s in seqs
    ]


@pytest.fixture(scope="module")
def trained(base_url, keys):
    """The spec's minimal user script, run once by alice (with more steps, and a forward on
    the saved weights)."""
    sc = _service(base_url, "tml-" + keys["alice"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated in 0.38, still served
        base = sc.get_server_capabilities().supported_models[0].model_name
    tc = sc.create_lora_training_client(base_model=base, rank=8, seed=3).result()
    tok = tc.get_tokenizer()  # get_info's tokenizer_id: a local directory, offline
    seqs, data = _data(tok)
    losses = []
    for _ in range(8):
        fb = tc.forward_backward(data, loss_fn="cross_entropy")
        op = tc.optim_step(types.AdamParams(learning_rate=2e-2))
        losses.append(fb.result().metrics["loss:sum"])
        op.result()
    path = tc.save_weights_for_sampler(name="sampler-0").result().path
    fwd = tc.forward(data, "cross_entropy").result()
    sampler = sc.create_sampling_client(model_path=path).result()
    yield dict(sc=sc, tc=tc, base=base, seqs=seqs, losses=losses, path=path, fwd=fwd,
               sampler=sampler, tok=tok)  # fmt: skip
    sc.close("success").result()


def _mint(cluster, key):
    return MintClient(cluster.router_address, timeout=60, retries=0, api_key=key)


def test_the_minimal_script_trains_saves_and_samples(cluster, keys, trained):
    losses = trained["losses"]
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    assert losses[-1] < 0.7 * losses[0], losses
    # The saved weights are a revision of alice's tenant, named by the SDK's name argument.
    assert trained["path"] == "tinker://alice/sampler-0@1"
    ref = trained["path"].removeprefix("tinker://")
    prompt = trained["seqs"][0][:4]
    greedy = (
        trained["sampler"]
        .sample(
            prompt=types.ModelInput.from_ints(prompt),
            num_samples=1,
            sampling_params=types.SamplingParams(max_tokens=12, temperature=0.0),
        )
        .result()
    )
    with _mint(cluster, keys["alice"]) as cl:
        rev = cl.resolve(ref)
        want = cl.generate(prompt_token_ids=prompt, adapter=ref,
                           sampling=sampling_params(max_tokens=12, logprobs=True))  # fmt: skip
        base_out = cl.generate(prompt_token_ids=prompt, sampling=sampling_params(max_tokens=12))
    assert rev.labels["mint.train.steps"] == "8"
    (seq,) = greedy.sequences
    assert list(seq.tokens) == want.token_ids
    assert seq.logprobs == pytest.approx(want.logprobs, abs=1e-4)
    assert seq.stop_reason == ("length" if want.finish_reason == "length" else "stop")
    assert want.token_ids != base_out.token_ids  # the training shows in what it says
    # The spec's two samples at temperature 0.7: one sequence each, its logprobs alongside.
    two = (
        trained["sampler"]
        .sample(
            prompt=types.ModelInput.from_ints(prompt),
            num_samples=2,
            sampling_params=types.SamplingParams(max_tokens=5, temperature=0.7, seed=1),
        )
        .result()
    )
    assert len(two.sequences) == 2
    for s in two.sequences:
        assert 1 <= len(s.tokens) <= 5 and len(s.logprobs) == len(s.tokens)


def test_forward_logprobs_equal_the_executors_score(cluster, keys, trained):
    ref = trained["path"].removeprefix("tinker://")
    fwd = trained["fwd"]
    assert fwd.metrics["loss:sum"] > 0
    with _mint(cluster, keys["alice"]) as cl:
        for seq, out in zip(trained["seqs"], fwd.loss_fn_outputs, strict=True):
            score = cl.score(prompt_token_ids=seq, adapter=ref)
            assert out["logprobs"].tolist() == pytest.approx(list(score.logprobs), abs=1e-4)
        # compute_logprobs: the prompt's own, None first (as the SDK writes it).
        seq = trained["seqs"][1]
        got = trained["sampler"].compute_logprobs(types.ModelInput.from_ints(seq)).result()
        assert got[0] is None
        assert got[1:] == pytest.approx(list(cl.score(prompt_token_ids=seq, adapter=ref).logprobs),
                                        abs=1e-4)  # fmt: skip
    # forward_backward's own logprobs: the first step of a fresh LoRA (B = 0) is the base's.
    sc = trained["sc"]
    tc = sc.create_lora_training_client(base_model=trained["base"], rank=2).result()
    seqs, data = _data(trained["tok"])
    fb = tc.forward_backward(data, "cross_entropy").result()
    with _mint(cluster, keys["alice"]) as cl:
        for seq, out in zip(seqs, fb.loss_fn_outputs, strict=True):
            want = list(cl.score(prompt_token_ids=seq).logprobs)
            assert out["logprobs"].tolist() == pytest.approx(want, abs=1e-4)
    assert fb.metrics["loss:sum"] == pytest.approx(
        -sum(sum(o["logprobs"].tolist()) for o in fb.loss_fn_outputs), rel=1e-5
    )


def _bad_vocab(d):
    ids = d.model_input.to_ints()
    return types.Datum(model_input=types.ModelInput.from_ints([*ids[:-1], 99999]),
                       loss_fn_inputs=d.loss_fn_inputs)  # fmt: skip


def _bad_weights(d):
    n = d.model_input.length
    return types.Datum(
        model_input=d.model_input,
        loss_fn_inputs={"target_tokens": d.loss_fn_inputs["target_tokens"],
                        "weights": [1.0] * (n - 1)},
    )  # fmt: skip


@pytest.mark.parametrize(
    "make, loss, needle",
    [
        (_bad_vocab, "cross_entropy", "outside the vocabulary"),
        (_bad_weights, "cross_entropy", "weights has"),
        (lambda d: d, "cispo", "'cispo' is not one of"),
    ],
    ids=["token-outside-vocab", "weights-length", "unknown-loss"],
)
def test_bad_input_is_the_sdks_user_error_at_once(base_url, keys, trained, make, loss, needle):
    sc = trained["sc"]
    tc = sc.create_lora_training_client(base_model=trained["base"], rank=2).result()
    _, data = _data(trained["tok"])
    t0 = time.monotonic()
    with pytest.raises(tinker.RequestFailedError) as ei:
        tc.forward_backward([make(data[0]), *data[1:]], loss).result()
    elapsed = time.monotonic() - t0
    assert ei.value.category == types.RequestErrorCategory.User, ei.value
    assert needle in str(ei.value)
    assert elapsed < 10, f"a user error took {elapsed:.1f} s (retried?)"
    # The run is still usable: its next call is served.
    ok = tc.forward(data, "cross_entropy").result()
    assert len(ok.loss_fn_outputs) == len(data)


def _nan_weights(d):
    n = d.model_input.length
    return types.Datum(
        model_input=d.model_input,
        loss_fn_inputs={"target_tokens": d.loss_fn_inputs["target_tokens"],
                        "weights": [1.0] * (n - 1) + [float("nan")]},
    )  # fmt: skip


def _inf_advantages(d):
    n = d.model_input.length
    return types.Datum(
        model_input=d.model_input,
        loss_fn_inputs={"target_tokens": d.loss_fn_inputs["target_tokens"],
                        "logprobs": [-1.0] * n, "advantages": [float("inf")] + [0.5] * (n - 1)},
    )  # fmt: skip


@pytest.mark.parametrize(
    "make, loss, needle",
    [
        (_nan_weights, "cross_entropy", "weights holds a value that is not finite"),
        (_inf_advantages, "importance_sampling", "advantages holds a value that is not finite"),
    ],
    ids=["nan-weights", "inf-advantages"],
)
def test_non_finite_inputs_are_the_sdks_user_error(base_url, keys, trained, make, loss, needle):
    sc = trained["sc"]
    tc = sc.create_lora_training_client(base_model=trained["base"], rank=2).result()
    _, data = _data(trained["tok"])
    with pytest.raises(tinker.RequestFailedError) as ei:
        tc.forward_backward([make(data[0])], loss).result()
    assert ei.value.category == types.RequestErrorCategory.User, ei.value
    assert needle in str(ei.value)


def test_a_learning_rate_of_zero_and_a_step_without_gradients_are_user_errors(trained):
    sc = trained["sc"]
    tc = sc.create_lora_training_client(base_model=trained["base"], rank=2).result()
    t0 = time.monotonic()
    with pytest.raises(tinker.RequestFailedError) as ei:
        tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    assert ei.value.category == types.RequestErrorCategory.User
    assert "no gradients" in str(ei.value)
    _, data = _data(trained["tok"])
    tc.forward_backward(data[:1], "cross_entropy").result()
    with pytest.raises(tinker.RequestFailedError) as ei:
        tc.optim_step(types.AdamParams(learning_rate=0.0)).result()
    assert ei.value.category == types.RequestErrorCategory.User
    assert "learning_rate=0.0 must be > 0" in str(ei.value)
    assert time.monotonic() - t0 < 20  # never the SDK's retry loop


def test_a_rank_above_the_maximum_and_an_unserved_base_are_refused(trained):
    sc = trained["sc"]
    t0 = time.monotonic()
    with pytest.raises(tinker.BadRequestError, match=r"rank=100000 must be in \[1, "):
        sc.create_lora_training_client(base_model=trained["base"], rank=100000).result()
    with pytest.raises(tinker.NotFoundError, match="no base model 'Qwen/nope'"):
        sc.create_lora_training_client(base_model="Qwen/nope", rank=2).result()
    assert time.monotonic() - t0 < 20


def test_another_tenants_path_is_not_found(base_url, keys, trained):
    sc = _service(base_url, "tml-" + keys["bob"])
    try:
        t0 = time.monotonic()
        with pytest.raises(tinker.NotFoundError) as ei:
            sc.create_sampling_client(model_path=trained["path"]).result()
        assert "no model at" in str(ei.value) and time.monotonic() - t0 < 10
        # Bob's own view: the base model samples.
        s = sc.create_sampling_client(base_model=trained["base"]).result()
        out = s.sample(
            prompt=types.ModelInput.from_ints(trained["seqs"][0][:3]),
            num_samples=1,
            sampling_params=types.SamplingParams(max_tokens=3, temperature=0.0),
        ).result()
        assert len(out.sequences[0].tokens) >= 1
    finally:
        sc.close("success").result()


def test_a_key_without_tml_is_refused_by_the_sdk_and_a_foreign_tml_key_by_us(base_url, keys):
    # The SDK itself refuses a key without its prefix, before any request: MinT keys go as
    # tml-<key>.
    with pytest.raises(tinker.TinkerError, match="tml-"):
        _service(base_url, keys["alice"]).create_lora_training_client(
            base_model="x", rank=2
        ).result()
    t0 = time.monotonic()
    sc = _service(base_url, "tml-mint_000000000000_notarealkeynotarealkey")
    with pytest.raises(tinker.AuthenticationError):
        sc.create_lora_training_client(base_model="x", rank=2).result()
    assert time.monotonic() - t0 < 10


def _post(base_url, key, path, body, **headers):
    return httpx.post(f"{base_url}/api/v1/{path}", json=body, timeout=60,
                      headers={"X-API-Key": key, **headers})  # fmt: skip


def _result(base_url, key, rid):
    for _ in range(10):
        r = _post(base_url, key, "retrieve_future", {"request_id": rid})
        assert r.status_code == 200, r.text
        if r.json().get("type") != "try_again":
            return r.json()
    raise AssertionError("no result")


def test_calls_run_in_seq_id_order_once_and_capacity_is_429(cluster, base_url, keys, trained):
    """Raw HTTP (0.22's JSON bodies): an optim_step sent before its forward_backward waits for
    it; a retried submit (same X-Idempotency-Key, or the same seq_id) is one call; a run that
    does not fit is a 429 with Retry-After."""
    key = "tml-" + keys["alice"]
    sid = _post(base_url, key, "create_session", {"sdk_version": "raw"}).json()["session_id"]
    r = _post(base_url, key, "create_model",
              {"session_id": sid, "model_seq_id": 0, "base_model": trained["base"],
               "lora_config": {"rank": 2}})  # fmt: skip
    assert r.status_code == 200, r.text
    mid = r.json()["model_id"]
    assert mid == f"{sid}:train:0"
    assert _result(base_url, key, r.json()["request_id"]) == {"model_id": mid}
    seq = trained["seqs"][0]
    datum = {
        "model_input": {"chunks": [{"type": "encoded_text", "tokens": seq[:-1]}]},
        "loss_fn_inputs": {
            "target_tokens": {"data": seq[1:], "dtype": "int64", "shape": [len(seq) - 1]},
            "weights": {"data": [1.0] * (len(seq) - 1), "dtype": "float32"},
        },
    }
    opt = {"model_id": mid, "seq_id": 2, "adam_params": {"learning_rate": 1e-3}}
    o1 = _post(base_url, key, "optim_step", opt, **{"X-Idempotency-Key": "k-opt"}).json()
    o2 = _post(base_url, key, "optim_step", opt, **{"X-Idempotency-Key": "k-opt"}).json()
    o3 = _post(base_url, key, "optim_step", opt).json()  # a new key, the same seq_id
    assert o1["request_id"] == o2["request_id"] == o3["request_id"]
    fbi = {"data": [datum], "loss_fn": "cross_entropy"}
    body = {"model_id": mid, "seq_id": 1, "forward_backward_input": fbi}
    fb = _post(base_url, key, "forward_backward", body).json()
    out = _result(base_url, key, fb["request_id"])
    assert len(out["loss_fn_outputs"][0]["logprobs"]["data"]) == len(seq) - 1
    assert "error" not in _result(base_url, key, o1["request_id"])  # ran after, with gradients
    # Does not fit the executor's training memory: 429 with Retry-After (the SDK backs off).
    r = _post(base_url, key, "create_model",
              {"session_id": sid, "model_seq_id": 1, "base_model": trained["base"],
               "lora_config": {"rank": 256}})  # fmt: skip
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1, r.text
    assert "training memory" in r.json()["detail"]
    # A user error on a synchronous call: 4xx with a body, and told not to retry.
    r = _post(base_url, key, "create_model",
              {"session_id": sid, "model_seq_id": 2, "base_model": trained["base"],
               "lora_config": {"rank": 2, "train_attn": False, "train_mlp": False}})  # fmt: skip
    assert r.status_code == 400 and "lm_head" in r.json()["detail"]
    assert r.headers["x-should-retry"] == "false"
    # Another tenant's future is not there.
    bob = "tml-" + keys["bob"]
    r = _post(base_url, bob, "retrieve_future", {"request_id": fb["request_id"]})
    assert r.status_code == 404
    # Finishing the session drops its runs on their executor.
    done = _post(base_url, key, f"sessions/{sid}/finish", {"reason": {"type": "success"}})
    assert done.status_code == 200
    with _mint(cluster, keys["alice"]) as cl, pytest.raises(grpc.RpcError) as ei:
        cl.optim_step(mid.replace(":", "-"))
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND


def test_readme_tinker_lines_run_against_the_gateway(cluster, base_url, keys, tmp_path):
    """The README's Tinker snippet (with its export), run as written by a fresh interpreter,
    offline."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    marker = "<!-- readme-tinker -->"
    assert readme.count(marker) == 1
    block = re.search(re.escape(marker) + r"\s*```python\n(.*?)^```", readme, re.S | re.M)[1]
    export = re.search(r"^export (TINKER_BASE_URL=\S+) (TINKER_API_KEY=\S+)$", readme, re.M)
    assert export and export[1] == "TINKER_BASE_URL=http://127.0.0.1:8000"
    assert export[2] == "TINKER_API_KEY=tml-$MINT_API_KEY"
    (tmp_path / "snippet.py").write_text(block)
    env = {
        **os.environ,
        # What the export says, with this cluster's port and alice's key as MINT_API_KEY.
        "TINKER_BASE_URL": base_url,
        "TINKER_API_KEY": "tml-" + keys["alice"],
        "HF_HUB_OFFLINE": "1",
    }
    r = subprocess.run(
        [sys.executable, str(tmp_path / "snippet.py")], capture_output=True, text=True,
        timeout=120, env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    losses = [float(ln.split()[1]) for ln in lines[:5]]
    assert [int(ln.split()[0]) for ln in lines[:5]] == list(range(5))
    assert losses[-1] < losses[0], losses
    assert lines[5].startswith("tinker://alice/hello@1 [")


def test_the_gateway_still_loads_no_torch(cluster, trained):
    pid = cluster.children["gateway"].proc.pid
    with open(f"/proc/{pid}/maps") as f:
        maps = f.read()
    assert "libtorch" not in maps and "python" in maps
