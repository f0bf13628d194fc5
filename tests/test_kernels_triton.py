"""The Triton kernels against the float32 oracle.

On CUDA (MINTMESH_TEST_DEVICE=cuda, what `make gpu-check` runs) the kernels run compiled. On a
machine without a GPU they run under the Triton interpreter, which must be switched on before
triton is first imported and stays on for the whole process: so the cases run in a child
pytest process with TRITON_INTERPRET=1 (test_triton_kernels_under_the_interpreter), and the
interpreter never leaks into the other tests of this session. The interpreter is slow: the
cases are a chosen table (every dtype, rank, batch size and popularity appears; not the full
product) at small hidden sizes (96, 200); the compiled run adds real model sizes.
"""

from __future__ import annotations

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
)

from mintmesh.kernels import BatchMeta, apply_lora, lora_expand, lora_shrink

REPO = Path(__file__).resolve().parents[1]
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = os.environ.get("MINTMESH_TEST_DEVICE") or (
    "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
)
RUN_HERE = DEVICE == "cuda" or INTERPRET
here = pytest.mark.skipif(
    not RUN_HERE,
    reason="no GPU: these cases run in a TRITON_INTERPRET=1 child process "
    "(test_triton_kernels_under_the_interpreter)",
)

SMALL = {"a": (200, 96), "b": (96, 200)}
REAL = {"q_proj": (4096, 4096), "up_proj": (11008, 4096), "down_proj": (4096, 11008)}
RANK_SETS = {
    "r1": [1],
    "r8": [8],
    "r16": [16],
    "r64": [64],
    "r128": [128],
    "mixed": [1, 8, 16, 64, 128],
}


@pytest.fixture(scope="module")
def triton_ops():
    if not RUN_HERE:
        pytest.skip("runs in the interpreter child process")
    from mintmesh.kernels import triton_ops

    return triton_ops


def _setup(shapes, rk, T, pop, dt, seed=0, n=None):
    ranks = RANK_SETS[rk]
    n = n or max(len(ranks), min(T, 6))
    ranks = (ranks * n)[:n]
    adapters = make_adapters(shapes, ranks, seed=seed)
    dtype = DTYPES[dt]
    pool, slots = load_pool(shapes, adapters, dtype=dtype, device=DEVICE)
    ts = batch_slots(pop, T, slots, seed=seed + 1)
    meta = BatchMeta.make().prepare(ts, device=DEVICE)
    return dtype, pool, dict(zip(slots, adapters, strict=True)), ts, meta


# (dtype, ranks, T, popularity): every value of each axis appears, mixed ranks in every dtype.
FUSED_CASES = [
    ("fp32", "r1", 7, "distinct"),
    ("fp32", "r16", 133, "zipf"),
    ("fp32", "mixed", 133, "requests"),
    ("fp32", "mixed", 7, "some_none"),
    ("fp32", "r128", 1, "identical"),
    ("fp16", "r8", 133, "identical"),
    ("fp16", "mixed", 7, "distinct"),
    ("fp16", "r64", 133, "some_none"),
    ("bf16", "r128", 7, "zipf"),
    ("bf16", "mixed", 133, "distinct"),
    ("bf16", "r16", 1, "some_none"),
    ("bf16", "r1", 133, "requests"),
    ("fp32", "r8", 1, "distinct"),
    ("fp32", "r64", 133, "distinct"),
    ("fp16", "r1", 133, "zipf"),
    ("fp16", "r128", 7, "requests"),
    ("fp16", "r16", 1, "zipf"),
    ("bf16", "r64", 7, "identical"),
]


@here
@pytest.mark.parametrize("dt,rk,T,pop", FUSED_CASES)
def test_apply_lora_triton_matches_oracle(triton_ops, dt, rk, T, pop):
    dtype, pool, by_slot, ts, meta = _setup(SMALL, rk, T, pop, dt)
    be = triton_ops.TritonBackend()
    g = torch.Generator().manual_seed(3)
    for layer, (o, n_in) in SMALL.items():
        x = torch.randn(T, n_in, generator=g).to(dtype)
        y = torch.randn(T, o, generator=g).to(dtype)
        want = oracle(y, x, ts, by_slot, layer, dtype)
        xd, yd = x.to(DEVICE), y.clone().to(DEVICE)
        apply_lora(yd, xd, layer, pool, meta, backend=be)
        assert_close(yd.cpu(), want, dtype, f"triton fused {layer}")


# Each grid of each op: per-row (BGMV) and segmented (SGMV), split-K on and off, with and
# without host metadata (the custom-op path sizes grids from T alone).
OP_CASES = [
    ("per_row", 1, True, "fp32", "mixed", 7, "zipf"),
    ("per_row", 3, False, "bf16", "r16", 7, "some_none"),
    ("per_row", 2, True, "fp16", "r8", 133, "zipf"),
    ("segmented", 1, False, "fp16", "mixed", 7, "requests"),
    ("segmented", 2, True, "fp32", "r64", 133, "requests"),
    ("segmented", 3, True, "bf16", "mixed", 133, "zipf"),
]


@here
@pytest.mark.parametrize("mode,split_k,with_host,dt,rk,T,pop", OP_CASES)
def test_shrink_and_expand_grids_match_oracle(triton_ops, mode, split_k, with_host, dt, rk, T, pop):
    dtype, pool, by_slot, ts, meta = _setup(SMALL, rk, T, pop, dt, seed=4)
    be = triton_ops.TritonBackend(mode=mode, split_k=split_k)
    width = pool.max_pages_per_adapter * pool.page_rows
    md = meta.tensors(DEVICE)
    g = torch.Generator().manual_seed(5)
    for layer, (o, n_in) in SMALL.items():
        lw = pool.layer(layer)
        x = torch.randn(T, n_in, generator=g).to(dtype)
        y = torch.randn(T, o, generator=g).to(dtype)
        want = oracle(y, x, ts, by_slot, layer, dtype)
        v = torch.full((T, width), 7.0, device=DEVICE)
        arg = meta if with_host else md
        lora_shrink(v, x.to(DEVICE), lw.a_pages, lw.page_table, lw.ranks, arg, backend=be)
        assert_close(v.cpu(), oracle_v(x, ts, by_slot, layer, dtype, width), dtype, "v")
        yd = y.clone().to(DEVICE)
        lora_expand(yd, v, lw.b_pages, lw.page_table, lw.ranks, lw.scales, arg, backend=be)
        assert_close(yd.cpu(), want, dtype, f"triton {mode} expand {layer}")
        yd = y.clone().to(DEVICE)
        be.fused(yd, x.to(DEVICE), lw, md, meta.host if with_host else None)
        assert_close(yd.cpu(), want, dtype, f"triton {mode} fused {layer}")


@here
def test_scattered_pages_and_untargeted_layers(triton_ops):
    """Adapters whose pages are not contiguous, and a layer one adapter does not target."""
    from mintmesh.kernels import AdapterPool

    pool = AdapterPool(SMALL, max_adapters=4, page_rows=8, max_pages=6, device=DEVICE)
    ads = make_adapters(SMALL, [16, 8, 24, 20], seed=9, skip={3: {"b"}})
    pool.load("x", ads[0])  # pages 0, 1
    pool.load("y", ads[1])  # page 2
    pool.evict("x")
    pool.load("z", ads[2])  # 3 pages: 3, 4, 5
    pool.evict("z")
    s1 = pool.slot("y")
    pool.load("pad", make_adapters(SMALL, [8], seed=10)[0])  # page 0
    s3 = pool.load("w", ads[3])  # 3 pages: 1, 3, 4 ... first fit of 3 contiguous is 3..5
    assert len(pool.pages("w")) == 3
    pool.evict("pad")
    s0 = pool.load("x", ads[0])  # 2 pages: 0, 1
    by_slot = {s0: ads[0], s1: ads[1], s3: ads[3]}
    ts = torch.tensor([s0, s3, -1, s1, s3, s0, s0])
    meta = BatchMeta.make().prepare(ts, device=DEVICE)
    for mode in ("per_row", "segmented"):
        be = triton_ops.TritonBackend(mode=mode)
        for layer, (o, n_in) in SMALL.items():
            x, y = torch.randn(7, n_in), torch.randn(7, o)
            want = oracle(y, x, ts, by_slot, layer, torch.float32)
            yd = y.clone().to(DEVICE)
            apply_lora(yd, x.to(DEVICE), layer, pool, meta, backend=be)
            assert_close(yd.cpu(), want, torch.float32, f"{mode} {layer}")


@here
def test_custom_op_dispatches_to_triton(triton_ops):
    """torch.ops.mintmesh.lora_fused (what torch.compile captures) with triton selected."""
    from mintmesh.kernels import set_backend

    dtype, pool, by_slot, ts, meta = _setup(SMALL, "mixed", 133, "some_none", "fp32", seed=13)
    set_backend(DEVICE, "triton")
    try:
        for layer, (o, n_in) in SMALL.items():
            lw = pool.layer_tensors(layer)
            x, y = torch.randn(133, n_in), torch.randn(133, o)
            want = oracle(y, x, ts, by_slot, layer, dtype)
            yd = y.clone().to(DEVICE)
            torch.ops.mintmesh.lora_fused(
                yd, x.to(DEVICE), lw.a_pages, lw.b_pages, lw.page_table, lw.ranks, lw.scales,
                *meta.tensors(DEVICE),
            )  # fmt: skip
            assert_close(yd.cpu(), want, dtype, f"custom op {layer}")
    finally:
        set_backend(DEVICE, None)


@here
def test_triton_passes_the_startup_self_check(triton_ops):
    """The check select_backend runs before Triton may serve a CUDA device (adversarial
    batches: large adapter norms, ranks 1 to 64, rows without an adapter, both grids)."""
    from mintmesh.kernels.backends import _smoke_test, get_backend

    _smoke_test(get_backend("triton"), torch.device(DEVICE))


REAL_CASES = [
    ("bf16", "mixed", 133, "requests"),
    ("fp16", "r16", 7, "distinct"),
    ("fp32", "r64", 1, "identical"),
    ("bf16", "r128", 133, "zipf"),
]


@pytest.mark.skipif(DEVICE != "cuda", reason="real model sizes run compiled on a GPU only")
@pytest.mark.parametrize("dt,rk,T,pop", REAL_CASES)
def test_real_model_sizes_on_gpu(triton_ops, dt, rk, T, pop):
    dtype, pool, by_slot, ts, meta = _setup(REAL, rk, T, pop, dt, seed=11)
    g = torch.Generator().manual_seed(12)
    for layer, (o, n_in) in REAL.items():
        x = torch.randn(T, n_in, generator=g).to(dtype)
        y = torch.randn(T, o, generator=g).to(dtype)
        want = oracle(y, x, ts, by_slot, layer, dtype)
        yd = y.clone().to(DEVICE)
        apply_lora(yd, x.to(DEVICE), layer, pool, meta)  # the selected backend: triton
        assert_close(yd.cpu(), want, dtype, f"triton {layer}")


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a GPU")
def test_selector_picks_triton_on_cuda():
    from mintmesh.kernels import backend_name

    assert backend_name("cuda") == "triton"


@pytest.mark.skipif(RUN_HERE, reason="this process already runs the kernels")
def test_triton_kernels_under_the_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", MINTMESH_TEST_DEVICE="cpu")
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-30:])
    assert r.returncode == 0, f"interpreter run failed:\n{tail}"
    assert " passed" in tail and "failed" not in tail, tail
