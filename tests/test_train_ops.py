"""The training LoRA op (kernels/train_ops.py): forward and backward of many runs' adapters over
segments of one batch, against autograd through the plain-torch reference, with values that
span what training sees (activations and adapter norms far from N(0, 1), ranks 1-64, empty
segments and rows that belong to no run), and torch.autograd.gradcheck in float64."""

from __future__ import annotations

import pytest
import torch
from fuzzing import fuzz_examples
from hypothesis import given
from hypothesis import strategies as st

from mintmesh.kernels.train_ops import _uniform, segment_lora, segment_lora_reference


def _case(seed, rows, hin, hout, segs, xscale, wscale, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, hin, generator=g) * xscale).to(dtype).requires_grad_()
    cuts = sorted(torch.randint(0, rows + 1, (2 * len(segs),), generator=g).tolist())
    bounds = [(cuts[2 * i], cuts[2 * i + 1]) for i in range(len(segs))]
    weights, scales = [], []
    for r, sc in segs:
        a = (torch.randn(r, hin, generator=g) * wscale / hin**0.5).to(dtype).requires_grad_()
        b = (torch.randn(hout, r, generator=g) * wscale).to(dtype).requires_grad_()
        weights.append((a, b))
        scales.append(sc)
    return x, bounds, scales, weights


def _grads(fn, x, bounds, scales, weights, gout):
    out = fn(x, bounds, scales, weights)
    params = [x] + [t for p in weights for t in p]
    grads = torch.autograd.grad(out, params, gout, allow_unused=True)
    return out, grads


@given(
    seed=st.integers(0, 2**31 - 1),
    rows=st.integers(0, 70),
    hin=st.integers(1, 48),
    hout=st.integers(1, 48),
    segs=st.lists(
        st.tuples(st.integers(1, 64), st.sampled_from([0.0, 0.5, 2.0, 16.0])), min_size=1,
        max_size=5,
    ),
    xscale=st.sampled_from([1e-3, 1.0, 30.0]),
    wscale=st.sampled_from([1e-2, 1.0, 8.0]),
)  # fmt: skip
@fuzz_examples(200)
def test_forward_and_backward_match_the_reference(seed, rows, hin, hout, segs, xscale, wscale):
    x, bounds, scales, weights = _case(seed, rows, hin, hout, segs, xscale, wscale)
    gout = torch.randn(rows, hout, generator=torch.Generator().manual_seed(seed + 1)) * xscale
    out, got = _grads(segment_lora, x, bounds, scales, weights, gout)
    ref, want = _grads(segment_lora_reference, x, bounds, scales, weights, gout)
    tol = lambda t: 1e-5 * max(1.0, float(t.detach().abs().max()) if t.numel() else 1.0)  # noqa: E731
    assert (out - ref).abs().max().item() <= tol(ref) if rows else out.shape == (0, hout)
    for gg, ww in zip(got, want, strict=True):
        if ww is None:
            assert gg is None or not gg.any()
            continue
        assert gg is not None and gg.shape == ww.shape
        if ww.numel():
            assert (gg - ww).abs().max().item() <= tol(ww)
    # Rows outside every segment: exactly zero delta and zero input gradient from the op.
    covered = torch.zeros(rows, dtype=torch.bool)
    for s, e in bounds:
        covered[s:e] = True
    assert not out[~covered].any()
    assert not got[0][~covered].any()


@pytest.mark.parametrize(
    "lead, n, seg, rank, tail", [(0, 8, 16, 4, 0), (3, 3, 5, 2, 4), (0, 2, 1, 1, 0)]
)
def test_equal_segments_back_to_back_match_the_reference(lead, n, seg, rank, tail):
    # The batched (bmm) path: every segment as long and of one rank, one after another, with
    # rows before and after that belong to no run; scales differ per segment.
    g = torch.Generator().manual_seed(n * 100 + seg)
    rows, hin, hout = lead + n * seg + tail, 12, 9
    x = (torch.randn(rows, hin, generator=g) * 3.0).requires_grad_()
    bounds = [(lead + i * seg, lead + (i + 1) * seg) for i in range(n)]
    scales = [0.5 * (i + 1) for i in range(n)]
    weights = [
        (
            torch.randn(rank, hin, generator=g).requires_grad_(),
            torch.randn(hout, rank, generator=g).requires_grad_(),
        )
        for _ in range(n)
    ]
    gout = torch.randn(rows, hout, generator=g)
    assert _uniform(bounds, weights)
    out, got = _grads(segment_lora, x, bounds, scales, weights, gout)
    ref, want = _grads(segment_lora_reference, x, bounds, scales, weights, gout)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    for gg, ww in zip(got, want, strict=True):
        assert (gg - ww).abs().max() <= 1e-5 * max(1.0, float(ww.abs().max()))
    assert not out[:lead].any() and not out[rows - tail :].any()
    assert not got[0][:lead].any() and not got[0][rows - tail :].any()
    # float64 gradcheck through the same path, and only what needs a gradient gets one
    x64 = x.detach().double().requires_grad_()
    flat = [t.detach().double().requires_grad_() for p in weights for t in p]

    def f(x, *flat):
        ws = [(flat[2 * i], flat[2 * i + 1]) for i in range(n)]
        return segment_lora(x, bounds, scales, ws)

    assert torch.autograd.gradcheck(f, (x64, *flat), eps=1e-6, atol=1e-7)
    flat[0].requires_grad_(False)
    f(x64.detach(), *flat).sum().backward()
    assert flat[0].grad is None and flat[1].grad is not None and flat[2].grad is not None


def test_gradcheck_in_float64():
    x, bounds, scales, weights = _case(3, 9, 5, 4, [(2, 0.5), (3, 2.0), (1, 1.0)], 1.0, 1.0,
                                       torch.float64)  # fmt: skip
    flat = [t for p in weights for t in p]

    def f(x, *flat):
        ws = [(flat[2 * i], flat[2 * i + 1]) for i in range(len(weights))]
        return segment_lora(x, bounds, scales, ws)

    assert torch.autograd.gradcheck(f, (x, *flat), eps=1e-6, atol=1e-8)


def test_only_what_needs_a_gradient_gets_one():
    x, bounds, scales, weights = _case(5, 12, 6, 7, [(2, 1.0), (4, 1.0)], 1.0, 1.0)
    x.requires_grad_(False)
    weights[1][0].requires_grad_(False)
    out = segment_lora(x, bounds, scales, weights)
    out.sum().backward()
    assert x.grad is None and weights[1][0].grad is None
    assert weights[0][0].grad is not None and weights[1][1].grad is not None


@pytest.mark.parametrize(
    "bounds, weights, needle",
    [
        ([(0, 5), (3, 8)], 2, "not ordered"),
        ([(0, 20)], 1, "not ordered"),
        ([(0, 2)], 0, "1 segments"),
    ],
)
def test_refuses_inconsistent_segments(bounds, weights, needle):
    x = torch.zeros(10, 4)
    ws = [(torch.zeros(2, 4), torch.zeros(3, 2)) for _ in range(weights)]
    with pytest.raises(ValueError, match=needle):
        segment_lora(x, bounds, [1.0] * len(bounds), ws)
    with pytest.raises(ValueError, match="do not make a LoRA"):
        segment_lora(x, [(0, 2)], [1.0], [(torch.zeros(2, 5), torch.zeros(3, 2))])


def test_target_logprobs_equal_log_softmax_gather_and_its_gradient():
    from mintmesh.kernels.train_ops import target_logprobs

    g = torch.Generator().manual_seed(0)
    for scale in (1.0, 30.0, 300.0):  # logits spread as far as trained models put them
        logits = (torch.randn(3, 7, 50, generator=g) * scale).requires_grad_()
        tgt = torch.randint(0, 50, (3, 7), generator=g)
        w = torch.randn(3, 7, generator=g)
        got = target_logprobs(logits, tgt)
        (gg,) = torch.autograd.grad((got * w).sum(), logits)
        ref = torch.log_softmax(logits.double(), -1).gather(-1, tgt[..., None]).squeeze(-1)
        (gr,) = torch.autograd.grad((ref * w.double()).sum(), logits)
        assert (got.double() - ref).abs().max() <= 1e-5 * max(1.0, scale)
        assert (gg - gr.float()).abs().max() <= 1e-5
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 6, (2, 3))
    assert torch.autograd.gradcheck(lambda x: target_logprobs(x, t), (x,))
    with pytest.raises(ValueError, match="do not fit"):
        target_logprobs(torch.zeros(2, 3, 4), torch.zeros(2, 2, dtype=torch.long))


def test_target_logprobs_overwrite_gives_the_same_gradient_in_the_logits_buffer():
    from mintmesh.kernels.train_ops import target_logprobs

    g = torch.Generator().manual_seed(1)
    # 40 rows of a 9000-token vocabulary: several ~1 MiB chunks, the last one short
    base = torch.randn(4, 10, 9000, generator=g) * 20
    tgt = torch.randint(0, 9000, (4, 10), generator=g)
    w = torch.randn(4, 10, generator=g)
    leaf = base.clone().requires_grad_()
    logits = leaf * 1.0  # a non-leaf in the graph, as a model's output is
    got = target_logprobs(logits, tgt, overwrite=True)
    (gg,) = torch.autograd.grad((got * w).sum(), leaf)
    ref = torch.log_softmax(base.double(), -1).gather(-1, tgt[..., None]).squeeze(-1)
    assert (got.detach().double() - ref).abs().max() <= 1e-4
    leaf2 = base.clone().requires_grad_()
    (gr,) = torch.autograd.grad((target_logprobs(leaf2 * 1.0, tgt) * w).sum(), leaf2)
    assert torch.equal(gg, gr)
    assert torch.equal(logits.detach(), gr)  # written over the logits
    # Another node that saved the logits for its backward: refused, not silently wrong.
    leaf3 = base.clone().requires_grad_()
    logits3 = leaf3 * 1.0
    other = (logits3 * logits3).sum()  # mul saves logits3; its backward runs after ours
    lp = target_logprobs(logits3, tgt, overwrite=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        ((lp * w).sum() + other).backward()
