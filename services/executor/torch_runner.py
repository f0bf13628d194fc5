"""Today's model runner: the HF transformers backbone with multi-LoRA layers on its targeted
Linears (lora.py), paged attention (kv.py), the base Linears packed for oneDNN where that
serves, and the device AdapterPool the LoRA layers read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mintmesh.kernels import BatchMeta
from mintmesh.kernels.dense import pack_linears, select_dense
from mintmesh.packed import DTYPES
from mintmesh.services.executor.config import ExecutorConfig
from mintmesh.services.executor.kv import use_paged_attention
from mintmesh.services.executor.lora import LoraContext, inject_lora
from mintmesh.services.executor.runner import ForwardBatch, ModelRunner, adapter_pool

__all__ = ["TorchModelRunner", "load_backbone"]


def load_backbone(config: ExecutorConfig) -> tuple[torch.nn.Module, Any, str]:
    """(model, tokenizer, base fingerprint) of config.model_dir."""
    from mintmesh.model import base_model_info, load_model

    model, tok = load_model(
        Path(config.model_dir), device=config.device, dtype=DTYPES[config.dtype]
    )
    info = base_model_info(config.model_dir)
    return model, tok, info.fingerprint


class TorchModelRunner(ModelRunner):
    """One resident torch backbone made multi-LoRA and paged, with its adapter pool."""

    def __init__(self, model: torch.nn.Module, config: ExecutorConfig, *, max_batch_size: int):
        self.model = model
        param = next(model.parameters())
        self.device = param.device
        self.dtype = param.dtype
        # Model: multi-LoRA wrappers on the targeted Linears, paged attention.
        self.ctx = LoraContext()
        self.layer_shapes = layer_shapes = inject_lora(model, self.ctx)
        use_paged_attention(model)
        # The base Linears (wrapped or not, the LM head too): packed once for oneDNN where that
        # serves (CPU float32), laid out for the decode step's rows.
        self.dense_kernels = select_dense(self.device, self.dtype, config.dense_kernels)
        if self.dense_kernels == "onednn":
            pack_linears(model, batch_hint=max_batch_size)
        self.pool = adapter_pool(layer_shapes, config, device=self.device, dtype=self.dtype)
        self.ctx.pool = self.pool
        self.kernel_backend = self.pool.backend
        self._meta = BatchMeta.make()

    def describe(self) -> str:
        return "torch"

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """One forward of one packed row; logits [len(keep_rows) or T, vocab]."""
        flat, positions, token_slots = batch.token_ids, batch.positions, batch.token_slots
        plan, keep_rows = batch.plan, batch.sample_rows
        dev = self.device
        slots = {s for s in token_slots if s >= 0}
        if slots:
            self.ctx.meta = self._meta.prepare(
                torch.tensor(token_slots, dtype=torch.long), device=dev
            )
            self.ctx.targeted = self._targeted_layers(slots)
        kwargs = {}
        if keep_rows is not None:
            kwargs["logits_to_keep"] = torch.tensor(keep_rows, dtype=torch.long, device=dev)
        try:
            with torch.inference_mode():
                out = self.model(
                    input_ids=torch.tensor([flat], dtype=torch.long, device=dev),
                    position_ids=torch.tensor([positions], dtype=torch.long, device=dev),
                    use_cache=False,
                    mint_plan=plan,
                    **kwargs,
                )
        finally:
            self.ctx.meta = None
            self.ctx.targeted = None
        return out.logits[0]

    def _targeted_layers(self, slots: set[int]) -> set[str]:
        """The LoRA layers some adapter in `slots` has weights on (rank > 0): only those run the
        LoRA op in this forward (a few microseconds of Python and dispatch per layer call
        otherwise, for nothing)."""
        out: set[str] = set()
        for slot in slots:
            out |= self.pool.resident_at(slot).targeted
        return out
