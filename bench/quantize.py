"""Smaller adapters: bytes and logit error of bf16 / fp16 / int8 storage against fp32.

    mint bench quantize [--preset small] [--model-dir DIR] [--rank 16] [--json]

A rank-16 LoRA on every targetable module of the small backbone (~170M parameters; built once
with mintmesh.model.init_model and cached under ~/.cache/mintmesh/<preset>) is packed through
the store's upload path (peft_io.validate_and_pack) as float32, bfloat16, float16 and int8
(per-row scales). Each pack is unpacked (int8: dequantized to float32) and applied to the
backbone, loaded with transformers, as y = base(x) + scale * (x A^T) B^T through forward hooks
(no peft). Over a batch of prompts:

    <fmt>_bytes_ratio     = stored bytes / float32 bytes
    <fmt>_max_rel_error   = max |logits_fmt - logits_fp32| / max |logits_fp32|
    adapter_effect        = max |logits_fp32 - logits_base| / max |logits_fp32|  (the adapter
                            matters: errors are small relative to a real change)
    delta_weight_ratio    = mean over modules of ||scale B A||_F / ||W||_F (how strong the
                            adapter is; trained LoRAs are typically well below 0.5)
    <fmt>_error_over_effect = max |logits_fmt - logits_fp32| / max |logits_fp32 - logits_base|
                            (the error relative to what the adapter changes: strength-free)

Target: int8_max_rel_error <= 1e-2 at int8_bytes_ratio <= 0.3. The last line of stdout is one
JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

FORMATS = ("bfloat16", "float16", "int8")
SHORT = {"bfloat16": "bf16", "float16": "fp16", "int8": "int8"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mint bench quantize", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small", help="backbone preset (default small)")
    p.add_argument("--model-dir", type=Path, help="default ~/.cache/mintmesh/<preset>")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument(
        "--b-std",
        type=float,
        default=0.02,
        help="std of the LoRA B entries (0.02: ||dW||/||W|| ~ 0.24, logits change ~80%%)",
    )
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--json", action="store_true", help="last stdout line: one JSON object")
    return p


def make_adapter(base_info, rank: int, b_std: float, seed: int) -> tuple[str, bytes]:
    """A rank-`rank` PEFT LoRA on every targetable module, seeded."""
    import torch
    from safetensors.torch import save

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for mod, (out_f, in_f) in sorted(base_info.linear_shapes.items()):
        key = f"base_model.model.{mod}"
        tensors[f"{key}.lora_A.weight"] = torch.randn(rank, in_f, generator=g) / in_f**0.5
        tensors[f"{key}.lora_B.weight"] = torch.randn(out_f, rank, generator=g) * b_std
    cfg = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": float(2 * rank),
        "target_modules": base_info.targetable(),
    }
    return json.dumps(cfg), save(tensors)


def _logits(model, input_ids, modules) -> torch.Tensor:
    """Logits of model with the LoRA `modules` (name -> ModuleWeights) added by hooks."""
    import torch

    handles = []
    if modules:
        named = dict(model.named_modules())
        for name, mw in modules.items():
            a, b, s = mw.A.float(), mw.B.float(), float(mw.scale)

            def hook(_mod, args, out, a=a, b=b, s=s):
                return out + s * ((args[0] @ a.T) @ b.T)

            handles.append(named[name].register_forward_hook(hook))
    try:
        with torch.no_grad():
            return model(input_ids=input_ids).logits.float()
    finally:
        for h in handles:
            h.remove()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    t0 = time.perf_counter()
    import torch

    from mintmesh import packed, peft_io
    from mintmesh.bench.common import ensure_model
    from mintmesh.model import base_model_info, load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = ensure_model(args.preset, args.model_dir)
    base = base_model_info(model_dir)
    cfg, weights = make_adapter(base, args.rank, args.b_std, args.seed)
    packs = {
        fmt: peft_io.validate_and_pack(cfg, weights, base, max_rank=max(args.rank, 16), storage=fmt)
        for fmt in ("float32", *FORMATS)
    }
    fp32_bytes = len(packs["float32"].data)

    model, _ = load_model(model_dir)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(args.seed + 1)
    input_ids = torch.randint(0, min(vocab, 256), (args.prompts, args.seq_len), generator=g)
    named = dict(model.named_modules())
    ref_mods = packed.unpack(packs["float32"].data)[1]
    ratios = [
        float((m.scale * m.B @ m.A).norm() / named[n].weight.float().norm())
        for n, m in ref_mods.items()
    ]
    base_logits = _logits(model, input_ids, None)
    ref = _logits(model, input_ids, ref_mods)
    scale = float(ref.abs().max())
    effect = float((ref - base_logits).abs().max())
    metrics: dict[str, float] = {
        "fp32_bytes": fp32_bytes,
        "adapter_effect": round(effect / scale, 6),
        "delta_weight_ratio": round(sum(ratios) / len(ratios), 4),
    }
    for fmt in FORMATS:
        header, mods = packed.unpack(packs[fmt].data)
        assert header.storage_format == fmt
        out = _logits(model, input_ids, mods)
        short = SHORT[fmt]
        metrics[f"{short}_bytes_ratio"] = round(len(packs[fmt].data) / fp32_bytes, 4)
        err = float((out - ref).abs().max())
        metrics[f"{short}_max_rel_error"] = float(f"{err / scale:.3e}")
        metrics[f"{short}_error_over_effect"] = float(f"{err / effect:.3e}")
    metrics["wall_s"] = round(time.perf_counter() - t0, 2)
    result = {
        "bench": "quantize",
        "device": "cpu",
        "params": {
            "preset": args.preset,
            "rank": args.rank,
            "targets": base.targetable(),
            "modules": len(base.linear_shapes),
            "prompts": args.prompts,
            "seq_len": args.seq_len,
            "b_std": args.b_std,
        },
        "metrics": metrics,
    }
    if not args.json:
        for k, v in metrics.items():
            print(f"{k:>22}: {v}")
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
