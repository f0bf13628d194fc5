"""The executor-facing API: a device pool of adapters, per-batch metadata, and apply_lora.

This first cut stores each adapter's A/B per layer as their own tensors (memory proportional to
rank, no padding) and applies LoRA by segment-grouped matmuls over rows sorted by adapter
(SGMV-style in plain torch). The kernels issue replaces the storage with a paged pool and adds
Triton and tuned CPU paths behind the same three names.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from mintmesh.errors import ResourceExhausted
from mintmesh.packed import ModuleWeights

logger = logging.getLogger(__name__)


@dataclass
class _Slot:
    key: str
    # layer name -> (A [r, in], B [out, r], scale)
    layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    nbytes: int


class AdapterPool:
    """Adapters resident on one device, keyed by digest. Slots are small ints used in BatchMeta."""

    def __init__(
        self,
        layer_shapes: Mapping[str, tuple[int, int]],
        *,
        max_adapters: int = 64,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        self.layer_shapes = dict(layer_shapes)
        self.max_adapters = int(max_adapters)
        self.device = torch.device(device)
        self.dtype = dtype
        self._slots: list[_Slot | None] = [None] * self.max_adapters
        self._by_key: dict[str, int] = {}

    def __contains__(self, key: str) -> bool:
        return key in self._by_key

    def __len__(self) -> int:
        return len(self._by_key)

    def slot(self, key: str) -> int | None:
        return self._by_key.get(key)

    def resident(self) -> list[str]:
        return list(self._by_key)

    def nbytes(self, key: str | None = None) -> int:
        if key is not None:
            s = self._by_key.get(key)
            return self._slots[s].nbytes if s is not None else 0
        return sum(s.nbytes for s in self._slots if s is not None)

    def load(self, key: str, modules: Mapping[str, ModuleWeights]) -> int:
        """Copy an adapter's weights into the pool; return its slot. Idempotent per key."""
        if key in self._by_key:
            return self._by_key[key]
        for name, mw in modules.items():
            if name not in self.layer_shapes:
                raise ValueError(f"module {name} is not a LoRA layer of this executor")
            out_f, in_f = self.layer_shapes[name]
            if tuple(mw.A.shape) != (mw.rank, in_f) or tuple(mw.B.shape) != (out_f, mw.rank):
                raise ValueError(
                    f"module {name}: A {list(mw.A.shape)} / B {list(mw.B.shape)} do not fit "
                    f"layer {out_f}x{in_f}"
                )
        try:
            free = self._slots.index(None)
        except ValueError:
            raise ResourceExhausted(
                f"adapter pool is full ({self.max_adapters} adapters resident)"
            ) from None
        layers, nbytes = {}, 0
        for name, mw in modules.items():
            A = mw.A.to(device=self.device, dtype=self.dtype).contiguous()
            B = mw.B.to(device=self.device, dtype=self.dtype).contiguous()
            layers[name] = (A, B, float(mw.scale))
            nbytes += A.numel() * A.element_size() + B.numel() * B.element_size()
        self._slots[free] = _Slot(key=key, layers=layers, nbytes=nbytes)
        self._by_key[key] = free
        return free

    def evict(self, key: str) -> bool:
        s = self._by_key.pop(key, None)
        if s is None:
            return False
        self._slots[s] = None
        return True

    def layer_weights(self, slot: int, layer: str):
        """(A, B, scale) of slot on layer, or None when the adapter does not target it."""
        s = self._slots[slot]
        if s is None:
            raise KeyError(f"slot {slot} is empty")
        return s.layers.get(layer)


class BatchMeta:
    """Per-forward metadata: the slot of every token row (-1 = none), and the rows grouped by
    slot (segments). Built once per forward in prepare(), read by every layer."""

    def __init__(self) -> None:
        self.token_slots = torch.empty(0, dtype=torch.long)
        self.segments: list[tuple[int, torch.Tensor]] = []  # (slot, row indices)
        self.num_tokens = 0

    @classmethod
    def make(cls) -> BatchMeta:
        return cls()

    def prepare(self, token_slots: torch.Tensor) -> BatchMeta:
        if token_slots.dim() != 1:
            raise ValueError(f"token_slots must be 1-D, got shape {list(token_slots.shape)}")
        self.token_slots = token_slots
        self.num_tokens = int(token_slots.numel())
        self.segments = []
        if self.num_tokens:
            order = torch.argsort(token_slots, stable=True)
            sorted_slots = token_slots[order]
            uniq, counts = torch.unique_consecutive(sorted_slots, return_counts=True)
            start = 0
            for s, c in zip(uniq.tolist(), counts.tolist(), strict=True):
                if s >= 0:
                    self.segments.append((s, order[start : start + c]))
                start += c
        return self


def apply_lora(
    y: torch.Tensor, x: torch.Tensor, layer: str, pool: AdapterPool, meta: BatchMeta
) -> None:
    """Semantics: y[t] += scale[a] * (x[t] @ A[a].T) @ B[a].T, a = slot of row t (skip -1).
    x: [T, H_in], y: [T, H_out], changed in place."""
    if x.shape[0] != meta.num_tokens:
        raise ValueError(f"x has {x.shape[0]} rows but the batch metadata has {meta.num_tokens}")
    for slot, rows in meta.segments:
        w = pool.layer_weights(slot, layer)
        if w is None:
            continue
        A, B, scale = w
        xs = x.index_select(0, rows)
        delta = (xs @ A.t()) @ B.t()
        y.index_add_(0, rows, delta.to(y.dtype), alpha=scale)
