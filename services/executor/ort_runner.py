"""The ONNX Runtime model runner: the backbone exported once (ort_export.py) and run by ORT with
every row's own adapter in one run (per-row multi-LoRA in the graph, read from the same
AdapterPool the torch runner uses: its page tensors and tables are bound into the session by
pointer, never copied). The scheduler's paged KV cache stays the truth: the graph reads the
cache tensors in place (each piece gathers its sequence's context by block table) and returns
only the step's new K/V, which this runner writes into the cache at plan.slot_mapping.

Providers: CUDAExecutionProvider where onnxruntime-gpu finds CUDA and the backbone is on a
CUDA device, else CPUExecutionProvider; `provider` says which one the session got (Status).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch

from mintmesh.kernels import AdapterPool
from mintmesh.services.executor.config import ExecutorConfig
from mintmesh.services.executor.kv import AttentionPlan, finite_or_zero
from mintmesh.services.executor.lora import LoraContext, inject_lora
from mintmesh.services.executor.ort_export import NEG, OUTPUT_NAMES, ensure_export, input_names
from mintmesh.services.executor.runner import ForwardBatch, ModelRunner, adapter_pool

logger = logging.getLogger(__name__)

__all__ = ["OrtModelRunner", "StepInputs", "ort_providers", "step_inputs"]

_NP = {torch.float32: np.float32, torch.int64: np.int64, torch.int32: np.int32}


def ort_providers(device: torch.device) -> list[str]:
    """The providers to ask for: CUDA first where the backbone is on CUDA and ORT has it."""
    import onnxruntime as ort

    avail = ort.get_available_providers()
    if device.type == "cuda" and "CUDAExecutionProvider" in avail:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _pieces(groups: list[list[int]], total: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Split groups of token rows into pieces of at most c rows (c = ceil(total / #groups):
    padding stays under `total` rows). Returns (index [Np, c] rows, padded with the piece's
    first row; inv [total] each covered row's flat position (-1: not covered); piece -> group).
    """
    if not groups:
        return np.zeros((0, 1), np.int64), np.full(total, -1, np.int64), []
    n = sum(len(g) for g in groups)
    c = max(1, math.ceil(n / len(groups)))
    rows: list[list[int]] = []
    owner: list[int] = []
    inv = np.full(total, -1, np.int64)
    for gi, g in enumerate(groups):
        for s in range(0, len(g), c):
            part = g[s : s + c]
            p = len(rows)
            inv[part] = np.arange(p * c, p * c + len(part))
            rows.append(part + [part[0]] * (c - len(part)))
            owner.append(gi)
    return np.asarray(rows, dtype=np.int64), inv, owner


class StepInputs(dict):
    """The graph's step inputs (torch tensors on the runner's device), by input name."""


def step_inputs(
    batch: ForwardBatch,
    pool: AdapterPool,
    *,
    num_layers: int,
    kv_heads: int,
    head_dim: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> StepInputs:
    """Everything but the pool's tensors, for one ForwardBatch (host work, numpy)."""
    T = len(batch.token_ids)
    plan: AttentionPlan = batch.plan
    kv = plan.kv
    rows = np.asarray(
        batch.sample_rows if batch.sample_rows is not None else range(T), dtype=np.int64
    )
    # Attention pieces: the tokens of each sequence with cached context, and that context.
    groups, ctxs = [], []
    seq_of = np.empty(T, np.int64)
    for i, s in enumerate(plan.spans):
        seq_of[s.q_start : s.q_start + s.q_len] = i
        cached = s.ctx_len - s.q_len
        if cached > 0:
            bs = kv.block_size
            nb = kv.blocks_for(cached)
            table = np.asarray(s.blocks[:nb], dtype=np.int64)
            p = np.arange(cached, dtype=np.int64)
            groups.append(list(range(s.q_start, s.q_start + s.q_len)))
            ctxs.append(table[p // bs] * bs + p % bs)
    a_index, a_inv, a_owner = _pieces(groups, T)
    C = max([len(x) for x in ctxs] + [1])
    Na = len(a_owner) + 1  # + one all-masked piece for the tokens without cached context
    ca = a_index.shape[1]
    attn_index = np.zeros((Na, ca), np.int64)
    attn_index[: Na - 1] = a_index
    ctx_index = np.zeros((Na, C), np.int64)
    ctx_mask = np.full((Na, C), NEG, np.float32)
    for p, gi in enumerate(a_owner):
        n = len(ctxs[gi])
        ctx_index[p, :n] = ctxs[gi]
        ctx_mask[p, :n] = 0.0
    attn_inv = np.where(a_inv >= 0, a_inv, (Na - 1) * ca)
    # New tokens: each sees its own sequence's new tokens up to itself.
    same = seq_of[:, None] == seq_of[None, :]
    causal = np.arange(T)[:, None] >= np.arange(T)[None, :]
    new_mask = np.where(same & causal, 0.0, NEG).astype(np.float32)
    # LoRA pieces: the tokens of each adapter slot (rows of slot -1 map to a piece of none).
    slots = np.asarray(batch.token_slots, dtype=np.int64)
    uniq = [int(u) for u in np.unique(slots) if u >= 0]
    l_groups = [np.nonzero(slots == u)[0].tolist() for u in uniq]
    l_index, l_inv, l_owner = _pieces(l_groups, T)
    c = l_index.shape[1]
    Np = len(l_owner) + 1
    lora_index = np.zeros((Np, c), np.int64)
    lora_index[: Np - 1] = l_index
    lora_slot = np.asarray([uniq[g] for g in l_owner] + [-1], dtype=np.int64)
    lora_inv = np.where(l_inv >= 0, l_inv, (Np - 1) * c)
    # Pages per LoRA layer: the most any of the step's adapters has there (0: none targets it).
    n_l = len(pool.layer_names)
    layer_ranks = np.zeros((1 + len(uniq), n_l), np.int64)
    for i, u in enumerate(uniq):
        layer_ranks[1 + i] = pool.resident_at(u).ranks
    layer_pages = -(-layer_ranks.max(0) // pool.page_rows)
    rank_cols = np.arange(max(int(layer_pages.max()), 1) * pool.page_rows, dtype=np.int64)

    def t(a):
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    out = StepInputs(
        input_ids=t(np.asarray(batch.token_ids, dtype=np.int64)),
        positions=t(np.asarray(batch.positions, dtype=np.int64)),
        sample_rows=t(rows),
        attn_index=t(attn_index),
        attn_inv=t(attn_inv),
        ctx_index=t(ctx_index),
        ctx_mask=t(ctx_mask),
        new_mask=t(new_mask),
        lora_index=t(lora_index),
        lora_inv=t(lora_inv),
        lora_slot=t(lora_slot),
        rank_cols=t(rank_cols),
        layer_pages=t(layer_pages),
    )
    if kv is not None:
        out["k_cache"] = kv.k.view(num_layers, -1, kv_heads, head_dim)
        out["v_cache"] = kv.v.view(num_layers, -1, kv_heads, head_dim)
    else:
        z = torch.zeros(num_layers, 1, kv_heads, head_dim, dtype=dtype, device=device)
        out["k_cache"], out["v_cache"] = z, z
    return out


def pool_inputs(pool: AdapterPool) -> dict[str, torch.Tensor]:
    out = {"page_table": pool.page_table, "ranks": pool.ranks, "scales": pool.scales}
    for i, t in enumerate(pool.a_pages):
        out[f"a_pages.{i}"] = t
    for i, t in enumerate(pool.b_pages):
        out[f"b_pages.{i}"] = t
    return out


def write_new_kv(plan: AttentionPlan, new_k: torch.Tensor, new_v: torch.Tensor) -> None:
    """This step's K/V [L, T, KVH, D] into the paged cache at plan.slot_mapping."""
    kv = plan.kv
    if kv is None or plan.slot_mapping is None:
        return
    L, _, KVH, D = new_k.shape
    kv.k.view(L, -1, KVH, D).index_copy_(1, plan.slot_mapping, finite_or_zero(new_k))
    kv.v.view(L, -1, KVH, D).index_copy_(1, plan.slot_mapping, finite_or_zero(new_v))


class OrtModelRunner(ModelRunner):
    """The backbone as an ORT session over the AdapterPool's tensors and the paged KV cache."""

    backend = "onnxruntime"

    def __init__(
        self,
        model: torch.nn.Module,
        config: ExecutorConfig,
        *,
        max_batch_size: int,
        fingerprint: str,
        threads: int = 0,
    ):
        import onnxruntime as ort

        self.model = model
        param = next(model.parameters())
        self.device = param.device
        self.dtype = param.dtype
        if self.dtype != torch.float32:
            raise ValueError(f"the onnxruntime backend serves float32 only (dtype {config.dtype})")
        # The torch model keeps its multi-LoRA wrappers: training (and anything else that runs
        # the torch modules) reads the same pool through the same context.
        self.ctx = LoraContext()
        self.layer_shapes = layer_shapes = inject_lora(model, self.ctx)
        self.pool = adapter_pool(layer_shapes, config, device=self.device, dtype=self.dtype)
        self.ctx.pool = self.pool
        self.dense_kernels = "onnxruntime"
        self.kernel_backend = "onnxruntime"
        cfg = model.config
        self.num_layers = int(cfg.num_hidden_layers)
        heads = int(cfg.num_attention_heads)
        self.kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
        self.vocab_size = int(cfg.vocab_size)
        self.path, self.exported = ensure_export(
            model, model_dir=Path(config.model_dir), fingerprint=fingerprint, pool=self.pool
        )
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        # No spinning threads after a run: on shared CPUs they take the cores from the step's
        # other work (the sampler, the torch runner in a benchmark's interleaved rounds).
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            str(self.path), so, providers=ort_providers(self.device)
        )
        self.provider = self.session.get_providers()[0]
        self._ort_device = "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"
        if self._ort_device == "cpu" and self.device.type != "cpu":
            raise ValueError(
                f"onnxruntime has no CUDA provider here (got {self.provider}); the backbone is "
                f"on {self.device}: run it on the CPU (--device cpu) or install CUDA for ORT"
            )
        self._names = input_names(len(self.pool.layer_names))
        self._binding = self.session.io_binding()
        # The pool's tensors never move (preallocated): bound once, by pointer.
        for name, t in pool_inputs(self.pool).items():
            self._bind(name, t)
        logger.info("onnxruntime runner: %s (%s)", self.provider, self.path)

    def _bind(self, name: str, t: torch.Tensor, *, output: bool = False) -> torch.Tensor:
        """Bind t (input or output) by pointer; returns what must stay alive for the run."""
        if not t.is_contiguous():
            raise ValueError(f"input {name} is not contiguous")
        # An empty tensor has no data pointer, which IOBinding refuses: point it at a
        # 1-element buffer (nothing is read or written there).
        buf = torch.empty(1, dtype=t.dtype, device=t.device) if t.numel() == 0 else t
        bind = self._binding.bind_output if output else self._binding.bind_input
        bind(name, self._ort_device, t.device.index or 0, _NP[t.dtype], list(t.shape),
             buf.data_ptr())  # fmt: skip
        return buf

    def describe(self) -> str:
        return f"onnxruntime:{self.provider}"

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """One forward of one packed row; logits [len(sample_rows) or T, vocab]."""
        inputs = step_inputs(
            batch,
            self.pool,
            num_layers=self.num_layers,
            kv_heads=self.kv_heads,
            head_dim=self.head_dim,
            device=self.device,
        )
        T = len(batch.token_ids)
        S = inputs["sample_rows"].shape[0]
        logits = torch.empty(S, self.vocab_size, dtype=self.dtype, device=self.device)
        new_k = torch.empty(
            self.num_layers, T, self.kv_heads, self.head_dim, dtype=self.dtype, device=self.device
        )
        new_v = torch.empty_like(new_k)
        keep = [self._bind(name, t) for name, t in inputs.items()]
        for name, t in zip(OUTPUT_NAMES, (logits, new_k, new_v), strict=True):
            keep.append(self._bind(name, t, output=True))
        if self._ort_device == "cuda":
            torch.cuda.synchronize(self.device)
        self.session.run_with_iobinding(self._binding)
        del keep
        write_new_kv(batch.plan, new_k, new_v)
        return logits
