"""Real peft adapters for tests: peft builds the LoRA modules and saves them; we only give
them non-zero, seeded weights so every adapter changes the model's outputs."""

from __future__ import annotations

from pathlib import Path

import torch


def make_peft_adapter(
    model_dir: Path | str,
    out_dir: Path | str,
    *,
    rank: int = 8,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    seed: int = 0,
    alpha: float | None = None,
    std: float = 0.3,
    base_model=None,
) -> Path:
    """Create a LoRA with peft on the model in model_dir, fill A and B with seeded random
    values (B non-zero), save it with save_pretrained into out_dir."""
    from peft import LoraConfig, get_peft_model

    from mintmesh.model import load_model

    model = base_model if base_model is not None else load_model(model_dir)[0]
    cfg = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else 2 * rank,
        target_modules=list(targets),
        lora_dropout=0.0,
        init_lora_weights=True,
    )
    pm = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            elif "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    out = Path(out_dir)
    pm.save_pretrained(out)
    return out


def peft_model_with(model_dir: Path | str, adapters: dict[str, Path]):
    """A PeftModel on a fresh copy of the base with every adapter loaded under its key."""
    from peft import PeftModel

    from mintmesh.model import load_model

    base, _ = load_model(model_dir)
    names = list(adapters)
    pm = PeftModel.from_pretrained(base, str(adapters[names[0]]), adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(str(adapters[n]), adapter_name=n)
    pm.eval()
    return pm
