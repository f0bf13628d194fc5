"""LoRA ops on CPU: the reference and the CPU path against a float32 oracle computed from the
adapters' own weights; the paged pool; batch metadata; the custom ops; the selector.

The Triton kernels are tested in test_kernels_triton.py (under TRITON_INTERPRET=1 on CPU)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kernels_cases import (
    DTYPES,
    assert_close,
    batch_slots,
    load_pool,
    make_adapters,
    oracle,
    oracle_v,
    prepare,
)

from mintmesh.errors import ResourceExhausted
from mintmesh.kernels import (
    AdapterPool,
    BatchMeta,
    apply_lora,
    backend_name,
    lora_expand,
    lora_fused,
    lora_shrink,
)
from mintmesh.kernels import backends as backends_mod
from mintmesh.kernels.cpu import CpuBackend
from mintmesh.packed import ModuleWeights

REPO = Path(__file__).resolve().parents[1]

# Layer shapes (out, in) of real models, and odd small ones.
SHAPES = {
    "llama7b_qo": {"q_proj": (4096, 4096)},
    "llama7b_up_down": {"up_proj": (11008, 4096), "down_proj": (4096, 11008)},
    "small": {"q_proj": (1024, 1024), "gate_proj": (2816, 1024)},
    "odd": {"a": (200, 96), "b": (96, 200)},
}
RANK_SETS = {
    "r1": [1],
    "r8": [8],
    "r16": [16],
    "r64": [64],
    "r128": [128],
    "mixed": [1, 8, 16, 64, 128],
}
POPS = ("distinct", "zipf", "identical", "some_none", "requests")


def _cases():
    """dtype x ranks x T, with popularity and shapes rotated (not the full product); the
    largest shapes in half precision only at small T (CPU half GEMMs are slow)."""
    out = []
    i = 0
    for dt in DTYPES:
        for rk in RANK_SETS:
            for T in (1, 7, 133):
                pop = POPS[i % len(POPS)]
                shape = list(SHAPES)[i % len(SHAPES)]
                if dt != "fp32" and T == 133 and shape.startswith("llama7b"):
                    shape = "small"
                out.append(pytest.param(dt, rk, T, pop, shape, id=f"{dt}-{rk}-T{T}-{pop}-{shape}"))
                i += 1
    return out


def _setup(dt: str, rk: str, T: int, pop: str, shape: str, seed: int = 0):
    shapes = SHAPES[shape]
    ranks = RANK_SETS[rk]
    n = max(len(ranks), min(T, 8))
    ranks = (ranks * n)[:n]
    adapters = make_adapters(shapes, ranks, seed=seed)
    dtype = DTYPES[dt]
    pool, slots = load_pool(shapes, adapters, dtype=dtype)
    by_slot = dict(zip(slots, adapters, strict=True))
    ts = batch_slots(pop, T, slots, seed=seed + 1)
    return shapes, dtype, pool, by_slot, ts


@pytest.mark.parametrize("dt,rk,T,pop,shape", _cases())
def test_apply_lora_cpu_and_reference_match_oracle(dt, rk, T, pop, shape):
    shapes, dtype, pool, by_slot, ts = _setup(dt, rk, T, pop, shape)
    meta = prepare(ts)
    g = torch.Generator().manual_seed(7)
    for layer, (o, n_in) in shapes.items():
        x = torch.randn(T, n_in, generator=g).to(dtype)
        y0 = torch.randn(T, o, generator=g).to(dtype)
        want = oracle(y0, x, ts, by_slot, layer, dtype)
        for be in ("cpu", "reference"):
            y = y0.clone()
            apply_lora(y, x, layer, pool, meta, backend=be)
            assert_close(y, want, dtype, f"{be} {layer}")


STRATEGY_CASES = [
    ("fp32", "mixed", 7, "distinct", "small"),
    ("fp32", "r16", 133, "zipf", "odd"),
    ("fp32", "mixed", 133, "requests", "odd"),
    ("bf16", "mixed", 133, "some_none", "odd"),
    ("fp16", "r8", 7, "some_none", "small"),
    ("fp32", "r64", 1, "identical", "odd"),
]


@pytest.mark.parametrize("strategy", ["runs", "sorted", "gather"])
@pytest.mark.parametrize("dt,rk,T,pop,shape", STRATEGY_CASES)
def test_cpu_strategies_match_oracle(strategy, dt, rk, T, pop, shape):
    shapes, dtype, pool, by_slot, ts = _setup(dt, rk, T, pop, shape, seed=3)
    meta = prepare(ts)
    be = CpuBackend(strategy=strategy)
    g = torch.Generator().manual_seed(8)
    for layer, (o, n_in) in shapes.items():
        x = torch.randn(T, n_in, generator=g).to(dtype)
        y = torch.randn(T, o, generator=g).to(dtype)
        want = oracle(y, x, ts, by_slot, layer, dtype)
        apply_lora(y, x, layer, pool, meta, backend=be)
        assert_close(y, want, dtype, f"cpu/{strategy} {layer}")


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize(
    "dt,rk,T,pop,shape",
    [
        ("fp32", "mixed", 133, "requests", "small"),
        ("fp32", "r128", 7, "distinct", "odd"),
        ("bf16", "mixed", 7, "some_none", "odd"),
        ("fp16", "r1", 1, "identical", "odd"),
    ],
)
def test_shrink_then_expand_match_oracle(backend, dt, rk, T, pop, shape):
    shapes, dtype, pool, by_slot, ts = _setup(dt, rk, T, pop, shape, seed=5)
    meta = prepare(ts)
    width = pool.max_pages_per_adapter * pool.page_rows
    g = torch.Generator().manual_seed(9)
    for layer, (o, n_in) in shapes.items():
        lw = pool.layer(layer)
        x = torch.randn(T, n_in, generator=g).to(dtype)
        y = torch.randn(T, o, generator=g).to(dtype)
        want = oracle(y, x, ts, by_slot, layer, dtype)
        v = torch.full((T, width), 123.0)  # garbage: shrink must overwrite every element
        lora_shrink(v, x, lw.a_pages, lw.page_table, lw.ranks, meta, backend=backend)
        assert_close(v, oracle_v(x, ts, by_slot, layer, dtype, width), dtype, "v")
        lora_expand(y, v, lw.b_pages, lw.page_table, lw.ranks, lw.scales, meta, backend=backend)
        assert_close(y, want, dtype, f"{backend} expand {layer}")


def test_layers_an_adapter_does_not_target_are_unchanged():
    shapes = SHAPES["odd"]
    adapters = make_adapters(shapes, [8, 16], skip={0: {"b"}})
    pool, slots = load_pool(shapes, adapters)
    ts = torch.tensor([slots[0]] * 3 + [slots[1]] * 2)
    meta = prepare(ts)
    for be in ("cpu", "reference", CpuBackend("gather"), CpuBackend("sorted")):
        x = torch.randn(5, 200)
        y = torch.randn(5, 96)
        y0 = y.clone()
        apply_lora(y, x, "b", pool, meta, backend=be)
        assert torch.equal(y[:3], y0[:3])
        assert not torch.allclose(y[3:], y0[3:])


# ---- the paged pool ----------------------------------------------------------------------------


def _one(shapes, r, seed=0):
    return make_adapters(shapes, [r], seed=seed)[0]


def test_pool_memory_is_proportional_to_rank():
    shapes = SHAPES["small"]
    pool = AdapterPool(shapes, max_adapters=8, page_rows=8, max_pages=64)
    sizes = {}
    for r in (1, 8, 16, 64, 128):
        pool.load(f"r{r}", _one(shapes, r))
        sizes[r] = pool.nbytes(f"r{r}")
    row = 4 * sum(o + i for o, i in shapes.values())  # one rank row of A and B^T, fp32
    for r, n in sizes.items():
        assert n == -(-r // 8) * 8 * row
    assert sizes[8] * 8 == sizes[64] and sizes[64] * 2 == sizes[128]
    assert sizes[1] == sizes[8]  # one page is the granule
    assert pool.nbytes() == sum(sizes.values())
    assert pool.free_pages == 64 - (1 + 1 + 2 + 8 + 16)


def test_pool_raises_when_full_and_eviction_frees_pages_for_reuse():
    shapes = SHAPES["odd"]
    pool = AdapterPool(shapes, max_adapters=3, page_rows=4, max_pages=10)
    pool.load("a", _one(shapes, 16))  # 4 pages
    pool.load("b", _one(shapes, 16))  # 4 pages
    with pytest.raises(ResourceExhausted, match="needs 3 pages"):
        pool.load("c", _one(shapes, 12))
    assert "c" not in pool and pool.free_pages == 2
    assert pool.load("a", _one(shapes, 16)) == pool.slot("a")  # idempotent
    pool.load("d", _one(shapes, 8))  # 2 pages: fits
    with pytest.raises(ResourceExhausted, match="3 adapters resident"):
        pool.load("e", _one(shapes, 1))
    with pytest.raises(ResourceExhausted, match="more than the pool's 10 pages"):
        AdapterPool(shapes, max_adapters=1, page_rows=4, max_pages=10).load("f", _one(shapes, 64))
    assert pool.evict("a") and not pool.evict("a")
    assert pool.free_pages == 4 and sorted(pool.resident()) == ["b", "d"]
    pool.load("c", _one(shapes, 12))
    assert pool.free_pages == 1 and len(pool) == 3


def test_pool_budget_in_bytes():
    shapes = SHAPES["odd"]
    one_page = 8 * 4 * (200 + 96 + 96 + 200)
    pool = AdapterPool(shapes, max_adapters=4, max_bytes=5 * one_page + 7)
    assert pool.num_pages == 5 and pool.capacity_bytes == 5 * one_page
    with pytest.raises(ValueError, match="rank 300 exceeds max_rank 256"):
        pool.load("x", _one(shapes, 300))
    with pytest.raises(ValueError, match="not a LoRA layer"):
        pool.load("x", {"nope": _one(shapes, 4)["a"]})
    bad = _one(shapes, 4)
    bad["a"] = ModuleWeights(A=torch.zeros(4, 95), B=torch.zeros(200, 4), alpha=1, scale=1)
    with pytest.raises(ValueError, match=r"A \[4, 95\]"):
        pool.load("x", bad)
    assert len(pool) == 0 and pool.free_pages == 5


@pytest.mark.parametrize("strategy", [None, "runs", "sorted", "gather"])
def test_loading_after_eviction_reads_no_stale_pages(strategy):
    """A rank-8 adapter loaded into the pages of an evicted rank-64 one; scattered pages too."""
    shapes = SHAPES["odd"]
    pool = AdapterPool(shapes, max_adapters=4, page_rows=8, max_pages=9)
    big = make_adapters(shapes, [48], seed=1)[0]
    pool.load("big", big)  # pages 0..5
    pool.load("mid", make_adapters(shapes, [16], seed=2)[0])  # pages 6..7
    pool.evict("big")
    small = make_adapters(shapes, [5], seed=3)[0]
    s_small = pool.load("small", small)  # page 0 (first fit)
    assert pool.pages("small") == [0]
    pool.evict("mid")
    pool.load("fill", make_adapters(shapes, [40], seed=4)[0])  # pages 1..5
    pool.load("fill2", make_adapters(shapes, [8], seed=5)[0])  # page 6 (7, 8 free)
    scat = make_adapters(shapes, [32], seed=6)[0]
    pool.evict("fill")
    pool.load("pad", make_adapters(shapes, [24], seed=7)[0])  # pages 1..3
    s_scat = pool.load("scattered", scat)  # 4 pages: 4, 5, 7, 8 (no run of 4)
    assert pool.pages("scattered") == [4, 5, 7, 8]
    # Rows of the small adapter's page past its rank are zero (the big adapter's are gone).
    li = pool.layer_id("a")
    assert torch.count_nonzero(pool.a_pages[li][0, 5:]) == 0
    ts = torch.tensor([s_small, s_scat, s_small, -1, s_scat])
    meta = prepare(ts)
    be = CpuBackend(strategy) if strategy else "cpu"
    for layer, (o, n_in) in shapes.items():
        x = torch.randn(5, n_in)
        y = torch.randn(5, o)
        want = oracle(y, x, ts, {s_small: small, s_scat: scat}, layer, torch.float32)
        apply_lora(y, x, layer, pool, meta, backend=be)
        assert_close(y, want, torch.float32, f"after eviction {layer}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pool_pages_are_views_of_one_storage(dtype):
    """Every layer's A and B^T pages live in pool.storage (one allocation, what a bench streams
    to bound the kernels): disjoint views on 256-byte boundaries, in it and nothing else."""
    shapes = SHAPES["odd"]
    pool = AdapterPool(shapes, max_adapters=3, page_rows=8, max_pages=5, dtype=dtype)
    st, es = pool.storage, pool.storage.element_size()
    lo, hi = st.data_ptr(), st.data_ptr() + st.numel() * es
    views = sorted([*pool.a_pages, *pool.b_pages], key=lambda t: t.data_ptr())
    assert len(views) == 2 * len(shapes)
    end = lo
    for t in views:
        assert t.is_contiguous() and t.dtype == dtype and t.untyped_storage() is not None
        assert t.data_ptr() >= end and (t.data_ptr() - lo) % 256 == 0
        end = t.data_ptr() + t.numel() * es
    assert end <= hi and hi - end < 256
    # Less than 256 bytes of padding per view: the storage is the pages.
    assert st.numel() * es - sum(t.numel() for t in views) * es < 256 * len(views)
    assert pool.capacity_bytes == sum(t.numel() for t in views) * es
    ad = make_adapters(shapes, [13], seed=4)[0]
    pool.load("x", ad)
    li = pool.layer_id("a")
    assert torch.count_nonzero(pool.a_pages[li]) > 0
    total = sum(t.double().abs().sum() for t in views)
    assert st.double().abs().sum() == pytest.approx(total.item(), rel=1e-12)
    pool.evict("x")
    pool.load("y", make_adapters(shapes, [5], seed=5)[0])
    (page,) = pool.pages("y")
    assert torch.count_nonzero(pool.a_pages[li][page, :5]) > 0
    assert torch.count_nonzero(pool.a_pages[li][page, 5:]) == 0  # the old adapter's rows: gone


def test_a_load_into_reused_pages_zeroes_the_layers_it_does_not_target():
    """Pages never written are known zero and not zeroed again; pages an evicted adapter
    wrote are: an adapter of layer "a" only, in them, leaves nothing of the old one in "b"."""
    shapes = SHAPES["odd"]
    pool = AdapterPool(shapes, max_adapters=4, page_rows=8, max_pages=4)
    only_a = make_adapters(shapes, [8], seed=2, skip={0: {"b"}})[0]
    pool.load("fresh", only_a)  # page 0, never written before
    lb = pool.layer_id("b")
    assert pool.pages("fresh") == [0] and torch.count_nonzero(pool.b_pages[lb][0]) == 0
    pool.load("both", make_adapters(shapes, [8], seed=1)[0])  # page 1
    assert torch.count_nonzero(pool.b_pages[lb][1]) > 0
    pool.evict("both")
    pool.evict("fresh")
    pool.load("reused", only_a)  # page 0 again, then page 1: the old adapter's rows
    pool.load("reused2", make_adapters(shapes, [8], seed=3, skip={0: {"b"}})[0])
    assert pool.pages("reused2") == [1]
    assert torch.count_nonzero(pool.b_pages[lb][:2]) == 0
    ts = torch.tensor([pool.slot("reused2"), -1])
    x, y = torch.randn(2, 200), torch.randn(2, 96)
    want = y.clone()
    apply_lora(y, x, "b", pool, prepare(ts))
    assert torch.equal(y, want)


# ---- batch metadata -----------------------------------------------------------------------------


def test_batch_meta_segments_runs_and_buffer_reuse():
    meta = BatchMeta.make(max_tokens=16)
    meta.prepare(torch.tensor([2, 2, -1, 0, 2, 0, -1]))
    md = meta.tensors()
    assert meta.num_tokens == 7 and meta.host.num_active == 5
    assert meta.segments == [(0, 2, 0), (2, 5, 2)]
    assert md.sorted_tokens.tolist() == [3, 5, 0, 1, 4, 2, 6]
    assert md.seg_starts[:3].tolist() == [0, 2, 5] and md.seg_slots[:2].tolist() == [0, 2]
    assert int(md.num_segs[0]) == 2
    assert meta.host.run_slots == [2, -1, 0, 2, 0, -1] and meta.host.run_sizes == [2, 1, 1, 1, 1, 1]
    ptr = md.sorted_tokens.data_ptr()
    meta.prepare(torch.tensor([1] * 16))
    assert meta.tensors().sorted_tokens.data_ptr() == ptr  # preallocated, reused
    assert meta.segments == [(0, 16, 1)] and meta.host.max_seg_len == 16
    # tensors() is cached until the next prepare(): each prepare's views, never the last one's
    # (a grow past the preallocated 16 rows included).
    assert meta.tensors() is meta.tensors()
    assert meta.tensors().sorted_tokens.tolist() == list(range(16))
    meta.prepare(torch.tensor([3, -1, 3]))
    md = meta.tensors()
    assert md.token_slots.tolist() == [3, -1, 3] and md.sorted_tokens.tolist() == [0, 2, 1]
    assert md.seg_slots[:1].tolist() == [3] and int(md.num_segs[0]) == 1
    meta.prepare(torch.tensor([0, 1] * 20))
    md = meta.tensors()
    assert md.token_slots.numel() == 40 and md.sorted_tokens[:3].tolist() == [0, 2, 4]
    assert md.seg_slots.tolist()[:2] == [0, 1] and int(md.num_segs[0]) == 2
    meta.prepare(torch.full((40,), -1))
    assert meta.host.num_active == 0 and meta.segments == []
    assert int(meta.tensors().num_segs[0]) == 0
    meta.prepare(torch.empty(0, dtype=torch.long))
    assert meta.num_tokens == 0
    with pytest.raises(ValueError, match="token_slots must be 1-D"):
        meta.prepare(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="slot -2"):
        meta.prepare(torch.tensor([0, -2]))


def test_inputs_are_checked_and_named():
    shapes = SHAPES["odd"]
    pool, slots = load_pool(shapes, make_adapters(shapes, [4]))
    meta = prepare(torch.tensor([slots[0]] * 3))
    with pytest.raises(ValueError, match="x has 2 rows but the batch metadata has 3"):
        apply_lora(torch.zeros(2, 200), torch.zeros(2, 96), "a", pool, meta)
    with pytest.raises(ValueError, match=r"layer a is 200x96 but x is \[3, 95\]"):
        apply_lora(torch.zeros(3, 200), torch.zeros(3, 95), "a", pool, meta)
    with pytest.raises(ValueError, match="pool dtype"):
        apply_lora(torch.zeros(3, 200).half(), torch.zeros(3, 96).half(), "a", pool, meta)
    with pytest.raises(KeyError, match="not a LoRA layer"):
        apply_lora(torch.zeros(3, 200), torch.zeros(3, 96), "zz", pool, meta)
    # A batch whose slot is past the pool's tables (metadata made for a larger pool): refused
    # before any kernel indexes the tables with it, whichever backend is asked for.
    n = pool.max_adapters
    far = prepare(torch.tensor([slots[0], n + 3, slots[0]]))
    refused = f"token_slots has slot {n + 3} but page_table has {n}"
    for be in (None, "cpu", "reference"):
        y = torch.zeros(3, 200)
        with pytest.raises(ValueError, match=refused):
            apply_lora(y, torch.ones(3, 96), "a", pool, far, backend=be)
        assert not y.any()
    lw = pool.layer("a")
    with pytest.raises(ValueError, match="v must be float32"):
        lora_shrink(torch.zeros(3, 256).half(), torch.zeros(3, 96), lw.a_pages, lw.page_table,
                    lw.ranks, meta)  # fmt: skip
    with pytest.raises(ValueError, match="v has 8 columns"):
        lora_shrink(torch.zeros(3, 8), torch.zeros(3, 96), lw.a_pages, lw.page_table, lw.ranks,
                    meta)  # fmt: skip
    with pytest.raises(ValueError, match="b_pages"):
        lora_fused(torch.zeros(3, 199), torch.zeros(3, 96), lw, meta)


# ---- custom ops, torch.compile, selector ---------------------------------------------------------


def _op_args():
    shapes = SHAPES["odd"]
    adapters = make_adapters(shapes, [3, 16, 9])
    pool, slots = load_pool(shapes, adapters)
    ts = torch.tensor([slots[1], slots[1], -1, slots[0], slots[2], slots[1], slots[0]])
    meta = prepare(ts)
    return shapes, adapters, pool, slots, ts, meta


def test_custom_ops_pass_opcheck():
    _, _, pool, _, _, meta = _op_args()
    lw, md = pool.layer("a"), meta.tensors()
    T = meta.num_tokens
    x, y = torch.randn(T, 96), torch.randn(T, 200)
    v = torch.zeros(T, pool.max_pages_per_adapter * pool.page_rows)
    torch.library.opcheck(
        torch.ops.mintmesh.lora_shrink.default, (v, x, lw.a_pages, lw.page_table, lw.ranks, *md)
    )
    torch.library.opcheck(
        torch.ops.mintmesh.lora_expand.default,
        (y, v, lw.b_pages, lw.page_table, lw.ranks, lw.scales, *md),
    )
    torch.library.opcheck(
        torch.ops.mintmesh.lora_fused.default,
        (y, x, lw.a_pages, lw.b_pages, lw.page_table, lw.ranks, lw.scales, *md),
    )


def test_torch_compile_fullgraph_captures_apply_lora():
    shapes, adapters, pool, slots, ts, meta = _op_args()
    by_slot = dict(zip(slots, adapters, strict=True))
    torch._dynamo.reset()

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        y = y * 1.0
        apply_lora(y, x, "a", pool, meta)
        return torch.relu(y)

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    x, y = torch.randn(7, 96), torch.randn(7, 200)
    want = torch.relu(oracle(y, x, ts, by_slot, "a", torch.float32))
    assert_close(compiled(x, y), want, torch.float32, "compiled step")
    # Another batch through the same compiled graph (metadata tensors are inputs).
    meta.prepare(torch.tensor([slots[2]] * 4 + [-1, slots[0], slots[0]]))
    x2 = torch.randn(7, 96)
    want2 = torch.relu(oracle(y, x2, meta.token_slots, by_slot, "a", torch.float32))
    assert_close(compiled(x2, y), want2, torch.float32, "compiled step, second batch")


def test_selector_logs_once_and_falls_back_with_one_warning(monkeypatch, caplog):
    assert backend_name("cpu") == "cpu"
    monkeypatch.setattr(backends_mod, "_chosen", {})

    def broken(*a, **k):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(backends_mod, "_smoke_test", broken)
    with caplog.at_level(logging.INFO, logger="mintmesh.kernels.backends"):
        assert backend_name("cuda") == "reference"
        assert backend_name("cuda") == "reference"
        assert backend_name("cpu") == "cpu"
        assert backend_name("cpu") == "cpu"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    infos = [r for r in caplog.records if r.levelno == logging.INFO]
    assert len(warnings) == 1 and "Triton" in warnings[0].getMessage()
    assert len(infos) == 1 and "cpu" in infos[0].getMessage()
    backends_mod.set_backend("cpu", "reference")
    try:
        assert backend_name("cpu") == "reference"
    finally:
        backends_mod.set_backend("cpu", None)
    assert backend_name("cpu") == "cpu"


def test_gpu_check_exits_cleanly_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: make gpu-check runs the real thing")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run(
        [sys.executable, "-m", "mintmesh.bench.gpu_check"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    assert "no NVIDIA GPU" in r.stdout + r.stderr


def test_kernel_bench_runs_end_to_end_on_the_tiny_backbone(tiny_model_dir, capsys):
    import json

    from mintmesh.bench import kernels as bench

    argv = ["--json", "--preset", "tiny", "--model-dir", str(tiny_model_dir), "--requests", "3",
            "--prompt-len", "5", "--repeats", "1", "--prefill-repeats", "1",
            "--serial-repeats", "1"]  # fmt: skip
    assert bench.main(argv) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    res = json.loads(last)
    assert res["bench"] == "kernels" and res["device"] == "cpu"
    m = res["metrics"]
    # One repeat: each paired-median ratio is the ratio of the two medians it pairs, up to the
    # rounding of all three to 4 decimals (a tiny prefill takes ~2 ms: 0.0016 s is +-3%).
    h = 5e-5

    def ratio_of(name, a, b):
        lo, hi = (m[a] - h) / (m[b] + h), (m[a] + h) / max(m[b] - h, 1e-12)
        assert lo - h <= m[name] <= hi + h, (name, m[name], m[a], m[b])

    ratio_of("decode_mixed_vs_base", "base_decode_ms", "ours_decode_ms")
    ratio_of("decode_vs_peft_mixed", "peft_decode_ms", "ours_decode_ms")
    ratio_of("decode_vs_peft_serial", "peft_serial_decode_ms", "ours_decode_ms")
    ratio_of("prefill_mixed_vs_base", "base_prefill_s", "ours_prefill_s")
    ratio_of("prefill_vs_peft_mixed", "peft_prefill_s", "ours_prefill_s")
    ratio_of("rank_padding_saving_decode", "lora_ops_decode_padded_ms", "lora_ops_decode_real_ms")
    ratio_of("dense_decode_speedup", "stock_base_decode_ms", "base_decode_ms")
    # The decode step's LoRA ops read each adapter's A (r x in) and B (out x r) on every targeted
    # layer once: the bytes the roofline divides by the bandwidth measured beside the ops.
    from mintmesh.model import base_model_info

    shapes = base_model_info(tiny_model_dir).linear_shapes
    per_rank = sum(
        o + i for n, (o, i) in shapes.items() if n.rsplit(".", 1)[-1] in bench.TARGET_LEAVES
    )
    assert m["lora_ops_decode_bytes"] == round(m["mixed_ranks_mean"] * 3) * per_rank * 4
    # (One repeat: the per-round figure is the figure of the medians.)
    t_ops = m["lora_ops_decode_real_ms"] / 1e3
    want = m["lora_ops_decode_bytes"] / (m["pool_read_bandwidth_gb_s"] * 1e9) / t_ops
    assert m["lora_ops_decode_roofline"] == pytest.approx(want, rel=0.05)
    fresh = m["lora_ops_decode_bytes"] / (m["read_bandwidth_gb_s"] * 1e9) / t_ops
    assert m["lora_ops_decode_roofline_fresh_buffer"] == pytest.approx(fresh, rel=0.05)
    assert m["lora_ops_decode_roofline_min"] <= m["lora_ops_decode_roofline"]
    assert m["lora_ops_decode_roofline"] <= m["lora_ops_decode_roofline_max"]
    assert m["read_bandwidth_gb_s"] > 0.1 and m["pool_read_bandwidth_gb_s"] > 0.1
    assert m["lora_threads"] == 2
    # decode_mixed_vs_base's bound: the base step, then the uniform adapters' bytes (3 of rank
    # --rank 16) at the rate their pool's memory streams at.
    assert m["uniform_adapter_decode_bytes"] == 3 * 16 * per_rank * 4
    assert m["uniform_pool_read_bandwidth_gb_s"] > 0.1
    t_lora = m["uniform_adapter_decode_bytes"] / (m["uniform_pool_read_bandwidth_gb_s"] * 1e9)
    base_s = m["base_decode_ms"] / 1e3
    assert m["decode_mixed_vs_base_bound"] == pytest.approx(base_s / (base_s + t_lora), rel=0.01)
    assert 0 < m["decode_mixed_vs_base_bound"] < 1
    # Every target's verdict is its value against its threshold.
    for name, (op, thr) in bench.TARGETS.items():
        assert op == ">=" and res["targets"][name]["met"] == (m[name] >= thr), name
    assert m["pool_bytes_rank8"] * 8 == m["pool_bytes_rank64"]
    # Ours and peft compute the same logits for the mixed batch; the adapters do change them.
    assert m["decode_logits_max_abs_diff_vs_peft"] < 1e-4
    assert m["decode_logits_max_abs_lora_effect"] > 100 * m["decode_logits_max_abs_diff_vs_peft"]
    # The stock-Linear base (peft's copy, adapters off) computes the same logits as our base
    # with its Linears packed for oneDNN.
    from mintmesh.kernels.dense import select_dense

    assert res["params"]["dense_kernels"] == select_dense("cpu", torch.float32)
    assert m["decode_logits_max_abs_diff_stock_base"] < 1e-4
    assert set(res["targets"]) >= {"decode_mixed_vs_base", "pool_bytes_rank8"}
    assert res["targets"]["pool_bytes_rank8"]["met"] is True


def test_gpu_check_adapter_tiers_step_runs_on_the_cpu():
    """The residency round trip `make gpu-check` runs on CUDA works (here on the CPU pool)."""
    from mintmesh.bench.gpu_check import residency_roundtrip

    rt = residency_roundtrip(torch.device("cpu"), n=3, rank=8)
    assert rt["rows_match"] and rt["adapters"] == 3 and rt["host_to_device_p50_ms"] > 0
