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


ALL_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_strong_adapter(
    model_dir: Path | str,
    out_dir: Path | str,
    *,
    rank: int = 8,
    seed: int = 101,
    multiplier: float = 4.0,
    targets: tuple[str, ...] = ALL_MODULES,
    base_model=None,
) -> Path:
    """A strongly trained adapter, as issue 11's probe made it: peft's own random init
    (init_lora_weights=False) after torch.manual_seed(seed), on all seven modules, every lora_
    parameter multiplied by `multiplier`; greedy tokens differ from the base at most positions
    and LoRA on q and k together widens the attention scores (the regime of issue 11's bug)."""
    from peft import LoraConfig, get_peft_model

    from mintmesh.model import load_model

    model = base_model if base_model is not None else load_model(model_dir)[0]
    torch.manual_seed(seed)
    cfg = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        init_lora_weights=False,
        target_modules=list(targets),
        lora_dropout=0.0,
    )
    pm = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.mul_(multiplier)
    out = Path(out_dir)
    pm.save_pretrained(out)
    return out


def peft_greedy(pm, adapter: str | None, ids: list[int], n: int, *, stop_at_eos: bool = True):
    """peft's greedy continuation of ids by n tokens with one adapter (None: the base), and the
    log-probability of each chosen token. stop_at_eos=False: EOS is an ordinary token (the
    engine's ignore_eos)."""
    import copy

    x = torch.tensor([list(ids)])
    gc = copy.deepcopy(pm.generation_config)
    gc.do_sample = False
    gc.max_new_tokens = n
    gc.output_logits = True
    gc.return_dict_in_generate = True
    if not stop_at_eos:
        # Not None: generate() fills None fields from the model's generation_config (EOS 257
        # again); an empty list is an explicit "no EOS".
        gc.eos_token_id = []
    kw = dict(input_ids=x, attention_mask=torch.ones_like(x), generation_config=gc)
    with torch.no_grad():
        if adapter is None:
            with pm.disable_adapter():
                out = pm.generate(**kw)
        else:
            pm.set_adapter(adapter)
            out = pm.generate(**kw)
    toks = out.sequences[0, len(ids) :].tolist()
    lps = [
        float(torch.log_softmax(step[0].double(), -1)[t])
        for step, t in zip(out.logits, toks, strict=True)
    ]
    return toks, lps
