"""Checkpoints that resume, through the UNMODIFIED SDKs against a real cluster (processes, auth
on): tinker 0.38's save_state / load_state / create_training_client_from_state[_with_optimizer]
resume a run exactly (its next steps' losses equal the uninterrupted run's), and mindlab-toolkit
0.2.0's `mint` module (over tinker 0.38, --no-deps) with a MinT `sk-` key (the gateway's JWT
exchange) trains, interpolates checkpoints (the store's exact merge) and distills with
forward_backward_reverse_kl."""

from __future__ import annotations

import warnings

import pytest

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402

from mintmesh.client import MintClient  # noqa: E402

pytestmark = pytest.mark.e2e
TEXTS = ("My name is Alice.", "I live in Lyon.", "I like tea.")
LR = 2e-2


@pytest.fixture(scope="module")
def cluster(tinker_cluster):
    return tinker_cluster


@pytest.fixture(scope="module")
def keys(cluster):
    with MintClient(cluster.router_address, timeout=60, api_key=cluster.admin_key) as admin:
        return {t: admin.create_tenant(t).api_key for t in ("carol", "dave")}


@pytest.fixture(scope="module")
def base_url(cluster):
    return cluster.openai_base_url.removesuffix("/v1")


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def _data(tok, texts=TEXTS):
    out = []
    for t in texts:
        s = tok.encode(t)
        out.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(s[:-1]),
                loss_fn_inputs={"target_tokens": s[1:], "weights": [1.0] * (len(s) - 1)},
            )
        )
    return out


def _steps(tc, data, n):
    losses = []
    for _ in range(n):
        fb = tc.forward_backward(data, loss_fn="cross_entropy")
        op = tc.optim_step(types.AdamParams(learning_rate=LR, weight_decay=0.01))
        losses.append(fb.result().metrics["loss:sum"])
        op.result()
    return losses


def _score(cluster, key, ref, seq):
    with MintClient(cluster.router_address, timeout=60, retries=0, api_key=key) as cl:
        return list(cl.score(prompt_token_ids=seq, adapter=ref).logprobs)


def test_save_state_and_load_state_resume_exactly(cluster, keys, base_url, tok):
    sc = tinker.ServiceClient(base_url=base_url, api_key="tml-" + keys["carol"])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            base = sc.get_server_capabilities().supported_models[0].model_name
        data = _data(tok)
        tc = sc.create_lora_training_client(base_model=base, rank=4, seed=11).result()
        first = _steps(tc, data, 3)
        path = tc.save_state("carol-ckpt").result().path
        assert path == "tinker://carol/carol-ckpt@1"
        want = _steps(tc, data, 3)  # the uninterrupted run
        end = tc.save_weights_for_sampler("carol-end").result().path

        # A new training client from the state, with its optimizer: the same next steps.
        tc2 = sc.create_training_client_from_state_with_optimizer(path).result()
        assert tc2.get_info().lora_rank == 4
        got = _steps(tc2, data, 3)
        assert got == pytest.approx(want, rel=1e-6), (got, want)
        end2 = tc2.save_weights_for_sampler("carol-end2").result().path
        seq = tok.encode(TEXTS[0])
        key = keys["carol"]
        assert _score(cluster, key, end2[9:], seq) == pytest.approx(
            _score(cluster, key, end[9:], seq), abs=1e-6
        )
        # Weights only: the saved weights (the first loss equals), AdamW afresh (then apart).
        tc3 = sc.create_training_client_from_state(path).result()
        fresh = _steps(tc3, data, 2)
        assert fresh[0] == pytest.approx(want[0], rel=1e-6)
        assert fresh[1] != pytest.approx(want[1], rel=1e-4)
        # load_state into the live client: its forward is the state's again.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tc.load_state_with_optimizer(path).result()
        again = _steps(tc, data, 1)
        assert again[0] == pytest.approx(want[0], rel=1e-6)
        # Provenance: a training revision with its state kept beside it, its parent the run's
        # previous save; the data digest chains.
        with MintClient(cluster.router_address, timeout=60, api_key=key) as cl:
            rev = cl.resolve("carol/carol-ckpt@1")
            assert rev.state_digest and rev.state_size_bytes > rev.size_bytes
            assert rev.labels["mint.train.steps"] == "3"
            e2 = cl.resolve(end2[9:])
            assert [p.ref for p in e2.provenance.parents] == ["carol/carol-ckpt@1"]
            assert e2.labels["mint.train.steps"] == "6"
            assert not cl.resolve(end[9:]).state_digest
        assert first[-1] < first[0]
    finally:
        sc.close("success").result()


def test_another_tenants_state_is_not_found_and_a_sampler_path_has_no_optimizer(
    cluster, keys, base_url, tok
):
    carol = tinker.ServiceClient(base_url=base_url, api_key="tml-" + keys["carol"])
    dave = tinker.ServiceClient(base_url=base_url, api_key="tml-" + keys["dave"])
    try:
        tc = carol.create_lora_training_client(base_model=_base(carol), rank=2).result()
        _steps(tc, _data(tok)[:1], 1)
        state = tc.save_state("private").result().path
        sampler = tc.save_weights_for_sampler("private-sampler").result().path
        with pytest.raises(tinker.NotFoundError, match="not found|no model"):
            dave.create_training_client_from_state(state).result()
        with pytest.raises(tinker.BadRequestError, match="no optimizer state"):  # not retried
            carol.create_training_client_from_state_with_optimizer(sampler).result()
        # Its weights alone do load (a served revision as a starting point).
        tc2 = carol.create_training_client_from_state(sampler).result()
        assert tc2.get_info().lora_rank == 2
    finally:
        carol.close("success").result()
        dave.close("success").result()


def _base(sc):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return sc.get_server_capabilities().supported_models[0].model_name


def test_mint_sdk_with_an_sk_key_interpolates_and_distills(cluster, keys, base_url, tok):
    import mint
    import mint.mint as mintx

    sc = mint.ServiceClient(base_url=base_url, api_key="sk-" + keys["dave"])
    try:
        data = _data(tok)
        tc = sc.create_lora_training_client(base_model=_base(sc), rank=4, seed=5).result()
        _steps(tc, data, 2)
        p1 = tc.save_weights_for_sampler("dave-a").result().path
        _steps(tc, data, 3)
        p2 = tc.save_weights_for_sampler("dave-b").result().path

        # interpolate_checkpoints: the store's exact merge. One source at 1.0 is that source.
        one = mintx.interpolate_checkpoints(sc, source_paths=[p1], coefficients=[1.0])
        assert one.path.startswith("tinker://dave/interpolated-")
        seq = tok.encode(TEXTS[1])
        key = keys["dave"]
        assert _score(cluster, key, one.path[9:], seq) == pytest.approx(
            _score(cluster, key, p1[9:], seq), abs=1e-5
        )
        mid = mintx.interpolate_checkpoints(
            sc, source_paths=[p1, p2], coefficients=[0.5, 0.5], output_path="dave-mid"
        )
        assert mid.path == "tinker://dave/dave-mid@1" and mid.coefficients == [0.5, 0.5]
        with MintClient(cluster.router_address, timeout=60, api_key=key) as cl:
            rev = cl.resolve("dave/dave-mid@1")
        assert [(p.ref, p.weight) for p in rev.provenance.parents] == [
            ("dave/dave-a@1", 0.5),
            ("dave/dave-b@1", 0.5),
        ]
        assert rev.rank == 8  # the sources' factors side by side

        # forward_backward_reverse_kl toward p2: a fresh student (the base) is far from it and
        # comes closer as it trains; a student that starts from p2 is at KL 0.
        def kl_data():
            out = []
            for t in TEXTS:
                s = tok.encode(t)
                n = len(s) - 1
                out.append(
                    mintx.ReverseKLDatum(
                        student_input=types.ModelInput.from_ints(s[:-1]),
                        reference_input=types.ModelInput.from_ints(s[:-1]),
                        target_tokens=types.TensorData(data=s[1:], dtype="int64", shape=[n]),
                        weights=types.TensorData(data=[1.0] * n, dtype="float32", shape=[n]),
                    )
                )
            return out

        student = sc.create_lora_training_client(base_model=_base(sc), rank=4, seed=9).result()
        losses = []
        for _ in range(4):
            res = mintx.forward_backward_reverse_kl(
                student, reference_model_path=p2, data=kl_data(), temperature=1.0
            )
            losses.append(res.metrics["loss:sum"])
            student.optim_step(types.AdamParams(learning_rate=LR)).result()
        assert len(res.outputs) == len(TEXTS)
        assert sum(sum(o.loss.data) for o in res.outputs) == pytest.approx(
            res.metrics["loss:sum"], rel=1e-4
        )
        assert losses[0] > 0.05 and losses[-1] < 0.7 * losses[0], losses
        same = sc.create_training_client_from_state(p2).result()
        zero = mintx.forward_backward_reverse_kl(same, reference_model_path=p2, data=kl_data())
        assert abs(zero.metrics["loss:sum"]) < 1e-4
    finally:
        sc.close("success").result()
