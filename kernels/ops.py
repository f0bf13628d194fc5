"""The LoRA ops: one function each, output changed in place, registered as torch custom ops.

Weights are read through the paged pool layout (pool.py). For the slot a = token_slots[t] of
row t (-1: no adapter) and one layer:

    A[a]  = a_pages[page_table[a]].reshape(-1, H_in)[:ranks[a]]     # [r_a, H_in]
    Bt[a] = b_pages[page_table[a]].reshape(-1, H_out)[:ranks[a]]    # [r_a, H_out] (= B[a].T)

The custom ops (torch.ops.mintmesh.lora_shrink / lora_expand / lora_fused) take only tensors,
so torch.compile(fullgraph=True) and CUDA graphs can capture a step; their fake (meta)
implementations do nothing (the ops mutate their output and return None). Eagerly, the
functions below call the selected backend directly with the host-side metadata (cheaper on
CPU); inside torch.compile they go through the custom op.
"""

from __future__ import annotations

import torch

from mintmesh.kernels.backends import Backend, get_backend, select_backend
from mintmesh.kernels.meta import BatchMeta, HostMeta, MetaTensors
from mintmesh.kernels.pool import LayerWeights

_EMPTY_F32 = torch.empty(0)


def _lw(a_pages, b_pages, page_table, ranks, scales) -> LayerWeights:
    return LayerWeights(a_pages, b_pages, page_table, ranks, scales)


@torch.library.custom_op("mintmesh::lora_shrink", mutates_args=("v",))
def _shrink_op(
    v: torch.Tensor,
    x: torch.Tensor,
    a_pages: torch.Tensor,
    page_table: torch.Tensor,
    ranks: torch.Tensor,
    token_slots: torch.Tensor,
    sorted_tokens: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_slots: torch.Tensor,
    num_segs: torch.Tensor,
) -> None:
    md = MetaTensors(token_slots, sorted_tokens, seg_starts, seg_slots, num_segs)
    lw = _lw(a_pages, a_pages, page_table, ranks, _EMPTY_F32)
    select_backend(x.device).shrink(v, x, lw, md)


@_shrink_op.register_fake
def _(v, x, a_pages, page_table, ranks, token_slots, sorted_tokens, seg_starts, seg_slots,
      num_segs) -> None:  # fmt: skip
    return None


@torch.library.custom_op("mintmesh::lora_expand", mutates_args=("y",))
def _expand_op(
    y: torch.Tensor,
    v: torch.Tensor,
    b_pages: torch.Tensor,
    page_table: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    token_slots: torch.Tensor,
    sorted_tokens: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_slots: torch.Tensor,
    num_segs: torch.Tensor,
) -> None:
    md = MetaTensors(token_slots, sorted_tokens, seg_starts, seg_slots, num_segs)
    lw = _lw(b_pages, b_pages, page_table, ranks, scales)
    select_backend(y.device).expand(y, v, lw, md)


@_expand_op.register_fake
def _(y, v, b_pages, page_table, ranks, scales, token_slots, sorted_tokens, seg_starts,
      seg_slots, num_segs) -> None:  # fmt: skip
    return None


@torch.library.custom_op("mintmesh::lora_fused", mutates_args=("y",))
def _fused_op(
    y: torch.Tensor,
    x: torch.Tensor,
    a_pages: torch.Tensor,
    b_pages: torch.Tensor,
    page_table: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    token_slots: torch.Tensor,
    sorted_tokens: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_slots: torch.Tensor,
    num_segs: torch.Tensor,
) -> None:
    md = MetaTensors(token_slots, sorted_tokens, seg_starts, seg_slots, num_segs)
    lw = _lw(a_pages, b_pages, page_table, ranks, scales)
    select_backend(y.device).fused(y, x, lw, md)


@_fused_op.register_fake
def _(y, x, a_pages, b_pages, page_table, ranks, scales, token_slots, sorted_tokens, seg_starts,
      seg_slots, num_segs) -> None:  # fmt: skip
    return None


# ---- input checks ---------------------------------------------------------------------------


def _dims(name: str, t: torch.Tensor, dims: int) -> None:
    if t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {list(t.shape)}")


def _check_common(
    name_io: str,
    io: torch.Tensor,
    pages: torch.Tensor,
    page_table: torch.Tensor,
    ranks: torch.Tensor,
    T: int,
) -> None:
    _dims(name_io, io, 2)
    _dims("pages", pages, 3)
    _dims("page_table", page_table, 2)
    _dims("ranks", ranks, 1)
    if io.shape[0] != T:
        raise ValueError(f"{name_io} has {io.shape[0]} rows but the batch metadata has {T}")
    if page_table.dtype != torch.int32 or ranks.dtype != torch.int32:
        raise ValueError(f"page_table ({page_table.dtype}) and ranks ({ranks.dtype}) must be int32")
    if ranks.shape[0] != page_table.shape[0]:
        raise ValueError(
            f"ranks has {ranks.shape[0]} slots but page_table has {page_table.shape[0]}"
        )
    for n, t in (("pages", pages), ("page_table", page_table), ("ranks", ranks)):
        if t.device != io.device:
            raise ValueError(f"{n} is on {t.device} but {name_io} is on {io.device}")


def _meta(meta: BatchMeta | MetaTensors, device: torch.device):
    if isinstance(meta, BatchMeta):
        return meta.tensors(device), meta.host, meta.num_tokens
    return meta, None, meta.token_slots.shape[0]


def _check_slots(host: HostMeta | None, page_table: torch.Tensor) -> None:
    """Every slot of the batch is a row of the pool's tables (the kernels index them unchecked).
    With host metadata only (O(1): segments are in slot order); tensors alone would cost a sync."""
    if host is not None and host.segments and host.segments[-1][2] >= page_table.shape[0]:
        raise ValueError(
            f"token_slots has slot {host.segments[-1][2]} but page_table has "
            f"{page_table.shape[0]} slots"
        )


def _resolve(backend: str | Backend | None) -> Backend | None:
    if backend is None or not isinstance(backend, str):
        return backend
    return get_backend(backend)


def _eager() -> bool:
    return not torch.compiler.is_compiling()


# ---- the ops ---------------------------------------------------------------------------------


def lora_shrink(
    v: torch.Tensor,
    x: torch.Tensor,
    a_pages: torch.Tensor,
    page_table: torch.Tensor,
    ranks: torch.Tensor,
    meta: BatchMeta | MetaTensors,
    *,
    backend: str | Backend | None = None,
) -> None:
    """Semantics: v[t, :r] = x[t] @ A[a].T, r = ranks[a], a = token_slots[t]; v[t, r:] = 0;
    v[t] = 0 where a = -1.
    v: [T, R] float32, R >= page_table.shape[1] * PR; x: [T, H_in]; a_pages: [P, PR, H_in]
    (dtype of x); page_table: [N, MP] int32; ranks: [N] int32."""
    md, host, T = _meta(meta, x.device)
    _check_common("x", x, a_pages, page_table, ranks, T)
    _check_slots(host, page_table)
    _dims("v", v, 2)
    if v.dtype != torch.float32 or v.shape[0] != T or v.device != x.device:
        raise ValueError(f"v must be float32 [{T}, R] on {x.device}, got {v.dtype} {list(v.shape)}")
    if v.shape[1] < page_table.shape[1] * a_pages.shape[1]:
        raise ValueError(
            f"v has {v.shape[1]} columns, fewer than the pool's max rank "
            f"{page_table.shape[1] * a_pages.shape[1]}"
        )
    if a_pages.shape[2] != x.shape[1] or a_pages.dtype != x.dtype:
        raise ValueError(
            f"a_pages {a_pages.dtype} {list(a_pages.shape)} does not fit x {x.dtype} "
            f"{list(x.shape)}"
        )
    be = _resolve(backend)
    if be is not None or (_eager() and host is not None):
        be = be or select_backend(x.device)
        be.shrink(v, x, _lw(a_pages, a_pages, page_table, ranks, _EMPTY_F32), md, host)
    else:
        torch.ops.mintmesh.lora_shrink(v, x, a_pages, page_table, ranks, *md)


def lora_expand(
    y: torch.Tensor,
    v: torch.Tensor,
    b_pages: torch.Tensor,
    page_table: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    meta: BatchMeta | MetaTensors,
    *,
    backend: str | Backend | None = None,
) -> None:
    """Semantics: y[t] += scales[a] * v[t, :r] @ Bt[a], r = ranks[a], a = token_slots[t];
    rows with a = -1 unchanged.
    y: [T, H_out]; v: [T, R] float32, R >= page_table.shape[1] * PR; b_pages: [P, PR, H_out]
    (dtype of y); scales: [N] float32."""
    md, host, T = _meta(meta, y.device)
    _check_common("y", y, b_pages, page_table, ranks, T)
    _check_slots(host, page_table)
    _dims("v", v, 2)
    if v.dtype != torch.float32 or v.shape[0] != T:
        raise ValueError(f"v must be float32 [{T}, R], got {v.dtype} {list(v.shape)}")
    if v.shape[1] < page_table.shape[1] * b_pages.shape[1]:
        raise ValueError(
            f"v has {v.shape[1]} columns, fewer than the pool's max rank "
            f"{page_table.shape[1] * b_pages.shape[1]}"
        )
    if b_pages.shape[2] != y.shape[1] or b_pages.dtype != y.dtype:
        raise ValueError(
            f"b_pages {b_pages.dtype} {list(b_pages.shape)} does not fit y {y.dtype} "
            f"{list(y.shape)}"
        )
    if scales.shape != ranks.shape or scales.dtype != torch.float32:
        raise ValueError(f"scales must be float32 {list(ranks.shape)}, got {scales.dtype} "
                         f"{list(scales.shape)}")  # fmt: skip
    be = _resolve(backend)
    if be is not None or (_eager() and host is not None):
        be = be or select_backend(y.device)
        be.expand(y, v, _lw(b_pages, b_pages, page_table, ranks, scales), md, host)
    else:
        torch.ops.mintmesh.lora_expand(y, v, b_pages, page_table, ranks, scales, *md)


def lora_fused(
    y: torch.Tensor,
    x: torch.Tensor,
    lw: LayerWeights,
    meta: BatchMeta | MetaTensors,
    *,
    backend: str | Backend | None = None,
) -> None:
    """Semantics: y[t] += scales[a] * (x[t] @ A[a].T) @ Bt[a], a = token_slots[t] (skip -1).
    y: [T, H_out], x: [T, H_in], lw: one layer of the pool (a_pages [P, PR, H_in],
    b_pages [P, PR, H_out], page_table [N, MP] int32, ranks [N] int32, scales [N] float32)."""
    md, host, T = _meta(meta, x.device)
    _check_common("x", x, lw.a_pages, lw.page_table, lw.ranks, T)
    _check_slots(host, lw.page_table)
    _dims("y", y, 2)
    if y.shape[0] != T or y.device != x.device:
        raise ValueError(f"y {list(y.shape)} on {y.device} does not match x {list(x.shape)}")
    if lw.a_pages.shape[2] != x.shape[1] or lw.a_pages.dtype != x.dtype:
        raise ValueError(
            f"a_pages {lw.a_pages.dtype} {list(lw.a_pages.shape)} does not fit x {x.dtype} "
            f"{list(x.shape)}"
        )
    if lw.b_pages.shape[2] != y.shape[1] or lw.b_pages.dtype != y.dtype:
        raise ValueError(
            f"b_pages {lw.b_pages.dtype} {list(lw.b_pages.shape)} does not fit y {y.dtype} "
            f"{list(y.shape)}"
        )
    be = _resolve(backend)
    if be is not None or (_eager() and host is not None):
        be = be or select_backend(x.device)
        be.fused(y, x, lw, md, host)
    else:
        torch.ops.mintmesh.lora_fused(
            y, x, lw.a_pages, lw.b_pages, lw.page_table, lw.ranks, lw.scales, *md
        )


__all__ = ["HostMeta", "MetaTensors", "lora_expand", "lora_fused", "lora_shrink"]
