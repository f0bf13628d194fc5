"""The backbone as one ONNX graph with per-row multi-LoRA: an export-friendly functional forward
of the Llama family `mint model init` builds, exported once per model directory and LoRA target
set, cached beside the model.

The graph runs ONE packed ragged row of T tokens (every scheduled token of every sequence of a
step, as the torch runner does). Its inputs (shapes; every axis but the model's is dynamic):

    input_ids [T], positions [T] int64; sample_rows [S] int64 (the rows whose logits come out)
    k_cache, v_cache [L, NB*BS, KVH, D]   the paged KV cache's tensors, read in place
    attention, in *pieces*: runs of at most c tokens of one sequence that has cached context
        attn_index [Na, ca] token rows of each piece (padding rows: any row)
        attn_inv [T]        each token's row in the flat [Na*ca] piece layout
        ctx_index [Na, C]   each piece's cached context: rows of a layer's [NB*BS] cache
        ctx_mask [Na, C]    additive (0 or NEG): padding past a sequence's cached length
        new_mask [T, T]     additive: token i sees new token j of its own sequence, j <= i
    LoRA, in pieces: runs of at most c tokens with one adapter slot
        lora_index [Np, c], lora_inv [T], lora_slot [Np] (-1: a piece of no adapter)
        rank_cols [R] int64 = arange(R), R = pages * page_rows: the widest adapter of the step
        layer_pages [NL] int64: the pages gathered for LoRA layer i (the most any of the step's
            adapters has there; 0: no adapter of the step targets the layer, which is skipped)
        page_table [N, MP] int32, ranks [NL, N] int32, scales [NL, N] float32  (the pool's)
        a_pages.<i> [P, PR, in], b_pages.<i> [P, PR, out]  (the pool's pages of LoRA layer i)

and its outputs: logits [S, vocab], new_k / new_v [L, T, KVH, D] (this step's K/V, which the
runner writes into the paged cache: the cache stays the truth).

Semantics per token t of sequence s with adapter a (slot -1: no delta, exactly):
    y = x W^T + scale[l, a] * (x A[a]^T)[:rank[l, a]] B[a]^T[:rank[l, a]]
    A[a] = a_pages[page_table[a]].reshape(-1, in) (pages past the adapter's rank are zero or
    masked off by rank, so mixed ranks are exact), attention over s's cached context and its
    new tokens up to t (a two-part softmax, merged exactly), RoPE from positions with the
    model's own inverse frequencies.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["EXPORT_VERSION", "NEG", "OrtForward", "export_path", "ensure_export", "input_names"]

# Bumped whenever the graph's math or its inputs change: older exports are not reused.
EXPORT_VERSION = "mint-ort-5"
# Masked scores: finite (an all-masked piece must not make NaN), far below any real score.
NEG = -1e30
# Rope types whose frequencies do not depend on the sequence length (the graph bakes them in).
_STATIC_ROPE = {"default", "linear", "llama3", "yarn", None}


@dataclass(frozen=True)
class ExportSpec:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    page_rows: int
    lora_layers: tuple[str, ...]


def _detach(t):
    return None if t is None else t.detach()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class OrtForward(nn.Module):
    """Functional forward over the HF model's own weights (no copy): see the module docstring.

    `model` is a LlamaForCausalLM (its targeted Linears may be wrapped by MultiLoraLinear:
    `.weight` is the base weight either way); `lora_layers` are the AdapterPool's layer names,
    in its order."""

    def __init__(self, model: nn.Module, lora_layers: list[str], page_rows: int) -> None:
        super().__init__()
        cfg = model.config
        if getattr(cfg, "model_type", None) not in ("llama", "mistral", "qwen2"):
            raise ValueError(f"model_type {cfg.model_type!r} has no ONNX export here (llama)")
        rope = getattr(cfg, "rope_scaling", None) or getattr(cfg, "rope_parameters", None) or {}
        rope_type = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
        if rope_type not in _STATIC_ROPE:
            raise ValueError(f"rope_type {rope_type!r} depends on the length: not exportable")
        inner = model.model
        self.num_layers = len(inner.layers)
        self.num_heads = int(cfg.num_attention_heads)
        self.num_kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.num_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads)
        self.vocab_size = int(cfg.vocab_size)
        self.page_rows = int(page_rows)
        self.eps = float(cfg.rms_norm_eps)
        rot = inner.rotary_emb
        self.register_buffer("inv_freq", rot.inv_freq.detach().float().clone(), persistent=False)
        self.rope_scale = float(getattr(rot, "attention_scaling", 1.0))
        self.embed = inner.embed_tokens.weight.detach()
        self.norm = inner.norm.weight.detach()
        self.lm_head = model.lm_head.weight.detach()
        self.layers = []
        index = {n: i for i, n in enumerate(lora_layers)}
        self.lora_layers = list(lora_layers)
        for li, layer in enumerate(inner.layers):
            att, mlp = layer.self_attn, layer.mlp
            prefix = f"model.layers.{li}."
            lin = {}
            for part, mod in (("self_attn", att), ("mlp", mlp)):
                for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                             "down_proj"):  # fmt: skip
                    m = getattr(mod, name, None)
                    if m is None:
                        continue
                    bias = getattr(getattr(m, "base_layer", m), "bias", None)
                    lin[name] = (
                        m.weight.detach(),
                        _detach(bias),
                        index.get(f"{prefix}{part}.{name}"),
                    )
            self.layers.append(
                dict(
                    ln1=layer.input_layernorm.weight.detach(),
                    ln2=layer.post_attention_layernorm.weight.detach(),
                    lin=lin,
                    scaling=float(getattr(att, "scaling", self.head_dim**-0.5)),
                )
            )
        missing = set(index) - {
            f"model.layers.{li}.{p}.{n}"
            for li, lay in enumerate(self.layers)
            for n in lay["lin"]
            for p in ("self_attn", "mlp")
        }
        if missing:
            raise ValueError(f"LoRA layers {sorted(missing)[:3]} are not Linears of the model")

    def spec(self) -> ExportSpec:
        return ExportSpec(
            self.num_layers,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.vocab_size,
            self.page_rows,
            tuple(self.lora_layers),
        )

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        var = x.pow(2).mean(-1, keepdim=True)
        return w * (x * torch.rsqrt(var + self.eps))

    def forward(
        self,
        input_ids,
        positions,
        sample_rows,
        k_cache,
        v_cache,
        attn_index,
        attn_inv,
        ctx_index,
        ctx_mask,
        new_mask,
        lora_index,
        lora_inv,
        lora_slot,
        rank_cols,
        layer_pages,
        page_table,
        ranks,
        scales,
        *pages,
    ):
        n_l = len(self.lora_layers)
        a_pages, b_pages = pages[:n_l], pages[n_l:]
        T = input_ids.shape[0]
        H, KVH, D = self.num_heads, self.num_kv_heads, self.head_dim
        G = H // KVH
        Na, ca = attn_index.shape[0], attn_index.shape[1]
        Np, c = lora_index.shape[0], lora_index.shape[1]
        nbbs = k_cache.shape[1]
        k_flat = k_cache.reshape(-1, KVH, D)
        v_flat = v_cache.reshape(-1, KVH, D)

        # LoRA pieces: their slots' page tables, ranks and scales gathered once per step for
        # every layer (one op each, not one per layer).
        has = lora_slot >= 0
        slot0 = torch.clamp(lora_slot, min=0)
        pt = page_table.index_select(0, slot0).long()  # [Np, MP]
        rk_all = ranks.index_select(1, slot0).long()  # [NL, Np]
        sc_all = scales.index_select(1, slot0)[:, :, None, None]  # [NL, Np, 1, 1]
        keep_all = (rank_cols[None, None, :] < rk_all[:, :, None]) & has[None, :, None]
        keep_all = keep_all[:, :, None, :]  # [NL, Np, 1, R]
        lora_idx = lora_index.reshape(-1)

        def linear(x, entry, xs_cache):
            w, b, li = entry
            y = torch.matmul(x, w.t())
            if b is not None:
                y = y + b
            if li is None:
                return y
            # q/k/v (and gate/up) share their input: gathered into pieces once.
            xs = next((g for src, g in xs_cache if src is x), None)
            if xs is None:
                xs = x.index_select(0, lora_idx).reshape(Np, c, -1)
                xs_cache.append((x, xs))
            # This layer's pages: layer_pages[li] of them (the most any piece's adapter has
            # here; 0 when none targets the layer: every tensor below is empty, the MatMul
            # over an empty rank gives exact zeros, and the layer costs a few empty ops).
            pt_l = pt.index_select(1, torch.arange(layer_pages[li])).reshape(-1)  # [Np * P_l]
            n_out, n_in = int(w.shape[0]), int(w.shape[1])
            A = a_pages[li].index_select(0, pt_l).reshape(Np, -1, n_in)  # [Np, R_l, in]
            Bt = b_pages[li].index_select(0, pt_l).reshape(Np, -1, n_out)  # [Np, R_l, out]
            xa = torch.matmul(xs, A.transpose(1, 2))  # [Np, c, R_l]
            keep = keep_all[li][:, :, : A.shape[1]]  # [Np, 1, R_l]
            xa = torch.where(keep, xa * sc_all[li], torch.zeros_like(xa))
            # Padded rank rows of Bt read another adapter's page; their xa columns are exactly 0
            # and every page is finite (adapters are refused otherwise), so they add exactly 0.
            yl = torch.matmul(xa, Bt).reshape(Np * c, -1)  # [Np*c, out]
            return y + yl.index_select(0, lora_inv)

        # RoPE from positions, the model's own frequencies.
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.rope_scale)[:, None, :]
        sin = (emb.sin() * self.rope_scale)[:, None, :]

        attn_idx = attn_index.reshape(-1)
        ctx_idx = ctx_index.t().reshape(-1)  # [C * Na], position major
        C = ctx_index.shape[1]
        h = self.embed.index_select(0, input_ids)
        # The masks come in additive (0 or NEG); attention selects with them as booleans.
        ok_c = (ctx_mask > NEG / 2)[:, None, None, :]  # [Na, 1, 1, C]
        ok_n = (new_mask > NEG / 2)[:, None, None, :]  # [T, 1, 1, T]
        neg = torch.tensor(NEG, dtype=h.dtype)
        zero = torch.tensor(0.0, dtype=h.dtype)
        new_k, new_v = [], []
        for layer_no, lay in enumerate(self.layers):
            lin = lay["lin"]
            xs_cache: list = []
            x = self._rms(h, lay["ln1"])
            q = linear(x, lin["q_proj"], xs_cache).reshape(T, H, D)
            k = linear(x, lin["k_proj"], xs_cache).reshape(T, KVH, D)
            v = linear(x, lin["v_proj"], xs_cache).reshape(T, KVH, D)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            new_k.append(k)
            new_v.append(v)
            scaling = lay["scaling"]
            qg = q.reshape(T, KVH, G, D) * scaling
            # Part 1: the cached context, per piece (gathered once per piece, not per token),
            # context position major ([C, Na, KVH, D]): the permutes below move only that
            # leading axis, which ORT folds into the MatMuls (FusedMatMul transBatchB reads
            # the gathered rows strided), so the context is never transposed in memory.
            off = ctx_idx + layer_no * nbbs
            kc = k_flat.index_select(0, off).reshape(C, Na, KVH, D).permute(1, 2, 3, 0)
            vc = v_flat.index_select(0, off).reshape(C, Na, KVH, D).permute(1, 2, 0, 3)
            qp = qg.index_select(0, attn_idx).reshape(Na, ca, KVH, G, D)
            qp = qp.permute(0, 2, 1, 3, 4).reshape(Na, KVH, ca * G, D)
            # Masked by selection, not by adding NEG: another sequence's (or a padding row's)
            # score never survives the mask however large it is, and its weight is exactly 0
            # (its values are finite: nothing non-finite is written into the cache).
            s_c = torch.where(ok_c, torch.matmul(qp, kc), neg)  # [Na, KVH, ca*G, C]
            m_c = s_c.amax(-1, keepdim=True)
            e_c = torch.where(ok_c, torch.exp(s_c - m_c), zero)
            l_c = e_c.sum(-1, keepdim=True)
            u_c = torch.matmul(e_c, vc)  # [Na, KVH, ca*G, D]

            def to_tokens(t, last):
                t = t.reshape(Na, KVH, ca, G, last).permute(0, 2, 1, 3, 4)
                return t.reshape(Na * ca, KVH, G, last).index_select(0, attn_inv)

            u_c, m_c, l_c = to_tokens(u_c, D), to_tokens(m_c, 1), to_tokens(l_c, 1)
            # Part 2: the new tokens of the row, masked to each token's own sequence, causal.
            qn = qg.permute(1, 0, 2, 3).reshape(KVH, T * G, D)
            s_n = torch.matmul(qn, k.permute(1, 2, 0)).reshape(KVH, T, G, T).permute(1, 0, 2, 3)
            s_n = torch.where(ok_n, s_n, neg)  # [T, KVH, G, T]
            m_n = s_n.amax(-1, keepdim=True)
            e_n = torch.where(ok_n, torch.exp(s_n - m_n), zero)
            l_n = e_n.sum(-1, keepdim=True)
            pn = e_n.permute(1, 0, 2, 3).reshape(KVH, T * G, T)
            # The product runs over every token of the row: a non-finite value of another
            # sequence would turn its exact-zero weight into NaN, so those values are zeroed
            # (only a row whose own values overflowed reads differently, and it is garbage).
            v_n = torch.where(torch.isfinite(v), v, zero)
            u_n = torch.matmul(pn, v_n.permute(1, 0, 2)).reshape(KVH, T, G, D).permute(1, 0, 2, 3)
            # Exact merge of the two softmax parts.
            m = torch.maximum(m_c, m_n)
            a_c = torch.exp(m_c - m)
            a_n = torch.exp(m_n - m)
            o = (u_c * a_c + u_n * a_n) / (l_c * a_c + l_n * a_n)
            h = h + linear(o.reshape(T, H * D), lin["o_proj"], xs_cache)
            x = self._rms(h, lay["ln2"])
            gate = linear(x, lin["gate_proj"], xs_cache)
            up = linear(x, lin["up_proj"], xs_cache)
            h = h + linear(torch.nn.functional.silu(gate) * up, lin["down_proj"], xs_cache)
        h = self._rms(h.index_select(0, sample_rows), self.norm)
        logits = torch.matmul(h, self.lm_head.t())
        return logits, torch.stack(new_k), torch.stack(new_v)


def input_names(n_lora: int) -> list[str]:
    base = [
        "input_ids",
        "positions",
        "sample_rows",
        "k_cache",
        "v_cache",
        "attn_index",
        "attn_inv",
        "ctx_index",
        "ctx_mask",
        "new_mask",
        "lora_index",
        "lora_inv",
        "lora_slot",
        "rank_cols",
        "layer_pages",
        "page_table",
        "ranks",
        "scales",
    ]
    return base + [f"a_pages.{i}" for i in range(n_lora)] + [f"b_pages.{i}" for i in range(n_lora)]


OUTPUT_NAMES = ["logits", "new_k", "new_v"]


def _dynamic_axes(n_lora: int) -> dict[str, dict[int, str]]:
    ax = {
        "input_ids": {0: "T"},
        "positions": {0: "T"},
        "sample_rows": {0: "S"},
        "k_cache": {1: "cache_rows"},
        "v_cache": {1: "cache_rows"},
        "attn_index": {0: "Na", 1: "ca"},
        "attn_inv": {0: "T"},
        "ctx_index": {0: "Na", 1: "C"},
        "ctx_mask": {0: "Na", 1: "C"},
        "new_mask": {0: "T", 1: "T"},
        "lora_index": {0: "Np", 1: "c"},
        "lora_inv": {0: "T"},
        "lora_slot": {0: "Np"},
        "rank_cols": {0: "R"},
        "page_table": {0: "N", 1: "MP"},
        "ranks": {1: "N"},
        "scales": {1: "N"},
        "logits": {0: "S"},
        "new_k": {1: "T"},
        "new_v": {1: "T"},
    }
    for i in range(n_lora):
        ax[f"a_pages.{i}"] = {0: "P"}
        ax[f"b_pages.{i}"] = {0: "P"}
    return ax


def export_key(fingerprint: str, lora_layers: list[str], page_rows: int, model_dir: Path) -> str:
    """<fingerprint>-<hash of the target set, page rows, export version and weight files>."""
    weights = sorted(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns)
        for p in Path(model_dir).glob("*.safetensors")
    )
    blob = json.dumps(
        {"v": EXPORT_VERSION, "targets": list(lora_layers), "pr": page_rows, "w": weights},
        sort_keys=True,
    ).encode()
    return f"{fingerprint[:16]}-{hashlib.sha256(blob).hexdigest()[:16]}"


def export_path(model_dir: Path, key: str) -> Path:
    return Path(model_dir) / ".onnx" / key / "model.onnx"


def _example_inputs(fwd: OrtForward, pool_tensors: list[torch.Tensor], n_lora: int):
    T, L, KVH, D = 3, fwd.num_layers, fwd.num_kv_heads, fwd.head_dim
    cache = torch.zeros(L, 8, KVH, D)
    i64 = torch.long
    return (
        torch.tensor([1, 2, 3], dtype=i64),
        torch.tensor([0, 1, 2], dtype=i64),
        torch.tensor([2], dtype=i64),
        cache,
        cache.clone(),
        torch.zeros(2, 2, dtype=i64),
        torch.tensor([0, 1, 2], dtype=i64),
        torch.zeros(2, 4, dtype=i64),
        torch.full((2, 4), NEG),
        torch.triu(torch.full((T, T), NEG), 1),
        torch.zeros(2, 2, dtype=i64),
        torch.tensor([0, 1, 2], dtype=i64),
        torch.tensor([0, -1], dtype=i64),
        torch.arange(2 * fwd.page_rows, dtype=i64),
        torch.full((n_lora,), 2, dtype=i64),
        *pool_tensors,
    )


def ensure_export(
    model: nn.Module,
    *,
    model_dir: Path,
    fingerprint: str,
    pool,
) -> tuple[Path, bool]:
    """The cached ONNX graph of model for pool's LoRA layers: (path, whether it was exported
    now). Exported into a temporary folder beside the cache and renamed into place (atomic:
    a reader never sees half a file; a concurrent exporter's result wins harmlessly)."""
    key = export_key(fingerprint, pool.layer_names, pool.page_rows, model_dir)
    path = export_path(model_dir, key)
    if path.is_file():
        return path, False
    fwd = OrtForward(model, pool.layer_names, pool.page_rows).eval()
    n_lora = len(pool.layer_names)
    # Example pool tensors: tiny stand-ins with the pool's per-layer shapes (CPU, fp32).
    pool_tensors = [
        torch.zeros(4, 2, dtype=torch.int32),
        torch.zeros(n_lora, 4, dtype=torch.int32),
        torch.zeros(n_lora, 4),
    ]
    pool_tensors += [torch.zeros(3, pool.page_rows, t.shape[2]) for t in pool.a_pages]
    pool_tensors += [torch.zeros(3, pool.page_rows, t.shape[2]) for t in pool.b_pages]
    args = _example_inputs(fwd, pool_tensors, n_lora)
    root = path.parent.parent
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
    try:
        import warnings

        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                fwd,
                args,
                str(tmp / "model.onnx"),
                input_names=input_names(n_lora),
                output_names=OUTPUT_NAMES,
                dynamic_axes=_dynamic_axes(n_lora),
                opset_version=17,
                do_constant_folding=True,
                dynamo=False,
            )
        (tmp / "export.json").write_text(
            json.dumps({"version": EXPORT_VERSION, "fingerprint": fingerprint, "key": key}) + "\n"
        )
        try:
            os.rename(tmp, path.parent)
        except OSError:
            if not path.is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("exported the backbone to ONNX: %s", path)
    return path, True
