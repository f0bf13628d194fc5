"""The CPU path: a native fp32 kernel (native.py) where it is built, else plain torch calls into
MKL/oneDNN, arranged by batch shape.

- native: one C++ call per layer and op (lora_cpu.cpp): per tile of up to 4 rows of one adapter,
          shrink, scale and expand fused, reading A and B^T in place through the page table (no
          gather copies, no per-adapter torch calls). float32 only; chosen by the cost model
          below (every batch shape measured here, except long prefill segments where MKL's
          GEMMs win). Unavailable (no compiler, --no-native-kernels): the torch strategies.

The torch strategies, all exact (no rank padding), chosen per layer call by a small cost model:

- runs:   loop over the runs of rows that share an adapter in row order (a prefill request is
          one run); zero-copy views of x, y and the adapter's pages; two GEMMs per run.
- sorted: gather the rows sorted by adapter, one pair of GEMMs per adapter segment, scatter-add
          back (rows of one adapter scattered over the batch, e.g. zipf popularity).
- gather: batched GEMV (torch.bmm) over per-row copies of each row's adapter pages, grouped by
          page count (decode: many adapters, one row each; per-call overhead beats bandwidth).

Per-call overhead on this path is a few microseconds per torch call, so the plan is cached per
batch (HostMeta.plans) and the weights are read through zero-copy views prepared at load time.

The ops run on the calling thread (torch threads set to 1 for their duration): these GEMMs are
too small to gain from the OpenMP pool, and each parallel region costs a barrier, which stalls
for a scheduler quantum whenever the cores are shared (measured here: 18 ms single-threaded vs
95-445 ms with 2 threads for one prefill layer under load; the same time on an idle machine).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from mintmesh.kernels import native
from mintmesh.kernels.meta import HostMeta, MetaTensors, host_from_tensors
from mintmesh.kernels.pool import HostLayer, LayerWeights, host_layer_from_tensors
from mintmesh.kernels.settings import SETTINGS

logger = logging.getLogger(__name__)

# Cost model constants (microseconds, bytes per microsecond), measured on a 2-core AVX2 host.
CALL_US = 10.0  # one run or segment: two small GEMM calls and the views
GROUP_US = 30.0  # one gather group: two index_selects and two bmm calls
BYTES_PER_US = 20_000.0  # streaming weights from memory
GATHER_MARGIN = 0.5  # gather must be estimated at most this fraction of the alternatives


# The native kernel reads an adapter's weights once per tile of 4 rows (from cache after the
# first); MKL's GEMMs win once segments are long (measured, 1024x1024 rank 16: 64 rows of one
# adapter native 148us vs runs 184us; 4 adapters x 128 rows 1208us vs 824us).
NATIVE_MAX_MEAN_SEGMENT = 64


def native_wins(hm: HostMeta) -> bool:
    """Whether the native kernel beats the torch strategies on this batch: decode and short
    segments, not long prefill segments."""
    return hm.num_active <= NATIVE_MAX_MEAN_SEGMENT * max(hm.num_segments, 1)


_threads_lock = threading.Lock()
_threads_depth = 0
_threads_saved = 1


@contextmanager
def single_threaded() -> Iterator[None]:
    """torch on one thread inside (re-entrant, safe with concurrent callers)."""
    global _threads_depth, _threads_saved
    with _threads_lock:
        if _threads_depth == 0:
            _threads_saved = torch.get_num_threads()
            if _threads_saved > 1:
                torch.set_num_threads(1)
        _threads_depth += 1
    try:
        yield
    finally:
        with _threads_lock:
            _threads_depth -= 1
            if _threads_depth == 0 and _threads_saved > 1:
                torch.set_num_threads(_threads_saved)


def _on_one_thread(fn):
    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        if not self.single_thread:
            return fn(self, *args, **kwargs)
        with single_threaded():
            return fn(self, *args, **kwargs)

    return wrapper


@dataclass
class _GatherGroup:
    rows: torch.Tensor  # [G] int64 row ids, in order
    pages: torch.Tensor  # [G * n] int64 page ids, row-major
    slots: torch.Tensor  # [G] int64 slot of each row
    n_pages: int
    whole: bool  # rows == arange(T): update y in place without index ops


@dataclass
class _Plan:
    kind: str  # "runs" | "sorted" | "gather"
    groups: list[_GatherGroup] | None = None
    perm: torch.Tensor | None = None  # sorted strategy: rows with an adapter, sorted


def _f32(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether an op's rows are float32. Half precision (float16 / bfloat16 pools) computes as
    the reference does: float32 products on upcast copies of the rows and of each adapter's
    weights, y rounded once. Products in the storage dtype rounded x A^T to it, which overflowed
    float16 (|v| > 65504: inf where the result fits) and lost its subnormals (x ~ 1e-6: 30%
    errors); and CPU half-precision GEMMs measured 2.5-25x slower than the upcast ones here."""
    return x.dtype == torch.float32 and y.dtype == torch.float32


def _weights(hl: HostLayer, lw: LayerWeights, slot: int):
    """(A [r, in], Bt [r, out], scale) of `slot` on this layer, or None if it has rank 0."""
    w = hl.views[slot]
    if w is not None:
        return w
    r = hl.ranks[slot]
    if r == 0:
        return None
    pr = lw.a_pages.shape[1]
    idx = torch.tensor(hl.pages[slot][: -(-r // pr)], dtype=torch.long)
    A = lw.a_pages.index_select(0, idx).reshape(-1, lw.a_pages.shape[2])[:r]
    Bt = lw.b_pages.index_select(0, idx).reshape(-1, lw.b_pages.shape[2])[:r]
    return A, Bt, hl.scales[slot]


def _plan(
    host: HostMeta,
    hl: HostLayer,
    md: MetaTensors,
    in_f: int,
    out_f: int,
    esize: int,
    pr: int,
    force: str | None = None,
) -> _Plan:
    key = ("cpu", id(hl.pages), in_f, out_f, esize, force)
    hit = host.plans.get(key)
    if hit is not None and hit[0] is hl.pages:
        return hit[1]
    row_bytes = (in_f + out_f) * esize
    # Estimated microseconds of each strategy: call overhead plus weight rows streamed.
    cost_runs = 0.0
    for s in host.run_slots:
        if s >= 0:
            cost_runs += CALL_US + hl.ranks[s] * row_bytes / BYTES_PER_US
    move_rows = host.num_active * row_bytes * 2 / BYTES_PER_US
    cost_sorted = 2 * CALL_US + move_rows
    for _, _, s in host.segments:
        cost_sorted += CALL_US + hl.ranks[s] * row_bytes / BYTES_PER_US
    kind = "runs" if cost_runs <= cost_sorted else "sorted"
    cost_gather = float("inf")
    if host.max_seg_len <= 8:
        # Whole pages per row, read twice (copy, then bmm); one group per page count.
        n_groups: set[int] = set()
        page_rows_total = 0
        for s, n in zip(host.run_slots, host.run_sizes, strict=True):
            pages = _rank_pages(hl, s, pr)
            if pages:
                n_groups.add(len(pages))
                page_rows_total += n * len(pages) * pr
        whole = len(n_groups) == 1 and host.num_active == host.num_tokens
        cost_gather = (
            GROUP_US * len(n_groups)
            + 1.5 * page_rows_total * row_bytes / BYTES_PER_US
            + (0.0 if whole else move_rows)
        )
        # It moves about 3x the bytes for a gain in call overhead that measured small (1.2-1.5x
        # at rank 16, 64 rows): only when the model says it is clearly cheaper.
        if cost_gather < GATHER_MARGIN * min(cost_runs, cost_sorted):
            kind = "gather"
    if force is not None:
        kind = force
    plan = _Plan(kind=kind)
    if kind == "gather":
        plan.groups = _gather_groups(hl, md, pr)
    elif kind == "sorted":
        plan.perm = md.sorted_tokens[: host.num_active].to("cpu", torch.int64)
    host.plans[key] = (hl.pages, plan)
    logger.debug(
        "cpu plan %s: runs %.0fus, sorted %.0fus, gather %.0fus",
        kind,
        cost_runs,
        cost_sorted,
        cost_gather,
    )
    return plan


def _rank_pages(hl: HostLayer, slot: int, pr: int) -> list[int]:
    """The pages of slot that hold its rank on this layer: none for rank 0 (an adapter that
    does not target the layer holds pages for the layers it does) or no adapter (slot < 0)."""
    if slot < 0 or not hl.ranks[slot]:
        return []
    return hl.pages[slot][: -(-hl.ranks[slot] // pr)]


def _gather_groups(hl: HostLayer, md: MetaTensors, pr: int) -> list[_GatherGroup]:
    """The gather strategy's groups: the rows whose adapters span the same number of pages
    on this layer; rows of rank 0 or without an adapter are in none (their y is untouched,
    even where x is not finite)."""
    slots = md.token_slots.to("cpu").tolist()
    by_n: dict[int, tuple[list[int], list[int], list[int]]] = {}
    for t, s in enumerate(slots):
        p = _rank_pages(hl, s, pr)
        if not p:
            continue
        rows, pages, sl = by_n.setdefault(len(p), ([], [], []))
        rows.append(t)
        pages.extend(p)
        sl.append(s)
    out = []
    T = len(slots)
    for n, (rows, pages, sl) in sorted(by_n.items()):
        out.append(
            _GatherGroup(
                rows=torch.tensor(rows, dtype=torch.long),
                pages=torch.tensor(pages, dtype=torch.long),
                slots=torch.tensor(sl, dtype=torch.long),
                n_pages=n,
                whole=len(rows) == T,
            )
        )
    return out


class CpuBackend:
    """Torch-on-CPU implementation of the three ops (see ops.py for their semantics)."""

    name = "cpu"

    def __init__(
        self,
        strategy: str | None = None,
        single_thread: bool = True,
        native_threads: int | None = None,
    ) -> None:
        """strategy: force "native", "runs", "sorted" or "gather" (tests, benchmarks; "native"
        falls back to the cost model where the library is unavailable or the dtype is not
        float32); None: cost model.
        single_thread: run the ops on the calling thread (see the module docstring).
        native_threads: threads of the native kernel, the caller included (default: the kernels'
        settings, --lora-threads); its helpers share tiles through an atomic counter
        (work_share.h), so a descheduled helper delays a call by one tile at most."""
        if strategy not in (None, "native", "runs", "sorted", "gather"):
            raise ValueError(
                f"unknown CPU strategy {strategy!r}; use native, runs, sorted or gather"
            )
        self.strategy = strategy
        self.single_thread = single_thread
        if native_threads is None:
            native_threads = SETTINGS.lora_threads
        self.native_threads = max(1, native_threads)
        self._local = threading.local()

    def _native(self, hm: HostMeta, dtype: torch.dtype):
        """The native library if it should serve this call, else None."""
        if dtype != torch.float32 or self.strategy not in (None, "native"):
            return None
        lib = native.load(block=False)
        if lib is None or self.strategy == "native":
            return lib
        return lib if native_wins(hm) else None

    def _buf(self, tag: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        # Reused per-thread workspaces: large fresh allocations page-fault on every call.
        ws = self._local.__dict__.setdefault("ws", {})
        key = (tag, dtype)
        numel = 1
        for d in shape:
            numel *= d
        b = ws.get(key)
        if b is None or b.numel() < numel:
            b = torch.empty(max(numel, 1), dtype=dtype)
            ws[key] = b
        return b[:numel].view(shape)

    @staticmethod
    def _hosts(lw: LayerWeights, md: MetaTensors, host: HostMeta | None):
        hl = lw.host if lw.host is not None else host_layer_from_tensors(lw)
        hm = host if host is not None else host_from_tensors(md)
        return hl, hm

    # ---- fused: y += scale * (x A^T) B^T ---------------------------------------------------

    def fused(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lw: LayerWeights,
        md: MetaTensors,
        host: HostMeta | None = None,
    ) -> None:
        hl, hm = self._hosts(lw, md, host)
        if hm.num_active == 0:
            return
        lib = self._native(hm, x.dtype)
        if lib is not None and lib.fused(y, x, lw, md, hm.num_segments, self.native_threads):
            return  # no torch op ran: torch's thread count was never touched
        with single_threaded() if self.single_thread else contextlib.nullcontext():
            pr = lw.a_pages.shape[1]
            strategy = None if self.strategy == "native" else self.strategy
            plan = _plan(hm, hl, md, x.shape[1], y.shape[1], x.element_size(), pr, strategy)
            if plan.kind == "runs":
                self._fused_runs(y, x, lw, hl, hm)
            elif plan.kind == "sorted":
                self._fused_sorted(y, x, lw, hl, hm, plan)
            else:
                self._fused_gather(y, x, lw, plan)

    @staticmethod
    def _run_weights(hl: HostLayer, lw: LayerWeights, hm: HostMeta):
        """[(run index, A^T [in, r], Bt [r, out], scale)] of the runs with an adapter on this
        layer; cached per batch and layer (the weights are views, built once)."""
        key = ("runs_w", id(hl))
        hit = hm.plans.get(key)
        if hit is not None and hit[0] is hl:
            return hit[1]
        out = []
        for i, s in enumerate(hm.run_slots):
            if s >= 0:
                w = _weights(hl, lw, s)
                if w is not None:
                    out.append((i, w[0].t(), w[1], w[2]))
        hm.plans[key] = (hl, out)
        return out

    def _fused_runs(self, y, x, lw, hl, hm) -> None:
        xs = torch.split(x, hm.run_sizes)
        ys = torch.split(y, hm.run_sizes)
        mm = torch.mm
        if _f32(x, y):
            for i, At, Bt, sc in self._run_weights(hl, lw, hm):
                ys[i].addmm_(mm(xs[i], At), Bt, alpha=sc)
            return
        for i, At, Bt, sc in self._run_weights(hl, lw, hm):  # half: see _f32
            ys[i].add_(mm(mm(xs[i].float(), At.float()), Bt.float()), alpha=sc)

    def _fused_sorted(self, y, x, lw, hl, hm, plan: _Plan) -> None:
        perm = plan.perm
        n = hm.num_active
        f32 = _f32(x, y)
        xs = torch.index_select(x, 0, perm, out=self._buf("xs", (n, x.shape[1]), x.dtype))
        xs = xs.float()  # half: see _f32 (a no-op in float32)
        d = self._buf("d", (n, y.shape[1]), torch.float32)
        for s0, s1, s in hm.segments:
            w = _weights(hl, lw, s)
            if w is None:
                d[s0:s1].zero_()
                continue
            A, Bt, sc = w
            v = torch.mm(xs[s0:s1], A.t().float())
            v.mul_(sc)
            torch.mm(v, Bt.float(), out=d[s0:s1])
        if f32:
            y.index_add_(0, perm, d)
        else:  # one rounding of y + delta (each row of perm appears once)
            y.index_copy_(0, perm, y.index_select(0, perm).float().add_(d).to(y.dtype))

    def _fused_gather(self, y, x, lw, plan: _Plan) -> None:
        pr = lw.a_pages.shape[1]
        in_f, out_f = x.shape[1], y.shape[1]
        sc_all = lw.scales
        f32 = _f32(x, y)
        for g in plan.groups or ():
            G, k = g.rows.numel(), g.n_pages * pr
            Ag = torch.index_select(
                lw.a_pages, 0, g.pages, out=self._buf("Ag", (G * g.n_pages, pr, in_f), x.dtype)
            ).view(G, k, in_f)
            Bg = torch.index_select(
                lw.b_pages, 0, g.pages, out=self._buf("Bg", (G * g.n_pages, pr, out_f), x.dtype)
            ).view(G, k, out_f)
            xg = x if g.whole else x.index_select(0, g.rows)
            if not f32:  # half: see _f32
                Ag, Bg, xg = Ag.float(), Bg.float(), xg.float()
            v = torch.bmm(xg.unsqueeze(1), Ag.transpose(1, 2))  # [G, 1, k]
            v.mul_(sc_all.index_select(0, g.slots).to(v.dtype).view(G, 1, 1))
            if f32 and g.whole:
                y.unsqueeze(1).baddbmm_(v, Bg)
            elif f32:
                y.index_add_(0, g.rows, torch.bmm(v, Bg).squeeze(1))
            elif g.whole:
                y.add_(torch.bmm(v, Bg).squeeze(1))
            else:  # one rounding of y + delta (each row of a group appears once)
                d = y.index_select(0, g.rows).float().add_(torch.bmm(v, Bg).squeeze(1))
                y.index_copy_(0, g.rows, d.to(y.dtype))

    # ---- shrink: v[t, :r] = x[t] A^T ------------------------------------------------------

    @_on_one_thread
    def shrink(
        self,
        v: torch.Tensor,
        x: torch.Tensor,
        lw: LayerWeights,
        md: MetaTensors,
        host: HostMeta | None = None,
    ) -> None:
        hl, hm = self._hosts(lw, md, host)
        lib = self._native(hm, x.dtype)
        if lib is not None and hm.num_active:
            if hm.num_active < hm.num_tokens:
                v.zero_()
            if lib.shrink(v, x, lw, md, hm.num_segments, self.native_threads):
                return
        v.zero_()
        start = 0
        for s, n in zip(hm.run_slots, hm.run_sizes, strict=True):
            if s >= 0:
                w = _weights(hl, lw, s)
                if w is not None:
                    A = w[0]  # half: float32 products (see _f32)
                    xr = x[start : start + n].float()
                    v[start : start + n, : A.shape[0]] = torch.mm(xr, A.t().float())
            start += n

    # ---- expand: y[t] += scale * v[t, :r] B^T ---------------------------------------------

    @_on_one_thread
    def expand(
        self,
        y: torch.Tensor,
        v: torch.Tensor,
        lw: LayerWeights,
        md: MetaTensors,
        host: HostMeta | None = None,
    ) -> None:
        hl, hm = self._hosts(lw, md, host)
        if hm.num_active == 0:
            return
        lib = self._native(hm, y.dtype)
        if lib is not None and lib.expand(y, v, lw, md, hm.num_segments, self.native_threads):
            return
        start = 0
        for s, n in zip(hm.run_slots, hm.run_sizes, strict=True):
            if s >= 0:
                w = _weights(hl, lw, s)
                if w is not None:
                    _, Bt, sc = w
                    vs = v[start : start + n, : Bt.shape[0]].float()
                    if _f32(Bt, y):
                        y[start : start + n].addmm_(vs, Bt, alpha=sc)
                    else:  # half: float32 products, y rounded once (see _f32)
                        y[start : start + n].add_(torch.mm(vs, Bt.float()), alpha=sc)
            start += n
