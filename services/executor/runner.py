"""The model runner interface: what the engine needs from the backbone, whatever runs it.

One ForwardBatch in (the step's scheduled tokens packed into one ragged row: token ids,
positions, the per-token adapter slot, the attention plan, the rows to sample), logits of the
sampled rows out; adapters loaded into and evicted from the runner's adapter pool by digest.
torch_runner.py's TorchModelRunner is today's implementation (HF modules, paged attention,
multi-LoRA layers).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from mintmesh.kernels import AdapterPool
from mintmesh.services.executor.config import ExecutorConfig
from mintmesh.services.executor.kv import AttentionPlan, PagedKVCache, SeqSpan

if TYPE_CHECKING:
    from mintmesh.services.executor.sequence import Sequence as Seq

__all__ = [
    "AdapterDevice",
    "ForwardBatch",
    "ModelRunner",
    "PackedStep",
    "adapter_pool",
    "pack_rows",
    "pack_step",
]


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


@dataclass
class PackedStep:
    """A step's schedule packed into one ForwardBatch: the sequences sampled after it (one per
    batch.sample_rows entry, in that order) and the prefill and decode tokens it holds."""

    batch: ForwardBatch
    samplers: list[Seq]
    prefill: int
    decode: int


def pack_step(sched: Sequence[tuple[Seq, int]], kv: PagedKVCache) -> PackedStep:
    """One packed row of every scheduled token of every sequence ((sequence, tokens this step),
    in the forward's order): each writes its K/V into its blocks and attends to its own."""
    flat: list[int] = []
    positions: list[int] = []
    token_slots: list[int] = []
    spans: list[SeqSpan] = []
    samplers: list[Seq] = []
    sample_rows: list[int] = []
    prefill = decode = 0
    for seq, n in sched:
        start = len(flat)
        c = seq.num_computed
        flat += seq.tokens[c : c + n]
        positions += range(c, c + n)
        token_slots += [seq.slot] * n
        spans.append(SeqSpan(start, n, c + n, seq.blocks))
        if c + n == len(seq.tokens):
            samplers.append(seq)
            sample_rows.append(start + n - 1)
        if seq.decoding:
            decode += n
        else:
            prefill += n
    plan = AttentionPlan(spans, kv)
    batch = ForwardBatch(flat, positions, token_slots, plan, sample_rows)
    return PackedStep(batch, samplers, prefill, decode)


def pack_rows(rows: Sequence[tuple[Sequence[int], int]]) -> ForwardBatch:
    """One packed row of fresh rows (token ids, adapter slot) without a KV cache: each from
    position 0, attending to itself; every row's logits wanted."""
    spans, flat, positions, token_slots, start = [], [], [], [], 0
    for ids, slot in rows:
        spans.append(SeqSpan(start, len(ids), len(ids)))
        flat += ids
        positions += range(len(ids))
        token_slots += [slot] * len(ids)
        start += len(ids)
    return ForwardBatch(flat, positions, token_slots, AttentionPlan(spans), None)


class AdapterDevice:
    """Adapters loaded into and evicted from a device AdapterPool by digest: what the adapter
    residency (residency.py) moves every adapter through. A ModelRunner is one, so a backend
    controls how adapters land in the pool its forwards read (it may override these); a bare
    AdapterDevice(pool) serves a residency without a model (benches, tests)."""

    # The device AdapterPool (adapter_pool() builds a runner's).
    pool: AdapterPool

    def __init__(self, pool: AdapterPool) -> None:
        self.pool = pool

    def load_adapter(self, digest: str, modules: Mapping[str, Any]) -> int:
        """Load an adapter's weights into the pool; returns its slot."""
        return self.pool.load(digest, modules)

    def evict_adapter(self, digest: str) -> bool:
        """Evict an adapter from the pool; whether it was resident."""
        return self.pool.evict(digest)


class ModelRunner(AdapterDevice, abc.ABC):
    """Runs forwards of packed batches over a resident backbone and its adapter pool."""

    @abc.abstractmethod
    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits [len(batch.sample_rows) or T, vocab] of one forward of batch."""

    @abc.abstractmethod
    def describe(self) -> str:
        """What serves the steps, for Status: "torch", or "onnxruntime:<provider>"."""


def adapter_pool(
    layer_shapes: Mapping[str, tuple[int, int]],
    config: ExecutorConfig,
    *,
    device: torch.device,
    dtype: torch.dtype,
) -> AdapterPool:
    """The device adapter pool of a runner's targeted layers, bounded as the config says."""
    return AdapterPool(
        layer_shapes,
        max_adapters=int(config.max_adapters),
        device=device,
        dtype=dtype,
        max_rank=int(config.max_rank),
        max_bytes=int(config.adapter_pool_bytes) or None,
    )
