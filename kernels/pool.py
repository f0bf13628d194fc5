"""The paged device pool of adapter weights (S-LoRA style unified paging, no rank padding).

Layout. The pool owns, for every LoRA layer l of the executor (a targeted Linear, out x in):

    a_pages[l]: [P, PR, in]    rank rows of A (lora_A.weight rows)
    b_pages[l]: [P, PR, out]   rank rows of B^T (lora_B.weight columns)

A *page* holds PR (page_rows) rank rows. Page ids are shared by all layers: an adapter of rank r
owns n = ceil(r / PR) page ids, and page p of that adapter is row p of every layer's a_pages and
b_pages. So one page table per adapter serves every layer, and the memory an adapter takes is
n * page_nbytes, proportional to its rank (rounded up to PR rows), never padded to a maximum
rank. Rows of a reserved page past a layer's rank are zero (written at load), so reading whole
pages is exact. The price of one page table for all layers: an adapter reserves its pages on
every layer of the pool, also those it does not target (build the pool over the modules the
deployment's adapters target), and a peft rank_pattern adapter takes pages for its largest rank.

Per-slot tables (device tensors, read by the kernels through the slot of each token):

    page_table: [max_adapters, max_pages_per_adapter] int32   page ids of each slot, in rank order
    ranks:      [num_layers, max_adapters] int32              rank of each slot on each layer
                                                              (0: the adapter does not target it)
    scales:     [num_layers, max_adapters] float32            alpha / r (or rsLoRA) per layer

Pages are allocated first-fit as one contiguous run when possible (the CPU path then reads an
adapter as a zero-copy view), else scattered; both are correct. The pool is bounded by
max_pages (or max_bytes) and by max_adapters slots; load() raises ResourceExhausted when an
adapter does not fit.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from mintmesh.errors import ResourceExhausted
from mintmesh.kernels.meta import norm_device
from mintmesh.packed import ModuleWeights

logger = logging.getLogger(__name__)

DEFAULT_PAGE_ROWS = 8
DEFAULT_MAX_RANK = 256
# Without max_pages / max_bytes the pool holds max_adapters adapters of this rank (and at least
# one adapter of max_rank).
DEFAULT_BUDGET_RANK = 32


@dataclass
class HostLayer:
    """One layer's per-slot tables as Python values (for the CPU path), indexed by slot."""

    views: list[tuple[torch.Tensor, torch.Tensor, float] | None]  # (A [r, in], Bt [r, out], s)
    ranks: list[int]
    scales: list[float]
    # Page ids of each slot covering at least its rank on this layer (rows past it are zero).
    pages: list[list[int]]


class LayerWeights(NamedTuple):
    """What an op reads for one layer: the paged weights and the slot tables."""

    a_pages: torch.Tensor  # [P, PR, H_in]
    b_pages: torch.Tensor  # [P, PR, H_out]
    page_table: torch.Tensor  # [N, MP] int32
    ranks: torch.Tensor  # [N] int32
    scales: torch.Tensor  # [N] float32
    host: HostLayer | None = None


def host_layer_from_tensors(lw: LayerWeights) -> HostLayer:
    """HostLayer rebuilt from the tensors (custom-op path); views only for contiguous pages."""
    pr = lw.a_pages.shape[1]
    in_f, out_f = lw.a_pages.shape[2], lw.b_pages.shape[2]
    ranks = lw.ranks.tolist()
    scales = lw.scales.tolist() if lw.scales.numel() else [0.0] * len(ranks)
    table = lw.page_table.tolist()
    views: list[tuple[torch.Tensor, torch.Tensor, float] | None] = []
    pages: list[list[int]] = []
    for s, r in enumerate(ranks):
        n = -(-r // pr)
        p = table[s][:n]
        pages.append(p)
        if r and p == list(range(p[0], p[0] + n)):
            row0 = p[0] * pr
            views.append(
                (
                    lw.a_pages.view(-1, in_f)[row0 : row0 + r],
                    lw.b_pages.view(-1, out_f)[row0 : row0 + r],
                    scales[s],
                )
            )
        else:
            views.append(None)
    return HostLayer(views=views, ranks=ranks, scales=scales, pages=pages)


@dataclass
class _Resident:
    key: str
    slot: int
    pages: list[int]
    ranks: list[int]  # per layer (0 = not targeted)
    scales: list[float]  # per layer
    contiguous: bool
    nbytes: int
    # Per layer: (A [r, in], Bt [r, out], scale) as views into the pages when the pages are one
    # contiguous run, else None (the CPU path gathers). None also where rank is 0.
    views: list[tuple[torch.Tensor, torch.Tensor, float] | None] = field(default_factory=list)
    # The layers it has weights on (rank > 0), by name.
    targeted: frozenset[str] = frozenset()


class _PageAllocator:
    """Free-page bookkeeping: first-fit contiguous runs, scattered pages as a fallback."""

    def __init__(self, num_pages: int) -> None:
        self.num_pages = num_pages
        self._free = bytearray(b"\x01") * num_pages
        self.num_free = num_pages

    def alloc(self, n: int) -> list[int] | None:
        if n > self.num_free:
            return None
        start = self._free.find(b"\x01" * n)  # first run of n free pages
        if start >= 0:
            pages = list(range(start, start + n))
        else:
            pages = [p for p in range(self.num_pages) if self._free[p]][:n]
        for p in pages:
            self._free[p] = 0
        self.num_free -= n
        return pages

    def free(self, pages: list[int]) -> None:
        for p in pages:
            if self._free[p]:
                raise RuntimeError(f"page {p} freed twice")
            self._free[p] = 1
        self.num_free += len(pages)


class AdapterPool:
    """Adapters resident on one device, keyed by digest, in pages proportional to their rank.

    Slots are small ints used in BatchMeta (token_slots); -1 means no adapter.
    """

    def __init__(
        self,
        layer_shapes: Mapping[str, tuple[int, int]],
        *,
        max_adapters: int = 64,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        page_rows: int = DEFAULT_PAGE_ROWS,
        max_rank: int = DEFAULT_MAX_RANK,
        max_pages: int | None = None,
        max_bytes: int | None = None,
    ):
        if not layer_shapes:
            raise ValueError("layer_shapes is empty: the pool needs at least one LoRA layer")
        if max_adapters < 1:
            raise ValueError(f"max_adapters {max_adapters} must be >= 1")
        if page_rows < 1 or max_rank < 1:
            raise ValueError(f"page_rows {page_rows} and max_rank {max_rank} must be >= 1")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"pool dtype {dtype} is not supported (float32, float16, bfloat16)")
        self.layer_shapes = {k: (int(v[0]), int(v[1])) for k, v in layer_shapes.items()}
        self.layer_names = list(self.layer_shapes)
        self.layer_index = {n: i for i, n in enumerate(self.layer_names)}
        self.max_adapters = int(max_adapters)
        self.device = norm_device(device)
        self.dtype = dtype
        self.page_rows = int(page_rows)
        self.max_rank = int(max_rank)
        self.max_pages_per_adapter = math.ceil(self.max_rank / self.page_rows)
        esize = torch.empty((), dtype=dtype).element_size()
        # Bytes of one page: PR rows of A and of B^T on every layer.
        self.page_nbytes = (
            self.page_rows * sum(i + o for o, i in self.layer_shapes.values()) * esize
        )
        if max_pages is None:
            if max_bytes is not None:
                max_pages = int(max_bytes) // self.page_nbytes
            else:
                max_pages = max(
                    self.max_adapters * math.ceil(DEFAULT_BUDGET_RANK / self.page_rows),
                    self.max_pages_per_adapter,
                )
        if max_pages < 1:
            raise ValueError(
                f"the pool budget holds no page (max_pages {max_pages}, max_bytes {max_bytes}, "
                f"page of {self.page_nbytes} bytes)"
            )
        self.num_pages = int(max_pages)
        dev = self.device
        # Every layer's A and B^T pages are views into one allocation (`storage`): one region
        # for the allocator and the OS, and the exact memory the kernels read, which a bench
        # streams to bound them (bench.common.measure_tensor_read_bandwidth says why). Each
        # view starts on a 256-byte boundary.
        cols = [c for out_f, in_f in self.layer_shapes.values() for c in (in_f, out_f)]
        align = max(1, 256 // esize)
        rows = self.num_pages * self.page_rows
        offsets, total = [], 0
        for c in cols:
            offsets.append(total)
            total += -(-rows * c // align) * align
        self.storage = torch.zeros(total, dtype=dtype, device=dev)
        views = [
            self.storage[o : o + rows * c].view(self.num_pages, self.page_rows, c)
            for o, c in zip(offsets, cols, strict=True)
        ]
        self.a_pages: list[torch.Tensor] = views[0::2]
        self.b_pages: list[torch.Tensor] = views[1::2]
        # [P * PR, in] / [P * PR, out] row views of each layer's pages (loads slice them).
        self._a_flat = [t.view(-1, t.shape[2]) for t in self.a_pages]
        self._b_flat = [t.view(-1, t.shape[2]) for t in self.b_pages]
        n_l = len(self.layer_names)
        self.page_table = torch.zeros(
            self.max_adapters, self.max_pages_per_adapter, dtype=torch.int32, device=dev
        )
        self.ranks = torch.zeros(n_l, self.max_adapters, dtype=torch.int32, device=dev)
        self.scales = torch.zeros(n_l, self.max_adapters, dtype=torch.float32, device=dev)
        self._alloc = _PageAllocator(self.num_pages)
        # 1 = the page's rows are zero in every layer (never written since the pool was made):
        # a load skips zeroing them. Zeroing pages that were never touched faulted them in, on
        # the CPU most of a load (a training run's save into a fresh slot: ~0.9 of its ~12 ms).
        self._clean = bytearray(b"\x01" * self.num_pages)
        self._slots: list[_Resident | None] = [None] * self.max_adapters
        self._by_key: dict[str, int] = {}
        self._lock = threading.Lock()
        # Bumped on every load/evict: plans cached against the pool's contents check it.
        self.generation = 0
        self._layer_cache: dict[int, tuple[int, LayerWeights]] = {}
        self._pages_cache: tuple[int, list[list[int]]] = (-1, [])
        logger.info(
            "adapter pool: %d layers, %d pages x %d rows (%.1f MiB), %d slots, %s %s",
            n_l,
            self.num_pages,
            self.page_rows,
            self.capacity_bytes / 2**20,
            self.max_adapters,
            dev,
            dtype,
        )

    # ---- queries -------------------------------------------------------------------------

    def __contains__(self, key: object) -> bool:
        return key in self._by_key

    def __len__(self) -> int:
        return len(self._by_key)

    def slot(self, key: str) -> int | None:
        return self._by_key.get(key)

    def resident(self) -> list[str]:
        return list(self._by_key)

    @property
    def backend(self) -> str:
        """Name of the LoRA implementation serving this pool's device (for Status)."""
        from mintmesh.kernels.backends import backend_name

        return backend_name(self.device)

    @property
    def capacity_bytes(self) -> int:
        return self.num_pages * self.page_nbytes

    @property
    def free_pages(self) -> int:
        return self._alloc.num_free

    def pages_for_rank(self, rank: int) -> int:
        return math.ceil(rank / self.page_rows)

    def nbytes(self, key: str | None = None) -> int:
        """Device bytes one adapter's pages take (0 if not resident), or all resident ones."""
        if key is not None:
            s = self._by_key.get(key)
            r = self._slots[s] if s is not None else None
            return r.nbytes if r is not None else 0
        return sum(r.nbytes for r in self._slots if r is not None)

    def pages(self, key: str) -> list[int]:
        s = self._by_key.get(key)
        r = self._slots[s] if s is not None else None
        if r is None:
            raise KeyError(f"adapter {key} is not resident")
        return list(r.pages)

    def resident_at(self, slot: int) -> _Resident:
        r = self._slots[slot] if 0 <= slot < self.max_adapters else None
        if r is None:
            raise KeyError(f"slot {slot} is empty")
        return r

    def layer_id(self, layer: str) -> int:
        try:
            return self.layer_index[layer]
        except KeyError:
            raise KeyError(f"layer {layer!r} is not a LoRA layer of this pool") from None

    def layer_tensors(self, layer: str | int) -> LayerWeights:
        """The paged weights and slot tables of one layer, tensors only (traceable)."""
        li = layer if isinstance(layer, int) else self.layer_index[layer]
        return LayerWeights(
            self.a_pages[li], self.b_pages[li], self.page_table, self.ranks[li], self.scales[li]
        )

    def layer(self, layer: str | int) -> LayerWeights:
        """The paged weights and slot tables of one layer (with host tables for the CPU path)."""
        li = layer if isinstance(layer, int) else self.layer_id(layer)
        cached = self._layer_cache.get(li)
        if cached is not None and cached[0] == self.generation:
            return cached[1]
        with self._lock:
            if self._pages_cache[0] != self.generation:
                # One list shared by every layer: the CPU path caches plans against it.
                self._pages_cache = (
                    self.generation,
                    [list(r.pages) if r is not None else [] for r in self._slots],
                )
            pages = self._pages_cache[1]
            views: list[tuple[torch.Tensor, torch.Tensor, float] | None] = []
            ranks: list[int] = []
            scales: list[float] = []
            for res in self._slots:
                views.append(res.views[li] if res is not None else None)
                ranks.append(res.ranks[li] if res is not None else 0)
                scales.append(res.scales[li] if res is not None else 0.0)
            lw = LayerWeights(
                a_pages=self.a_pages[li],
                b_pages=self.b_pages[li],
                page_table=self.page_table,
                ranks=self.ranks[li],
                scales=self.scales[li],
                host=HostLayer(views=views, ranks=ranks, scales=scales, pages=pages),
            )
            self._layer_cache[li] = (self.generation, lw)
            return lw

    def layer_weights(self, slot: int, layer: str):
        """(A [r, in], B [out, r], scale) of slot on layer (copies for scattered pages), or None
        when the adapter does not target that layer."""
        res = self.resident_at(slot)
        li = self.layer_id(layer)
        r = res.ranks[li]
        if r == 0:
            return None
        _, in_f = self.layer_shapes[layer]
        out_f, _ = self.layer_shapes[layer]
        idx = torch.tensor(res.pages, device=self.device)
        A = self.a_pages[li].index_select(0, idx).reshape(-1, in_f)[:r]
        Bt = self.b_pages[li].index_select(0, idx).reshape(-1, out_f)[:r]
        return A, Bt.t(), res.scales[li]

    # ---- load / evict ----------------------------------------------------------------------

    def _check(self, modules: Mapping[str, ModuleWeights]) -> int:
        if not modules:
            raise ValueError("adapter has no modules")
        max_r = 0
        for name, mw in modules.items():
            if name not in self.layer_shapes:
                raise ValueError(f"module {name} is not a LoRA layer of this executor")
            out_f, in_f = self.layer_shapes[name]
            r = mw.rank
            if tuple(mw.A.shape) != (r, in_f) or tuple(mw.B.shape) != (out_f, r):
                raise ValueError(
                    f"module {name}: A {list(mw.A.shape)} / B {list(mw.B.shape)} do not fit "
                    f"layer {out_f}x{in_f}"
                )
            if r < 1:
                raise ValueError(f"module {name}: rank {r} must be >= 1")
            if r > self.max_rank:
                raise ValueError(
                    f"module {name}: rank {r} exceeds max_rank {self.max_rank} of this pool"
                )
            max_r = max(max_r, r)
        return max_r

    def load(self, key: str, modules: Mapping[str, ModuleWeights]) -> int:
        """Copy an adapter's weights into free pages; return its slot. Idempotent per key.

        Raises ResourceExhausted when no slot or not enough pages are free, ValueError when a
        module does not fit a layer of this pool."""
        with self._lock:
            if key in self._by_key:
                return self._by_key[key]
            max_r = self._check(modules)
            n = self.pages_for_rank(max_r)
            if n > self.num_pages:
                raise ResourceExhausted(
                    f"adapter {key} needs {n} pages (rank {max_r}), more than the pool's "
                    f"{self.num_pages} pages in all"
                )
            try:
                slot = self._slots.index(None)
            except ValueError:
                raise ResourceExhausted(
                    f"adapter pool is full ({self.max_adapters} adapters resident)"
                ) from None
            pages = self._alloc.alloc(n)
            if pages is None:
                raise ResourceExhausted(
                    f"adapter {key} needs {n} pages (rank {max_r}) but the pool has "
                    f"{self._alloc.num_free} of {self.num_pages} free"
                )
            try:
                res = self._write(key, slot, pages, modules)
            except BaseException:
                self._alloc.free(pages)
                raise
            self._slots[slot] = res
            self._by_key[key] = slot
            self.generation += 1
            return slot

    def _write(
        self, key: str, slot: int, pages: list[int], modules: Mapping[str, ModuleWeights]
    ) -> _Resident:
        n, pr, dev = len(pages), self.page_rows, self.device
        contiguous = pages == list(range(pages[0], pages[0] + n))
        clean = all(self._clean[p] for p in pages)
        for p in pages:  # before any write: a load that fails half-way leaves them dirty
            self._clean[p] = 0
        page_idx = None if contiguous else torch.tensor(pages, dtype=torch.long, device=dev)
        ranks, scales, views = [], [], []
        dst: list[torch.Tensor] = []
        src: list[torch.Tensor] = []
        for li, name in enumerate(self.layer_names):
            out_f, in_f = self.layer_shapes[name]
            mw = modules.get(name)
            r = 0
            scale = 0.0
            if mw is not None:
                r = mw.rank
                scale = float(mw.scale)
            # Every reserved row is written (weights or zeros) unless the pages are still
            # clean: no stale rows from an evicted adapter survive in these pages, and
            # whole-page reads are exact.
            if contiguous:
                # Straight into the pages (zeros only past the rank); the copies of all layers
                # go in one _foreach_copy_ below: per-call overhead dominates these 64 KiB
                # copies on the CPU (so do the few tensor ops per layer here: keep them few).
                row0 = pages[0] * pr
                if r:
                    A = self._a_flat[li][row0 : row0 + r]
                    Bt = self._b_flat[li][row0 : row0 + r]
                    dst += (A, Bt)
                    src += (mw.A, mw.B.t())
                    views.append((A, Bt, scale))
                else:
                    views.append(None)
                if r < n * pr and not clean:
                    self._a_flat[li][row0 + r : row0 + n * pr].zero_()
                    self._b_flat[li][row0 + r : row0 + n * pr].zero_()
            else:
                a_buf = torch.zeros(n * pr, in_f, dtype=self.dtype, device=dev)
                b_buf = torch.zeros(n * pr, out_f, dtype=self.dtype, device=dev)
                if r:
                    a_buf[:r].copy_(mw.A.detach())
                    b_buf[:r].copy_(mw.B.detach().t())
                self.a_pages[li].index_copy_(0, page_idx, a_buf.view(n, pr, in_f))
                self.b_pages[li].index_copy_(0, page_idx, b_buf.view(n, pr, out_f))
                views.append(None)
            ranks.append(r)
            scales.append(scale)
        if dst:
            with torch.no_grad():  # weights that require grad (tests, benches) copy as data
                torch._foreach_copy_(dst, src)
        row = torch.zeros(self.max_pages_per_adapter, dtype=torch.int32)
        row[:n] = torch.tensor(pages, dtype=torch.int32)
        self.page_table[slot].copy_(row)
        self.ranks[:, slot].copy_(torch.tensor(ranks, dtype=torch.int32))
        self.scales[:, slot].copy_(torch.tensor(scales, dtype=torch.float32))
        return _Resident(
            key=key,
            slot=slot,
            pages=list(pages),
            ranks=ranks,
            scales=scales,
            contiguous=contiguous,
            nbytes=n * self.page_nbytes,
            views=views,
            targeted=frozenset(name for name, r in zip(self.layer_names, ranks, strict=True) if r),
        )

    def evict(self, key: str) -> bool:
        """Free an adapter's slot and pages. The caller guarantees it is not in a running batch."""
        with self._lock:
            s = self._by_key.pop(key, None)
            if s is None:
                return False
            res = self._slots[s]
            self._slots[s] = None
            assert res is not None
            self._alloc.free(res.pages)
            self.ranks[:, s].zero_()
            self.scales[:, s].zero_()
            self.page_table[s].zero_()
            self.generation += 1
            return True
