"""The native CPU decode attention (kernels/attn_cpu.cpp via kernels.native.load_attn) against a
plain torch reference (SDPA over the K/V gathered from each sequence's block table): context
lengths around block boundaries and long, batch sizes, GQA ratios, head sizes, scattered and
shared block tables, both ISA paths, helper threads; through AttentionPlan (mixed with fresh
sequences, contiguous runs and prefill chunks); and the fallback when the library is off.

The library is built once per machine (cached under the torch extensions directory); a missing
compiler skips the tests that need it."""

from __future__ import annotations

import logging

import native_util
import pytest
import torch
import torch.nn.functional as F

from mintmesh.kernels import native
from mintmesh.kernels.settings import SETTINGS
from mintmesh.services.executor.kv import AttentionPlan, PagedKVCache, SeqSpan, finite_or_zero

F32 = torch.float32
CTXS = (1, 15, 16, 17, 200, 513)
BS = 16


@pytest.fixture(scope="module")
def lib():
    return native_util.require("attn")


def _cache(num_blocks, kvh, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(num_blocks, BS, kvh, d, generator=g)
    v = torch.randn(num_blocks, BS, kvh, d, generator=g)
    return k, v


def _tables(ctxs, num_blocks, layout, seed=0):
    """Block tables for contexts ctxs: "scattered" (random distinct blocks), "shared" (every
    sequence starts with the same full blocks, then its own), "contiguous"."""
    g = torch.Generator().manual_seed(seed + 1)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, pos = [], 0
    shared = perm[:4]
    if layout == "shared":
        pos = 4
    for c in ctxs:
        nb = -(-c // BS)
        if layout == "shared":
            own = (c - 1) // BS  # the block holding the last token is the sequence's own
            head = shared[: min(own, len(shared))]
            rest = nb - len(head)
            tables.append(head + perm[pos : pos + rest])
            pos += rest
        elif layout == "contiguous":
            tables.append(list(range(pos, pos + nb)))
            pos += nb
        else:
            tables.append(perm[pos : pos + nb])
            pos += nb
    assert pos <= num_blocks
    return tables


def _reference(q, k, v, tables, ctxs, scale):
    """q [B, H, D] -> [B, H, D]: SDPA per sequence over its gathered K/V (float64)."""
    kvh = k.shape[2]
    outs = []
    for i, (t, c) in enumerate(zip(tables, ctxs, strict=True)):
        idx = torch.tensor(t)
        kk = k[idx].reshape(-1, kvh, k.shape[3])[:c].transpose(0, 1)[None].double()
        vv = v[idx].reshape(-1, kvh, v.shape[3])[:c].transpose(0, 1)[None].double()
        o = F.scaled_dot_product_attention(
            q[i][None, :, None].double(), kk, vv, scale=scale, enable_gqa=q.shape[1] != kvh
        )
        outs.append(o[0, :, 0])
    return torch.stack(outs).float()


def _flat(tables, ctxs):
    flat, starts = [], [0]
    for t, c in zip(tables, ctxs, strict=True):
        flat.extend(t[: -(-c // BS)])
        starts.append(len(flat))
    return (
        torch.tensor(ctxs, dtype=torch.int32),
        torch.tensor(starts, dtype=torch.int32),
        torch.tensor(flat, dtype=torch.int32),
    )


def _run_native(lib, q, k, v, tables, ctxs, scale, threads=1):
    """q [B, H, D]: laid out as the model hands it ([H, T, D], a strided view of [T, H, D])."""
    B, H, D = q.shape
    T = B + 3  # other rows of the packed batch stay untouched
    rows = torch.randperm(T, generator=torch.Generator().manual_seed(7))[:B].to(torch.int64)
    qt = torch.zeros(T, H, D)
    qt[rows] = q
    out = torch.full((T, H, D), 123.0)
    lens, starts, blocks = _flat(tables, ctxs)
    assert lib.decode(out, qt.transpose(0, 1), k, v, rows, lens, starts, blocks, scale, threads)
    others = torch.ones(T, dtype=torch.bool)
    others[rows] = False
    assert (out[others] == 123.0).all()
    return out[rows]


def _check(got, want):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("d", [64, 128, 80])
@pytest.mark.parametrize("ratio", [1, 2, 4])
@pytest.mark.parametrize("batch", [1, 7, 48])
@pytest.mark.parametrize("layout", ["scattered", "shared"])
def test_native_decode_matches_sdpa(lib, batch, ratio, d, layout):
    kvh = 4
    H = kvh * ratio
    ctxs = [CTXS[(i * 5 + batch) % len(CTXS)] for i in range(batch)]
    if batch == 1:
        ctxs = [513]
    nb = sum(-(-c // BS) for c in ctxs) + 8
    k, v = _cache(nb, kvh, d, seed=batch + ratio + d)
    tables = _tables(ctxs, nb, layout, seed=d)
    q = torch.randn(batch, H, d, generator=torch.Generator().manual_seed(3))
    scale = d**-0.5
    _check(_run_native(lib, q, k, v, tables, ctxs, scale), _reference(q, k, v, tables, ctxs, scale))


@pytest.mark.parametrize("ctx", CTXS)
@pytest.mark.parametrize("ratio", [1, 4])
def test_native_decode_each_context_length(lib, ctx, ratio):
    kvh, d, batch = 2, 64, 3
    ctxs = [ctx] * batch
    nb = batch * (-(-ctx // BS)) + 2
    k, v = _cache(nb, kvh, d, seed=ctx)
    tables = _tables(ctxs, nb, "scattered", seed=ctx)
    # Large logits: the online softmax must subtract its running max.
    q = 8 * torch.randn(batch, kvh * ratio, d, generator=torch.Generator().manual_seed(ctx))
    _check(_run_native(lib, q, k, v, tables, ctxs, 0.125), _reference(q, k, v, tables, ctxs, 0.125))


@pytest.mark.parametrize("isa", ["baseline", "avx2"])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_native_decode_isa_paths_and_threads(lib, isa, threads):
    kvh, d, ratio, batch = 4, 80, 2, 48
    ctxs = [CTXS[i % len(CTXS)] for i in range(batch)]
    nb = sum(-(-c // BS) for c in ctxs)
    k, v = _cache(nb, kvh, d)
    tables = _tables(ctxs, nb, "scattered")
    q = torch.randn(batch, kvh * ratio, d, generator=torch.Generator().manual_seed(1))
    want = _reference(q, k, v, tables, ctxs, 0.1)
    try:
        lib.set_isa("baseline" if isa == "baseline" else None)
        for _ in range(3):
            _check(_run_native(lib, q, k, v, tables, ctxs, 0.1, threads), want)
    finally:
        lib.set_isa(None)


def test_items_shared_by_torch_openmp_team_or_own_helpers(lib, tmp_path):
    """Where torch runs on OpenMP (here), the attention library is built against torch's own
    runtime and its team shares the work items (no second OpenMP runtime in the process); the
    build without it (helper threads, work_share.h) stays correct too: both against the
    reference on one, two and three threads, with large logits across block boundaries, and
    every thread count gives the single-threaded result bit for bit (each item is one thread's,
    whichever), also where few sequences split their KV heads into more items."""
    helpers = native_util.check_threading(lib, native.ATTN_SOURCE, native.AttnLib, tmp_path)
    kvh, d, ratio, batch = 4, 64, 4, 24
    ctxs = [CTXS[(5 * i + 1) % len(CTXS)] for i in range(batch)]
    nb = sum(-(-c // BS) for c in ctxs)
    k, v = _cache(nb, kvh, d, seed=9)
    tables = _tables(ctxs, nb, "scattered", seed=9)
    q = 12 * torch.randn(batch, kvh * ratio, d, generator=torch.Generator().manual_seed(9))
    want = _reference(q, k, v, tables, ctxs, 0.125)
    one = _run_native(lib, q, k, v, tables, ctxs, 0.125, 1)
    _check(one, want)
    for impl in (lib, helpers):
        for threads in (1, 2, 3):
            got = _run_native(impl, q, k, v, tables, ctxs, 0.125, threads)
            assert torch.equal(got, one), f"{impl.threading} x{threads}"
    # Few sequences: the KV heads are split into more items for the threads (1-3 sequences
    # x 4 KV heads), and the split changes no bit either.
    longest = sorted(range(batch), key=lambda i: -ctxs[i])
    for n in (1, 2, 3):
        idx = longest[:n]  # 513 tokens each: 33 blocks
        qn, tn, cn = q[idx], [tables[i] for i in idx], [ctxs[i] for i in idx]
        one = _run_native(lib, qn, k, v, tn, cn, 0.125, 1)
        _check(one, _reference(qn, k, v, tn, cn, 0.125))
        for impl in (lib, helpers):
            for threads in (2, 3):
                got = _run_native(impl, qn, k, v, tn, cn, 0.125, threads)
                assert torch.equal(got, one), f"{impl.threading} x{threads}, {n} sequences"


def test_native_decode_rejects_unsupported_layouts(lib):
    k, v = _cache(4, 2, 64)
    lens, starts, blocks = _flat([[0, 1]], [20])
    rows = torch.tensor([0])
    out = torch.zeros(1, 4, 64)
    q = torch.zeros(4, 1, 64)
    assert not lib.decode(out, q.double(), k, v, rows, lens, starts, blocks, 1.0)
    assert not lib.decode(out, q, k, v, rows.int(), lens, starts, blocks, 1.0)
    # 3 query heads over 2 KV heads is no GQA grouping; a context longer than its blocks.
    assert not lib.decode(out[:, :3], q[:3], k, v, rows, lens, starts, blocks, 1.0)
    lens2, starts2, blocks2 = _flat([[0]], [16])
    assert not lib.decode(out, q, k, v, rows, lens2 + 1, starts2, blocks2, 1.0)
    # Rows and blocks out of range are refused, not read or written.
    assert not lib.decode(out, q, k, v, rows + 1, lens, starts, blocks, 1.0)
    assert not lib.decode(out, q, k, v, rows, lens, starts, blocks + 3, 1.0)
    assert lib.decode(out, q, k, v, rows, lens, starts, blocks, 1.0)


def _plan_inputs(kvh=2, ratio=2, d=64, seed=0):
    """A packed step mixing every kind of span: fresh prefill, decode over scattered and shared
    blocks, decode over one contiguous run, a later prefill chunk."""
    cache = PagedKVCache(num_layers=2, num_kv_heads=kvh, head_dim=d, block_size=BS, num_blocks=96)
    g = torch.Generator().manual_seed(seed)
    cache.k.copy_(torch.randn(cache.k.shape, generator=g))
    cache.v.copy_(torch.randn(cache.v.shape, generator=g))
    spans = [
        SeqSpan(0, 5, 5, [90]),  # fresh
        SeqSpan(5, 1, 40, [7, 3, 60]),  # decode, scattered
        SeqSpan(6, 1, 33, [10, 11, 12]),  # decode, one run
        SeqSpan(7, 1, 35, [7, 3, 61]),  # decode, shares two blocks with the second
        SeqSpan(8, 4, 50, [20, 40, 41, 22]),  # prefill chunk after a cached context
        SeqSpan(12, 1, 1 + 16 * 5, [70, 71, 80, 81, 82, 83]),  # decode, a block boundary
    ]
    T = 13
    H = kvh * ratio
    q = torch.randn(1, T, H, d, generator=g).transpose(1, 2)
    key = torch.randn(1, T, kvh, d, generator=g).transpose(1, 2)
    val = torch.randn(1, T, kvh, d, generator=g).transpose(1, 2)
    return cache, spans, q, key, val


def _plan_out(cache, spans, q, key, val):
    k0, v0 = cache.k.clone(), cache.v.clone()
    plan = AttentionPlan(spans, cache)
    outs = [plan.attend(layer, q, key, val, 0.125) for layer in range(cache.num_layers)]
    cache.k.copy_(k0)
    cache.v.copy_(v0)
    return plan, torch.stack(outs)


def test_plan_uses_native_for_decode_and_matches_torch_path(lib, monkeypatch):
    cache, spans, q, key, val = _plan_inputs()
    plan, got = _plan_out(cache, spans, q, key, val)
    assert plan.native is lib
    assert [s.q_start for s in plan.native_spans] == [5, 6, 7, 12]
    assert plan.decode_rows is None and [r[:2] for r in plan.runs] == [(6, 1)]
    monkeypatch.setattr(native, "_attn_lib", None)
    monkeypatch.setattr(SETTINGS, "native", False)
    plan2, want = _plan_out(cache, spans, q, key, val)
    assert plan2.native is None and not plan2.native_spans
    assert plan2.decode_rows is not None and plan2.runs
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)


def test_plan_native_falls_back_for_other_query_dtypes(lib):
    cache, spans, q, key, val = _plan_inputs()
    # Decode spans only (the other paths need one dtype throughout).
    spans = [s for s in spans if s.q_len == 1]
    spans = [SeqSpan(i, 1, s.ctx_len, s.blocks) for i, s in enumerate(spans)]
    q, key, val = (t[:, :, : len(spans)] for t in (q, key, val))
    plan, want = _plan_out(cache, spans, q, key, val)
    assert plan.native is lib
    _, got = _plan_out(cache, spans, q.double(), key, val)
    torch.testing.assert_close(got.float(), want, rtol=1e-5, atol=2e-6)


def test_plan_threads_setting(lib, monkeypatch):
    """SETTINGS.attn_threads reaches the kernel through the plan: 2 and 3 threads give the
    one-thread result."""
    cache, spans, q, key, val = _plan_inputs(kvh=4, ratio=1, d=128)
    monkeypatch.setattr(SETTINGS, "attn_threads", 1)
    _, want = _plan_out(cache, spans, q, key, val)
    for threads in (2, 3):
        monkeypatch.setattr(SETTINGS, "attn_threads", threads)
        _, got = _plan_out(cache, spans, q, key, val)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)


def test_fallback_when_disabled_or_unbuildable(monkeypatch, caplog):
    monkeypatch.setattr(native, "_attn_lib", None)
    monkeypatch.setattr(native, "_attn_failed", False)
    monkeypatch.setattr(native, "_attn_builder", None)
    monkeypatch.setattr(SETTINGS, "native", False)
    assert native.load_attn(block=True) is None
    assert native.load_attn(block=False) is None
    cache, spans, q, key, val = _plan_inputs()
    plan, off = _plan_out(cache, spans, q, key, val)
    assert plan.native is None and not plan.native_spans
    # No compiler: one warning, then the torch path.
    monkeypatch.setattr(SETTINGS, "native", True)
    monkeypatch.setattr(native, "_compiler", lambda: None)
    with caplog.at_level(logging.WARNING, logger="mintmesh.kernels.native"):
        assert native.load_attn(block=True) is None
        assert native.load_attn(block=False) is None
        plan, got = _plan_out(cache, spans, q, key, val)
    assert plan.native is None
    warnings = [r for r in caplog.records if "attention kernel unavailable" in r.message]
    assert len(warnings) == 1
    torch.testing.assert_close(got, off)
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_finite_or_zero_zeroes_every_non_finite_value_and_keeps_the_rest(dtype):
    """What the runners write into the paged cache: NaN, +inf and -inf become 0 (a strided view,
    as the model hands keys over), every finite value, the largest and subnormal ones too, is
    kept bit for bit."""
    fmax = torch.finfo(dtype).max
    x = (torch.randn(16, 5, 8, generator=torch.Generator().manual_seed(0)) * 1e3).to(dtype)
    x[0, 0, 0], x[1, 2, 3], x[2, 3, 4] = float("nan"), float("inf"), -float("inf")
    x[3, 1, 1], x[4, 4, 7] = fmax, torch.finfo(dtype).tiny / 4
    t = x.transpose(0, 1)
    got = finite_or_zero(t)
    assert got.dtype == dtype and got.shape == t.shape
    bad = ~torch.isfinite(t)
    assert int(bad.sum()) == 3 and bool((got[bad] == 0).all())
    assert torch.equal(got[~bad], t[~bad]) and float(got[1, 3, 1]) == float(fmax)
