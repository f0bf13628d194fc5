"""The engine checked against peft, never against itself (issue 17, items 2 and 3).

Sampling is tested for what it is, against the logits peft computes for the same prefix:
top_k=1 is peft's greedy; every sampled token lies inside the top-k set and the top-p nucleus
of peft's softmax(logits / T) at its position; token frequencies over many seeds fit that
distribution (a chi-square bound); stop token ids and stop strings end the output exactly
where peft's greedy tokens first hit them.

Stored revisions are served through the engine: the store keeps an upload as float32, bfloat16,
float16 or int8 (per-row scales) and merges revisions (MergeAdapters: the exact weighted sum
of their deltas, ranks concatenated); peft loaded with those exact weights (rounded or
quantized here, independently of mintmesh.packed; merges with peft's own "cat" combination)
gives the same logits to 1e-4 and the same greedy tokens.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from peft_util import make_peft_adapter, make_strong_adapter, peft_greedy, peft_model_with

from mintmesh import packed
from mintmesh.peft_io import read_peft_dir
from mintmesh.services.executor.config import ExecutorConfig
from mintmesh.services.executor.engine import Engine, GenerationRequest, SamplingOptions
from mintmesh.services.executor.sources import PackedBytesSource
from mintmesh.services.store.config import StoreConfig
from mintmesh.services.store.core import PushHeader, StoreCore

FORMATS = ("float32", "bfloat16", "float16", "int8")
# peft adapter names of the weights each storage format serves (S rounded or quantized).
PEFT_NAME = {"float32": "s", "bfloat16": "s_bf16", "float16": "s_fp16", "int8": "s_int8"}
# Merge weights of MergeAdapters: S (float32 upload) and P (an int8 upload of q/v only).
MERGE_W = {"s": 0.7, "p": -1.5}
PROMPT = [72, 101, 108, 108, 111, 32, 119]  # "Hello w"
ROWS = [PROMPT, list(range(30, 70)), [5], [200, 13, 10, 99]]
# Tokens of the cached peft greedy continuations of PROMPT (a prefix of n is greedy of n).
GREEDY_TOKENS = 48


# ---- independent versions of the stored weights (the spec in mintmesh/packed.py) -----------


def _int8_rows(t: torch.Tensor) -> torch.Tensor:
    """Symmetric per-row int8, dequantized: round(x / s) * s with s = max|row| / 127."""
    s = t.abs().amax(dim=1) / 127
    s = torch.where(s > 0, s, torch.ones_like(s))
    return torch.round(t / s[:, None]).clamp(-127, 127) * s[:, None]


def _stored(t: torch.Tensor, fmt: str) -> torch.Tensor:
    """The float32 weights a pack of storage format fmt holds for t."""
    t = t.float()
    if fmt == "int8":
        return _int8_rows(t)
    return t.to(getattr(torch, fmt)).float()


def _write_peft_dir(out: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    (out / "adapter_config.json").write_text(json.dumps(config))
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(out / "adapter_model.safetensors")
    )
    return out


def _load_peft_tensors(d: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    return (
        json.loads((d / "adapter_config.json").read_text()),
        load_file(str(d / "adapter_model.safetensors")),
    )


def _merged_stored(parts: list[tuple[Path, float]], fmt: str) -> tuple[dict, dict]:
    """The store's merge (services/store/core.py merge_linear) rebuilt from the sources' peft
    weights: per module A = cat_i(A_i), B = cat_i(w_i * scale_i * B_i), scale 1 (alpha = rank,
    the rank the sum of the ranks of the sources that have the module), then stored as fmt.
    As a peft config: r/lora_alpha of the widest module, rank_pattern/alpha_pattern the rest."""
    mods: dict[str, tuple[list, list]] = {}
    for d, w in parts:
        cfg, tensors = _load_peft_tensors(d)
        scale = cfg["lora_alpha"] / cfg["r"]
        for key, a in sorted(tensors.items()):
            if ".lora_A." not in key:
                continue
            name = key.removeprefix("base_model.model.").split(".lora_A.")[0]
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            a_parts, b_parts = mods.setdefault(name, ([], []))
            a_parts.append(a.float())
            b_parts.append(b.float() * float(w * scale))
    tensors, ranks = {}, {}
    for name, (a_parts, b_parts) in mods.items():
        a, b = torch.cat(a_parts, dim=0), torch.cat(b_parts, dim=1)
        tensors[f"base_model.model.{name}.lora_A.weight"] = _stored(a, fmt)
        tensors[f"base_model.model.{name}.lora_B.weight"] = _stored(b, fmt)
        ranks[name] = int(a.shape[0])
    r = max(ranks.values())
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": float(r),
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in ranks}),
        "lora_dropout": 0.0,
        "bias": "none",
        "rank_pattern": {n: k for n, k in ranks.items() if k != r},
        "alpha_pattern": {n: float(k) for n, k in ranks.items() if k != r},
    }
    return cfg, tensors


# ---- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def revisions(tiny_model_dir, base_info, tmp_path_factory):
    """Revisions of a store: the strong adapter S in every storage format, P (q/v, rank 4)
    as int8, and merges of 0.7 S + (-1.5) P stored as float32 and as int8. Also the peft
    directories holding the weights each revision stores."""
    root = tmp_path_factory.mktemp("oracle-adapters")
    s_dir = make_strong_adapter(tiny_model_dir, root / "s", rank=8, seed=101)
    p_dir = make_peft_adapter(
        tiny_model_dir, root / "p", rank=4, seed=7, targets=("q_proj", "v_proj"), std=1.0
    )
    core = StoreCore(StoreConfig(data_dir=root / "store", model_dir=tiny_model_dir), base=base_info)

    def push(name, d, fmt):
        cfg, w = read_peft_dir(d)
        head = PushHeader(name, cfg, hashlib.sha256(w).hexdigest(), len(w), storage_format=fmt)
        rec = core.push(head, [w])
        assert rec.storage_format == fmt
        return rec

    recs = {fmt: push(f"o/s-{fmt}", s_dir, fmt) for fmt in FORMATS}
    recs["p"] = push("o/p", p_dir, "int8")
    sources = [(recs["float32"].ref, MERGE_W["s"]), (recs["p"].ref, MERGE_W["p"])]
    recs["merged"] = core.merge("o/merged", sources)
    recs["merged_int8"] = core.merge("o/merged", sources, storage="int8")
    blobs = {rec.digest: core.fetch(ref=rec.ref).data for rec in recs.values()}
    core.close()

    s_cfg, s_tensors = _load_peft_tensors(s_dir)
    p_cfg, p_tensors = _load_peft_tensors(p_dir)
    dirs = {"s": s_dir}
    for fmt in FORMATS[1:]:
        stored = {k: _stored(v, fmt) for k, v in s_tensors.items()}
        dirs[PEFT_NAME[fmt]] = _write_peft_dir(root / PEFT_NAME[fmt], s_cfg, stored)
    dirs["p_int8"] = _write_peft_dir(
        root / "p_int8", p_cfg, {k: _stored(v, "int8") for k, v in p_tensors.items()}
    )
    # The int8 merge quantizes the merged float32 weights (the sources as the store holds them).
    merge_parts = [(s_dir, MERGE_W["s"]), (dirs["p_int8"], MERGE_W["p"])]
    dirs["merged_int8"] = _write_peft_dir(
        root / "merged_int8", *_merged_stored(merge_parts, "int8")
    )
    return {"recs": recs, "blobs": blobs, "dirs": dirs}


@pytest.fixture(scope="module")
def pm(tiny_model_dir, revisions):
    """peft with every stored revision's weights, and the merge as peft's own "cat"
    combination of S and P's int8 weights (new rank = the sum, lora_alpha = rank)."""
    model = peft_model_with(tiny_model_dir, revisions["dirs"])
    model.add_weighted_adapter(
        ["s", "p_int8"], [MERGE_W["s"], MERGE_W["p"]], "merged", combination_type="cat"
    )
    # The merge without P's part (P weighted 0): what a merge that dropped P would serve.
    model.add_weighted_adapter(["s", "p_int8"], [MERGE_W["s"], 0.0], "no_p", combination_type="cat")
    model.eval()
    return model


@pytest.fixture(scope="module")
def eng(tiny_model_dir, revisions):
    e = Engine.from_config(
        ExecutorConfig(model_dir=tiny_model_dir, max_batch_size=64, max_queue=1024),
        source=PackedBytesSource(revisions["blobs"]),
        autostart=False,
    )
    yield e
    e.close(timeout=0)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def s_digest(revisions):
    return revisions["recs"]["float32"].digest


def _peft_logits(pm, name: str | None, seq: list[int]) -> torch.Tensor:
    """peft's logits [len(seq), vocab] (float64) of one sequence, teacher-forced."""
    x = torch.tensor([list(seq)])
    with torch.no_grad():
        if name is None:
            with pm.disable_adapter():
                return pm(input_ids=x).logits[0].double()
        pm.set_adapter(name)
        return pm(input_ids=x).logits[0].double()


def _request(digest, ids, n, **sampling) -> GenerationRequest:
    return GenerationRequest(
        prompt_token_ids=list(ids),
        sampling=SamplingOptions(max_tokens=n, **sampling),
        adapter_digest=digest,
    )


def _run(eng, reqs: list[GenerationRequest]) -> list:
    """Submit every request at once (one batch), run them to the end; their results."""
    hs = [eng.submit(r) for r in reqs]
    eng.run_until_done(hs)
    return [h.result() for h in hs]


def _generate(eng, digest, ids, n, **sampling):
    return _run(eng, [_request(digest, ids, n, **sampling)])[0]


@pytest.fixture(scope="module")
def greedy(pm):
    """peft's greedy continuation of PROMPT (EOS an ordinary token), n tokens, cached."""
    cache: dict = {}

    def get(name: str | None, n: int) -> list[int]:
        if name not in cache:
            cache[name] = peft_greedy(pm, name, PROMPT, GREEDY_TOKENS, stop_at_eos=False)[0]
        assert n <= GREEDY_TOKENS
        return cache[name][:n]

    return get


def _filtered_probs(logits: torch.Tensor, t: float, top_k: int, top_p: float) -> torch.Tensor:
    """softmax(logits / t) restricted to the top-k tokens, then to the top-p nucleus of what is
    left (the smallest set of most probable tokens whose mass reaches top_p), renormalized."""
    p = torch.softmax(logits.double() / t, dim=-1)
    if 0 < top_k < p.numel():
        keep = torch.zeros_like(p, dtype=torch.bool)
        keep[torch.topk(p, top_k).indices] = True
        p = torch.where(keep, p, 0.0)
        p = p / p.sum()
    if top_p < 1:
        sp, order = torch.sort(p, descending=True)
        before = torch.cumsum(sp, 0) - sp
        drop = order[before >= top_p]
        p = p.clone()
        p[drop] = 0.0
        p = p / p.sum()
    return p


def _allowed(logits: torch.Tensor, tok: int, t: float, top_k: int, top_p: float) -> bool:
    """Whether tok survives top-k and top-p at these logits, with a margin of 1e-4 (engine and
    peft logits differ by ~1e-5; a token on the very edge may go either way)."""
    scores = logits.double() / t
    higher = scores > scores[tok] + 1e-4 / t  # tokens surely ranked above tok
    if top_k and int(higher.sum()) >= top_k:
        return False
    p = torch.softmax(scores, dim=-1)
    if top_k:
        p = torch.where(scores >= torch.topk(scores, top_k).values[-1] - 1e-4 / t, p, 0.0)
        p = p / p.sum()
    return float(p[higher].sum()) < top_p + 1e-4


# ---- sampling ---------------------------------------------------------------------------------


@pytest.mark.parametrize("adapter", ["s", None])
def test_top_k_1_and_a_vanishing_nucleus_are_peft_greedy(eng, s_digest, greedy, adapter):
    digest = s_digest if adapter else None
    want = greedy(adapter, 24)
    filters = [dict(top_k=1, seed=seed) for seed in (0, 1, 2)] + [dict(top_p=1e-6, seed=3)]
    reqs = [_request(digest, PROMPT, 24, temperature=1.3, ignore_eos=True, **f) for f in filters]
    # Unfiltered sampling at that temperature (same seed) is not greedy: the filter made it so.
    reqs.append(_request(digest, PROMPT, 24, temperature=1.3, ignore_eos=True, seed=0))
    *filtered, free = _run(eng, reqs)
    for f, res in zip(filters, filtered, strict=True):
        assert res.token_ids == want, f
    assert free.token_ids != want


SAMPLED = [
    ("s", 1.0, 6, 1.0),  # top-k alone
    (None, 1.0, 0, 0.5),  # top-p alone
    ("s", 0.7, 30, 0.6),  # both: top-k first, then the nucleus of what is left
]


@pytest.mark.parametrize("adapter,t,top_k,top_p", SAMPLED)
def test_sampled_tokens_stay_inside_peft_top_k_and_top_p(eng, pm, s_digest, adapter, t, top_k,
                                                         top_p):  # fmt: skip
    """Each sampled token, at its position (peft teacher-forced on the sampled prefix), is in
    the top-k set and the top-p nucleus of softmax(logits / T); its logprob is peft's."""
    digest = s_digest if adapter else None
    n = 24
    opts = dict(temperature=t, top_k=top_k, top_p=top_p, ignore_eos=True, logprobs=True)
    results = _run(eng, [_request(digest, PROMPT, n, seed=seed, **opts) for seed in range(4)])
    sizes, sampled = [], set()
    for seed, res in enumerate(results):
        toks = res.token_ids
        assert len(toks) == n and res.finish_reason == "length"
        logits = _peft_logits(pm, adapter, PROMPT + toks[:-1])[len(PROMPT) - 1 :]
        for i, tok in enumerate(toks):
            assert _allowed(logits[i], tok, t, top_k, top_p), (seed, i, tok)
            sizes.append(int((_filtered_probs(logits[i], t, top_k, top_p) > 0).sum()))
        want_lp = torch.log_softmax(logits, dim=-1)[torch.arange(n), toks]
        torch.testing.assert_close(torch.tensor(res.logprobs, dtype=torch.float64), want_lp,
                                   atol=1e-4, rtol=0)  # fmt: skip
        sampled.update((i, tok) for i, tok in enumerate(toks))
    # The filters really filter (most of the vocabulary is outside), and sampling really
    # samples (the seeds disagree at most positions).
    assert max(sizes) < eng.vocab_size / 2 and len(sampled) > 2 * n
    if top_k:
        assert max(sizes) <= top_k


def _chi2(counts: torch.Tensor, probs: torch.Tensor, n: int) -> tuple[float, int]:
    """Pearson's statistic and its degrees of freedom; tokens expected fewer than 5 times are
    binned together (that bin joins the smallest other one if it is itself under 5)."""
    exp = probs.double() * n
    order = torch.argsort(exp, descending=True).tolist()
    bins = [(float(counts[t]), float(exp[t])) for t in order if exp[t] >= 5]
    rest = (float(sum(counts[t] for t in order if exp[t] < 5)),
            float(sum(exp[t] for t in order if exp[t] < 5)))  # fmt: skip
    if rest[1] >= 5 or not bins:
        bins.append(rest)
    else:
        o, e = bins.pop()
        bins.append((o + rest[0], e + rest[1]))
    stat = sum((o - e) ** 2 / e if e > 0 else (math.inf if o else 0.0) for o, e in bins)
    return stat, len(bins) - 1


def _chi2_critical(df: int, z: float = 4.753) -> float:
    """Upper quantile of chi-square(df) (Wilson-Hilferty); z = 4.753: p = 1e-6, conservative
    (the seeds are fixed, so the test is deterministic either way)."""
    c = 2 / (9 * df)
    return df * (1 - c + z * math.sqrt(c)) ** 3


FREQS = [
    ("s", 0.5, 0, 1.0),  # temperature alone
    (None, 1.0, 8, 1.0),  # top-k, renormalized
    ("s", 0.4, 0, 0.7),  # top-p, renormalized
]


@pytest.mark.parametrize("adapter,t,top_k,top_p", FREQS)
def test_sampled_frequencies_fit_peft_softmax(eng, pm, s_digest, adapter, t, top_k, top_p):
    """400 one-token requests, seeds 0..399, one prompt: the token counts fit peft's filtered
    softmax(logits / T) by a chi-square bound, and the wrong distributions do not."""
    n = 400
    digest = s_digest if adapter else None
    opts = dict(temperature=t, top_k=top_k, top_p=top_p)
    results = _run(eng, [_request(digest, PROMPT, 1, seed=seed, **opts) for seed in range(n)])
    counts = torch.zeros(eng.vocab_size, dtype=torch.float64)
    for res in results:
        counts[res.token_ids[0]] += 1
    logits = _peft_logits(pm, adapter, PROMPT)[-1]
    want = _filtered_probs(logits, t, top_k, top_p)
    assert counts[want == 0].sum() == 0, "sampled a token outside top-k / top-p"
    stat, df = _chi2(counts, want, n)
    assert df >= 5, df  # enough bins for the bound to mean something
    assert stat < _chi2_critical(df), (stat, df)
    # Power: the same counts reject the unfiltered T=1 softmax and the other model's.
    other = _peft_logits(pm, None if adapter else "s", PROMPT)[-1]
    for wrong in (torch.softmax(logits, -1), _filtered_probs(other, t, top_k, top_p)):
        w_stat, w_df = _chi2(counts, wrong, n)
        assert w_stat > _chi2_critical(w_df), (w_stat, w_df)


def test_seeded_sampling_is_reproducible_across_runs_and_batch_compositions(
    eng, pm, s_digest, tiny_model_dir, revisions
):
    """A seed fixes the tokens whatever else runs in the step; the tokens are valid samples
    of peft's distribution (inside top-k and top-p) and their logprobs are peft's."""
    opts = dict(temperature=1.0, top_p=0.9, top_k=50, seed=1234, logprobs=True)
    first, reseeded = _run(
        eng, [_request(s_digest, [72, 105], 12, **opts), _request(s_digest, [72, 105], 12,
                                                                  **{**opts, "seed": 99})]
    )  # fmt: skip
    assert reseeded.token_ids != first.token_ids
    logits = _peft_logits(pm, "s", [72, 105] + first.token_ids[:-1])[1:]
    for i, tok in enumerate(first.token_ids):
        assert _allowed(logits[i], tok, 1.0, 50, 0.9), (i, tok)
    want_lp = torch.log_softmax(logits, dim=-1)[torch.arange(12), first.token_ids]
    torch.testing.assert_close(torch.tensor(first.logprobs, dtype=torch.float64), want_lp,
                               atol=1e-4, rtol=0)  # fmt: skip
    # Another engine, the request alone there and then in a crowd: other adapters, greedy and
    # sampled neighbours, joining at other steps.
    other = Engine.from_config(
        ExecutorConfig(model_dir=tiny_model_dir, max_step_tokens=32),
        source=PackedBytesSource(revisions["blobs"]),
        autostart=False,
    )
    try:
        alone = _generate(other, s_digest, [72, 105], 12, **opts)
        rec = revisions["recs"]
        others = [other.submit(_request(rec["int8"].digest, range(20, 50), 6, temperature=0.7))]
        other.wait_loads()
        other.step()
        other.step()
        h = other.submit(_request(s_digest, [72, 105], 12, **opts))
        others.append(other.submit(_request(None, [1, 2, 3], 20)))
        other.step()
        others.append(other.submit(_request(rec["merged"].digest, [9], 5, temperature=1.3, seed=5)))
        other.run_until_done([h, *others])
    finally:
        other.close(timeout=0)
    for res in (alone, h.result()):
        assert res.token_ids == first.token_ids
        torch.testing.assert_close(torch.tensor(res.logprobs), torch.tensor(first.logprobs))


def _first_containing(tokenizer, toks: list[int], stop: str) -> int:
    """The first i such that the text of toks[: i + 1] contains stop."""
    return next(
        i
        for i in range(len(toks))
        if stop in tokenizer.decode(toks[: i + 1], skip_special_tokens=True)
    )


@pytest.mark.parametrize("adapter", ["s", None])
def test_stop_token_ids_and_stop_strings_end_where_peft_greedy_first_hits_them(
    eng, s_digest, greedy, tokenizer, adapter
):
    """Stop token ids end the output at the first of them in peft's greedy tokens (its text
    not emitted); a stop string spanning tokens ends it at the token that completes its first
    occurrence in their text, and the text ends right before the stop string."""
    digest = s_digest if adapter else None
    toks = greedy(adapter, GREEDY_TOKENS)
    # Stop ids: two tokens that first occur a few tokens in (the earlier one ends the output)
    # and one that never occurs.
    firsts = [i for i in range(4, len(toks)) if toks[i] not in toks[:i]]
    assert len(firsts) >= 2, toks
    id_cut = firsts[0]
    absent = next(t for t in range(256) if t not in toks)
    stop_ids = (toks[firsts[-1]], absent, toks[id_cut])
    # A stop string: the text of two printable ASCII tokens in a row, a few tokens in.
    j = next(j for j in range(3, len(toks) - 1) if all(32 <= t < 127 for t in toks[j : j + 2]))
    stop = tokenizer.decode(toks[j : j + 2])
    assert len(stop) == 2
    str_cut = _first_containing(tokenizer, toks, stop)
    assert str_cut <= j + 1
    by_id, by_str = _run(eng, [
        _request(digest, PROMPT, GREEDY_TOKENS, ignore_eos=True, stop_token_ids=stop_ids),
        _request(digest, PROMPT, GREEDY_TOKENS, ignore_eos=True, stop=("not-in-it", stop)),
    ])  # fmt: skip
    assert by_id.token_ids == toks[: id_cut + 1] and by_id.finish_reason == "stop"
    assert by_id.completion_tokens == id_cut + 1
    assert by_id.text == tokenizer.decode(toks[:id_cut], skip_special_tokens=True)
    assert by_str.token_ids == toks[: str_cut + 1] and by_str.finish_reason == "stop"
    full = tokenizer.decode(toks[: str_cut + 1], skip_special_tokens=True)
    assert by_str.text == full[: full.index(stop)] and stop not in by_str.text


# ---- stored and merged revisions, served ------------------------------------------------------


def _assert_serves(eng, pm, digest: str, name: str) -> None:
    """engine.forward logits of every row (mixed with base-model rows in the same forward)
    equal peft's with adapter `name` to 1e-4, and greedy tokens are peft's exactly."""
    rows = [(digest, r) for r in ROWS] + [(None, PROMPT)]
    outs = eng.forward(rows)
    for (d, ids), out in zip(rows, outs, strict=True):
        want = _peft_logits(pm, name if d else None, ids).float()
        torch.testing.assert_close(out, want, atol=1e-4, rtol=0, msg=lambda m, i=ids: f"{i}: {m}")
    want = peft_greedy(pm, name, PROMPT, 16, stop_at_eos=False)[0]
    assert _generate(eng, digest, PROMPT, 16, ignore_eos=True).token_ids == want


def _max_diff(pm, a: str, b: str) -> float:
    return max(float((_peft_logits(pm, a, r) - _peft_logits(pm, b, r)).abs().max()) for r in ROWS)


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_storage_format_serves_what_peft_computes_with_its_weights(eng, pm, revisions, fmt):
    rec = revisions["recs"][fmt]
    data = revisions["blobs"][rec.digest]
    header, mods = packed.unpack(data)
    assert header.storage_format == fmt
    # The pack holds exactly the weights rounded (quantized) here, independently.
    _, s_tensors = _load_peft_tensors(revisions["dirs"]["s"])
    for name, mw in mods.items():
        key = f"base_model.model.{name}"
        assert torch.equal(mw.A.float(), _stored(s_tensors[f"{key}.lora_A.weight"], fmt)), name
        assert torch.equal(mw.B.float(), _stored(s_tensors[f"{key}.lora_B.weight"], fmt)), name
    _assert_serves(eng, pm, rec.digest, PEFT_NAME[fmt])
    if fmt != "float32":  # the format matters at this tolerance: serving fp32 would fail
        assert _max_diff(pm, PEFT_NAME[fmt], "s") > 10 * 1e-4


@pytest.mark.parametrize("which", ["merged", "merged_int8"])
def test_merged_revision_serves_peft_weighted_cat_of_its_sources(eng, pm, revisions, which):
    """MergeAdapters 0.7 S + (-1.5) P: served, it equals peft's add_weighted_adapter "cat" of
    S and P (as stored: P int8) at 1e-4; stored as int8, peft with that merge quantized."""
    rec = revisions["recs"][which]
    assert rec.rank == 8 + 4  # concatenated ranks (q/v; the other modules are S's alone)
    header, mods = packed.unpack(revisions["blobs"][rec.digest])
    ranks = {n.rsplit(".", 1)[-1]: m.rank for n, m in mods.items()}
    assert ranks == {"q_proj": 12, "v_proj": 12, "k_proj": 8, "o_proj": 8, "gate_proj": 8,
                     "up_proj": 8, "down_proj": 8}  # fmt: skip
    name = "merged" if which == "merged" else "merged_int8"
    _assert_serves(eng, pm, rec.digest, name)
    assert _max_diff(pm, "merged", "no_p") > 1e-2  # P's part of the merge matters
    if which == "merged_int8":
        assert _max_diff(pm, "merged_int8", "merged") > 10 * 1e-4
