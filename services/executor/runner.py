"""The model runner interface: what the engine needs from the backbone, whatever runs it.

One ForwardBatch in (the step's scheduled tokens packed into one ragged row: token ids,
positions, the per-token adapter slot, the attention plan, the rows to sample), logits of the
sampled rows out; adapters loaded into and evicted from the runner's adapter pool by digest.
torch_runner.py's TorchModelRunner is today's implementation (HF modules, paged attention,
multi-LoRA layers).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from mintmesh.services.executor.kv import AttentionPlan

__all__ = ["ForwardBatch", "ModelRunner"]


@dataclass
class ForwardBatch:
    """One forward of one packed row of T tokens."""

    token_ids: list[int]
    positions: list[int]
    # Per token: the adapter slot in the runner's pool (-1: the base model alone).
    token_slots: list[int]
    # Where each sequence's K/V goes and what it attends to (kv.py).
    plan: AttentionPlan
    # The rows whose logits are wanted (None: all T).
    sample_rows: list[int] | None = None


class ModelRunner(abc.ABC):
    """Runs forwards of packed batches over a resident backbone and its adapter pool."""

    @abc.abstractmethod
    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits [len(batch.sample_rows) or T, vocab] of one forward of batch."""

    @abc.abstractmethod
    def load_adapter(self, digest: str, modules: Mapping[str, Any]) -> int:
        """Load an adapter's weights into the pool; returns its slot."""

    def describe(self) -> str:
        """What serves the steps, for Status: "torch", or "onnxruntime:<provider>"."""
        return str(getattr(self, "backend", "torch"))

    @abc.abstractmethod
    def evict_adapter(self, digest: str) -> bool:
        """Evict an adapter from the pool; whether it was resident."""
