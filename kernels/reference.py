"""Pure-torch reference ops: the semantics, and the oracle every other implementation is tested
against. Stacked weights (one slot per adapter, zero-padded to a common rank R: padding with
zeros does not change the result)."""

from __future__ import annotations

import torch


def _check(name: str, t: torch.Tensor, dims: int) -> None:
    if t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {list(t.shape)}")


def lora_shrink(v: torch.Tensor, x: torch.Tensor, A: torch.Tensor, idx: torch.Tensor) -> None:
    """Semantics: v[t] = x[t] @ A[a].T, a = idx[t]; v[t] = 0 where a = -1.
    v: [T, R], x: [T, H_in], A: [N, R, H_in], idx: [T] int64."""
    _check("v", v, 2), _check("x", x, 2), _check("A", A, 3), _check("idx", idx, 1)
    has = idx >= 0
    Ag = A[idx.clamp(min=0)]  # [T, R, H_in]
    out = torch.bmm(Ag.float(), x.float().unsqueeze(-1)).squeeze(-1)  # [T, R]
    v.copy_(torch.where(has.unsqueeze(-1), out, torch.zeros_like(out)).to(v.dtype))


def lora_expand(
    y: torch.Tensor, v: torch.Tensor, B: torch.Tensor, idx: torch.Tensor, scale: torch.Tensor
) -> None:
    """Semantics: y[t] += scale[a] * v[t] @ B[a].T, a = idx[t]; rows with a = -1 unchanged.
    y: [T, H_out], v: [T, R], B: [N, H_out, R], scale: [N]."""
    _check("y", y, 2), _check("v", v, 2), _check("B", B, 3), _check("idx", idx, 1)
    has = idx >= 0
    ic = idx.clamp(min=0)
    Bg = B[ic]  # [T, H_out, R]
    out = torch.bmm(Bg.float(), v.float().unsqueeze(-1)).squeeze(-1) * scale[ic].float()[:, None]
    out = torch.where(has.unsqueeze(-1), out, torch.zeros_like(out))
    y.copy_((y.float() + out).to(y.dtype))


def lora_fused(
    y: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    idx: torch.Tensor,
    scale: torch.Tensor,
) -> None:
    """Semantics: y[t] += scale[a] * (x[t] @ A[a].T) @ B[a].T, a = idx[t].
    x: [T, H_in], y: [T, H_out], A: [N, R, H_in], B: [N, H_out, R], scale: [N]."""
    v = torch.empty(x.shape[0], A.shape[1], dtype=torch.float32, device=x.device)
    lora_shrink(v, x, A, idx)
    lora_expand(y, v, B, idx, scale)
