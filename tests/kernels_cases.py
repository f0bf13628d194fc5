"""Shared cases for the kernel tests: adapters, pools, batch popularity, the fp32 oracle and
tolerances keyed by dtype. Used by test_kernels.py and test_kernels_triton.py."""

from __future__ import annotations

import torch

from mintmesh.kernels import AdapterPool, BatchMeta
from mintmesh.packed import ModuleWeights

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# (rtol, atol) of an implementation against the float32 oracle, on outputs of magnitude ~1.
TOL = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (3e-2, 3e-2),
}

POPULARITY = ("distinct", "zipf", "identical", "some_none", "requests")


def make_adapters(
    shapes: dict[str, tuple[int, int]],
    ranks: list[int],
    *,
    seed: int = 0,
    skip: dict[int, set[str]] | None = None,
) -> list[dict[str, ModuleWeights]]:
    """One adapter per rank, every layer targeted (except skip[i]); deltas of magnitude ~1."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, r in enumerate(ranks):
        mods = {}
        for name, (o, n_in) in shapes.items():
            if skip and name in skip.get(i, set()):
                continue
            A = torch.randn(r, n_in, generator=g) / n_in**0.5
            B = torch.randn(o, r, generator=g) / r**0.5
            mods[name] = ModuleWeights(A=A, B=B, alpha=float(r), scale=0.5 + 0.25 * (i % 3))
        out.append(mods)
    return out


def load_pool(
    shapes: dict[str, tuple[int, int]],
    adapters: list[dict[str, ModuleWeights]],
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    page_rows: int = 8,
    extra_pages: int = 0,
) -> tuple[AdapterPool, list[int]]:
    need = sum(-(-max(m.rank for m in a.values()) // page_rows) for a in adapters)
    pool = AdapterPool(
        shapes,
        max_adapters=max(len(adapters), 1),
        device=device,
        dtype=dtype,
        page_rows=page_rows,
        max_pages=need + extra_pages,
    )
    slots = [pool.load(f"adapter-{i}", a) for i, a in enumerate(adapters)]
    return pool, slots


def batch_slots(popularity: str, T: int, slots: list[int], *, seed: int = 0) -> torch.Tensor:
    """The slot of each of T rows (-1 = no adapter) under a popularity pattern."""
    g = torch.Generator().manual_seed(seed)
    n = len(slots)
    s = torch.tensor(slots, dtype=torch.long)
    if popularity == "distinct":
        idx = torch.arange(T) % n
        idx = idx[torch.randperm(T, generator=g)]
        return s[idx]
    if popularity == "zipf":
        w = 1.0 / torch.arange(1, n + 1, dtype=torch.float64) ** 1.2
        idx = torch.multinomial(w, T, replacement=True, generator=g)
        return s[idx]
    if popularity == "identical":
        return s[torch.zeros(T, dtype=torch.long)]
    if popularity == "some_none":
        idx = torch.randint(0, n, (T,), generator=g)
        out = s[idx]
        out[torch.rand(T, generator=g) < 0.3] = -1
        if T > 1:
            out[0] = -1
        return out
    if popularity == "requests":
        # Prefill-like: contiguous requests of 1..40 rows, each with one adapter (or none).
        out = torch.empty(T, dtype=torch.long)
        t = 0
        while t < T:
            ln = int(torch.randint(1, 41, (1,), generator=g))
            k = int(torch.randint(-1, n, (1,), generator=g))
            out[t : t + ln] = s[k] if k >= 0 else -1
            t += ln
        return out
    raise ValueError(f"unknown popularity {popularity!r}")


def oracle(
    y: torch.Tensor,
    x: torch.Tensor,
    token_slots: torch.Tensor,
    adapters_by_slot: dict[int, dict[str, ModuleWeights]],
    layer: str,
    dtype: torch.dtype,
) -> torch.Tensor:
    """float32 y + scale * (x A^T) B^T per row, from the adapters' own weights (rounded to the
    pool dtype as the pool stores them): independent of the paged layout."""
    want = y.float().clone()
    xf = x.float()
    for s in sorted(set(token_slots.tolist())):
        if s < 0:
            continue
        mw = adapters_by_slot[s].get(layer)
        if mw is None:
            continue
        rows = (token_slots == s).nonzero().squeeze(1)
        A = mw.A.to(dtype).float()
        B = mw.B.to(dtype).float()
        want[rows] += mw.scale * (xf[rows] @ A.t()) @ B.t()
    return want


def oracle_v(
    x: torch.Tensor,
    token_slots: torch.Tensor,
    adapters_by_slot: dict[int, dict[str, ModuleWeights]],
    layer: str,
    dtype: torch.dtype,
    width: int,
) -> torch.Tensor:
    """float32 shrink output: v[t, :r] = x[t] A^T, zeros elsewhere."""
    v = torch.zeros(x.shape[0], width)
    for s in sorted(set(token_slots.tolist())):
        if s < 0:
            continue
        mw = adapters_by_slot[s].get(layer)
        if mw is None:
            continue
        rows = (token_slots == s).nonzero().squeeze(1)
        v[rows, : mw.rank] = x[rows].float() @ mw.A.to(dtype).float().t()
    return v


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    rtol, atol = TOL[dtype]
    got = got.float()
    bad = (got - want).abs() > atol + rtol * want.abs()
    if bad.any():
        err = (got - want).abs().max().item()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements off (max abs err {err:.3g}, "
            f"dtype {dtype}, rtol {rtol}, atol {atol})"
        )


def prepare(token_slots: torch.Tensor, device: str = "cpu") -> BatchMeta:
    return BatchMeta.make().prepare(token_slots, device=device)
