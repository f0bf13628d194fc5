"""Differential (property-based) tests of the oneDNN packed dense Linears (kernels/dense.py)
against F.linear computed in float64.

Hypothesis draws the layer (in / out features: 1, odd, below one vector, real widths), the
batch_hint the weight is packed for and a different row count (1, odd, prefill-sized, none),
the input's layout (contiguous, column-major, row-strided, broadcast rows, 3-D permuted, 1-D),
bias or none, and values (normal, uniform, positive, outliers, small integers) at magnitudes from
1e-6 to 1e3, all-zero inputs included; and whole models of such Linears through pack_linears.

Tolerance: per output row, |got - want|_2 <= RTOL * |want|_2 + ABS_COEF * sqrt(K) * |bound|_2,
with want the float64 result and bound its absolute-value product |x| |W|^T + |b| (the float32
rounding of a K-term dot product that cancels grows with it, about as sqrt(K)).
"""

from __future__ import annotations

import pytest
import torch
from fuzzing import fuzz_examples, one_thread, values  # noqa: F401
from hypothesis import example, given
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from mintmesh.kernels.dense import (
    PackedLinear,
    YieldPoints,
    pack_linears,
    select_dense,
    yield_points,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # fuzzing.one_thread: torch on one thread

needs_onednn = pytest.mark.skipif(
    select_dense("cpu", torch.float32) != "onednn", reason="no oneDNN linear in this torch build"
)

RTOL = 1e-6
ABS_COEF = 2 * 2.0**-24  # ~ 2 float32 units in the last place, times sqrt(K)
DIMS = st.one_of(
    st.sampled_from([1, 3, 7, 8, 9, 15, 16, 17, 64, 96, 100, 200, 1024, 4096, 4099]),
    st.integers(1, 300),
)
ROWS = st.one_of(st.sampled_from([0, 1, 2, 3, 5, 7, 8, 9, 31, 33, 64, 133, 512]),
                 st.integers(1, 600))  # fmt: skip
HINTS = st.sampled_from([1, 4, 7, 8, 32, 64, 512])
MAGS = st.sampled_from([1.0, 0.0, 1e-6, 1e-3, 30.0, 1e3])
DISTS = st.sampled_from(["normal", "uniform", "positive", "outliers", "ints"])
LAYOUTS = ("contiguous", "column_major", "row_strided", "broadcast", "permuted_3d", "vector")
WORK = 3e7  # rows * in * out multiply-adds per example (CPU time)


def layout(x2: torch.Tensor, how: str) -> torch.Tensor:
    """The [T, K] values of x2 as an input of layout `how` (same values, row order kept)."""
    T, K = x2.shape
    if how == "column_major":
        return x2.t().contiguous().t()
    if how == "row_strided":
        buf = torch.full((T, K + 5), float("nan"))
        buf[:, 2 : 2 + K] = x2
        return buf[:, 2 : 2 + K]
    if how == "broadcast":  # every row the first one, stride 0
        return x2[:1].expand(T, K)
    if how == "permuted_3d":  # [2, T/2, K] viewed through a permute of [T/2, 2, K]
        h = T // 2
        return x2[: 2 * h].reshape(2, h, K).transpose(0, 1).contiguous().transpose(0, 1)
    if how == "vector":
        return x2[0]
    return x2.contiguous()


def check_close(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b, what: str) -> None:
    want = F.linear(x.double(), w.double(), None if b is None else b.double())
    bound = F.linear(x.double().abs(), w.double().abs(), None if b is None else b.double().abs())
    assert got.shape == want.shape, f"{what}: shape {list(got.shape)} != {list(want.shape)}"
    assert got.dtype == torch.float32
    K = w.shape[1]
    g2, w2, b2 = (t.reshape(-1, t.shape[-1]) if t.dim() else t for t in (got, want, bound))
    if g2.dim() == 1:
        g2, w2, b2 = g2[None], w2[None], b2[None]
    err = (g2.double() - w2).norm(dim=-1)
    tol = RTOL * w2.norm(dim=-1) + ABS_COEF * (K + 1) ** 0.5 * b2.norm(dim=-1)
    bad = ~(err <= tol)
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {g2.shape[0]} rows off; row {i}: error "
            f"{float(err[i]):.4g} > tolerance {float(tol[i]):.4g} "
            f"(|want| {float(w2[i].norm()):.4g})"
        )


@st.composite
def linear_cases(draw):
    in_f, out_f = draw(DIMS), draw(DIMS)
    cap = max(1, int(WORK // (in_f * out_f)))
    return {
        "in_f": in_f,
        "out_f": out_f,
        "rows": min(draw(ROWS), cap),
        "hint": draw(HINTS),
        "layout": draw(st.sampled_from(LAYOUTS)),
        "bias": draw(st.booleans()),
        "x_dist": draw(DISTS),
        "w_dist": draw(DISTS),
        "x_mag": draw(MAGS),
        "w_mag": draw(MAGS),
        "b_mag": draw(MAGS),
        "seed": draw(st.integers(0, 2**16)),
    }


def _real(in_f, out_f, rows, hint, how, bias, dist):
    """An explicit case at a real model size (the draws rarely reach 4096 x 4096)."""
    return {"in_f": in_f, "out_f": out_f, "rows": rows, "hint": hint, "layout": how,
            "bias": bias, "x_dist": dist, "w_dist": "normal", "x_mag": 1.0, "w_mag": 0.02,
            "b_mag": 1.0, "seed": in_f + rows}  # fmt: skip


def make_linear(g, in_f, out_f, bias, w_dist, w_mag, b_mag) -> nn.Linear:
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(values(g, (out_f, in_f), w_dist, w_mag))
        if bias:
            lin.bias.copy_(values(g, (out_f,), "normal", b_mag))
    return lin


@needs_onednn
@pytest.mark.fuzz
@fuzz_examples(250)
@given(c=linear_cases())
@example(c=_real(4096, 4096, 7, 32, "contiguous", True, "outliers"))  # decode, a q projection
@example(c=_real(1024, 4096, 512, 512, "row_strided", False, "normal"))  # a prefill chunk
@example(c=_real(4099, 1030, 33, 8, "column_major", True, "positive"))  # odd, no cancellation
def test_packed_linear_matches_f_linear(c):
    g = torch.Generator().manual_seed(c["seed"])
    lin = make_linear(g, c["in_f"], c["out_f"], c["bias"], c["w_dist"], c["w_mag"], c["b_mag"])
    packed = PackedLinear(lin, batch_hint=c["hint"])
    # The packed weight gives the dense one back exactly.
    assert torch.equal(packed.weight, lin.weight.detach())
    rows = max(c["rows"], 1) if c["layout"] in ("vector", "broadcast") else c["rows"]
    x = layout(values(g, (rows, c["in_f"]), c["x_dist"], c["x_mag"]), c["layout"])
    with torch.inference_mode():
        got = packed(x)
        again = packed(x)
    assert torch.equal(got, again), "not deterministic"
    check_close(got, x, lin.weight.detach(), lin.bias, f"PackedLinear {c}")


@st.composite
def model_cases(draw):
    n = draw(st.integers(1, 4))
    widths = [draw(st.sampled_from([1, 5, 8, 17, 64, 96])) for _ in range(n + 1)]
    return {
        "widths": widths,
        "bias": [draw(st.booleans()) for _ in range(n)],
        "tie": draw(st.booleans()),
        "rows": draw(st.sampled_from([1, 3, 8, 33, 130])),
        "hint": draw(HINTS),
        "w_mag": draw(MAGS),
        "x_dist": draw(DISTS),
        "seed": draw(st.integers(0, 2**16)),
    }


class _Net(nn.Module):
    """Linears in a chain (one nested in a submodule) and an optional head tied to an embedding
    (pack_linears must leave it as it is)."""

    def __init__(self, widths, bias, tie, g, w_mag, x_dist):
        super().__init__()
        layers = [make_linear(g, i, o, b, x_dist, w_mag, 1.0)
                  for i, o, b in zip(widths[:-1], widths[1:], bias, strict=True)]  # fmt: skip
        self.first = layers[0]
        self.rest = nn.Sequential(*layers[1:])
        self.emb = nn.Embedding(11, widths[-1]) if tie else None
        self.head = nn.Linear(widths[-1], 11, bias=False) if tie else None
        if tie:
            self.head.weight = self.emb.weight

    def forward(self, x):
        y = self.rest(torch.tanh(self.first(x)))
        return self.head(y) if self.head is not None else y


@needs_onednn
@pytest.mark.fuzz
@fuzz_examples(40)
@given(c=model_cases())
def test_pack_linears_keeps_the_models_output(c):
    g = torch.Generator().manual_seed(c["seed"])
    net = _Net(c["widths"], c["bias"], c["tie"], g, c["w_mag"], c["x_dist"])
    x = values(g, (c["rows"], c["widths"][0]), c["x_dist"], 1.0)
    with torch.inference_mode():
        want_layers = [(m.weight.detach().clone(), None if m.bias is None else m.bias.clone())
                       for m in [net.first, *net.rest]]  # fmt: skip
        n = pack_linears(net, batch_hint=c["hint"])
        assert n == len(c["bias"])  # every Linear but the tied head
        assert isinstance(net.first, PackedLinear)
        assert all(isinstance(m, PackedLinear) for m in net.rest)
        assert net.head is None or type(net.head) is nn.Linear
        # Layer by layer against float64 F.linear on the same inputs (a chain through tanh
        # would compare the activations' rounding, not the kernels).
        h = x
        for (w, b), m in zip(want_layers, [net.first, *net.rest], strict=True):
            out = m(h)
            check_close(out, h, w, b, f"layer of {c}")
            h = torch.tanh(out) if m is net.first else out


@needs_onednn
@pytest.mark.parametrize(
    "shape", [(3, 63), (3, 65), (0, 8), (2, 0, 8), (63,), ()], ids=lambda s: "x" + str(list(s))
)
def test_packed_linear_refuses_a_wrong_width(shape):
    """A ValueError naming x (oneDNN's own error was cryptic; an empty x of any width returned
    an empty output, where nn.Linear refuses it)."""
    packed = PackedLinear(nn.Linear(64, 32))
    with pytest.raises(ValueError, match=r"x \[.*\] does not fit PackedLinear with in_features 64"):
        packed(torch.zeros(shape))


class _Points(YieldPoints):
    """A training pass's yield points as the packed Linears see them: serving waits (or not);
    each yield point and each unlocked call recorded."""

    def __init__(self, busy: bool, piece_macs: int) -> None:
        self._busy, self.piece_macs = busy, piece_macs
        self.points = self.unlocked_calls = 0

    def busy(self) -> bool:
        return self._busy

    def point(self) -> None:
        self.points += 1

    def unlocked(self, fn):
        self.unlocked_calls += 1
        return fn()


@needs_onednn
@fuzz_examples(40)
@given(c=linear_cases(), piece_rows=st.integers(1, 40), busy=st.booleans())
@example(c=_real(1024, 4096, 64, 32, "contiguous", False, "outliers"), piece_rows=8, busy=True)
def test_training_pieces_yield_within_a_long_gemm_and_keep_its_values(c, piece_rows, busy):
    """A training forward/backward of a packed Linear under yield points (a sliced training
    pass while serving waits): in pieces of piece_macs, a yield point between two pieces both
    ways and the weight unpacked with the model let go; the output and the input gradient
    those of F.linear / dY W in float64 within float32 rounding. Serving not waiting: one
    call each way, bit for bit the pass without yield points."""
    g = torch.Generator().manual_seed(c["seed"])
    lin = make_linear(g, c["in_f"], c["out_f"], c["bias"], c["w_dist"], c["w_mag"], c["b_mag"])
    packed = PackedLinear(lin, batch_hint=c["hint"])
    rows = max(c["rows"], 1)
    x0 = values(g, (rows, c["in_f"]), c["x_dist"], c["x_mag"])
    dy = values(g, (rows, c["out_f"]), "normal", 1.0)
    pts = _Points(busy, piece_rows * c["in_f"] * c["out_f"])
    x = x0.clone().requires_grad_(True)
    with yield_points(pts):
        y = packed(x)
        y.backward(dy)
    x_ref = x0.clone().requires_grad_(True)
    y_ref = packed(x_ref)
    y_ref.backward(dy)
    pieces = -(-rows // piece_rows) if busy else 1
    assert pts.points == 2 * (pieces - 1)
    assert pts.unlocked_calls == (1 if pieces > 1 else 0)
    if pieces == 1:
        assert torch.equal(y, y_ref) and torch.equal(x.grad, x_ref.grad)
    w = lin.weight.detach()
    check_close(y.detach(), x0, w, lin.bias, f"pieces forward {c}")
    # dX = dY W is F.linear(dY, W^T).
    check_close(x.grad, dy, w.t().contiguous(), None, f"pieces backward {c}")
