"""Synthetic LoRA adapters in the PEFT on-disk format, for demos and benchmarks.

Writes exactly what peft's save_pretrained writes (adapter_config.json + adapter_model.safetensors
with 'base_model.model.<module>.lora_{A,B}.weight' keys), without building a peft model, so
thousands can be made in seconds. Weights are deterministic in `seed`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mintmesh.model import BaseModelInfo


def synth_tensors(
    base: BaseModelInfo,
    *,
    rank: int,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    seed: int = 0,
    std: float = 0.05,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for mod, (fout, fin) in sorted(base.linear_shapes.items()):
        if mod.rsplit(".", 1)[-1] not in targets:
            continue
        a = torch.randn(rank, fin, generator=g) * (1.0 / fin**0.5)
        b = torch.randn(fout, rank, generator=g) * std
        out[f"base_model.model.{mod}.lora_A.weight"] = a.to(dtype)
        out[f"base_model.model.{mod}.lora_B.weight"] = b.to(dtype)
    if not out:
        raise ValueError(f"no module of the base matches targets {targets}")
    return out


def synth_config(rank: int, alpha: float, targets: tuple[str, ...]) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": sorted(targets),
        "use_rslora": False,
    }


def synth_peft_bytes(
    base: BaseModelInfo,
    *,
    rank: int,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    seed: int = 0,
    alpha: float | None = None,
    std: float = 0.05,
) -> tuple[str, bytes]:
    """(adapter_config.json text, safetensors bytes) of a synthetic adapter."""
    from safetensors.torch import save

    tensors = synth_tensors(base, rank=rank, targets=targets, seed=seed, std=std)
    cfg = synth_config(rank, float(alpha if alpha is not None else 2 * rank), targets)
    return json.dumps(cfg), save(tensors)


def write_synth_adapter(base: BaseModelInfo, out_dir: Path | str, **kw) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg, data = synth_peft_bytes(base, **kw)
    (out / "adapter_config.json").write_text(cfg)
    (out / "adapter_model.safetensors").write_bytes(data)
    return out
