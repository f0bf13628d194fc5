"""Implementations of the LoRA ops and the selector that picks one per device.

- "triton": Triton kernels (CUDA); chosen on CUDA when triton imports and a smoke test compiles
  and matches the reference on that device;
- "cpu": torch on CPU, arranged by batch shape (cpu.py);
- "reference": pure torch, the semantics (reference.py); the fallback anywhere else, with one
  warning.

Every backend has shrink / expand / fused with the same arguments:
    (out, in, lw: LayerWeights, md: MetaTensors, host: HostMeta | None = None).
The choice is logged once per device; backend_name(device) reports it (executor Status).
"""

from __future__ import annotations

import logging
import threading
from typing import Protocol

import torch

from mintmesh.kernels import reference
from mintmesh.kernels.meta import HostMeta, MetaTensors
from mintmesh.kernels.pool import LayerWeights

logger = logging.getLogger(__name__)


class Backend(Protocol):
    name: str

    def shrink(
        self, v: torch.Tensor, x: torch.Tensor, lw: LayerWeights, md: MetaTensors,
        host: HostMeta | None = None,
    ) -> None: ...  # fmt: skip

    def expand(
        self, y: torch.Tensor, v: torch.Tensor, lw: LayerWeights, md: MetaTensors,
        host: HostMeta | None = None,
    ) -> None: ...  # fmt: skip

    def fused(
        self, y: torch.Tensor, x: torch.Tensor, lw: LayerWeights, md: MetaTensors,
        host: HostMeta | None = None,
    ) -> None: ...  # fmt: skip


class ReferenceBackend:
    """The pure-torch reference (slow; any device)."""

    name = "reference"

    def shrink(self, v, x, lw: LayerWeights, md: MetaTensors, host=None) -> None:
        reference.lora_shrink(v, x, lw.a_pages, lw.page_table, lw.ranks, md.token_slots)

    def expand(self, y, v, lw: LayerWeights, md: MetaTensors, host=None) -> None:
        reference.lora_expand(y, v, lw.b_pages, lw.page_table, lw.ranks, lw.scales, md.token_slots)

    def fused(self, y, x, lw: LayerWeights, md: MetaTensors, host=None) -> None:
        reference.lora_fused(
            y, x, lw.a_pages, lw.b_pages, lw.page_table, lw.ranks, lw.scales, md.token_slots
        )


_lock = threading.Lock()
_instances: dict[str, Backend] = {}
_chosen: dict[str, Backend] = {}
_forced: dict[str, str] = {}


def get_backend(name: str) -> Backend:
    """The backend instance called `name` ("triton", "cpu" or "reference")."""
    with _lock:
        be = _instances.get(name)
        if be is not None:
            return be
        if name == "reference":
            be = ReferenceBackend()
        elif name == "cpu":
            from mintmesh.kernels.cpu import CpuBackend

            be = CpuBackend()
        elif name == "triton":
            from mintmesh.kernels.triton_ops import TritonBackend

            be = TritonBackend()
        else:
            raise ValueError(f"unknown LoRA backend {name!r}; use triton, cpu or reference")
        _instances[name] = be
        return be


def _device_key(device: str | torch.device) -> str:
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.current_device())
    return str(dev)


def _smoke_test(be: Backend, device: torch.device) -> None:
    """Run the backend's kernels on the start-up self-check's adversarial batches (large
    adapter norms, mixed ranks, rows without an adapter, both grids) against the reference:
    raises if it cannot compile or disagrees."""
    from mintmesh.kernels.selfcheck import check_lora

    why = check_lora(lambda y, x, lw, md, hm: be.fused(y, x, lw, md, hm), device)
    if why is not None:
        raise RuntimeError(f"{be.name} self-check disagrees with the reference: {why}")


def select_backend(device: str | torch.device) -> Backend:
    """The implementation for `device`: forced by set_backend, else triton on CUDA (if it
    imports and compiles), cpu on CPU, reference elsewhere. Logged once per device."""
    key = _device_key(device)
    be = _chosen.get(key)
    if be is not None:
        return be
    dev = torch.device(key)
    forced = _forced.get(key) or _forced.get(dev.type)
    if forced is not None:
        be = get_backend(forced)
        logger.info("LoRA backend for %s: %s (forced)", key, be.name)
    elif dev.type == "cuda":
        try:
            be = get_backend("triton")
            _smoke_test(be, dev)
            logger.info("LoRA backend for %s: triton", key)
        except Exception as e:  # noqa: BLE001 - any import/compile failure falls back
            logger.warning(
                "Triton LoRA kernels unavailable on %s (%s: %s); serving with the reference ops",
                key,
                type(e).__name__,
                e,
            )
            be = get_backend("reference")
    elif dev.type == "cpu":
        be = get_backend("cpu")
        logger.info("LoRA backend for %s: cpu", key)
    else:
        be = get_backend("reference")
        logger.warning("no LoRA kernels for %s; serving with the reference ops", key)
    _chosen[key] = be
    return be


def backend_name(device: str | torch.device) -> str:
    """Name of the implementation serving `device` ("triton", "cpu" or "reference")."""
    return select_backend(device).name


def set_backend(device: str | torch.device, name: str | None) -> None:
    """Force the backend of a device (or a device type, e.g. "cuda"); None restores the
    automatic choice."""
    dev = torch.device(device)
    key = dev.type if dev.index is None else str(dev)
    if name is None:
        _forced.pop(key, None)
    else:
        get_backend(name)
        _forced[key] = name
    for k in list(_chosen):
        if k == key or k.split(":")[0] == key:
            del _chosen[k]
