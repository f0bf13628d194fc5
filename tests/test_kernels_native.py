"""The native CPU LoRA kernel (kernels/lora_cpu.cpp via kernels/native.py) against the float32
oracle: ranks, batch sizes, popularity, odd hidden sizes, scattered pages, both ISA paths,
threads; and the fallback when it cannot be built.

The library is built once per machine (cached under the torch extensions directory); a missing
compiler skips the tests that need it."""

from __future__ import annotations

import logging
import threading

import native_util
import pytest
import torch
from kernels_cases import (
    assert_close,
    batch_slots,
    load_pool,
    make_adapters,
    oracle,
    oracle_v,
    prepare,
)

from mintmesh.kernels import AdapterPool, apply_lora, lora_expand, lora_shrink, native
from mintmesh.kernels.cpu import CpuBackend, native_wins
from mintmesh.kernels.meta import HostMeta
from mintmesh.kernels.settings import SETTINGS, configure

F32 = torch.float32

# (out, in): a real square layer, odd non powers of two, and widths below one vector (8 floats).
SHAPES = {
    "small": {"q_proj": (1024, 1024)},
    "odd": {"a": (200, 96), "b": (96, 200)},
    "ragged": {"up": (1030, 777), "tiny": (5, 13)},
}
RANK_SETS = {
    "r1": [1],
    "r8": [8],
    "r16": [16],
    "r64": [64],
    "r128": [128],
    "mixed": [1, 8, 16, 64, 128, 3, 24],
}
POPS = ("distinct", "zipf", "identical", "some_none", "requests")


@pytest.fixture(scope="module")
def lib():
    return native_util.require("lora")


def _setup(rk: str, T: int, pop: str, shape: str, seed: int = 0, extra_pages: int = 0):
    shapes = SHAPES[shape]
    ranks = RANK_SETS[rk]
    n = max(len(ranks), min(T, 8))
    ranks = (ranks * n)[:n]
    adapters = make_adapters(shapes, ranks, seed=seed)
    pool, slots = load_pool(shapes, adapters, extra_pages=extra_pages)
    by_slot = dict(zip(slots, adapters, strict=True))
    ts = batch_slots(pop, T, slots, seed=seed + 1)
    return shapes, pool, by_slot, ts


def _cases():
    out = []
    i = 0
    for rk in RANK_SETS:
        for T in (1, 7, 133):
            for pop in POPS:
                shape = list(SHAPES)[i % len(SHAPES)]
                out.append(pytest.param(rk, T, pop, shape, id=f"{rk}-T{T}-{pop}-{shape}"))
                i += 1
    return out


@pytest.mark.parametrize("rk,T,pop,shape", _cases())
def test_native_fused_matches_oracle(lib, rk, T, pop, shape):
    shapes, pool, by_slot, ts = _setup(rk, T, pop, shape)
    meta = prepare(ts)
    md = meta.tensors()
    g = torch.Generator().manual_seed(7)
    for layer, (o, n_in) in shapes.items():
        x = torch.randn(T, n_in, generator=g)
        y0 = torch.randn(T, o, generator=g)
        want = oracle(y0, x, ts, by_slot, layer, F32)
        y = y0.clone()
        assert lib.fused(y, x, pool.layer(layer), md, meta.host.num_segments, 1)
        assert_close(y, want, F32, f"native fused {layer}")
        # Through the backend (forced and by the cost model): the same result.
        for be in (CpuBackend("native"), CpuBackend()):
            y = y0.clone()
            apply_lora(y, x, layer, pool, meta, backend=be)
            assert_close(y, want, F32, f"apply_lora {be.strategy} {layer}")


@pytest.mark.parametrize(
    "rk,T,pop,shape",
    [
        ("mixed", 133, "requests", "ragged"),
        ("r128", 7, "distinct", "odd"),
        ("r1", 1, "identical", "small"),
        ("mixed", 133, "some_none", "odd"),
        ("r16", 133, "zipf", "small"),
    ],
)
def test_native_shrink_then_expand_match_oracle(lib, rk, T, pop, shape):
    shapes, pool, by_slot, ts = _setup(rk, T, pop, shape, seed=5)
    meta = prepare(ts)
    width = pool.max_pages_per_adapter * pool.page_rows
    be = CpuBackend("native")
    g = torch.Generator().manual_seed(9)
    for layer, (o, n_in) in shapes.items():
        lw = pool.layer(layer)
        x = torch.randn(T, n_in, generator=g)
        y = torch.randn(T, o, generator=g)
        want = oracle(y, x, ts, by_slot, layer, F32)
        v = torch.full((T, width), 123.0)  # garbage: shrink must overwrite every element
        lora_shrink(v, x, lw.a_pages, lw.page_table, lw.ranks, meta, backend=be)
        assert_close(v, oracle_v(x, ts, by_slot, layer, F32, width), F32, "v")
        # The library itself (not a silent fallback) takes this layout.
        v2 = torch.zeros(T, width)
        assert lib.shrink(v2, x, lw, meta.tensors(), meta.host.num_segments, 1)
        assert_close(v2, v, F32, "v (direct)")
        y2 = y.clone()
        lora_expand(y, v, lw.b_pages, lw.page_table, lw.ranks, lw.scales, meta, backend=be)
        assert_close(y, want, F32, f"native expand {layer}")
        assert lib.expand(y2, v, lw, meta.tensors(), meta.host.num_segments, 1)
        assert_close(y2, want, F32, f"native expand {layer} (direct)")


@pytest.mark.parametrize("isa,threads", [("baseline", 1), (None, 2), ("baseline", 2)])
def test_native_isa_paths_and_threads(lib, isa, threads):
    shapes, pool, by_slot, ts = _setup("mixed", 133, "zipf", "ragged", seed=11)
    meta = prepare(ts)
    g = torch.Generator().manual_seed(3)
    try:
        lib.set_isa(isa)
        for layer, (o, n_in) in shapes.items():
            x = torch.randn(133, n_in, generator=g)
            y = torch.randn(133, o, generator=g)
            want = oracle(y, x, ts, by_slot, layer, F32)
            assert lib.fused(y, x, pool.layer(layer), meta.tensors(), meta.host.num_segments,
                             threads)  # fmt: skip
            assert_close(y, want, F32, f"native {isa} x{threads} {layer}")
    finally:
        lib.set_isa(None)


def test_tiles_shared_by_torch_openmp_team_or_own_helpers(lib, tmp_path):
    """Where torch runs on OpenMP (here), the library is built against torch's own runtime and
    its team shares the tiles; the build without it (helper threads, work_share.h) stays
    correct too: both against the oracle, on one and two threads, decode rows (one per
    adapter: one-row tiles) and a zipf batch."""
    helpers = native_util.check_threading(lib, native.SOURCE, native.NativeLib, tmp_path)
    g = torch.Generator().manual_seed(5)
    for pop, T in (("distinct", 7), ("zipf", 133)):
        shapes, pool, by_slot, ts = _setup("mixed", T, pop, "small", seed=13)
        meta = prepare(ts)
        for layer, (o, n_in) in shapes.items():
            x = torch.randn(T, n_in, generator=g) * 30  # large activations, as real models have
            y0 = torch.randn(T, o, generator=g)
            want = oracle(y0.clone(), x, ts, by_slot, layer, F32)
            for impl in (lib, helpers):
                for threads in (1, 2):
                    y = y0.clone()
                    assert impl.fused(y, x, pool.layer(layer), meta.tensors(),
                                      meta.host.num_segments, threads)  # fmt: skip
                    assert_close(y, want, F32, f"{impl.threading} x{threads} {pop} {layer}")


def test_native_threads_shared_by_concurrent_callers(lib):
    """Helper threads are shared (work_share.h): callers on four Python threads at once, each
    asking for 2 and 3 threads, with one call's tiles taken by the caller and helpers and the other
    callers running alone; every result equals the single-threaded one, bit for bit (each tile is
    computed by one thread, whichever)."""
    shapes, pool, by_slot, ts = _setup("mixed", 133, "zipf", "ragged", seed=17)
    meta = prepare(ts)
    g = torch.Generator().manual_seed(5)
    cases = []
    for layer, (o, n_in) in shapes.items():
        x = torch.randn(133, n_in, generator=g) * 30.0  # large activations
        y = torch.randn(133, o, generator=g)
        want = y.clone()
        assert lib.fused(want, x, pool.layer(layer), meta.tensors(), meta.host.num_segments, 1)
        assert_close(want, oracle(y, x, ts, by_slot, layer, F32), F32, f"x1 {layer}")
        cases.append((layer, x, y, want))
    errors: list[str] = []

    def caller(k: int) -> None:
        for rep in range(20):
            for layer, x, y, want in cases:
                got = y.clone()
                ok = lib.fused(got, x, pool.layer(layer), meta.tensors(),
                               meta.host.num_segments, 2 + (k + rep) % 2)  # fmt: skip
                if not ok or not torch.equal(got, want):
                    errors.append(f"caller {k} rep {rep} {layer}")

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a caller hung"
    assert errors == []


def test_native_reads_scattered_pages_and_skips_untargeted_layers(lib):
    shapes = SHAPES["odd"]
    pool = AdapterPool(shapes, max_adapters=4, page_rows=8, max_pages=9)
    pool.load("fill", make_adapters(shapes, [40], seed=4)[0])  # pages 0..4
    pool.load("hole", make_adapters(shapes, [8], seed=5)[0])  # page 5
    pool.evict("fill")
    pool.load("pad", make_adapters(shapes, [24], seed=7)[0])  # pages 0..2
    scat = make_adapters(shapes, [32], seed=6)[0]
    s_scat = pool.load("scattered", scat)  # 3, 4, 6, 7: no run of 4
    assert pool.pages("scattered") == [3, 4, 6, 7]
    part = make_adapters(shapes, [5], seed=8, skip={0: {"b"}})[0]
    s_part = pool.load("part", part)
    ts = torch.tensor([s_scat, s_part, -1, s_scat, s_part])
    meta = prepare(ts)
    by_slot = {s_scat: scat, s_part: part}
    for layer, (o, n_in) in shapes.items():
        x = torch.randn(5, n_in)
        y = torch.randn(5, o)
        y0 = y.clone()
        want = oracle(y, x, ts, by_slot, layer, F32)
        assert lib.fused(y, x, pool.layer(layer), meta.tensors(), meta.host.num_segments, 1)
        assert_close(y, want, F32, f"scattered {layer}")
        assert torch.equal(y[2], y0[2])
        if layer == "b":  # "part" does not target b: its rows are unchanged
            assert torch.equal(y[[1, 4]], y0[[1, 4]])


def test_native_takes_strided_rows_and_leaves_other_columns(lib):
    shapes, pool, by_slot, ts = _setup("r16", 7, "distinct", "odd")
    meta = prepare(ts)
    xb = torch.randn(7, 300)
    yb = torch.randn(7, 250)
    x, y = xb[:, 3:99], yb[:, 10:210]  # row strides 300 and 250
    want = oracle(y, x, ts, by_slot, "a", F32)
    y_before = yb.clone()
    assert lib.fused(y, x, pool.layer("a"), meta.tensors(), meta.host.num_segments, 1)
    assert_close(y, want, F32, "strided")
    assert torch.equal(yb[:, :10], y_before[:, :10]) and torch.equal(yb[:, 210:], y_before[:, 210:])
    # Column-strided x is not a layout it takes: it says so and the backend falls back.
    xt = torch.randn(96, 7).t()
    y2 = torch.randn(7, 200)
    assert not lib.fused(y2.clone(), xt, pool.layer("a"), meta.tensors(), 1, 1)
    want2 = oracle(y2, xt, ts, by_slot, "a", F32)
    apply_lora(y2, xt, "a", pool, meta, backend=CpuBackend("native"))
    assert_close(y2, want2, F32, "column-strided x, fallback")


@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16])
def test_native_strategy_falls_back_to_torch_for_half_precision(lib, dt):
    shapes = SHAPES["odd"]
    adapters = make_adapters(shapes, [8, 16, 3])
    pool, slots = load_pool(shapes, adapters, dtype=dt)
    ts = batch_slots("some_none", 7, slots)
    meta = prepare(ts)
    x = torch.randn(7, 96).to(dt)
    y = torch.randn(7, 200).to(dt)
    want = oracle(y, x, ts, dict(zip(slots, adapters, strict=True)), "a", dt)
    apply_lora(y, x, "a", pool, meta, backend=CpuBackend("native"))
    assert_close(y, want, dt, "half precision via the torch path")


def test_native_is_chosen_for_decode_not_for_long_prefill_segments():
    decode = HostMeta(num_tokens=64, num_active=64, segments=[(i, i + 1, i) for i in range(64)])
    assert native_wins(decode)
    one = HostMeta(num_tokens=64, num_active=64, segments=[(0, 64, 0)])
    assert native_wins(one)
    prefill = HostMeta(num_tokens=512, num_active=512,
                       segments=[(i * 128, (i + 1) * 128, i) for i in range(4)])  # fmt: skip
    assert not native_wins(prefill)


def test_build_failure_logs_one_warning_and_serves_with_torch(monkeypatch, caplog):
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_failed", False)
    monkeypatch.setattr(native, "_builder", None)
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    shapes, pool, by_slot, ts = _setup("mixed", 7, "some_none", "odd")
    meta = prepare(ts)
    with caplog.at_level(logging.WARNING, logger="mintmesh.kernels.native"):
        assert native.load(block=True) is None
        assert native.load(block=False) is None
        for be in (CpuBackend(), CpuBackend("native")):
            x, y = torch.randn(7, 96), torch.randn(7, 200)
            want = oracle(y, x, ts, by_slot, "a", F32)
            apply_lora(y, x, "a", pool, meta, backend=be)
            assert_close(y, want, F32, "torch fallback")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "torch CPU path" in warnings[0].getMessage()


def test_native_off_by_setting(monkeypatch):
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_builder", None)
    monkeypatch.setattr(SETTINGS, "native", False)
    assert native.load(block=True) is None


@pytest.mark.slow
def test_fresh_build_happens_in_the_background(lib, monkeypatch, tmp_path):
    """Without a cached build, load(block=False) returns None at once and compiles on another
    thread; the result is cached and loads without compiling."""
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_failed", False)
    monkeypatch.setattr(native, "_builder", None)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert native.load(block=False) is None
    assert native._builder is not None
    built = native.load(block=True)  # joins the background build
    assert built is not None and tmp_path in built.path.parents
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_builder", None)
    assert native.load(block=False) is not None  # cached: loaded here, no build thread
    assert native._builder is None


def test_configure_sets_the_kernels_parameters(monkeypatch):
    """The executor's --native-kernels / --lora-threads / --attn-threads reach the kernels through
    configure(); a thread count below 1 is refused and changes nothing."""
    for name in ("native", "lora_threads", "attn_threads"):
        monkeypatch.setattr(SETTINGS, name, getattr(SETTINGS, name))
    configure(lora_threads=2, attn_threads=3)
    assert (SETTINGS.lora_threads, SETTINGS.attn_threads) == (2, 3)
    assert CpuBackend().native_threads == 2
    with pytest.raises(ValueError, match="attn_threads=0"):
        configure(attn_threads=0)
    assert SETTINGS.attn_threads == 3
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_builder", None)
    configure(native=False)
    assert native.load(block=True) is None
    assert native.unavailable_reason() == "disabled (--no-native-kernels)"
