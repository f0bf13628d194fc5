"""`mint bench kernels`: mixed-adapter LoRA serving on the small backbone, ours vs base vs peft.

Scenarios (defaults: 64 requests, 64 distinct adapters on q/k/v/o, 128-token prompts):

- uniform (every adapter rank 16): one prefill of the whole batch and one decode step, timed for
  the base model alone, for the model with our multi-LoRA wrappers (apply_lora, the selected
  backend), for peft's mixed batch (adapter_names=...), and for peft serving the 64 requests
  one adapter at a time (decode). Variants run interleaved in one process, medians of repeats.
- mixed ranks (ranks drawn from {8, 16, 32, 64}): the LoRA ops alone (apply_lora over every
  layer, for the prefill batch and the decode batch) at the adapters' real ranks vs the same
  adapters zero-padded to rank 64. lora_ops_decode_roofline: the time the decode ops' bytes
  take at the rate a sum streams the pool's own memory (measured beside them, each round), over
  the time the ops took; _fresh_buffer: the same against a fresh 256 MiB buffer.
- memory: device-pool bytes of one rank-8 and one rank-64 adapter.

"base" and "ours" run the backbone as the executor does: its Linears packed for oneDNN where
that serves (CPU float32; --dense torch keeps nn.Linear). peft runs stock transformers Linears.
So the step-level gain of the packed Linears alone is measured too: the base decode on a copy
of the backbone with transformers' own Linears over ours without adapters (dense_decode_speedup),
next to the ratios it is part of.

Progress goes to stderr; the last stdout line is one JSON object
{"bench": "kernels", "device", "params", "metrics", "targets"}.
    python -m mintmesh.bench.kernels --json [--model-dir DIR] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from mintmesh.bench.common import (
    ensure_model,
    measure_read_bandwidth,
    measure_tensor_read_bandwidth,
)
from mintmesh.kernels.settings import KernelSettings

logger = logging.getLogger(__name__)

TARGET_LEAVES = ("q_proj", "k_proj", "v_proj", "o_proj")
MIXED_RANKS = (8, 16, 32, 64)
# name: (comparison, threshold); metrics are "higher is better" ratios except pool bytes.
TARGETS: dict[str, tuple[str, float]] = {
    "prefill_mixed_vs_base": (">=", 0.92),
    "decode_mixed_vs_base": (">=", 0.94),
    "decode_vs_peft_mixed": (">=", 1.8),
    "decode_vs_peft_serial": (">=", 15.0),
    "rank_padding_saving": (">=", 1.6),
    "lora_ops_decode_roofline": (">=", 0.8),
}
# --backend onnxruntime (bench/ort.py).
ORT_TARGETS: dict[str, tuple[str, float]] = {"ort_vs_torch_decode": (">=", 1.0)}


def _progress(msg: str) -> None:
    print(f"[bench kernels] {msg}", file=sys.stderr, flush=True)


# ---- our minimal multi-LoRA wrapper ----------------------------------------------------------


class _Ctx:
    def __init__(self) -> None:
        self.pool = None
        self.meta = None


class MultiLoraLinear(nn.Module):
    """y = base(x) + apply_lora(...) for the rows' adapters (no-op while ctx.meta is None)."""

    def __init__(self, base: nn.Linear, name: str, ctx: _Ctx) -> None:
        super().__init__()
        self.base = base
        self.name = name
        self.ctx = ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from mintmesh.kernels import apply_lora

        y = self.base(x)
        if self.ctx.meta is None:
            return y
        apply_lora(
            y.view(-1, y.shape[-1]), x.reshape(-1, x.shape[-1]), self.name, self.ctx.pool,
            self.ctx.meta,
        )  # fmt: skip
        return y


def _targets(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from mintmesh.kernels.dense import PackedLinear

    return [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, (nn.Linear, PackedLinear)) and n.rsplit(".", 1)[-1] in TARGET_LEAVES
    ]


def _set_module(model: nn.Module, path: str, mod: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, mod)


class Wrapped:
    """The base model with swappable wrappers: base() restores the plain Linears."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.ctx = _Ctx()
        self.linears = dict(_targets(model))
        self.wrappers = {n: MultiLoraLinear(m, n, self.ctx) for n, m in self.linears.items()}

    def shapes(self) -> dict[str, tuple[int, int]]:
        return {n: (m.out_features, m.in_features) for n, m in self.linears.items()}

    def wrap(self, on: bool) -> None:
        for n in self.linears:
            _set_module(self.model, n, self.wrappers[n] if on else self.linears[n])


# ---- adapters ------------------------------------------------------------------------------


def make_adapter_weights(shapes: dict[str, tuple[int, int]], rank: int, seed: int) -> dict:
    """{module path: ModuleWeights} with seeded random A and B (alpha = 2 r)."""
    from mintmesh.packed import ModuleWeights

    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (o, i) in shapes.items():
        A = torch.randn(rank, i, generator=g) / i**0.5
        B = torch.randn(o, rank, generator=g) * 0.02
        out[name] = ModuleWeights(A=A, B=B, alpha=2.0 * rank, scale=2.0)
    return out


def pad_adapter(mods: dict, rank: int) -> dict:
    """The same adapter zero-padded to `rank` (identical outputs, more rows)."""
    from mintmesh.packed import ModuleWeights

    out = {}
    for name, mw in mods.items():
        r = mw.rank
        A = torch.zeros(rank, mw.A.shape[1])
        A[:r] = mw.A
        B = torch.zeros(mw.B.shape[0], rank)
        B[:, :r] = mw.B
        out[name] = ModuleWeights(A=A, B=B, alpha=mw.alpha, scale=mw.scale)
    return out


def build_pool(shapes, adapters: list[dict], device, dtype, page_rows: int = 8):
    from mintmesh.kernels import AdapterPool

    pages = sum(-(-max(m.rank for m in a.values()) // page_rows) for a in adapters)
    pool = AdapterPool(
        shapes,
        max_adapters=len(adapters),
        device=device,
        dtype=dtype,
        page_rows=page_rows,
        max_pages=pages,
    )
    slots = [pool.load(f"adapter-{i:03d}", a) for i, a in enumerate(adapters)]
    return pool, slots


def build_peft(model_dir: Path, adapters: list[dict], device, dtype):
    """A peft model on its own copy of the base with every adapter loaded (a0, a1, ...)."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    from mintmesh.model import load_model

    base, _ = load_model(model_dir, device=str(device), dtype=dtype)
    rank = adapters[0][next(iter(adapters[0]))].rank
    cfg = LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=list(TARGET_LEAVES), lora_dropout=0.0
    )
    pm = get_peft_model(base, cfg, adapter_name="a0")
    for i in range(1, len(adapters)):
        pm.add_adapter(f"a{i}", cfg)
    prefix = "base_model.model."
    with torch.no_grad():
        for name, mod in pm.named_modules():
            if not isinstance(mod, LoraLayer) or not name.startswith(prefix):
                continue
            path = name[len(prefix) :]
            for i, ad in enumerate(adapters):
                mw = ad[path]
                mod.lora_A[f"a{i}"].weight.copy_(mw.A)
                mod.lora_B[f"a{i}"].weight.copy_(mw.B)
                mod.scaling[f"a{i}"] = mw.scale
    pm.eval()
    return pm


# ---- timing --------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def _cache_kw(model: nn.Module) -> str:
    """The forward's KV-cache argument: `cache` in newer transformers, else past_key_values."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _out_cache(out):
    c = getattr(out, "cache", None)
    return c if c is not None else out.past_key_values


def _loadavg() -> float | None:
    """1-minute load average (the machine is shared: read the ratios with it in mind)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


# ---- scenarios -----------------------------------------------------------------------------


def run_uniform(args, model_dir: Path, device: torch.device, dtype) -> dict:
    from mintmesh.kernels import BatchMeta
    from mintmesh.kernels.dense import pack_linears
    from mintmesh.model import load_model

    R, L = args.requests, args.prompt_len
    model, _ = load_model(model_dir, device=str(device), dtype=dtype)
    # The backbone with transformers' own Linears (only needed when ours are packed).
    stock = model
    if args.dense_kernels == "onednn":
        stock, _ = load_model(model_dir, device=str(device), dtype=dtype)
        pack_linears(model, batch_hint=R)
    w = Wrapped(model)
    shapes = w.shapes()
    _progress(f"{len(shapes)} LoRA layers; {R} adapters of rank {args.rank}")
    adapters = [make_adapter_weights(shapes, args.rank, seed=1000 + i) for i in range(R)]
    pool, slots = build_pool(shapes, adapters, device, dtype)
    w.ctx.pool = pool
    meta = BatchMeta.make(max_tokens=R * L, device=device)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, min(vocab, 256), (R, L), generator=g).to(device)
    nxt = torch.randint(0, min(vocab, 256), (R, 1), generator=g).to(device)
    slot_t = torch.tensor(slots, dtype=torch.long)
    prefill_slots = slot_t.repeat_interleave(L)
    decode_slots = slot_t

    _progress("loading peft with the same adapters")
    pm = build_peft(model_dir, adapters, device, dtype)
    names = [f"a{i}" for i in range(R)]

    res: dict[str, list[float]] = {k: [] for k in ("base_p", "ours_p", "peft_p")}
    res.update({k: [] for k in ("base_d", "ours_d", "peft_d", "serial_d", "stock_d")})
    ck = _cache_kw(model)
    kv = {"static": True}
    cache: dict = {}

    def new_cache() -> dict:
        """A preallocated KV cache of L + 1 positions (as a serving engine keeps): decode steps
        write in place instead of concatenating the whole cache each step (HF's dynamic cache
        would add ~0.2 s of copies to every variant's step here). {} = the model's default."""
        if not kv["static"]:
            return {}
        from transformers import StaticCache

        return {ck: StaticCache(config=model.config, max_cache_len=L + 1)}

    def prefill(fn, **kw):
        c = new_cache()
        out = fn(input_ids=ids, use_cache=True, logits_to_keep=1, **c, **kw)
        return c.get(ck) if c else _out_cache(out)

    def base_prefill():
        w.wrap(False)
        w.ctx.meta = None
        prefill(model)

    def ours_prefill():
        w.wrap(True)
        w.ctx.meta = meta.prepare(prefill_slots, device=device)
        prefill(model)
        w.ctx.meta = None

    def peft_prefill():
        prefill(pm, adapter_names=names)

    def base_decode():
        w.wrap(False)
        out = model(nxt, **{ck: cache["c"]}, use_cache=True)
        cache["c"].crop(-1)
        return out.logits

    def ours_decode():
        w.wrap(True)
        w.ctx.meta = meta.prepare(decode_slots, device=device)
        out = model(nxt, **{ck: cache["c"]}, use_cache=True)
        w.ctx.meta = None
        cache["c"].crop(-1)
        return out.logits

    def peft_decode():
        out = pm(input_ids=nxt, **{ck: cache["c"]}, use_cache=True, adapter_names=names)
        cache["c"].crop(-1)
        return out.logits

    def stock_decode():
        """The base model with transformers' own Linears."""
        w.wrap(False)
        out = stock(nxt, **{ck: cache["c"]}, use_cache=True)
        cache["c"].crop(-1)
        return out.logits

    with torch.inference_mode():
        # Decode first: it is short and the most sensitive to a busy machine. Its KV cache
        # comes from an untimed base prefill (which also warms the prefill path up).
        _progress("warm-up prefill (builds the decode KV cache)")
        w.wrap(False)
        try:
            cache["c"] = prefill(model)
            base_decode()
        except Exception as e:  # noqa: BLE001 - another transformers: its default cache
            _progress(f"static KV cache unavailable ({type(e).__name__}: {e}); dynamic cache")
            kv["static"] = False
            cache["c"] = prefill(model)
        # Same rows, same cache: our logits against peft's (and the base's, which must differ).
        ours_logits, peft_logits, base_logits = ours_decode(), peft_decode(), base_decode()
        logit_diff = (ours_logits.float() - peft_logits.float()).abs().max().item()
        lora_effect = (ours_logits.float() - base_logits.float()).abs().max().item()
        _progress(f"decode logits: ours vs peft max |diff| {logit_diff:.2e} "
                  f"(LoRA changes them by up to {lora_effect:.2e})")  # fmt: skip
        stock_diff = (stock_decode().float() - base_logits.float()).abs().max().item()
        variants = [("base_d", base_decode), ("ours_d", ours_decode), ("peft_d", peft_decode),
                    ("stock_d", stock_decode)]  # fmt: skip
        pool_bw: list[float] = []
        for rep in range(args.repeats):
            k = rep % len(variants)
            for key, fn in variants[k:] + variants[:k]:
                res[key].append(_timed(fn, device))
            # The adapters' own memory streamed beside the steps: the rate their bytes can come
            # at (decode_mixed_vs_base_bound).
            pool_bw.append(measure_tensor_read_bandwidth(pool.storage, repeats=3))
            _progress(
                f"decode {rep + 1}/{args.repeats}: base {res['base_d'][-1] * 1e3:.0f}ms, "
                f"ours {res['ours_d'][-1] * 1e3:.0f}ms, peft {res['peft_d'][-1] * 1e3:.0f}ms, "
                f"stock base {res['stock_d'][-1] * 1e3:.0f}ms"
            )
        # peft serving the requests one adapter at a time (batch 1, its own 128-token cache).
        c1 = new_cache()
        out1 = pm(input_ids=ids[:1], use_cache=True, logits_to_keep=1, **c1)
        one = c1.get(ck) if c1 else _out_cache(out1)

        def serial():
            for i in range(R):
                pm.set_adapter(names[i])
                pm(input_ids=nxt[i : i + 1], **{ck: one}, use_cache=True)
                one.crop(-1)

        for rep in range(args.serial_repeats):
            res["serial_d"].append(_timed(serial, device))
            _progress(f"peft serial decode {rep + 1}/{args.serial_repeats}: "
                      f"{res['serial_d'][-1]:.2f}s")  # fmt: skip
        t_phase = time.perf_counter()
        variants = [("base_p", base_prefill), ("ours_p", ours_prefill), ("peft_p", peft_prefill)]
        for rep in range(args.prefill_repeats):
            if rep and time.perf_counter() - t_phase > args.prefill_budget_s:
                _progress(f"prefill: {rep} rounds took over {args.prefill_budget_s:.0f}s; stop")
                break
            # Rotate the order each round: no variant always runs first (cold) or last.
            for key, fn in variants[rep % 3 :] + variants[: rep % 3]:
                res[key].append(_timed(fn, device))
            _progress(
                f"prefill {rep + 1}/{args.prefill_repeats}: base {res['base_p'][-1]:.2f}s, "
                f"ours {res['ours_p'][-1]:.2f}s, peft {res['peft_p'][-1]:.2f}s"
            )
    med = {k: statistics.median(v) for k, v in res.items()}

    def paired(num: str, den: str) -> float:
        """Median over rounds of the ratio within a round (the variants of one round ran back
        to back, so a slow stretch of a shared machine hits both sides)."""
        return statistics.median([a / b for a, b in zip(res[num], res[den], strict=True)])

    return {
        "kv_cache": "static" if kv["static"] else "dynamic",
        "decode_logits_max_abs_diff_vs_peft": logit_diff,
        "decode_logits_max_abs_lora_effect": lora_effect,
        "decode_logits_max_abs_diff_stock_base": stock_diff,
        "base_prefill_s": med["base_p"],
        "ours_prefill_s": med["ours_p"],
        "peft_prefill_s": med["peft_p"],
        "base_decode_ms": med["base_d"] * 1e3,
        "ours_decode_ms": med["ours_d"] * 1e3,
        "peft_decode_ms": med["peft_d"] * 1e3,
        "peft_serial_decode_ms": med["serial_d"] * 1e3,
        "prefill_rounds": len(res["base_p"]),
        "stock_base_decode_ms": med["stock_d"] * 1e3,
        "dense_decode_speedup": paired("stock_d", "base_d"),
        "prefill_mixed_vs_base": paired("base_p", "ours_p"),
        "decode_mixed_vs_base": paired("base_d", "ours_d"),
        "prefill_vs_peft_mixed": paired("peft_p", "ours_p"),
        "decode_vs_peft_mixed": paired("peft_d", "ours_d"),
        "decode_vs_peft_serial": med["serial_d"] / med["ours_d"],
        # What the decode step's LoRA ops must read beyond the base: every adapter's pages.
        "uniform_adapter_decode_bytes": sum(pool.nbytes(f"adapter-{i:03d}") for i in range(R)),
        "uniform_pool_read_bandwidth_gb_s": statistics.median(pool_bw) / 1e9,
    }


def run_mixed_ranks(args, shapes, device: torch.device, dtype) -> dict:
    """LoRA ops time for one prefill + one decode step over every layer: real vs padded ranks."""
    from mintmesh.kernels import BatchMeta, apply_lora

    R, L = args.requests, args.prompt_len
    rng = random.Random(args.seed)
    ranks = [rng.choice(MIXED_RANKS) for _ in range(R)]
    adapters = [make_adapter_weights(shapes, r, seed=2000 + i) for i, r in enumerate(ranks)]
    real_pool, real_slots = build_pool(shapes, adapters, device, dtype)
    pad_pool, pad_slots = build_pool(
        shapes, [pad_adapter(a, max(MIXED_RANKS)) for a in adapters], device, dtype
    )
    g = torch.Generator().manual_seed(args.seed + 1)
    dims = {s for s in shapes.values()}
    xs = {
        (o, i): (torch.randn(R * L, i, generator=g).to(device, dtype),
                 torch.randn(R, i, generator=g).to(device, dtype))
        for o, i in dims
    }  # fmt: skip
    ys = {(o, i): (torch.zeros(R * L, o, device=device, dtype=dtype),
                   torch.zeros(R, o, device=device, dtype=dtype)) for o, i in dims}  # fmt: skip

    def ops(pool, slots, phase: int):
        meta = BatchMeta.make()
        s = torch.tensor(slots, dtype=torch.long)
        meta.prepare(s.repeat_interleave(L) if phase == 0 else s, device=device)
        for name, shp in shapes.items():
            apply_lora(ys[shp][phase], xs[shp][phase], name, pool, meta)

    times: dict[str, list[float]] = {k: [] for k in ("real_p", "pad_p", "real_d", "pad_d")}
    # What one decode step's LoRA ops must read: every distinct adapter's A and B pages, every
    # targeted layer (the activations are R rows, noise beside them).
    decode_bytes = sum(real_pool.nbytes(f"adapter-{i:03d}") for i in range(R))
    bandwidth: list[float] = []
    pool_bw: list[float] = []
    with torch.inference_mode():
        for phase in (0, 1):
            ops(real_pool, real_slots, phase)  # warm-up
            ops(pad_pool, pad_slots, phase)
        for _ in range(args.repeats):
            times["real_p"].append(_timed(lambda: ops(real_pool, real_slots, 0), device))
            times["pad_p"].append(_timed(lambda: ops(pad_pool, pad_slots, 0), device))
            times["real_d"].append(_timed(lambda: ops(real_pool, real_slots, 1), device))
            times["pad_d"].append(_timed(lambda: ops(pad_pool, pad_slots, 1), device))
            # Interleaved with the ops it bounds, so both see the same machine: the pool's own
            # memory (what the ops read; the bench's pool holds exactly the adapters' pages)
            # streamed by a sum, and a fresh buffer (the machine, for comparison).
            pool_bw.append(measure_tensor_read_bandwidth(real_pool.storage, repeats=3))
            bandwidth.append(measure_read_bandwidth(device, repeats=3))
    med = {k: statistics.median(v) for k, v in times.items()}
    t = times

    def paired(ratios) -> float:
        return statistics.median(list(ratios))

    _progress(
        "mixed ranks, LoRA ops over all layers: prefill real {:.0f}ms / padded {:.0f}ms, decode "
        "real {:.1f}ms / padded {:.1f}ms".format(*(med[k] * 1e3 for k in
                                                   ("real_p", "pad_p", "real_d", "pad_d")))
    )  # fmt: skip
    # Per round: the time the bytes need at the rate their memory streams at in that round,
    # over the time the ops took (1.0 = the ops read as fast as a sum over the same memory).
    roofline = [decode_bytes / bw / td for bw, td in zip(pool_bw, t["real_d"], strict=True)]
    fresh = [decode_bytes / bw / td for bw, td in zip(bandwidth, t["real_d"], strict=True)]
    return {
        "lora_ops_decode_bytes": decode_bytes,
        "read_bandwidth_gb_s": statistics.median(bandwidth) / 1e9,
        "pool_read_bandwidth_gb_s": statistics.median(pool_bw) / 1e9,
        "lora_ops_decode_roofline": statistics.median(roofline),
        "lora_ops_decode_roofline_min": min(roofline),
        "lora_ops_decode_roofline_max": max(roofline),
        # The same against a fresh buffer (the figure before the pool's own memory was read).
        "lora_ops_decode_roofline_fresh_buffer": statistics.median(fresh),
        "lora_threads": _lora_threads(),
        "lora_threading": _lora_threading(),
        "mixed_ranks_mean": sum(ranks) / len(ranks),
        "lora_ops_prefill_real_ms": med["real_p"] * 1e3,
        "lora_ops_prefill_padded_ms": med["pad_p"] * 1e3,
        "lora_ops_decode_real_ms": med["real_d"] * 1e3,
        "lora_ops_decode_padded_ms": med["pad_d"] * 1e3,
        "rank_padding_saving_prefill": paired(
            a / b for a, b in zip(t["pad_p"], t["real_p"], strict=True)
        ),
        "rank_padding_saving_decode": paired(
            a / b for a, b in zip(t["pad_d"], t["real_d"], strict=True)
        ),
        # One prefill and one decode step: the scenario's LoRA ops time, padded over real.
        "rank_padding_saving": paired(
            (pp + pd) / (rp + rd)
            for pp, pd, rp, rd in zip(t["pad_p"], t["pad_d"], t["real_p"], t["real_d"], strict=True)
        ),
    }


def _lora_threads() -> int:
    from mintmesh.kernels.settings import SETTINGS

    return SETTINGS.lora_threads


def _lora_threading() -> str | None:
    """Who shares the native LoRA kernels' tiles ("openmp": torch's team; "helpers": the
    library's own threads); None where the native library does not serve."""
    from mintmesh.kernels import native

    lib = native.load(block=False)
    return None if lib is None else lib.threading


def run_memory(shapes, device: torch.device, dtype) -> dict:
    from mintmesh.kernels import AdapterPool

    pool = AdapterPool(shapes, max_adapters=2, device=device, dtype=dtype, max_pages=9)
    pool.load("rank8", make_adapter_weights(shapes, 8, seed=1))
    pool.load("rank64", make_adapter_weights(shapes, 64, seed=2))
    return {"pool_bytes_rank8": pool.nbytes("rank8"), "pool_bytes_rank64": pool.nbytes("rank64")}


def _check_targets(metrics: dict) -> dict:
    out = {}
    targets = ORT_TARGETS if "ort_vs_torch_decode" in metrics else TARGETS
    for name, (op, thr) in targets.items():
        v = metrics.get(name)
        out[name] = {"target": f"{op} {thr}", "value": v, "met": v is not None and v >= thr}
    if targets is ORT_TARGETS:
        return out
    b8, b64 = metrics.get("pool_bytes_rank8"), metrics.get("pool_bytes_rank64")
    out["pool_bytes_rank8"] = {
        "target": "<= pool_bytes_rank64 / 7",
        "value": b8,
        "met": b8 is not None and b64 is not None and b8 <= b64 / 7,
    }
    return out


def _fmt(v, backend: str):
    """A metric for the JSON: floats to 4 places; the onnxruntime runner's to 5 significant
    digits (its logit differences are ~1e-6: 4 places printed them as 0.0)."""
    if not isinstance(v, float):
        return v
    return float(f"{v:.5g}") if backend == "onnxruntime" else round(v, 4)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mint bench kernels", description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="print only the JSON line on stdout")
    p.add_argument("--preset", default="small", help="backbone preset (small; tiny for tests)")
    p.add_argument("--model-dir", type=Path, default=None,
                   help="backbone directory (built there if missing; default "
                        "~/.cache/mintmesh/PRESET)")  # fmt: skip
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA)")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5, help="decode and LoRA-ops repeats")
    # A prefill of the batch takes ~15 s here and a shared machine's speed drifts by +-15% over
    # that time, more than the ~4% the LoRA ops add: five paired rounds, median ratio.
    p.add_argument("--prefill-repeats", type=int, default=5)
    p.add_argument(
        "--prefill-budget-s",
        type=float,
        default=300.0,
        help="no further prefill round once the prefill rounds took this long",
    )
    p.add_argument(
        "--dense",
        choices=("auto", "onednn", "torch"),
        default="auto",
        help="the backbone's Linears for base/ours (as the executor's dense_kernels)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument(
        "--lora-threads",
        type=int,
        default=KernelSettings.lora_threads,
        help="threads of the native LoRA kernel (the executor's --lora-threads)",
    )
    p.add_argument("--serial-repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--backend",
        choices=("torch", "onnxruntime"),
        default="torch",
        help="onnxruntime: the ORT runner vs the torch runner and vs ORT's Multi-LoRA API "
        "(bench/ort.py) instead of the torch scenarios",
    )
    p.add_argument("--ort-batch", type=int, default=32, help="onnxruntime: decode sequences")
    p.add_argument(
        "--max-step-tokens", type=int, default=512, help="onnxruntime: tokens of a prefill step"
    )
    p.add_argument("--skip", default="", help="comma list of scenarios to skip: "
                   "uniform,mixed,memory")  # fmt: skip
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    warnings.filterwarnings("ignore", category=FutureWarning)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is available")
    dt_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        dt_name
    ]
    if args.threads:
        torch.set_num_threads(args.threads)
    from mintmesh.kernels.settings import configure

    try:
        configure(lora_threads=args.lora_threads)
    except ValueError as e:
        p.error(str(e))
    from mintmesh.kernels.dense import select_dense

    try:
        args.dense_kernels = select_dense(device, dtype, args.dense)
    except ValueError as e:
        p.error(str(e))
    load_start = _loadavg()
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    t0 = time.perf_counter()
    model_dir = ensure_model(args.preset, args.model_dir)
    from mintmesh.model import base_model_info

    info = base_model_info(model_dir)
    shapes = {n: s for n, s in info.linear_shapes.items() if n.rsplit(".", 1)[-1] in TARGET_LEAVES}
    metrics: dict = {}
    if args.backend == "onnxruntime":
        from mintmesh.bench.ort import run_ort

        skip |= {"uniform", "mixed", "memory"}
        metrics.update(run_ort(args, model_dir))
    if "uniform" not in skip:
        metrics.update(run_uniform(args, model_dir, device, dtype))
    if "mixed" not in skip:
        metrics.update(run_mixed_ranks(args, shapes, device, dtype))
    if "memory" not in skip:
        metrics.update(run_memory(shapes, device, dtype))
    if "base_decode_ms" in metrics:
        # The most decode_mixed_vs_base can be with the base step as measured and the adapters'
        # bytes read after it at the rate their memory streams at (one after the other: both
        # cores run the base GEMMs, so the reads do not hide under them).
        bw = metrics["uniform_pool_read_bandwidth_gb_s"] * 1e9
        t_lora = metrics["uniform_adapter_decode_bytes"] / bw
        base_s = metrics["base_decode_ms"] / 1e3
        metrics["decode_mixed_vs_base_bound"] = base_s / (base_s + t_lora)
    from mintmesh.kernels import backend_name

    dev_name = str(device)
    if device.type == "cuda":
        dev_name = f"{device} ({torch.cuda.get_device_name(device)})"
    out = {
        "bench": "kernels",
        "device": dev_name,
        "params": {
            "preset": args.preset,
            "requests": args.requests,
            "prompt_len": args.prompt_len,
            "rank": args.rank,
            "mixed_ranks": list(MIXED_RANKS),
            "targets": list(TARGET_LEAVES),
            "dtype": dt_name,
            "backend": backend_name(device),
            "dense_kernels": args.dense_kernels,
            "runner": args.backend,
            "kv_cache": metrics.pop("kv_cache", None),
            "threads": torch.get_num_threads(),
            "loadavg_1m_start": load_start,
            "loadavg_1m_end": _loadavg(),
            "repeats": args.repeats,
            "prefill_repeats": args.prefill_repeats,
            "wall_s": round(time.perf_counter() - t0, 1),
        },
        "metrics": {k: _fmt(v, args.backend) for k, v in metrics.items()},
        "targets": _check_targets(metrics),
    }
    if not args.json:
        for k, v in out["metrics"].items():
            print(f"{k:32s} {v}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
