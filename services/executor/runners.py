"""The model runner an executor serves with, by ExecutorConfig.backend."""

from __future__ import annotations

import torch

from mintmesh.services.executor.config import ExecutorConfig
from mintmesh.services.executor.runner import ModelRunner

__all__ = ["make_runner"]


def make_runner(
    model: torch.nn.Module, config: ExecutorConfig, *, max_batch_size: int, fingerprint: str
) -> ModelRunner:
    """torch: TorchModelRunner (torch_runner.py); onnxruntime: OrtModelRunner (ort_runner.py),
    the backbone exported once per model directory and cached beside it."""
    if config.backend == "onnxruntime":
        from mintmesh.services.executor.ort_runner import OrtModelRunner

        return OrtModelRunner(model, config, max_batch_size=max_batch_size, fingerprint=fingerprint)
    if config.backend != "torch":
        raise ValueError(f"backend {config.backend!r} is not supported; use torch or onnxruntime")
    from mintmesh.services.executor.torch_runner import TorchModelRunner

    return TorchModelRunner(model, config, max_batch_size=max_batch_size)
