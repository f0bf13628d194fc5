"""Parity with peft for adapters that matter: strongly trained LoRAs on all seven modules
(issue 11's recipe: peft's own random init after torch.manual_seed, every lora_ parameter x4),
prompts spanning several KV blocks and hundreds of tokens, long generations, mixed arrivals,
prefix-cache reuse. Every token equals peft's and every logprob is within 1e-4 of peft's.

The native decode attention is built first and each test asserts it (or, where the test says
so, the torch path) really served: on a cold build cache the engine would otherwise silently
test the torch path (kernels.native.load_attn(block=False) builds in the background).

The adapters are strong: greedy tokens differ from the base model's at most positions (asserted),
so a dropped adapter, a dropped scale or a stale accumulator shows up as wrong tokens, and an
error smaller than a top-1 margin shows up in the logprobs.
"""

from __future__ import annotations

import native_util
import pytest
import torch
from backends import BACKENDS, needs_ort
from peft_util import (
    ALL_MODULES,
    make_peft_adapter,
    make_strong_adapter,
    peft_greedy,
    peft_model_with,
)

from mintmesh.kernels import native
from mintmesh.kernels.settings import SETTINGS
from mintmesh.model import load_model
from mintmesh.peft_io import read_peft_dir, validate_and_pack
from mintmesh.services.executor import kv as kvmod
from mintmesh.services.executor.config import ExecutorConfig
from mintmesh.services.executor.engine import Engine, GenerationRequest, SamplingOptions
from mintmesh.services.executor.sources import PackedBytesSource

# name: (rank, seed); s101 is issue 11's adapter exactly.
STRONG = {"s101": (8, 101), "s7": (16, 7), "s3": (4, 3)}
# peft's greedy tokens for issue 11's scenario (its report; the mesh answered ...218, 92, 15).
ISSUE_11_PROMPT = "The personal model of"
ISSUE_11_TOKENS = [158, 139, 15, 37, 89, 42, 218, 222, 160, 15]
LOGPROB_TOL = 1e-4


@pytest.fixture(scope="module")
def native_attention():
    return native_util.require("attn")


@pytest.fixture(scope="module")
def strong(tiny_model_dir, base_info, tmp_path_factory):
    root = tmp_path_factory.mktemp("strong-adapters")
    dirs, digests, data = {}, {}, {}
    for name, (rank, seed) in STRONG.items():
        d = make_strong_adapter(tiny_model_dir, root / name, rank=rank, seed=seed)
        pa = validate_and_pack(*read_peft_dir(d), base_info, max_rank=64)
        dirs[name], digests[name], data[pa.digest] = d, pa.digest, pa.data
    return dirs, digests, data


@pytest.fixture(scope="module")
def oracle(tiny_model_dir, strong):
    """(tokens, fp32 logprobs, float64 logprobs): peft's greedy generation in fp32, and the
    same tokens' logprobs from peft in float64 (the truth the fp32 numbers approximate)."""
    pm = peft_model_with(tiny_model_dir, strong[0])
    pm64 = peft_model_with(tiny_model_dir, strong[0]).double()
    cache: dict = {}

    def run(name, ids, n, stop_at_eos=True):
        key = (name, tuple(ids), n, stop_at_eos)
        if key not in cache:
            toks, lps = peft_greedy(pm, name, list(ids), n, stop_at_eos=stop_at_eos)
            seq = torch.tensor([list(ids) + toks])
            with torch.no_grad():
                if name is None:
                    with pm64.disable_adapter():
                        logits = pm64(input_ids=seq).logits[0]
                else:
                    pm64.set_adapter(name)
                    logits = pm64(input_ids=seq).logits[0]
            lp = torch.log_softmax(logits, -1)
            lps64 = [float(lp[len(ids) - 1 + j, t]) for j, t in enumerate(toks)]
            cache[key] = (toks, lps, lps64)
        return cache[key]

    return run


@pytest.fixture()
def make_engine(tiny_model_dir, strong, backend):
    made = []

    def make(**cfg):
        cfg.setdefault("backend", backend)
        eng = Engine.from_config(
            ExecutorConfig(model_dir=tiny_model_dir, **cfg),
            source=PackedBytesSource(strong[2]),
            autostart=False,
        )
        made.append(eng)
        return eng

    yield make
    for eng in made:
        eng.close(timeout=0)


def _req(strong, name, ids, n, **sampling):
    return GenerationRequest(
        prompt_token_ids=list(ids),
        sampling=SamplingOptions(max_tokens=n, logprobs=True, **sampling),
        adapter_digest=strong[1][name] if name else None,
    )


# The onnxruntime runner is an independent fp32 implementation (its own op order, MLAS GEMMs).
# A few decode rows of these strong adapters are ill-conditioned: there the torch runner, the
# ORT graph and the same graph run eagerly in torch disagree with each other by 1e-3 to 9e-3
# (measured, logits of scale ~2.4), while the torch runner happens to stay within 1e-4 of
# float64 peft. So for ORT: every token equal, 98% of logprobs within the torch bound, all
# within LOGPROB_TOL_ORT.
LOGPROB_TOL_ORT = 1e-2


def _assert_matches(res, want, what, tol=LOGPROB_TOL, *, loose=None):
    """Every token peft's; every logprob within LOGPROB_TOL of the float64 truth, widened where
    peft's own fp32 logprob is off the truth (a few ill-conditioned positions: with adapters
    this strong, fp32 peft itself misses the float64 value by up to ~3e-4 at some tokens)."""
    toks, lps32, lps64 = want
    assert res.token_ids == toks, f"{what}: tokens differ from peft's"
    assert len(res.logprobs) == len(toks)
    tight = 0
    for j, (got, p32, p64) in enumerate(zip(res.logprobs, lps32, lps64, strict=True)):
        bound = tol + 2 * abs(p32 - p64)
        if loose is not None:
            tight += abs(got - p64) <= bound
            bound = loose
        assert abs(got - p64) <= bound, (
            f"{what}: logprob of token {j} is {got:.6f}, float64 peft {p64:.6f}, fp32 peft "
            f"{p32:.6f} (bound {bound:.3g})"
        )
    return tight


def _prompt(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), generator=g).tolist()


def test_strong_adapters_change_most_tokens(oracle):
    ids = _prompt(0, 60)
    base = oracle(None, ids, 32, False)[0]
    for name in STRONG:
        toks = oracle(name, ids, 32, False)[0]
        differ = sum(a != b for a, b in zip(toks, base, strict=True))
        assert differ >= 24, f"{name} changes only {differ} of 32 greedy tokens"


def test_issue_11_scenario_engine(make_engine, strong, oracle, tiny_model_dir, native_attention):
    _, tok = load_model(tiny_model_dir)
    ids = tok(ISSUE_11_PROMPT)["input_ids"]
    want = oracle("s101", ids, 24)
    assert want[0][:10] == ISSUE_11_TOKENS
    eng = make_engine()
    before = dict(kvmod.ATTENTION_TOKENS)
    h = eng.submit(_req(strong, "s101", ids, 24, temperature=0.0))
    eng.run_until_done([h])
    _assert_matches(h.result(), want, "issue 11's scenario")
    assert kvmod.ATTENTION_TOKENS["native_decode"] - before["native_decode"] == 23
    assert kvmod.ATTENTION_TOKENS["torch_decode"] == before["torch_decode"]


# (arrival step, adapter, prompt length, prompt seed, generated tokens)
LONG = [
    (0, "s101", 300, 1, 128),
    (0, None, 220, 2, 64),
    (3, "s7", 380, 3, 100),
    (7, "s3", 250, 4, 96),
    (12, "s101", 205, 5, 64),
]


@pytest.mark.parametrize(
    "block_size,backend",
    [(4, "torch"), (16, "torch"), (32, "torch"), pytest.param(16, "onnxruntime", marks=needs_ort)],
)
def test_long_mixed_generations_match_peft_tokens_and_logprobs(
    make_engine, strong, oracle, native_attention, block_size, backend
):
    eng = make_engine(kv_block_size=block_size, max_batch_size=8, max_step_tokens=256)
    before = dict(kvmod.ATTENTION_TOKENS)
    handles, step = {}, 0
    while step < 2000 and not (len(handles) == len(LONG) and all(h.done for h in handles.values())):
        for i, (at, name, n, seed, k) in enumerate(LONG):
            if at == step:
                handles[i] = eng.submit(_req(strong, name, _prompt(seed, n), k, ignore_eos=True))
        eng.wait_loads()
        eng.step()
        step += 1
    tight = 0
    for i, (_, name, n, seed, k) in enumerate(LONG):
        res = handles[i].result()
        assert len(res.token_ids) == k
        loose = None if backend == "torch" else LOGPROB_TOL_ORT
        want = oracle(name, _prompt(seed, n), k, False)
        tight += _assert_matches(res, want, f"request {i} ({name})", loose=loose)
    if backend != "torch":
        total = sum(k for *_, k in LONG)
        assert tight >= 0.98 * total, f"{total - tight} of {total} logprobs past the fp32 bound"
    decoded = sum(k - 1 for *_, k in LONG)
    if backend == "torch":
        assert kvmod.ATTENTION_TOKENS["native_decode"] - before["native_decode"] == decoded
    else:  # the ORT graph attended: the torch paths never ran
        assert dict(kvmod.ATTENTION_TOKENS) == before
    assert eng.kv_blocks_used() == 0


def test_torch_decode_path_matches_peft_too(make_engine, strong, oracle, monkeypatch):
    """The fallback that serves where the library is off: the same strong-adapter parity."""
    monkeypatch.setattr(native, "_attn_lib", None)
    monkeypatch.setattr(SETTINGS, "native", False)
    eng = make_engine(kv_block_size=16)
    before = dict(kvmod.ATTENTION_TOKENS)
    jobs = [("s101", _prompt(11, 90), 40), ("s7", _prompt(12, 33), 48), (None, _prompt(13, 17), 32)]
    hs = [eng.submit(_req(strong, n, ids, k, ignore_eos=True)) for n, ids, k in jobs]
    eng.run_until_done(hs)
    for (name, ids, k), h in zip(jobs, hs, strict=True):
        _assert_matches(h.result(), oracle(name, ids, k, False), f"torch path {name}")
    assert kvmod.ATTENTION_TOKENS["native_decode"] == before["native_decode"]
    assert kvmod.ATTENTION_TOKENS["torch_decode"] - before["torch_decode"] == 39 + 47 + 31


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefix_cache_reuse_with_a_strong_adapter_matches_peft(
    make_engine, strong, oracle, native_attention, backend
):
    """A second turn re-sends the first (prompt and reply): its cached blocks are reused and
    every token of both turns is peft's."""
    eng = make_engine(kv_block_size=16)
    p1 = _prompt(21, 70)
    h1 = eng.submit(_req(strong, "s7", p1, 40, ignore_eos=True))
    eng.run_until_done([h1])
    r1 = h1.result()
    _assert_matches(r1, oracle("s7", p1, 40, False), "turn 1")
    p2 = p1 + r1.token_ids + _prompt(22, 20)
    computed = eng.prefill_tokens_computed
    h2 = eng.submit(_req(strong, "s7", p2, 36, ignore_eos=True))
    eng.run_until_done([h2])
    _assert_matches(h2.result(), oracle("s7", p2, 36, False), "turn 2")
    hit = (len(p1) + len(r1.token_ids) - 1) // 16 * 16
    assert eng.prefix_hit_tokens == hit and hit >= 96
    assert eng.prefill_tokens_computed - computed == len(p2) - hit
    # The same prompt with another adapter reuses nothing and is that adapter's.
    h3 = eng.submit(_req(strong, "s3", p2, 32, ignore_eos=True))
    eng.run_until_done([h3])
    _assert_matches(h3.result(), oracle("s3", p2, 32, False), "turn 2 under s3")
    assert eng.prefix_hit_tokens == hit


# Tolerances keyed by dtype: bf16 keeps 8 bits of mantissa (2^-8 = 3.9e-3 relative per
# rounding); two implementations that round in different places drift apart by a few of those
# over a 2-layer forward.
LOGIT_TOL = {"float32": 1e-4, "bfloat16": 6e-2}


@pytest.mark.parametrize("dtype", ["bfloat16"])
def test_half_precision_executor_matches_peft_in_the_same_dtype(
    tiny_model_dir, base_info, tmp_path, dtype
):
    """A bf16 executor end to end (forward logits and greedy generation) against peft in bf16
    with the same adapter. The x4 strong adapters are chaotic in bf16 (peft in bf16 misses its
    own fp32 logits by ~3.7 at some positions, and so does the engine): this test uses an
    ordinary adapter on all seven modules. Bound: the engine's distance to the fp32 truth is at
    most twice peft-bf16's worst, or the dtype's tolerance; greedy tokens are peft's
    wherever peft's top-2 margin is wider than that tolerance."""
    tdt = getattr(torch, dtype)
    d = make_peft_adapter(tiny_model_dir, tmp_path / "a", rank=8, targets=ALL_MODULES, seed=5)
    pa = validate_and_pack(*read_peft_dir(d), base_info, max_rank=64)
    pm32 = peft_model_with(tiny_model_dir, {"a": d})
    pm = peft_model_with(tiny_model_dir, {"a": d}).to(tdt)
    eng = Engine.from_config(
        ExecutorConfig(model_dir=tiny_model_dir, dtype=dtype),
        source=PackedBytesSource({pa.digest: pa.data}),
        autostart=False,
    )
    try:
        assert eng.model.dtype == tdt
        ids = _prompt(31, 60)
        tol = LOGIT_TOL[dtype]
        x = torch.tensor([ids])
        got = eng.forward([(pa.digest, ids), (None, ids)])
        truths = []
        for row, lg in zip(("a", None), got, strict=True):
            outs = []
            with torch.no_grad():
                for m in (pm32, pm):
                    if row is None:
                        with m.disable_adapter():
                            outs.append(m(input_ids=x).logits[0].float())
                    else:
                        m.set_adapter(row)
                        outs.append(m(input_ids=x).logits[0].float())
            truth, peft_half = outs
            scale = max(float(truth.abs().max()), 1.0)
            e_eng = (lg.float() - truth).abs().amax(-1)
            e_peft = (peft_half - truth).abs().amax(-1)
            bound = max(2 * float(e_peft.max()), tol * scale)
            bad = (e_eng > bound).nonzero().flatten().tolist()
            assert not bad, f"{row}: positions {bad} off by {e_eng[bad].tolist()} > {bound:.3g}"
            truths.append(truth)
        # The adapter matters at this precision: it moves the logits far past the tolerance.
        assert float((truths[0] - truths[1]).abs().max()) > 5 * tol * scale
        # Greedy: the engine's tokens are peft-bf16's; where they part, the two tokens are a
        # near-tie of the fp32 truth (within the precision's noise), never a clear choice.
        h = eng.submit(
            GenerationRequest(ids, SamplingOptions(max_tokens=32, ignore_eos=True), pa.digest)
        )
        eng.run_until_done([h])
        toks = h.result().token_ids
        want = peft_greedy(pm, "a", ids, 32, stop_at_eos=False)[0]
        j = next((i for i, (u, v) in enumerate(zip(toks, want, strict=True)) if u != v), None)
        if j is not None:
            pm32.set_adapter("a")
            with torch.no_grad():
                lg = pm32(input_ids=torch.tensor([ids + want[:j]])).logits[0, -1]
            gap = abs(float(lg[toks[j]] - lg[want[j]]))
            assert gap <= 2 * bound, f"token {j}: {toks[j]} vs peft's {want[j]}, a gap of {gap:.3g}"
    finally:
        eng.close(timeout=0)
