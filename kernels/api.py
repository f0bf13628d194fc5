"""The executor-facing API: a paged device pool of adapters, per-forward batch metadata, and
apply_lora, which runs the fused LoRA op with the implementation selected for the device.

    pool = AdapterPool({module_path: (out, in)}, max_adapters=64, device=..., dtype=...)
    slot = pool.load(digest, {module_path: ModuleWeights})      # ResourceExhausted when full
    meta = BatchMeta.make().prepare(token_slots)                  # once per forward, -1 = none
    apply_lora(y, x, module_path, pool, meta)                     # y += delta, in every layer
"""

from __future__ import annotations

import torch

from mintmesh.kernels.backends import Backend, backend_name, select_backend
from mintmesh.kernels.meta import BatchMeta
from mintmesh.kernels.ops import _check_slots, _resolve, lora_fused
from mintmesh.kernels.pool import AdapterPool

__all__ = ["AdapterPool", "BatchMeta", "apply_lora", "backend_name"]


def apply_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    layer: str,
    pool: AdapterPool,
    meta: BatchMeta,
    *,
    backend: str | Backend | None = None,
) -> None:
    """Semantics: y[t] += scale[a] * (x[t] @ A[a].T) @ B[a].T, a = slot of row t (skip -1),
    with A, B, scale the weights of the adapter in slot a on `layer` (skipped where it does not
    target the layer). x: [T, H_in], y: [T, H_out], changed in place; T = meta.num_tokens.

    backend: force an implementation (name or object); default: the one selected for the
    pool's device (backend_name(pool.device))."""
    if x.dim() != 2 or y.dim() != 2:
        raise ValueError(f"x {list(x.shape)} and y {list(y.shape)} must be 2-D [tokens, features]")
    if x.shape[0] != meta.num_tokens:
        raise ValueError(f"x has {x.shape[0]} rows but the batch metadata has {meta.num_tokens}")
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"y has {y.shape[0]} rows but x has {x.shape[0]}")
    out_f, in_f = pool.layer_shapes.get(layer, (None, None))
    if out_f is None:
        raise KeyError(f"layer {layer!r} is not a LoRA layer of this pool")
    if x.shape[1] != in_f or y.shape[1] != out_f:
        raise ValueError(
            f"layer {layer} is {out_f}x{in_f} but x is {list(x.shape)} and y {list(y.shape)}"
        )
    if x.dtype != pool.dtype or y.dtype != pool.dtype:
        raise ValueError(f"x ({x.dtype}) and y ({y.dtype}) must have the pool dtype {pool.dtype}")
    if x.device != pool.device or y.device != pool.device:
        raise ValueError(f"x ({x.device}) and y ({y.device}) must be on the pool's {pool.device}")
    if meta.host.num_active == 0:
        return
    if torch.compiler.is_compiling():
        lora_fused(y, x, pool.layer_tensors(layer), meta.tensors(x.device), backend=backend)
        return
    be = select_backend(pool.device) if backend is None else _resolve(backend)
    # The pool's own tensors need none of lora_fused's checks (their shapes, dtypes and device
    # are the pool's, checked against x and y above); the batch's slots are checked against
    # its tables. lora_fused's checks were a fifth of a decode call's Python time (12.0 -> 9.6 us).
    lw = pool.layer(layer)
    _check_slots(meta.host, lw.page_table)
    be.fused(y, x, lw, meta.tensors(x.device), meta.host)
