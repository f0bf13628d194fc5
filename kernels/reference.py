"""Pure-torch reference ops: the semantics of every LoRA op, and the oracle other implementations
are tested against. They read adapter weights through the paged pool layout (see pool.py):

    A[a]  = a_pages[page_table[a]].reshape(-1, H_in)[:ranks[a]]     # [r_a, H_in]
    Bt[a] = b_pages[page_table[a]].reshape(-1, H_out)[:ranks[a]]    # [r_a, H_out] = B[a].T

with a = token_slots[t] the slot of row t (-1: no adapter). Every op computes in float32 and
writes its output in place; it never pads ranks (each adapter's rows are sliced to its rank).
Slow by design (one loop over the batch's adapters); the metadata is not needed.
"""

from __future__ import annotations

import torch


def _check(name: str, t: torch.Tensor, dims: int) -> None:
    if t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {list(t.shape)}")


def adapter_rows(
    pages: torch.Tensor, page_table: torch.Tensor, ranks: torch.Tensor, slot: int
) -> torch.Tensor:
    """The first ranks[slot] rows held by the pages of `slot`: [r, H] (a gathered copy)."""
    r = int(ranks[slot])
    n = -(-r // pages.shape[1])
    idx = page_table[slot, :n].long()
    return pages.index_select(0, idx).reshape(-1, pages.shape[2])[:r]


def _active_slots(token_slots: torch.Tensor) -> list[int]:
    return [int(s) for s in torch.unique(token_slots).tolist() if s >= 0]


def lora_shrink(
    v: torch.Tensor,
    x: torch.Tensor,
    a_pages: torch.Tensor,
    page_table: torch.Tensor,
    ranks: torch.Tensor,
    token_slots: torch.Tensor,
) -> None:
    """Semantics: v[t, :r] = x[t] @ A[a].T, r = ranks[a], a = token_slots[t]; v[t, r:] = 0;
    v[t] = 0 where a = -1.
    v: [T, R] float32 (R >= every rank in the batch), x: [T, H_in], a_pages: [P, PR, H_in],
    page_table: [N, MP] int, ranks: [N] int, token_slots: [T] int."""
    _check("v", v, 2), _check("x", x, 2), _check("a_pages", a_pages, 3)
    _check("token_slots", token_slots, 1)
    out = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    for a in _active_slots(token_slots):
        rows = (token_slots == a).nonzero().squeeze(1)
        A = adapter_rows(a_pages, page_table, ranks, a).float()
        out[rows, : A.shape[0]] = x[rows].float() @ A.t()
    v.copy_(out)


def lora_expand(
    y: torch.Tensor,
    v: torch.Tensor,
    b_pages: torch.Tensor,
    page_table: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    token_slots: torch.Tensor,
) -> None:
    """Semantics: y[t] += scales[a] * v[t, :r] @ Bt[a], r = ranks[a], a = token_slots[t];
    rows with a = -1 unchanged.
    y: [T, H_out], v: [T, R], b_pages: [P, PR, H_out], scales: [N] float32."""
    _check("y", y, 2), _check("v", v, 2), _check("b_pages", b_pages, 3)
    _check("token_slots", token_slots, 1)
    for a in _active_slots(token_slots):
        rows = (token_slots == a).nonzero().squeeze(1)
        Bt = adapter_rows(b_pages, page_table, ranks, a).float()
        r = Bt.shape[0]
        delta = float(scales[a]) * (v[rows, :r].float() @ Bt)
        y[rows] = (y[rows].float() + delta).to(y.dtype)


def lora_fused(
    y: torch.Tensor,
    x: torch.Tensor,
    a_pages: torch.Tensor,
    b_pages: torch.Tensor,
    page_table: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    token_slots: torch.Tensor,
) -> None:
    """Semantics: y[t] += scales[a] * (x[t] @ A[a].T) @ Bt[a], a = token_slots[t] (skip -1).
    y: [T, H_out], x: [T, H_in], a_pages: [P, PR, H_in], b_pages: [P, PR, H_out]."""
    _check("y", y, 2), _check("x", x, 2), _check("token_slots", token_slots, 1)
    for a in _active_slots(token_slots):
        rows = (token_slots == a).nonzero().squeeze(1)
        A = adapter_rows(a_pages, page_table, ranks, a).float()
        Bt = adapter_rows(b_pages, page_table, ranks, a).float()
        delta = float(scales[a]) * ((x[rows].float() @ A.t()) @ Bt)
        y[rows] = (y[rows].float() + delta).to(y.dtype)
