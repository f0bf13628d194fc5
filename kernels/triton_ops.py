"""Triton kernels for the LoRA ops, reading adapter weights through the pool's page table.

Kernels (names after punica: SGMV = segments of rows sharing an adapter, BGMV = one adapter
index per row):

- _sgmv_shrink: prefill shrink. Programs (m-block x rank-block, split-k, segment): a tile of
  BLOCK_M sorted rows of one segment times BLOCK_R rank rows of its adapter (tl.dot), the
  H_in reduction split over SPLIT_K programs (atomic adds into a float32 v) since H_in >> r.
- _sgmv_expand: prefill expand. Programs (m-block x n-block, segment): v tile times the
  adapter's B^T rows, loop over the adapter's own rank only, y tile += scale * acc.
- _bgmv_shrink / _bgmv_expand: decode, one row per program (no tl.dot, no 16-row minimum).
- _bgmv_fused: decode shrink+expand in one kernel for tiny batches (launch-bound): each
  (row, n-block) program recomputes the row's v (r x H_in, L2-resident after the first program)
  and adds its slice of v B^T. Larger decode batches run _bgmv_shrink + _bgmv_expand.

Ranks are never padded: every program loops over its adapter's rank (a runtime bound) and
programs past it exit. Segments and m-blocks past the batch's exit early, so grids can be sized
from T alone (no host sync, CUDA-graph friendly); with host metadata the grids are tighter.
The module imports triton at import time: import it lazily (the selector does).
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

from mintmesh.kernels.meta import HostMeta, MetaTensors
from mintmesh.kernels.pool import LayerWeights

logger = logging.getLogger(__name__)

_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


# The interpreter's tl.dot mishandles bfloat16 operands (triton 3.7): upcast there.
_INTERPRET = bool(triton.knobs.runtime.interpret)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """a @ b accumulated in float32; IEEE: exact float32 products (no TF32)."""
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


def _ieee(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 or (_INTERPRET and dtype == torch.bfloat16)


@triton.jit
def _sgmv_shrink(
    x_ptr, a_ptr, pt_ptr, rank_ptr, sorted_ptr, seg_start_ptr, seg_slot_ptr, nseg_ptr, v_ptr,
    H_in, num_rb,
    sx_t, sx_k, sa_p, sa_r, sa_k, spt, sv_t, sv_r,
    PR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    seg = tl.program_id(2)
    if seg >= tl.load(nseg_ptr):
        return
    pid_m = pid // num_rb
    pid_r = pid % num_rb
    start = tl.load(seg_start_ptr + seg)
    end = tl.load(seg_start_ptr + seg + 1)
    slot = tl.load(seg_slot_ptr + seg)
    rank = tl.load(rank_ptr + slot)
    m0 = start + pid_m * BLOCK_M
    r0 = pid_r * BLOCK_R
    if (m0 >= end) | (r0 >= rank):
        return
    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_mask = offs_m < end
    tok = tl.load(sorted_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
    rows = r0 + tl.arange(0, BLOCK_R)
    r_mask = rows < rank
    page = tl.load(pt_ptr + slot * spt + rows // PR, mask=r_mask, other=0).to(tl.int64)
    w_row = a_ptr + page * sa_p + (rows % PR) * sa_r  # [BLOCK_R] row starts
    x_row = x_ptr + tok * sx_t  # [BLOCK_M]
    k_chunk = tl.cdiv(tl.cdiv(H_in, SPLIT_K), BLOCK_K) * BLOCK_K
    k_begin = pid_k * k_chunk
    k_end = tl.minimum(k_begin + k_chunk, H_in)
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for k in range(k_begin, k_end, BLOCK_K):
        kk = k + tl.arange(0, BLOCK_K)
        k_mask = kk < k_end
        xb = tl.load(
            x_row[:, None] + kk[None, :] * sx_k, mask=m_mask[:, None] & k_mask[None, :], other=0.0
        )
        wb = tl.load(
            w_row[None, :] + kk[:, None] * sa_k, mask=k_mask[:, None] & r_mask[None, :], other=0.0
        )
        acc += _dot(xb, wb, IEEE)
    out = v_ptr + tok[:, None] * sv_t + rows[None, :] * sv_r
    o_mask = m_mask[:, None] & r_mask[None, :]
    if SPLIT_K == 1:
        tl.store(out, acc, mask=o_mask)
    else:
        tl.atomic_add(out, acc, mask=o_mask)


@triton.jit
def _sgmv_expand(
    v_ptr, b_ptr, pt_ptr, rank_ptr, scale_ptr, sorted_ptr, seg_start_ptr, seg_slot_ptr, nseg_ptr,
    y_ptr,
    H_out, num_nb,
    sv_t, sv_r, sb_p, sb_r, sb_n, spt, sy_t, sy_n,
    PR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    seg = tl.program_id(1)
    if seg >= tl.load(nseg_ptr):
        return
    pid_m = pid // num_nb
    pid_n = pid % num_nb
    start = tl.load(seg_start_ptr + seg)
    end = tl.load(seg_start_ptr + seg + 1)
    slot = tl.load(seg_slot_ptr + seg)
    rank = tl.load(rank_ptr + slot)
    m0 = start + pid_m * BLOCK_M
    if (m0 >= end) | (rank == 0):
        return
    scale = tl.load(scale_ptr + slot)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_mask = offs_m < end
    tok = tl.load(sorted_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < H_out
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        r_mask = rows < rank
        page = tl.load(pt_ptr + slot * spt + rows // PR, mask=r_mask, other=0).to(tl.int64)
        b_row = b_ptr + page * sb_p + (rows % PR) * sb_r
        vb = tl.load(
            v_ptr + tok[:, None] * sv_t + rows[None, :] * sv_r,
            mask=m_mask[:, None] & r_mask[None, :],
            other=0.0,
        )
        bb = tl.load(
            b_row[:, None] + offs_n[None, :] * sb_n,
            mask=r_mask[:, None] & n_mask[None, :],
            other=0.0,
        )
        # v stays float32 (B is upcast, TF32 on tensor cores): v cast to float16 overflowed
        # at |v| > 65504 where y fits, and lost v's small values.
        acc += _dot(vb, bb.to(tl.float32), IEEE)
    out = y_ptr + tok[:, None] * sy_t + offs_n[None, :] * sy_n
    o_mask = m_mask[:, None] & n_mask[None, :]
    yv = tl.load(out, mask=o_mask, other=0.0)
    tl.store(out, (yv.to(tl.float32) + scale * acc).to(yv.dtype), mask=o_mask)


@triton.jit
def _bgmv_shrink(
    x_ptr, a_ptr, pt_ptr, rank_ptr, slot_ptr, v_ptr,
    H_in,
    sx_t, sx_k, sa_p, sa_r, sa_k, spt, sv_t, sv_r,
    PR: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    pid_k = tl.program_id(1)
    slot = tl.load(slot_ptr + t)
    if slot < 0:
        return
    rank = tl.load(rank_ptr + slot)
    k_chunk = tl.cdiv(tl.cdiv(H_in, SPLIT_K), BLOCK_K) * BLOCK_K
    k_begin = pid_k * k_chunk
    k_end = tl.minimum(k_begin + k_chunk, H_in)
    x_row = x_ptr + t.to(tl.int64) * sx_t
    for r0 in range(0, rank, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        r_mask = rows < rank
        page = tl.load(pt_ptr + slot * spt + rows // PR, mask=r_mask, other=0).to(tl.int64)
        w_row = a_ptr + page * sa_p + (rows % PR) * sa_r
        acc = tl.zeros([BLOCK_R], dtype=tl.float32)
        for k in range(k_begin, k_end, BLOCK_K):
            kk = k + tl.arange(0, BLOCK_K)
            k_mask = kk < k_end
            xv = tl.load(x_row + kk * sx_k, mask=k_mask, other=0.0).to(tl.float32)
            wb = tl.load(
                w_row[:, None] + kk[None, :] * sa_k,
                mask=r_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            acc += tl.sum(wb.to(tl.float32) * xv[None, :], axis=1)
        out = v_ptr + t.to(tl.int64) * sv_t + rows * sv_r
        if SPLIT_K == 1:
            tl.store(out, acc, mask=r_mask)
        else:
            tl.atomic_add(out, acc, mask=r_mask)


@triton.jit
def _bgmv_expand(
    v_ptr, b_ptr, pt_ptr, rank_ptr, scale_ptr, slot_ptr, y_ptr,
    H_out,
    sv_t, sv_r, sb_p, sb_r, sb_n, spt, sy_t, sy_n,
    PR: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    pid_n = tl.program_id(1)
    slot = tl.load(slot_ptr + t)
    if slot < 0:
        return
    rank = tl.load(rank_ptr + slot)
    if rank == 0:
        return
    scale = tl.load(scale_ptr + slot)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < H_out
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        r_mask = rows < rank
        page = tl.load(pt_ptr + slot * spt + rows // PR, mask=r_mask, other=0).to(tl.int64)
        b_row = b_ptr + page * sb_p + (rows % PR) * sb_r
        vv = tl.load(v_ptr + t.to(tl.int64) * sv_t + rows * sv_r, mask=r_mask, other=0.0)
        bb = tl.load(
            b_row[:, None] + offs_n[None, :] * sb_n,
            mask=r_mask[:, None] & n_mask[None, :],
            other=0.0,
        )
        acc += tl.sum(vv.to(tl.float32)[:, None] * bb.to(tl.float32), axis=0)
    out = y_ptr + t.to(tl.int64) * sy_t + offs_n * sy_n
    yv = tl.load(out, mask=n_mask, other=0.0)
    tl.store(out, (yv.to(tl.float32) + scale * acc).to(yv.dtype), mask=n_mask)


@triton.jit
def _bgmv_fused(
    x_ptr, a_ptr, b_ptr, pt_ptr, rank_ptr, scale_ptr, slot_ptr, y_ptr,
    H_in, H_out,
    sx_t, sx_k, sa_p, sa_r, sa_k, sb_p, sb_r, sb_n, spt, sy_t, sy_n,
    PR: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    pid_n = tl.program_id(1)
    slot = tl.load(slot_ptr + t)
    if slot < 0:
        return
    rank = tl.load(rank_ptr + slot)
    if rank == 0:
        return
    scale = tl.load(scale_ptr + slot)
    x_row = x_ptr + t.to(tl.int64) * sx_t
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < H_out
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        r_mask = rows < rank
        page = tl.load(pt_ptr + slot * spt + rows // PR, mask=r_mask, other=0).to(tl.int64)
        sub = (rows % PR).to(tl.int64)
        a_row = a_ptr + page * sa_p + sub * sa_r
        vr = tl.zeros([BLOCK_R], dtype=tl.float32)
        for k in range(0, H_in, BLOCK_K):
            kk = k + tl.arange(0, BLOCK_K)
            k_mask = kk < H_in
            xv = tl.load(x_row + kk * sx_k, mask=k_mask, other=0.0).to(tl.float32)
            wb = tl.load(
                a_row[:, None] + kk[None, :] * sa_k,
                mask=r_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            vr += tl.sum(wb.to(tl.float32) * xv[None, :], axis=1)
        bb = tl.load(
            (b_ptr + page * sb_p + sub * sb_r)[:, None] + offs_n[None, :] * sb_n,
            mask=r_mask[:, None] & n_mask[None, :],
            other=0.0,
        )
        acc += tl.sum(vr[:, None] * bb.to(tl.float32), axis=0)
    out = y_ptr + t.to(tl.int64) * sy_t + offs_n * sy_n
    yv = tl.load(out, mask=n_mask, other=0.0)
    tl.store(out, (yv.to(tl.float32) + scale * acc).to(yv.dtype), mask=n_mask)


# ---- launchers -------------------------------------------------------------------------------


def _split_k(h_in: int, programs: int, target: int = 264) -> int:
    """Split the H_in reduction so that about `target` programs run (2x the SMs of an H100),
    keeping at least 256 columns per split."""
    sk = 1
    while sk < 16 and programs * sk * 2 <= target and h_in // (sk * 2) >= 256:
        sk *= 2
    return sk


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


class TritonBackend:
    """Triton implementation of the three ops (see ops.py for their semantics).

    mode: "auto" runs the per-row (BGMV) kernels when the batch's longest adapter segment has
    at most decode_max_seg rows (without host metadata, inside the custom op: when
    T <= decode_max_tokens), else the segmented (SGMV) ones; "per_row" / "segmented" force one.
    split_k: force the shrink's H_in split (default: sized to fill the GPU).
    fused_max_tokens: per-row batches up to this many rows run shrink and expand in one kernel.
    """

    name = "triton"

    def __init__(
        self,
        mode: str = "auto",
        split_k: int | None = None,
        decode_max_seg: int = 4,
        decode_max_tokens: int = 64,
        fused_max_tokens: int = 16,
    ) -> None:
        if mode not in ("auto", "per_row", "segmented"):
            raise ValueError(f"unknown mode {mode!r}; use auto, per_row or segmented")
        if split_k is not None and split_k < 1:
            raise ValueError(f"split_k {split_k} must be >= 1")
        self.mode = mode
        self.split_k = split_k
        self.decode_max_seg = decode_max_seg
        self.decode_max_tokens = decode_max_tokens
        self.fused_max_tokens = fused_max_tokens

    def _per_row(self, n_tokens: int, host: HostMeta | None) -> bool:
        if self.mode != "auto":
            return self.mode == "per_row"
        if host is not None:
            return host.max_seg_len <= self.decode_max_seg
        return n_tokens <= self.decode_max_tokens

    def _sk(self, h_in: int, programs: int) -> int:
        return self.split_k if self.split_k is not None else _split_k(h_in, programs)

    @staticmethod
    def _grid_segs(T: int, lw: LayerWeights, host: HostMeta | None) -> tuple[int, int]:
        """(segment programs, longest segment) for SGMV grids."""
        if host is not None:
            return max(host.num_segments, 1), max(host.max_seg_len, 1)
        return max(min(T, lw.page_table.shape[0]), 1), max(T, 1)

    # ---- shrink ----------------------------------------------------------------------------

    def shrink(
        self,
        v: torch.Tensor,
        x: torch.Tensor,
        lw: LayerWeights,
        md: MetaTensors,
        host: HostMeta | None = None,
    ) -> None:
        v.zero_()
        T, H_in = x.shape
        if T == 0:
            return
        a = lw.a_pages
        pr = a.shape[1]
        if self._per_row(T, host):
            sk = self._sk(H_in, T)
            _bgmv_shrink[(T, sk)](
                x, a, lw.page_table, lw.ranks, md.token_slots, v,
                H_in,
                x.stride(0), x.stride(1), a.stride(0), a.stride(1), a.stride(2),
                lw.page_table.stride(0), v.stride(0), v.stride(1),
                PR=pr, BLOCK_R=16, BLOCK_K=_pow2(H_in, 16, 256), SPLIT_K=sk,
            )  # fmt: skip
            return
        n_seg, max_len = self._grid_segs(T, lw, host)
        block_m = _pow2(max_len, 16, 64)
        block_r = 16
        num_rb = triton.cdiv(v.shape[1], block_r)
        num_mb = triton.cdiv(max_len, block_m)
        sk = self._sk(H_in, n_seg * num_mb * num_rb)
        _sgmv_shrink[(num_mb * num_rb, sk, n_seg)](
            x, a, lw.page_table, lw.ranks, md.sorted_tokens, md.seg_starts, md.seg_slots,
            md.num_segs, v,
            H_in, num_rb,
            x.stride(0), x.stride(1), a.stride(0), a.stride(1), a.stride(2),
            lw.page_table.stride(0), v.stride(0), v.stride(1),
            PR=pr, BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=_pow2(H_in, 16, 64), SPLIT_K=sk,
            IEEE=_ieee(x.dtype),
        )  # fmt: skip

    # ---- expand ----------------------------------------------------------------------------

    def expand(
        self,
        y: torch.Tensor,
        v: torch.Tensor,
        lw: LayerWeights,
        md: MetaTensors,
        host: HostMeta | None = None,
    ) -> None:
        T, H_out = y.shape
        if T == 0:
            return
        b = lw.b_pages
        pr = b.shape[1]
        if self._per_row(T, host):
            block_n = _pow2(H_out, 16, 256)
            _bgmv_expand[(T, triton.cdiv(H_out, block_n))](
                v, b, lw.page_table, lw.ranks, lw.scales, md.token_slots, y,
                H_out,
                v.stride(0), v.stride(1), b.stride(0), b.stride(1), b.stride(2),
                lw.page_table.stride(0), y.stride(0), y.stride(1),
                PR=pr, BLOCK_R=16, BLOCK_N=block_n,
            )  # fmt: skip
            return
        n_seg, max_len = self._grid_segs(T, lw, host)
        block_m = _pow2(max_len, 16, 64)
        block_n = _pow2(H_out, 16, 128)
        num_nb = triton.cdiv(H_out, block_n)
        num_mb = triton.cdiv(max_len, block_m)
        _sgmv_expand[(num_mb * num_nb, n_seg)](
            v, b, lw.page_table, lw.ranks, lw.scales, md.sorted_tokens, md.seg_starts,
            md.seg_slots, md.num_segs, y,
            H_out, num_nb,
            v.stride(0), v.stride(1), b.stride(0), b.stride(1), b.stride(2),
            lw.page_table.stride(0), y.stride(0), y.stride(1),
            PR=pr, BLOCK_M=block_m, BLOCK_R=16, BLOCK_N=block_n,
            IEEE=_ieee(y.dtype),
        )  # fmt: skip

    # ---- fused -----------------------------------------------------------------------------

    def fused(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lw: LayerWeights,
        md: MetaTensors,
        host: HostMeta | None = None,
    ) -> None:
        T, H_in = x.shape
        H_out = y.shape[1]
        if T == 0 or (host is not None and host.num_active == 0):
            return
        a, b = lw.a_pages, lw.b_pages
        if x.shape[0] <= self.fused_max_tokens and self._per_row(T, host):
            # Tiny decode batches: one launch instead of two (each program recomputes its row's
            # v, re-read from L2, which only pays while launches dominate).
            block_n = _pow2(H_out, 16, 256)
            _bgmv_fused[(T, triton.cdiv(H_out, block_n))](
                x, a, b, lw.page_table, lw.ranks, lw.scales, md.token_slots, y,
                H_in, H_out,
                x.stride(0), x.stride(1), a.stride(0), a.stride(1), a.stride(2),
                b.stride(0), b.stride(1), b.stride(2),
                lw.page_table.stride(0), y.stride(0), y.stride(1),
                PR=a.shape[1], BLOCK_R=16, BLOCK_K=_pow2(H_in, 16, 256), BLOCK_N=block_n,
            )  # fmt: skip
            return
        width = lw.page_table.shape[1] * a.shape[1]
        if host is not None and lw.host is not None and host.segments:
            # Only as wide as the batch's largest rank on this layer (fewer rank-block programs).
            width = max(16, max(lw.host.ranks[s] for _, _, s in host.segments))
        v = torch.empty(T, width, dtype=torch.float32, device=x.device)
        self.shrink(v, x, lw, md, host)
        self.expand(y, v, lw, md, host)
