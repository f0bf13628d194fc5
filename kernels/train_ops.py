"""The LoRA op for training, with its backward: many runs' adapters over one batch of rows.

Rows are grouped in segments, one per training run (the way serving groups rows by adapter);
segment i covers rows [start_i, end_i) and has its own trainable A_i [r_i, H_in], B_i
[H_out, r_i] (fp32) and scale s_i:

    delta[t] = s_i * (x[t] A_i^T) B_i^T                   for t in segment i, 0 elsewhere

and, with v = x_seg A_i^T and g = dL/d delta:

    dB_i = s_i g_seg^T v        dv = s_i g_seg B_i        dA_i = dv^T x_seg        dx_seg = dv A_i

(SGMV forward and backward: one matmul pair per segment and direction, no padding of ranks;
segments of one length and rank back to back, as a step of runs of equal sequences makes
them, go through bmm as one batch).
`segment_lora` is the autograd Function; `segment_lora_reference` the same through plain torch
ops (autograd differentiates it), the oracle of the tests.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _check(
    x: torch.Tensor,
    bounds: Sequence[tuple[int, int]],
    scales: Sequence[float],
    weights: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> int:
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [rows, H_in], got shape {list(x.shape)}")
    if not (len(bounds) == len(scales) == len(weights)):
        raise ValueError(
            f"{len(bounds)} segments, {len(scales)} scales and {len(weights)} weight pairs"
        )
    out_f = None
    prev = 0
    for i, ((s, e), (a, b)) in enumerate(zip(bounds, weights, strict=True)):
        if not prev <= s <= e <= x.shape[0]:
            raise ValueError(
                f"segment {i} = [{s}, {e}) is not ordered inside the {x.shape[0]} rows"
            )
        prev = e
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or a.shape[1] != x.shape[1]:
            raise ValueError(
                f"segment {i}: A {list(a.shape)} and B {list(b.shape)} do not make a LoRA "
                f"over x with {x.shape[1]} features"
            )
        if out_f is not None and b.shape[0] != out_f:
            raise ValueError(f"segment {i}: B has {b.shape[0]} outputs, segment 0 {out_f}")
        out_f = int(b.shape[0])
    if out_f is None:
        raise ValueError("no segments")
    return out_f


class _SegmentLoRA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bounds, scales, *flat):
        weights = [(flat[2 * i], flat[2 * i + 1]) for i in range(len(bounds))]
        out_f = int(weights[0][1].shape[0])
        cd = torch.promote_types(x.dtype, torch.float32)  # fp32, or fp64 (gradcheck)
        xf = x.to(cd)
        out = torch.zeros(x.shape[0], out_f, dtype=cd, device=x.device)
        ctx.bounds, ctx.scales = bounds, scales
        if _uniform(bounds, weights):
            # Every segment as long and of one rank, back to back: the segments as one batch
            # of matmuls (bmm), 2 calls instead of 2 per segment (a training step of 8 runs of
            # one sequence each: the per-call overhead of these [64, r] products was most of
            # the op's time).
            n, s0, seg = len(bounds), bounds[0][0], bounds[0][1] - bounds[0][0]
            a3 = torch.stack([a.to(cd) for a, _ in weights])  # [n, r, in]
            b3 = torch.stack([b.to(cd) for _, b in weights])  # [n, out, r]
            sc = torch.tensor(scales, dtype=cd, device=x.device).view(n, 1, 1)
            x3 = xf[s0 : s0 + n * seg].view(n, seg, -1)
            v3 = torch.bmm(x3, a3.transpose(1, 2))  # [n, T, r]
            torch.bmm(v3 * sc, b3.transpose(1, 2), out=out[s0 : s0 + n * seg].view(n, seg, -1))
            ctx.uniform = True
            ctx.save_for_backward(xf, a3, b3, v3, sc, *flat)
            return out.to(x.dtype)
        ctx.uniform = False
        vs = []
        for (s, e), (a, b), sc in zip(bounds, weights, scales, strict=True):
            v = xf[s:e] @ a.to(cd).t()
            vs.append(v)
            if e > s:  # scale the [T, r] factor, not the [T, H_out] product
                torch.mm(v * sc, b.to(cd).t(), out=out[s:e])
        ctx.save_for_backward(xf, *flat, *vs)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        if ctx.uniform:
            return _SegmentLoRA._backward_uniform(ctx, grad)
        bounds, scales = ctx.bounds, ctx.scales
        n = len(bounds)
        saved = ctx.saved_tensors
        xf, flat, vs = saved[0], saved[1 : 1 + 2 * n], saved[1 + 2 * n :]
        g = grad.to(xf.dtype)
        need_x = ctx.needs_input_grad[0]
        dx = torch.zeros_like(xf) if need_x else None
        grads: list[torch.Tensor | None] = []
        for i, ((s, e), sc) in enumerate(zip(bounds, scales, strict=True)):
            a, b, v = flat[2 * i].to(g.dtype), flat[2 * i + 1].to(g.dtype), vs[i]
            gs = g[s:e]
            dv = (gs @ b) * sc  # [T_i, r]
            da = dv.t() @ xf[s:e] if ctx.needs_input_grad[3 + 2 * i] else None
            db = (gs.t() @ v) * sc if ctx.needs_input_grad[4 + 2 * i] else None
            da = None if da is None else da.to(flat[2 * i].dtype)
            db = None if db is None else db.to(flat[2 * i + 1].dtype)
            if need_x and e > s:
                dx[s:e] = dv @ a
            grads += [da, db]
        return (None if dx is None else dx.to(grad.dtype), None, None, *grads)

    @staticmethod
    def _backward_uniform(ctx, grad):
        xf, a3, b3, v3, sc, *flat = ctx.saved_tensors
        bounds = ctx.bounds
        n, s0, seg = len(bounds), bounds[0][0], bounds[0][1] - bounds[0][0]
        rows = slice(s0, s0 + n * seg)
        g3 = grad.to(xf.dtype)[rows].view(n, seg, -1)
        dv3 = torch.bmm(g3, b3).mul_(sc)  # [n, T, r]
        need = ctx.needs_input_grad
        da3 = torch.bmm(dv3.transpose(1, 2), xf[rows].view(n, seg, -1))
        db3 = torch.bmm(g3.transpose(1, 2), v3).mul_(sc)
        grads: list[torch.Tensor | None] = []
        for i in range(n):
            grads.append(da3[i].to(flat[2 * i].dtype) if need[3 + 2 * i] else None)
            grads.append(db3[i].to(flat[2 * i + 1].dtype) if need[4 + 2 * i] else None)
        dx = None
        if need[0]:
            dx = torch.zeros_like(xf)
            torch.bmm(dv3, a3, out=dx[rows].view(n, seg, -1))
            dx = dx.to(grad.dtype)
        return (dx, None, None, *grads)


def _uniform(bounds, weights) -> bool:
    """More than one segment, all of one non-zero length and rank, each starting where the
    previous one ends (what bmm takes as one batch)."""
    if len(bounds) < 2:
        return False
    seg, rank = bounds[0][1] - bounds[0][0], weights[0][0].shape[0]
    if seg == 0:
        return False
    prev = bounds[0][0]
    for (s, e), (a, _) in zip(bounds, weights, strict=True):
        if s != prev or e - s != seg or a.shape[0] != rank:
            return False
        prev = e
    return True


def segment_lora(
    x: torch.Tensor,
    bounds: Sequence[tuple[int, int]],
    scales: Sequence[float],
    weights: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """delta [rows, H_out] (dtype of x; computed in fp32) of the runs' LoRAs over their segments
    of x; rows outside every segment get exact zeros. Differentiable in x and every A, B."""
    _check(x, bounds, scales, weights)
    bounds = [(int(s), int(e)) for s, e in bounds]
    scales = [float(s) for s in scales]
    flat = [t for pair in weights for t in pair]
    return _SegmentLoRA.apply(x, bounds, scales, *flat)


def segment_lora_reference(
    x: torch.Tensor,
    bounds: Sequence[tuple[int, int]],
    scales: Sequence[float],
    weights: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """The semantics, through plain torch ops (slow; autograd gives its backward)."""
    out_f = _check(x, bounds, scales, weights)
    parts, prev = [], 0
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    for (s, e), sc, (a, b) in zip(bounds, scales, weights, strict=True):
        parts.append(xf.new_zeros(s - prev, out_f))
        parts.append(sc * ((xf[s:e] @ a.to(xf.dtype).t()) @ b.to(xf.dtype).t()))
        prev = e
    parts.append(xf.new_zeros(x.shape[0] - prev, out_f))
    return torch.cat(parts).to(x.dtype)


# Rows of the logits per pass of the loss head's elementwise work: ~1 MiB at a 32k vocabulary,
# so each chunk's temporaries stay in cache (and come from the heap, not fresh pages).
_CHUNK_BYTES = 1 << 20


def _row_chunks(rows: int, vocab: int, itemsize: int):
    step = max(1, _CHUNK_BYTES // max(1, vocab * itemsize))
    return [slice(c, min(rows, c + step)) for c in range(0, rows, step)]


class _TargetLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, overwrite):
        shape = logits.shape[:-1]
        flat = logits.reshape(-1, logits.shape[-1])
        t = targets.reshape(-1, 1)
        lse = torch.empty(flat.shape[0], dtype=flat.dtype, device=flat.device)
        for c in _row_chunks(flat.shape[0], flat.shape[1], flat.element_size()):
            torch.logsumexp(flat[c], dim=-1, out=lse[c])
        lp = flat.gather(-1, t).squeeze(-1) - lse
        ctx.overwrite = bool(overwrite) and logits.is_contiguous()  # flat is then a view
        ctx.shape = logits.shape
        ctx.save_for_backward(flat, lse, t)
        return lp.view(shape)

    @staticmethod
    def backward(ctx, g):
        flat, lse, t = ctx.saved_tensors
        g = g.reshape(-1, 1)
        # d lp / d logits = onehot(target) - softmax, chunk by chunk while it is in cache; with
        # overwrite, written over the logits themselves (no logits-sized allocation).
        grad = flat if ctx.overwrite else torch.empty_like(flat)
        for c in _row_chunks(flat.shape[0], flat.shape[1], flat.element_size()):
            gc = grad[c]
            torch.sub(flat[c], lse[c, None], out=gc)
            gc.exp_().mul_(-g[c])
        grad.scatter_add_(-1, t, g)
        return grad.view(ctx.shape), None, None


def target_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, *, overwrite: bool = False
) -> torch.Tensor:
    """log_softmax(logits)[..., targets] ([..., vocab], [...] -> [...]) with a backward that
    allocates at most one tensor of the logits' size (log_softmax + gather make three, and
    zero-fill one): the loss head of a training step over [rows, T, vocab] logits. The
    elementwise work goes over ~1 MiB of rows at a time. overwrite: the backward writes the
    gradient over logits (the caller reads them no more after the forward; nothing else may
    have saved them for its backward: autograd would refuse that node's backward)."""
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"targets {list(targets.shape)} do not fit logits {list(logits.shape)}")
    return _TargetLogprobs.apply(logits, targets.long(), overwrite)
