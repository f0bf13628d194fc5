"""Differential tests of every attention path that can serve, against a float64 oracle.

Property-based (hypothesis): shapes drawn at random (query heads, GQA ratios, head dims that
are not multiples of 8, KV block sizes, contexts spanning several blocks and online-softmax
tiles, decode batches of mixed lengths, scattered / contiguous / shared block tables, helper
threads) and values from the regimes real models produce, not only N(0, 1): score spreads of
+-1000 (a one-hot softmax), all-equal scores, scores that rise (or fall) by hundreds from one
tile to the next, very large and very small V.

Covered: the native decode kernel (kernels/attn_cpu.cpp, each ISA path) called directly, and
AttentionPlan.attend (services/executor/kv.py) over packed steps that mix fresh prefills,
prefill chunks after a cached context (zero-copy runs and gathered chunks), and decode tokens,
once with the native kernel and once on the torch path.

The oracle: scaled_dot_product_attention in float64 on the same (fp32) inputs. The tolerance
is relative to the magnitude of V and grows with the magnitude of the scores: an fp32 dot
product of size S is only known to about S * 2^-23, and softmax turns an absolute score error
e into a relative weight error e.

Issue 11's wrong tokens came from one of these regimes (a tile whose best score beats the
running max by ~104 or more left a stale accumulator); its shrunk case is kept below as an
explicit regression test.
"""

from __future__ import annotations

import contextlib

import native_util
import pytest
import torch
import torch.nn.functional as F
from fuzzing import fuzz_examples
from hypothesis import given
from hypothesis import strategies as st

from mintmesh.kernels import native
from mintmesh.kernels.settings import SETTINGS
from mintmesh.services.executor.kv import AttentionPlan, PagedKVCache, SeqSpan

pytestmark = pytest.mark.fuzz

EPS32 = 2.0**-23
REGIMES = ("normal", "wide", "one_hot", "equal", "rising", "falling", "large_v", "tiny_v")


@pytest.fixture(scope="module")
def lib():
    return native_util.require("attn")


# ---- value regimes ----------------------------------------------------------------------------


def _values(regime: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """Shape N(0, 1) inputs into one regime. q: [..., H, D] queries, k/v: [N, KVH, D] rows of
    one sequence in position order (or cache rows); returns (q, k, v)."""
    D = q.shape[-1]
    if regime == "wide":  # scores spanning about +-50 (q and K of scale 16, issue 11's probe)
        return q * 16, k * 16, v
    if regime == "one_hot":  # scores of +-1000: the softmax is one-hot
        return q * (1000.0 / (scale * D**0.5)), k, v
    if regime == "equal":  # every score of a head equal: a plain mean of V
        return q, k[:1].expand_as(k).clone(), v
    if regime in ("rising", "falling"):
        # Every K row carries a component along the mean query direction that grows (or
        # shrinks) by ~40 score units per position: a later tile beats the running max by
        # hundreds (rising), or the first tile holds the max (falling).
        u = q.reshape(-1, D).mean(0)
        u = u / u.norm().clamp_min(1e-6)
        n = k.shape[0]
        pos = torch.arange(n, dtype=k.dtype)
        if regime == "falling":
            pos = pos.flip(0)
        step = 40.0 / (scale * q.norm(dim=-1).mean().clamp_min(1e-3))
        return q, k + (pos * step)[:, None, None] * u, v
    if regime == "large_v":
        return q, k, v * 1e4
    if regime == "tiny_v":
        return q, k, v * 1e-6
    return q, k, v


def _tolerance(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> float:
    """An absolute bound for one sequence: relative to max |V|, widened by the size of the
    largest |q|.|k| sum (the fp32 rounding of the scores)."""
    s = q.abs().reshape(-1, q.shape[-1]).double() @ k.abs().reshape(-1, k.shape[-1]).double().T
    score_mag = float(s.max()) * scale
    vmax = float(v.abs().max())
    return vmax * (2e-5 + 16 * EPS32 * score_mag) + 1e-30


def _sdpa64(q, k, v, scale, causal_offset=None):
    """q [H, n, D], k/v [KVH, ctx, D] -> [n, H, D] in float64; causal with query i at
    position causal_offset + i when given."""
    H, n, _ = q.shape
    ctx = k.shape[1]
    mask = None
    if causal_offset is not None:
        i = torch.arange(n)[:, None]
        mask = torch.arange(ctx)[None, :] <= i + causal_offset
    o = F.scaled_dot_product_attention(
        q[None].double(),
        k[None].double(),
        v[None].double(),
        attn_mask=mask,
        scale=scale,
        enable_gqa=k.shape[0] != H,
    )
    return o[0].transpose(0, 1)


# ---- block tables -----------------------------------------------------------------------------


def _tables(ctxs, bs, layout, g):
    """Block tables for contexts ctxs: "scattered", "contiguous" or "shared" (every sequence
    starts with the same full blocks, then its own). Returns (tables, num_blocks)."""
    need = [-(-c // bs) for c in ctxs]
    num_blocks = sum(need) + 3
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, pos = [], 0
    if layout == "shared":
        common = min((c - 1) // bs for c in ctxs)
        shared, pos = perm[:common], common
    for nb in need:
        if layout == "contiguous":
            tables.append(list(range(pos, pos + nb)))
        elif layout == "shared":
            rest = nb - len(shared)
            tables.append(shared + perm[pos : pos + rest])
            nb = rest
        else:
            tables.append(perm[pos : pos + nb])
        pos += nb
    return tables, num_blocks


# ---- the native decode kernel, called directly ------------------------------------------------


@st.composite
def decode_cases(draw):
    kvh = draw(st.sampled_from([1, 2, 4]))
    ratio = draw(st.sampled_from([1, 2, 3, 4, 8]))
    d = draw(st.sampled_from([1, 3, 8, 15, 16, 24, 40, 64, 80, 128]))
    bs = draw(st.sampled_from([1, 4, 5, 16, 32]))
    batch = draw(st.integers(1, 5))
    ctxs = draw(st.lists(st.integers(1, 300), min_size=batch, max_size=batch))
    return {
        "kvh": kvh,
        "h": kvh * ratio,
        "d": d,
        "bs": bs,
        "ctxs": ctxs,
        "layout": draw(st.sampled_from(["scattered", "contiguous", "shared"])),
        "regime": draw(st.sampled_from(REGIMES)),
        "isa": draw(st.sampled_from(["baseline", "best"])),
        "threads": draw(st.sampled_from([1, 2])),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def _native_decode(lib, c):
    """Run one drawn case through the kernel and the oracle: [(got, want, tol)] per sequence."""
    g = torch.Generator().manual_seed(c["seed"])
    kvh, h, d, bs, ctxs = c["kvh"], c["h"], c["d"], c["bs"], c["ctxs"]
    scale = d**-0.5
    tables, nblocks = _tables(ctxs, bs, c["layout"], g)
    k = torch.randn(nblocks, bs, kvh, d, generator=g)
    v = torch.randn(nblocks, bs, kvh, d, generator=g)
    B = len(ctxs)
    T = B + 2  # rows of the packed step that are not decode rows stay untouched
    rows = torch.randperm(T, generator=g)[:B].to(torch.int64)
    qt = torch.randn(T, h, d, generator=g)
    # Shape each sequence's rows into the regime (shared blocks: the first sequence's wins).
    seqs = []
    for i, (t, n) in enumerate(zip(tables, ctxs, strict=True)):
        idx = torch.tensor(t)
        kk = k[idx].reshape(-1, kvh, d)[:n]
        vv = v[idx].reshape(-1, kvh, d)[:n]
        qq, kk, vv = _values(c["regime"], qt[rows[i]], kk, vv, scale)
        qt[rows[i]] = qq
        pad = len(t) * bs - n
        full_k = torch.cat([kk, k[idx].reshape(-1, kvh, d)[n:]]) if pad else kk
        full_v = torch.cat([vv, v[idx].reshape(-1, kvh, d)[n:]]) if pad else vv
        k[idx] = full_k.reshape(len(t), bs, kvh, d)
        v[idx] = full_v.reshape(len(t), bs, kvh, d)
    for t, n in zip(tables, ctxs, strict=True):
        idx = torch.tensor(t)
        seqs.append((k[idx].reshape(-1, kvh, d)[:n], v[idx].reshape(-1, kvh, d)[:n]))
    flat, starts = [], [0]
    for t in tables:
        flat.extend(t)
        starts.append(len(flat))
    out = torch.full((T, h, d), 123.0)
    lib.set_isa("baseline" if c["isa"] == "baseline" else None)
    try:
        ok = lib.decode(
            out,
            qt.transpose(0, 1),
            k,
            v,
            rows,
            torch.tensor(ctxs, dtype=torch.int32),
            torch.tensor(starts, dtype=torch.int32),
            torch.tensor(flat, dtype=torch.int32),
            scale,
            c["threads"],
        )
    finally:
        lib.set_isa(None)
    assert ok, f"the kernel refused a supported case {c}"
    others = torch.ones(T, dtype=torch.bool)
    others[rows] = False
    assert (out[others] == 123.0).all(), "the kernel wrote rows that are not decode rows"
    res = []
    for i, (kk, vv) in enumerate(seqs):
        q1 = qt[rows[i]][:, None]  # [H, 1, D]
        want = _sdpa64(q1, kk.transpose(0, 1), vv.transpose(0, 1), scale)[0]
        res.append((out[rows[i]], want, _tolerance(q1, kk, vv, scale)))
    return res


def _assert_close(got, want, tol, what):
    err = float((got.double() - want).abs().max())
    assert torch.isfinite(got).all(), f"{what}: non-finite output"
    assert err <= tol, f"{what}: max abs error {err:.3g} > tolerance {tol:.3g}"


@fuzz_examples(150)
@given(c=decode_cases())
def test_native_decode_matches_float64_oracle(lib, c):
    for i, (got, want, tol) in enumerate(_native_decode(lib, c)):
        _assert_close(got, want, tol, f"sequence {i} of {c}")


# Issue 11's probe, shrunk: H=4, KVH=2, D=16, blocks of 16, q and K of scale 16 (scores spanning
# a wide range), a context of 31 tokens (the second tile holds more than 8): the kernel before
# the fix differed from SDPA by 1.6 on outputs of size 1, on both ISA paths. Kept with the
# regimes that reach the same branch from other directions.
REGRESSIONS = [
    # hypothesis's own shrink of the property above against the unfixed kernel: one-token
    # blocks, so every tile is one token and the second beats the first by > 104.
    {"ctxs": [2], "regime": "wide", "seed": 0, "kvh": 1, "h": 1, "d": 1, "bs": 1},
    {"ctxs": [31], "regime": "wide", "seed": 0, "kvh": 2, "h": 4, "d": 16, "bs": 16},
    {"ctxs": [40], "regime": "rising", "seed": 1, "kvh": 1, "h": 1, "d": 8, "bs": 16},
    {"ctxs": [17], "regime": "rising", "seed": 2, "kvh": 2, "h": 2, "d": 3, "bs": 4},
    {"ctxs": [300, 5], "regime": "one_hot", "seed": 3, "kvh": 4, "h": 8, "d": 64, "bs": 32},
]


@pytest.mark.parametrize("isa", ["baseline", "best"])
@pytest.mark.parametrize("case", REGRESSIONS, ids=lambda c: f"{c['regime']}-{c['ctxs']}")
def test_native_decode_regressions(lib, case, isa):
    c = {"layout": "contiguous", "threads": 1, "isa": isa, **case}
    for got, want, tol in _native_decode(lib, c):
        _assert_close(got, want, tol, f"regression {case}")
        # These inputs are far from the tolerance's edge: a stale accumulator is off by O(1).
        assert float((got.double() - want).abs().max()) < 1e-3 * float(want.abs().max() + 1)


# ---- AttentionPlan: every path of a packed step -----------------------------------------------


@st.composite
def plan_cases(draw):
    kvh = draw(st.sampled_from([1, 2]))
    ratio = draw(st.sampled_from([1, 2, 4]))
    d = draw(st.sampled_from([4, 12, 16, 32]))
    bs = draw(st.sampled_from([4, 16, 32]))
    n = draw(st.integers(1, 5))
    spans = []
    for _ in range(n):
        kind = draw(st.sampled_from(["fresh", "decode", "chunk"]))
        if kind == "fresh":
            q_len = draw(st.integers(1, 40))
            spans.append((q_len, q_len))
        elif kind == "decode":
            spans.append((1, draw(st.integers(2, 200))))
        else:
            ctx = draw(st.integers(3, 200))
            spans.append((draw(st.integers(2, min(ctx - 1, 40))), ctx))
    return {
        "kvh": kvh,
        "h": kvh * ratio,
        "d": d,
        "bs": bs,
        "spans": spans,
        "layout": draw(st.sampled_from(["scattered", "contiguous"])),
        "regime": draw(st.sampled_from(REGIMES)),
        "native": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


@contextlib.contextmanager
def _native_attention(lib, on: bool):
    """The plan picks the native kernel where the library is loaded; off: the torch path."""
    saved = native._attn_lib
    native._attn_lib = lib if on else None
    with pytest.MonkeyPatch.context() as mp:
        if not on:
            mp.setattr(SETTINGS, "native", False)
        try:
            yield
        finally:
            native._attn_lib = saved


@fuzz_examples(60)
@given(c=plan_cases())
def test_attention_plan_matches_float64_oracle(lib, c):
    g = torch.Generator().manual_seed(c["seed"])
    kvh, h, d, bs = c["kvh"], c["h"], c["d"], c["bs"]
    scale = d**-0.5
    ctxs = [ctx for _, ctx in c["spans"]]
    tables, nblocks = _tables(ctxs, bs, c["layout"], g)
    cache = PagedKVCache(
        num_layers=1, num_kv_heads=kvh, head_dim=d, block_size=bs, num_blocks=nblocks
    )
    T = sum(q_len for q_len, _ in c["spans"])
    query = torch.randn(T, h, d, generator=g)
    key = torch.empty(T, kvh, d)
    val = torch.empty(T, kvh, d)
    spans, seqs, q0 = [], [], 0
    for (q_len, ctx), table in zip(c["spans"], tables, strict=True):
        kk = torch.randn(ctx, kvh, d, generator=g)
        vv = torch.randn(ctx, kvh, d, generator=g)
        qq, kk, vv = _values(c["regime"], query[q0 : q0 + q_len], kk, vv, scale)
        query[q0 : q0 + q_len] = qq
        cached = ctx - q_len
        for p in range(cached):  # the context already in the cache
            cache.k[0, table[p // bs], p % bs] = kk[p]
            cache.v[0, table[p // bs], p % bs] = vv[p]
        key[q0 : q0 + q_len] = kk[cached:]  # the step's own tokens: written by attend
        val[q0 : q0 + q_len] = vv[cached:]
        spans.append(SeqSpan(q0, q_len, ctx, table))
        seqs.append((q0, q_len, ctx, kk, vv))
        q0 += q_len
    with _native_attention(lib, c["native"]):
        plan = AttentionPlan(spans, cache)
        assert (plan.native is lib) == c["native"]
        out = plan.attend(
            0,
            query.transpose(0, 1)[None],
            key.transpose(0, 1)[None],
            val.transpose(0, 1)[None],
            scale,
        )[0]
    for q0, q_len, ctx, kk, vv in seqs:
        qq = query[q0 : q0 + q_len].transpose(0, 1)
        want = _sdpa64(qq, kk.transpose(0, 1), vv.transpose(0, 1), scale, ctx - q_len)
        _assert_close(
            out[q0 : q0 + q_len],
            want,
            _tolerance(qq, kk, vv, scale),
            f"span (q_len {q_len}, ctx {ctx}) of {c}",
        )
