"""The Tinker API driven by the UNMODIFIED tinker SDK 0.22.0, the one mindlab-toolkit 0.2.0 pins
(what `pip install mindlab-toolkit==0.2.0` brings): its forward_backward is JSON (0.38's is
protobuf), its create_* answer clients (0.38: futures), and its ServiceClient opens its session
eagerly. It cannot share .venv with tinker 0.38, so `make install` keeps it in .venv-tinker022,
and a real process of that interpreter runs tests/tinker022_flow.py against the session's cluster:
once through `import mint` with a MinT `sk-` key (traded for the gateway's JWT), once through plain
`import tinker` with a `tml-` key. What it saw is checked against the mesh's own numbers
(Router.Score, Router.Generate greedy on the saved revision) and against tinker 0.38 sampling the
same revision."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from mintmesh.client import MintClient, sampling_params

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]
PY022 = ROOT / ".venv-tinker022" / "bin" / "python"
SCRIPT = Path(__file__).with_name("tinker022_flow.py")
TEXTS = ("Tinker zero twenty-two.", "Mint pins an older SDK.", "JSON on the wire.")
STEPS, LR, MAX_TOKENS = 3, 2e-2, 10
# sdk -> (tenant, key prefix): mint's sk- keys go through the gateway's JWT exchange.
RUNS = {"mint": ("erin", "sk-"), "tinker": ("fern", "tml-")}

if not PY022.exists():
    pytest.skip(
        f"{PY022.relative_to(ROOT)} is absent: `make install` creates it (tinker 0.22.0 and "
        "mindlab-toolkit 0.2.0, which cannot live in .venv beside tinker 0.38)",
        allow_module_level=True,
    )


@pytest.fixture(scope="module")
def cluster(tinker_cluster):
    return tinker_cluster


@pytest.fixture(scope="module")
def keys(cluster):
    with MintClient(cluster.router_address, timeout=60, api_key=cluster.admin_key) as admin:
        return {t: admin.create_tenant(t).api_key for t, _ in RUNS.values()}


@pytest.fixture(scope="module")
def base_url(cluster):
    """What `mint up` prints for the OpenAI API, without /v1: the gateway's root."""
    return cluster.openai_base_url.removesuffix("/v1")


@pytest.fixture(scope="module")
def seqs(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    return [tok.encode(t) for t in TEXTS]


@pytest.fixture(scope="module", params=sorted(RUNS))
def run(request, keys, base_url, seqs, tmp_path_factory):
    """The flow, run once per SDK entry point by a fresh 0.22 interpreter."""
    sdk = request.param
    tenant, prefix = RUNS[sdk]
    args = {
        "base_url": base_url,
        "api_key": prefix + keys[tenant],
        "sdk": sdk,
        "name": f"t22-{sdk}",
        "seqs": seqs,
        "prompt": seqs[0][:4],
        "steps": STEPS,
        "lr": LR,
        "seed": 7,
        "max_tokens": MAX_TOKENS,
    }
    # Nothing of this interpreter's (its venv, our PYTHONPATH) nor env config of the SDKs; the
    # script's folder off sys.path (PYTHONSAFEPATH), offline.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TINKER_", "MINT_", "VIRTUAL_ENV", "PYTHON"))}  # fmt: skip
    env.update(HF_HUB_OFFLINE="1", PYTHONSAFEPATH="1", TOKENIZERS_PARALLELISM="false")
    r = subprocess.run(
        [str(PY022), "-X", "faulthandler", str(SCRIPT), json.dumps(args)],
        capture_output=True, text=True, timeout=300, env=env,
        cwd=tmp_path_factory.mktemp(f"t22-{sdk}"),
    )  # fmt: skip
    assert r.returncode == 0, f"stdout: {r.stdout[-2000:]}\nstderr: {r.stderr[-6000:]}"
    out = json.loads(r.stdout.strip().splitlines()[-1])
    return dict(out, sdk=sdk, tenant=tenant, key=keys[tenant], args=args)


def _mint(cluster, key):
    return MintClient(cluster.router_address, timeout=60, retries=0, api_key=key)


def test_it_is_the_0_22_sdk_that_ran(run):
    assert run["tinker_version"] == "0.22.0"
    assert run["module"] == run["sdk"]
    if run["sdk"] == "mint":
        assert run["mint_tinker_version"] == "0.22.0"
    assert run["same_classes"]  # mint's ServiceClient is tinker's own
    # 0.22's create_* answer the clients themselves.
    assert run["training_client"] == "TrainingClient"
    assert run["sampling_client"] == "SamplingClient"


def test_json_forward_backward_trains(cluster, run):
    losses = run["losses"]
    assert len(losses) == STEPS and run["finite"], losses
    assert all(x > 0 for x in losses), losses
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    # The first step's logprobs are a fresh LoRA's (B = 0): the base model's, as the mesh
    # scores them; and its loss is their negated sum.
    with _mint(cluster, run["key"]) as cl:
        for seq, lps in zip(run["args"]["seqs"], run["first_logprobs"], strict=True):
            assert len(lps) == len(seq) - 1
            assert lps == pytest.approx(list(cl.score(prompt_token_ids=seq).logprobs), abs=1e-4)
        rev = cl.resolve(run["path"].removeprefix("tinker://"))
    assert losses[0] == pytest.approx(-sum(map(sum, run["first_logprobs"])), rel=1e-5)
    assert rev.labels["mint.train.steps"] == str(STEPS)


def test_the_saved_revision_is_what_samples(cluster, run):
    # save_weights_for_sampler: a revision of the caller's tenant, named by the SDK's argument.
    assert run["path"] == f"tinker://{run['tenant']}/t22-{run['sdk']}@1"
    ref = run["path"].removeprefix("tinker://")
    prompt = run["args"]["prompt"]
    with _mint(cluster, run["key"]) as cl:
        greedy = sampling_params(max_tokens=MAX_TOKENS, logprobs=True)
        want = cl.generate(prompt_token_ids=prompt, adapter=ref, sampling=greedy)
        base = cl.generate(prompt_token_ids=prompt, sampling=sampling_params(max_tokens=MAX_TOKENS))
    (seq,) = run["greedy"]
    assert seq["tokens"] == want.token_ids
    assert seq["logprobs"] == pytest.approx(want.logprobs, abs=1e-4)
    assert seq["stop_reason"] == ("length" if want.finish_reason == "length" else "stop")
    assert want.token_ids != base.token_ids  # the training shows in what it says


def test_tinker_0_38_samples_the_same_from_a_0_22_revision(base_url, run):
    tinker = pytest.importorskip("tinker")
    from tinker import types

    assert tinker.__version__ == "0.38.0"  # this interpreter's: .venv
    sc = tinker.ServiceClient(base_url=base_url, api_key="tml-" + run["key"])
    try:
        sampler = sc.create_sampling_client(model_path=run["path"]).result()
        res = sampler.sample(
            prompt=types.ModelInput.from_ints(run["args"]["prompt"]),
            num_samples=1,
            sampling_params=types.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0),
        ).result()
    finally:
        sc.close("success").result()
    (seq,) = res.sequences
    assert list(seq.tokens) == run["greedy"][0]["tokens"]
    assert seq.logprobs == pytest.approx(run["greedy"][0]["logprobs"], abs=1e-4)
