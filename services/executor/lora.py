"""The multi-LoRA layer: each targeted nn.Linear of the backbone is wrapped, in place, by a
layer that adds every row's own adapter delta on top of the untouched base output:

    y = base(x) + scale[a] * (x A[a]^T) B[a]^T,   a = the adapter of x's row (or none)

The backbone's weights are never merged or modified. All layers share one LoraContext: the
engine sets its BatchMeta once per forward (token slots, -1 = no adapter) and every layer reads
it; with no meta set the model is exactly the base model. The engine also names the layers that
some adapter of the forward targets, so the others skip the LoRA op and its per-call overhead
(adapters commonly target q_proj/v_proj only: 2 of the 7 wrapped Linears of a block).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

import torch
from torch import nn

from mintmesh.kernels import AdapterPool, BatchMeta, apply_lora
from mintmesh.kernels.train_ops import segment_lora
from mintmesh.model import TARGET_MODULES


class LoraContext:
    """What every MultiLoraLinear of one model reads during a forward: the adapter pool and the
    current batch's metadata (None = no adapter in this forward)."""

    def __init__(self, pool: AdapterPool | None = None) -> None:
        self.pool = pool
        self.meta: BatchMeta | None = None
        # Layers some adapter of the current batch targets; None = assume every layer.
        self.targeted: set[str] | None = None
        self._local = threading.local()

    @property
    def train(self):
        """A training forward (services/executor/training.py TrainBatch) of THIS thread: the
        runs' trainable LoRAs over their segments of the rows, differentiable; None when
        serving. Per thread, because a training forward/backward lets serving steps run on the
        same modules between its layers (time-slicing)."""
        return getattr(self._local, "train", None)

    @train.setter
    def train(self, value) -> None:
        self._local.train = value


class MultiLoraLinear(nn.Module):
    """Wraps one nn.Linear; `name` is its module path, the key of its weights in the pool."""

    def __init__(self, base_layer: nn.Linear, name: str, ctx: LoraContext) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"{name}: expected nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.name = name
        self.ctx = ctx

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        ctx = self.ctx
        if ctx.train is not None:
            seg = ctx.train.layer(self.name)
            if seg is None:
                return y
            delta = segment_lora(x.reshape(-1, self.in_features), *seg)
            return y + delta.view(y.shape)
        meta, pool = ctx.meta, ctx.pool
        if (
            meta is None
            or pool is None
            or (ctx.targeted is not None and self.name not in ctx.targeted)
        ):
            return y
        x2 = x.reshape(-1, self.in_features)
        if not y.is_contiguous():
            y = y.contiguous()
        apply_lora(y.view(-1, self.out_features), x2, self.name, pool, meta)
        return y

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


def inject_lora(
    model: nn.Module, ctx: LoraContext, targets: Iterable[str] = TARGET_MODULES
) -> dict[str, tuple[int, int]]:
    """Replace every nn.Linear whose leaf name is in targets by a MultiLoraLinear, in place.
    Returns {module path: (out_features, in_features)}: the AdapterPool's layer shapes."""
    targets = set(targets)
    found = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in targets
    ]
    if not found:
        raise ValueError(f"the model has no nn.Linear named any of {sorted(targets)}")
    shapes: dict[str, tuple[int, int]] = {}
    for name, mod in found:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, MultiLoraLinear(mod, name, ctx))
        shapes[name] = (mod.out_features, mod.in_features)
    return shapes


def lora_layers(model: nn.Module) -> list[MultiLoraLinear]:
    return [m for m in model.modules() if isinstance(m, MultiLoraLinear)]
