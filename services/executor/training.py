"""Training personal adapters on the resident backbone (no second copy of the base).

A TrainingRun holds one LoRA (rank, alpha, target modules) as fp32 master weights, their
gradients and AdamW state. `Trainer.forward_backward` takes the calls of several runs that are
ready together and runs them through ONE forward/backward over the shared base: rows are grouped
by run and every MultiLoraLinear adds each run's delta over its own segment of the rows
(kernels/train_ops.py: the LoRA op with a backward), the way a serving batch mixes adapters; the
backbone is frozen (its packed Linears pass gradients to their inputs only). Each run's
gradients are exactly those it gets alone (the segments do not touch each other).

Loss functions, with Tinker's semantics (per datum, over its positions t; the model input's
logits at t predict target_tokens[t]; lp_t = log p(target_tokens[t])):

    cross_entropy        loss = -sum_t weights_t * lp_t
    importance_sampling  loss = -sum_t exp(lp_t - logprobs_t) * advantages_t
    ppo                  loss = -sum_t min(r_t * A_t, clip(r_t, low, high) * A_t),
                         r_t = exp(lp_t - logprobs_t), low/high = clip_low/high_threshold
                         (default 0.8 / 1.2)
    reverse_kl           loss = sum_t weights_t * KL(p_t || q_t), p_t / q_t = softmax of the
                         student's / a reference's logits at t over `temperature` (default 1):
                         distillation toward a reference revision (MinT's
                         forward_backward_reverse_kl); its per-position output is the
                         position's loss, not a logprob

The call's loss is the sum over its data; outputs: per datum `logprobs` (lp_t), metrics
`loss:sum`. `optim_step` applies AdamW (torch.optim.AdamW semantics, Tinker's AdamParams:
learning_rate, beta1, beta2, eps, weight_decay, grad_clip_norm) to the gradients accumulated since
the last step.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from mintmesh.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    TrainingRunNotFound,
)
from mintmesh.kernels.dense import YieldPoints, yield_points
from mintmesh.kernels.train_ops import target_logprobs
from mintmesh.peft_io import TRAINING_STATE_FORMAT as STATE_FORMAT
from mintmesh.peft_io import training_state_metadata
from mintmesh.services.executor.passing import on_a_passing_thread

logger = logging.getLogger(__name__)

LOSSES = ("cross_entropy", "importance_sampling", "ppo", "reverse_kl")
# Tensors each loss needs besides target_tokens.
_NEEDS = {
    "cross_entropy": ("weights",),
    "importance_sampling": ("logprobs", "advantages"),
    "ppo": ("logprobs", "advantages"),
    "reverse_kl": ("weights",),
}


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    # Module leaf names (q_proj, ...): every Linear of the backbone with that name is trained.
    targets: tuple[str, ...]

    def validate(self, max_rank: int, trainable: Sequence[str]) -> None:
        if not 1 <= self.rank <= max_rank:
            raise InvalidArgument(f"rank={self.rank} must be in [1, {max_rank}]")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise InvalidArgument(f"alpha={self.alpha} must be a number > 0")
        if not self.targets:
            raise InvalidArgument("targets is empty: name at least one module (e.g. q_proj)")
        bad = sorted(set(self.targets) - set(trainable))
        if bad:
            raise InvalidArgument(f"targets {bad} are not trainable here; choose from {trainable}")


FP32_MAX = 3.4028234663852886e38
FP32_TINY = 1.1754943508222875e-38


@dataclass(frozen=True)
class AdamParams:
    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0

    def validate(self) -> None:
        def finite(name, v):
            # The master weights and optimizer state are fp32: a value past its range would
            # overflow inside the step (and one below its smallest normal is zero there).
            if not math.isfinite(v) or abs(v) > FP32_MAX:
                raise InvalidArgument(
                    f"adam_params.{name}={v} is not a finite number within fp32's range"
                )

        for name in ("learning_rate", "beta1", "beta2", "eps", "weight_decay", "grad_clip_norm"):
            finite(name, getattr(self, name))
        if self.learning_rate <= 0:
            raise InvalidArgument(f"adam_params.learning_rate={self.learning_rate} must be > 0")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise InvalidArgument(f"adam_params.{name}={getattr(self, name)} must be in [0, 1)")
        if self.eps < FP32_TINY or self.weight_decay < 0 or self.grad_clip_norm < 0:
            raise InvalidArgument(
                f"adam_params: eps must be >= {FP32_TINY:.4g} (fp32's smallest normal), "
                "weight_decay and grad_clip_norm >= 0 (got "
                f"eps={self.eps}, weight_decay={self.weight_decay}, "
                f"grad_clip_norm={self.grad_clip_norm})"
            )
        if self.learning_rate * self.weight_decay > FP32_MAX:
            raise InvalidArgument(
                f"adam_params: learning_rate * weight_decay = "
                f"{self.learning_rate * self.weight_decay:.4g} overflows fp32"
            )


@dataclass
class Datum:
    """One sequence: the model's input tokens and, per position, what the loss needs."""

    input_ids: list[int]
    target_tokens: list[int]
    weights: list[float] | None = None
    logprobs: list[float] | None = None
    advantages: list[float] | None = None
    # reverse_kl: the reference's log-probabilities [len(input_ids), vocab] at the loss's
    # temperature, aligned with input_ids (rows of zero-weight positions are not read).
    reference_logprobs: torch.Tensor | None = None


@dataclass
class TrainingState:
    """A run's saved state (TrainingRun.state_bytes parsed): its LoRA spec, fp32 weights per
    layer, AdamW moments (exp_avg, exp_avg_sq, step) per parameter ("<layer>.A"/".B")."""

    spec: LoraSpec
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    moments: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    steps: int = 0
    last_loss: float | None = None
    data_digest: str = ""

    @classmethod
    def parse(cls, data: bytes) -> TrainingState:
        from safetensors import SafetensorError
        from safetensors.torch import load

        meta = training_state_metadata(data)
        try:
            tensors = load(bytes(data))
        except SafetensorError as e:
            raise InvalidArgument(f"the training state does not parse: {e}") from None
        try:
            spec = LoraSpec(
                int(meta["rank"]), float(meta["alpha"]), tuple(json.loads(meta["targets"]))
            )
            steps = int(meta.get("steps", "0"))
            adam_steps = json.loads(meta.get("adam_steps", "{}"))
            last = meta.get("last_loss", "")
            last_loss = float(last) if last else None
        except (KeyError, ValueError, TypeError) as e:
            raise InvalidArgument(f"the training state's metadata is bad: {e}") from None
        weights: dict[str, list] = {}
        moments = {}
        for key, t in tensors.items():
            kind, _, rest = key.partition("/")
            layer, _, which = rest.rpartition(".")
            if kind == "weight" and which in ("A", "B"):
                weights.setdefault(layer, [None, None])["AB".index(which)] = t.float()
            elif kind == "exp_avg" and rest in adam_steps:
                moments[rest] = (t, tensors[f"exp_avg_sq/{rest}"], float(adam_steps[rest]))
        if any(a is None or b is None for a, b in weights.values()):
            raise InvalidArgument("the training state lacks an A or B weight")
        return cls(
            spec=spec,
            weights={k: (a, b) for k, (a, b) in weights.items()},
            moments=moments,
            steps=steps,
            last_loss=last_loss,
            data_digest=meta.get("data_digest", ""),
        )

    @classmethod
    def from_packed(cls, packed: bytes) -> TrainingState:
        """A served revision (packed adapter) as a starting point: its weights in fp32, no
        optimizer state. Its modules must share one rank and scale (one LoRA spec)."""
        from mintmesh.packed import unpack

        header, modules = unpack(packed, copy=True)
        if not modules:
            raise InvalidArgument("the revision has no LoRA modules")
        ranks = {mw.rank for mw in modules.values()}
        scales = {round(mw.scale, 9) for mw in modules.values()}
        if len(ranks) != 1 or len(scales) != 1:
            raise InvalidArgument(
                "the revision's modules have different ranks or scales (a merge or a "
                "rank_pattern upload): training from it needs one rank and alpha"
            )
        (rank,) = ranks
        mw0 = next(iter(modules.values()))
        spec = LoraSpec(rank, float(mw0.scale) * rank, tuple(header.target_modules))
        weights = {n: (mw.A.float().clone(), mw.B.float().contiguous().clone())
                   for n, mw in modules.items()}  # fmt: skip
        return cls(spec=spec, weights=weights, moments={})


@dataclass
class CallResult:
    loss: float
    logprobs: list[list[float]]  # per datum, per position
    metrics: dict[str, float] = field(default_factory=dict)


class TrainingRun:
    """One run's LoRA: fp32 A [r, in] and B [out, r] per targeted layer, AdamW state."""

    def __init__(
        self,
        run_id: str,
        tenant: str,
        spec: LoraSpec,
        layer_shapes: Mapping[str, tuple[int, int]],
        *,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        self.run_id, self.tenant, self.spec = run_id, tenant, spec
        self.scale = float(spec.alpha) / spec.rank
        gen = torch.Generator().manual_seed(seed)
        self.layers: dict[str, tuple[nn.Parameter, nn.Parameter]] = {}
        for name, (out_f, in_f) in sorted(layer_shapes.items()):
            if name.rsplit(".", 1)[-1] not in spec.targets:
                continue
            # peft's default init: A ~ kaiming-uniform(a=sqrt(5)), B = 0 (the run starts as the
            # base model).
            a = torch.empty(spec.rank, in_f)
            bound = 1.0 / math.sqrt(in_f)  # kaiming_uniform_ with a=sqrt(5) on fan_in = in_f
            a.uniform_(-bound, bound, generator=gen)
            self.layers[name] = (
                nn.Parameter(a.to(device)),
                nn.Parameter(torch.zeros(out_f, spec.rank, device=device)),
            )
        # foreach: the same update, bit for bit, in a few ops over all the run's tensors
        # (torch's CPU default is one loop of ops per tensor: 64 tensors on the bench's run).
        self.optimizer = torch.optim.AdamW(self.parameters(), lr=1e-4, foreach=True)
        self.steps = 0
        self.has_grads = False
        self.last_loss: float | None = None
        # sha256 over every token trained on, in order (the revision's data digest); a run
        # resumed from a revision chains on from that revision's digest.
        self.data_hash = hashlib.sha256()
        # forward_backward calls of this run under way (Trainer.quiet waits for none).
        self.active = 0
        # When a call last looked the run up or ended (time.monotonic), and the calls of it
        # waiting in the training queue: idle expiry (Trainer.expire_idle) spares a run with
        # either under way.
        self.last_used = time.monotonic()
        self.queued = 0
        # The revision its next save descends from (the router's: from_ref resolved, then each
        # save's ref), kept here so that a router that restarted finds it again.
        self.parent_ref = ""

    def chain_data_digest(self, parent_digest: str) -> None:
        """Start the data digest from a parent's: the digest then covers every token of the
        lineage (sha256(parent digest, then this run's tokens))."""
        self.data_hash = hashlib.sha256(parent_digest.encode("ascii"))

    def parameters(self) -> list[nn.Parameter]:
        return [p for pair in self.layers.values() for p in pair]

    def numel(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def bytes(self) -> int:
        """fp32 weights, gradients and AdamW's two moments."""
        return 16 * self.numel()

    def load_weights(self, weights: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Set A and B of every layer (e.g. from a revision); the optimizer state is kept."""
        missing = sorted(set(self.layers) - set(weights))
        if missing:
            raise InvalidArgument(f"weights for {len(missing)} layers missing, e.g. {missing[0]}")
        with torch.no_grad():
            for name, (a, b) in self.layers.items():
                wa, wb = weights[name]
                if tuple(wa.shape) != tuple(a.shape) or tuple(wb.shape) != tuple(b.shape):
                    raise InvalidArgument(
                        f"{name}: A {list(wa.shape)} / B {list(wb.shape)} do not fit the run's "
                        f"{list(a.shape)} / {list(b.shape)}"
                    )
                a.copy_(wa)
                b.copy_(wb)

    def weights(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {n: (a.detach().clone(), b.detach().clone()) for n, (a, b) in self.layers.items()}

    def peft_bytes(self) -> tuple[str, bytes]:
        """(adapter_config.json, safetensors) of the run's LoRA, as peft's save_pretrained
        writes them: what the store takes as a new revision."""
        from safetensors.torch import save

        from mintmesh.synth import synth_config

        tensors = {}
        for name, (a, b) in self.layers.items():
            tensors[f"base_model.model.{name}.lora_A.weight"] = a.detach().cpu().contiguous()
            tensors[f"base_model.model.{name}.lora_B.weight"] = b.detach().cpu().contiguous()
        cfg = synth_config(self.spec.rank, float(self.spec.alpha), tuple(self.spec.targets))
        return json.dumps(cfg), save(tensors)

    def _lora(self, base_fingerprint: str) -> tuple[dict, dict]:
        """(layers, the rest of peft_io.pack_lora's / lora_layout's arguments) of the run."""
        layers = {n: (a.detach(), b.detach()) for n, (a, b) in self.layers.items()}
        return layers, dict(
            rank=self.spec.rank,
            alpha=float(self.spec.alpha),
            targets=self.spec.targets,
            base_fingerprint=base_fingerprint,
        )

    def packed(self, base_fingerprint: str):
        """The run's LoRA packed as the store packs its PEFT files (same bytes, same digest),
        straight from the weights (peft_io.pack_lora): what the executor serves."""
        from mintmesh.peft_io import pack_lora

        layers, kw = self._lora(base_fingerprint)
        return pack_lora(layers, **kw)

    def install(self, engine) -> tuple[str, bool]:
        """The run's LoRA made servable on engine at once (adapter-only handoff): packed as the
        store will pack its PEFT files (the same digest), written straight into the host tier
        and loaded into free device room. (digest, resident)."""
        from mintmesh.peft_io import check_finite_pack, lora_layout

        layers, kw = self._lora(engine.base_fingerprint)
        layout, _ = lora_layout(layers, **kw)
        return engine.install_layout(layout, lambda buf: check_finite_pack(buf, layout, layers))

    def state_bytes(self) -> bytes:
        """The run's training state as a safetensors file: fp32 master weights and AdamW's
        moments and step per parameter, with the run's spec, steps, last loss and data digest
        in the metadata. Pending gradients (a forward_backward with no optim_step after it)
        are not part of it. load_state of these bytes resumes the run exactly."""
        from safetensors.torch import save

        tensors: dict[str, torch.Tensor] = {}
        adam_steps: dict[str, float] = {}
        for name, pair in self.layers.items():
            for which, p in zip("AB", pair, strict=True):
                key = f"{name}.{which}"
                tensors[f"weight/{key}"] = p.detach().cpu().contiguous()
                st = self.optimizer.state.get(p)
                if st:
                    tensors[f"exp_avg/{key}"] = st["exp_avg"].detach().cpu().contiguous()
                    tensors[f"exp_avg_sq/{key}"] = st["exp_avg_sq"].detach().cpu().contiguous()
                    adam_steps[key] = float(st["step"])
        meta = {
            "format": STATE_FORMAT,
            "rank": str(self.spec.rank),
            "alpha": repr(float(self.spec.alpha)),
            "targets": json.dumps(list(self.spec.targets)),
            "steps": str(self.steps),
            "last_loss": "" if self.last_loss is None else repr(self.last_loss),
            "data_digest": self.data_hash.hexdigest(),
            "adam_steps": json.dumps(adam_steps, sort_keys=True),
        }
        return save(tensors, metadata=meta)

    def load_state(self, state: TrainingState, *, optimizer: bool) -> None:
        """Set the run's weights (and, with optimizer, AdamW's moments, its step count and the
        run's steps) from a saved state; the gradients are cleared."""
        self.load_weights(state.weights)
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer.state.clear()
        self.has_grads = False
        self.chain_data_digest(state.data_digest)
        if not optimizer:
            return
        self.steps = state.steps
        self.last_loss = state.last_loss
        for name, pair in self.layers.items():
            for which, p in zip("AB", pair, strict=True):
                key = f"{name}.{which}"
                if key not in state.moments:
                    continue
                m, v, step = state.moments[key]
                self.optimizer.state[p] = {
                    "step": torch.tensor(step, dtype=torch.float32),
                    "exp_avg": m.to(p.device, torch.float32).clone(),
                    "exp_avg_sq": v.to(p.device, torch.float32).clone(),
                }

    def optim_step(self, adam: AdamParams) -> dict[str, float]:
        adam.validate()
        if not self.has_grads:
            raise FailedPrecondition(
                f"optim_step on run {self.run_id} with no gradients: call forward_backward first"
            )
        metrics: dict[str, float] = {}
        if adam.grad_clip_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.parameters(), adam.grad_clip_norm)
            metrics["grad_norm:mean"] = float(norm)
        for g in self.optimizer.param_groups:
            g.update(
                lr=adam.learning_rate,
                betas=(adam.beta1, adam.beta2),
                eps=adam.eps,
                weight_decay=adam.weight_decay,
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.has_grads = False
        self.steps += 1
        return metrics


class TrainBatch:
    """What the LoRA layers read during one training forward: per layer, the segments of the
    runs that train it (bounds over the flattened rows, scales, (A, B))."""

    def __init__(self, segments: Sequence[tuple[TrainingRun, int, int]]) -> None:
        self._layers: dict[str, tuple[list, list, list]] = {}
        for run, start, end in segments:
            for name, pair in run.layers.items():
                bounds, scales, weights = self._layers.setdefault(name, ([], [], []))
                bounds.append((start, end))
                scales.append(run.scale)
                weights.append(pair)

    def layer(self, name: str):
        return self._layers.get(name)


def _finite(name: str, xs: Sequence[float], i: int) -> None:
    if not all(math.isfinite(x) for x in xs):
        raise InvalidArgument(f"data[{i}].{name} holds a value that is not finite")


class Trainer:
    """The runs of one executor and the batched forward/backward over its resident model."""

    def __init__(
        self,
        model: nn.Module,
        ctx,
        layer_shapes: Mapping[str, tuple[int, int]],
        *,
        vocab_size: int,
        max_positions: int,
        max_rank: int = 128,
        max_bytes: int = 256 << 20,
        lock: threading.Lock | None = None,
        device: torch.device | str = "cpu",
        micro_tokens: int = 64,
        yield_fn=None,
        busy_fn=None,
        slice_s: float = 0.01,
        idle_s: float = 0.0,
    ) -> None:
        self.model, self.ctx = model, ctx
        # A run no call has touched for idle_s is dropped (expire_idle; 0 = never): whoever
        # made it (a client, a gateway) may have died without dropping it.
        self.idle_s = float(idle_s)
        self._expired: dict[str, tuple[str, float]] = {}  # run id -> (tenant, idle s), bounded
        self.expired_runs = 0
        # While busy_fn(): a forward/backward holds the model lock for at most about slice_s
        # at a time, then lets a serving step run at the next layer boundary (forward: after
        # a decoder layer or the LM head; backward: when a layer's output gradient is done).
        self.slice_s = slice_s
        # Within one backbone GEMM longer than that (the LM head's), a yield point every
        # piece_macs multiply-adds (kernels/dense.py's pieces of rows).
        self.piece_macs = YieldPoints.piece_macs
        self._slicer: _Slicer | None = None
        self.yields = 0
        self.longest_slice_s = 0.0
        # Hooked only while a training chunk runs (_Slicer): serving steps otherwise pay nothing.
        self._points = _slice_points(model)
        # While busy_fn() (sequences being served): padded tokens per forward/backward under the
        # lock, and what to call before each (the engine: let a serving step run).
        self.micro_tokens = micro_tokens
        self.yield_fn = yield_fn
        self.busy_fn = busy_fn
        self.layer_shapes = dict(layer_shapes)
        self.trainable = sorted({n.rsplit(".", 1)[-1] for n in layer_shapes})
        self.vocab_size, self.max_positions = vocab_size, max_positions
        self.max_rank, self.max_bytes = max_rank, max_bytes
        self.lock = lock or threading.Lock()
        self.device = torch.device(device)
        self.runs: dict[str, TrainingRun] = {}
        self._runs_lock = threading.Lock()
        self._idle = threading.Condition()
        self.tokens_trained = 0
        # The backbone is frozen: autograd tracks only the runs' LoRA weights.
        for p in model.parameters():
            p.requires_grad_(False)

    def bytes_used(self) -> int:
        with self._runs_lock:
            return sum(r.bytes() for r in self.runs.values())

    def create_run(
        self,
        run_id: str,
        tenant: str,
        spec: LoraSpec,
        *,
        seed: int = 0,
        init: TrainingState | None = None,
        optimizer: bool = False,
        replace: bool = False,
    ):
        """A new run: a fresh LoRA of spec, or (init) one that starts from a saved state or
        revision, whose spec it takes; with optimizer, its AdamW state and steps too (init must
        hold them). replace: an existing run of this id is replaced (load_state)."""
        if init is not None:
            spec = init.spec
            if optimizer and not init.moments:
                raise FailedPrecondition(
                    "the revision holds no optimizer state (save it with save_state, or load "
                    "its weights only)"
                )
        spec.validate(self.max_rank, self.trainable)
        run = TrainingRun(run_id, tenant, spec, self.layer_shapes, seed=seed, device=self.device)
        if init is not None:
            extra = sorted(set(init.weights) - set(run.layers))
            if extra:
                raise InvalidArgument(
                    f"the revision has {len(extra)} modules this base does not train, e.g. "
                    f"{extra[0]}"
                )
            run.load_state(init, optimizer=optimizer)
        self.expire_idle()
        with self._runs_lock:
            old = self.runs.get(run_id)
            if old is not None and not replace:
                raise AlreadyExists(f"training run {run_id!r} exists already")
            if old is not None and old.tenant != tenant:
                raise InvalidArgument(f"training run {run_id!r} belongs to another tenant")
            used = sum(r.bytes() for r in self.runs.values() if r is not old)
            if used + run.bytes() > self.max_bytes:
                raise ResourceExhausted(
                    f"training memory of this executor is full: run {run_id!r} needs "
                    f"{run.bytes()} bytes (weights, gradients, AdamW state), {used} of "
                    f"{self.max_bytes} are held by {len(self.runs)} runs",
                    retry_after_s=5.0,
                )
            self.runs[run_id] = run
            self._expired.pop(run_id, None)
        return run

    @contextlib.contextmanager
    def quiet(self, run: TrainingRun):
        """The model lock, at a moment when no forward_backward of run is under way (one lets
        go of the lock between its slices and micro-batches: an optim_step or a save then would
        see half a batch's gradients)."""
        while True:
            with self._idle:
                self._idle.wait_for(lambda: run.active == 0)
            self.lock.acquire()
            if run.active == 0:
                break
            self.lock.release()
        try:
            yield
        finally:
            run.last_used = time.monotonic()  # an optim_step or a save: idle from its end
            self.lock.release()

    def drop_run(self, run_id: str) -> None:
        with self._runs_lock:
            self.runs.pop(run_id, None)
            self._expired.pop(run_id, None)

    def expire_idle(self, now: float | None = None) -> list[str]:
        """Drop the runs that no call has touched for idle_s (none under way); their ids."""
        if self.idle_s <= 0:
            return []
        now = time.monotonic() if now is None else now
        with self._runs_lock:
            gone = [r for r in self.runs.values() if self._overdue(r, now)]
            for r in gone:
                self._forget(r, now)
        for r in gone:
            logger.info(
                "training run %s (tenant %r): no call for %.0f s (training_run_idle_s %.0f): "
                "dropped, %d bytes freed", r.run_id, r.tenant, now - r.last_used, self.idle_s,
                r.bytes(),
            )  # fmt: skip
        return [r.run_id for r in gone]

    def _forget(self, r: TrainingRun, now: float) -> None:
        """(under _runs_lock) r dropped for idleness; its id remembered (bounded) for the
        error its next call gets."""
        del self.runs[r.run_id]
        self._expired[r.run_id] = (r.tenant, now - r.last_used)
        self.expired_runs += 1
        while len(self._expired) > 4096:
            del self._expired[next(iter(self._expired))]

    def _overdue(self, r: TrainingRun, now: float) -> bool:
        """(under _runs_lock) r has had no call, running or queued, for idle_s."""
        return (
            self.idle_s > 0 and r.active == 0 and r.queued == 0 and now - r.last_used > self.idle_s
        )

    def run(self, run_id: str, *, queue: bool = False) -> TrainingRun:
        """The run (its idle clock restarted); queue: a call of it now waits in the training
        queue (dequeued() when it leaves). TrainingRunNotFound when there is none, or when it
        is overdue for idle expiry (dropped now, as the sweep would)."""
        now = time.monotonic()
        with self._runs_lock:
            run = self.runs.get(run_id)
            if run is not None and self._overdue(run, now):
                self._forget(run, now)
                run = None
            if run is not None:
                run.last_used = now
                run.queued += 1 if queue else 0
                return run
            expired = self._expired.get(run_id)
        meta = {"run_id": run_id}
        if expired is not None:
            raise TrainingRunNotFound(
                f"training run {run_id!r} was dropped after {expired[1]:.0f} s without a call "
                f"(this executor's training_run_idle_s is {self.idle_s:.0f}); start it again "
                "from its last saved state",
                metadata=meta,
            )
        raise TrainingRunNotFound(f"no training run {run_id!r} on this executor", metadata=meta)

    def dequeued(self, run: TrainingRun) -> None:
        with self._runs_lock:
            run.queued -= 1
            run.last_used = time.monotonic()

    # -- forward / backward ----------------------------------------------------------------------

    def _check(self, d: Datum, loss_fn: str, i: int) -> None:
        n = len(d.input_ids)
        if n == 0:
            raise InvalidArgument(f"data[{i}].model_input is empty")
        if n > self.max_positions:
            raise InvalidArgument(
                f"data[{i}] has {n} tokens; the model holds {self.max_positions} positions"
            )
        for what, ids in (("model_input", d.input_ids), ("target_tokens", d.target_tokens)):
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidArgument(
                    f"data[{i}].{what} has token id {bad[0]}, outside the vocabulary "
                    f"(size {self.vocab_size})"
                )
        if len(d.target_tokens) != n:
            raise InvalidArgument(
                f"data[{i}].target_tokens has {len(d.target_tokens)} entries for {n} input tokens"
            )
        for name in _NEEDS[loss_fn]:
            xs = getattr(d, name)
            if xs is None:
                raise InvalidArgument(f"data[{i}].{name} is needed by loss {loss_fn!r}")
            if len(xs) != n:
                raise InvalidArgument(
                    f"data[{i}].{name} has {len(xs)} entries for {n} input tokens"
                )
            _finite(name, xs, i)
        if loss_fn == "reverse_kl":
            ref = d.reference_logprobs
            if ref is None:
                raise InvalidArgument(f"data[{i}].reference_input is needed by loss 'reverse_kl'")
            if tuple(ref.shape) != (n, self.vocab_size):
                raise InvalidArgument(
                    f"data[{i}].reference logprobs have shape {list(ref.shape)}, not "
                    f"[{n}, {self.vocab_size}]"
                )

    def check_call(
        self, run_id: str, data: Sequence[Datum], loss_fn: str, *, queue: bool = False
    ) -> TrainingRun:
        """A forward_backward call's input checked (InvalidArgument naming the field); its run
        (queue: counted as queued, see run())."""
        if loss_fn not in LOSSES:
            raise InvalidArgument(f"loss_fn {loss_fn!r} is not one of {list(LOSSES)}")
        if not data:
            raise InvalidArgument("data is empty: give at least one datum")
        for i, d in enumerate(data):
            self._check(d, loss_fn, i)
        return self.run(run_id, queue=queue)

    def forward_backward(
        self,
        calls: Sequence[tuple[str, Sequence[Datum], str, Mapping[str, float] | None]],
        *,
        forward_only: bool = False,
        runs: Sequence[TrainingRun] | None = None,
    ) -> list[CallResult]:
        """(run_id, data, loss_fn, loss_fn_config) calls, in one forward (and backward): each
        run's gradients accumulate on its weights. Results in the calls' order. runs: the
        calls' runs, when they were checked and looked up already (the queue checks at
        submit); else each call is checked here."""
        if not calls:
            raise InvalidArgument("no calls")
        if runs is not None:
            runs = list(runs)
        else:
            runs = [self.check_call(run_id, data, fn) for run_id, data, fn, _ in calls]
        with self._idle:
            for run in runs:
                run.active += 1
        try:
            return self._forward_backward(calls, runs, forward_only)
        finally:
            done = time.monotonic()
            with self._idle:
                for run in runs:
                    run.active -= 1
                    run.last_used = done  # idle from the end of its call, not its start
                self._idle.notify_all()

    def _forward_backward(self, calls, runs, forward_only: bool) -> list[CallResult]:
        # Rows grouped by run: each run one contiguous segment of the batch.
        order = sorted(range(len(calls)), key=lambda c: (runs[c].run_id, c))
        rows: list[tuple[int, int]] = []  # (call, datum) per batch row
        for c in order:
            rows += [(c, i) for i in range(len(calls[c][1]))]
        # While there are sequences to serve (busy_fn), micro-batches of at most micro_tokens
        # (padded) tokens, each a forward and backward of its own under the model lock, and a
        # serving step before each (yield_fn): the loss is a sum over data, so the gradients
        # add up to the whole batch's. Otherwise the whole batch in one pass.
        losses = [0.0] * len(calls)
        per: dict[tuple[int, int], list[float]] = {}
        k = 0
        while k < len(rows):
            busy = self.busy_fn is not None and self.busy_fn()
            if busy and self.yield_fn is not None:
                self.yield_fn()
            budget = self.micro_tokens if busy else float("inf")
            chunk, longest = [], 0
            while k < len(rows):
                n = len(calls[rows[k][0]][1][rows[k][1]].input_ids)
                if chunk and max(longest, n) * (len(chunk) + 1) > budget:
                    break
                chunk.append(rows[k])
                longest = max(longest, n)
                k += 1
            self._run_chunk(calls, runs, chunk, losses, per, forward_only)
        results = [
            CallResult(
                loss=losses[c],
                logprobs=[per[(c, i)] for i in range(len(calls[c][1]))],
                metrics={"loss:sum": losses[c]},
            )
            for c in range(len(calls))
        ]
        if not forward_only:
            for c, run in enumerate(runs):
                run.has_grads = True
                run.last_loss = results[c].loss
                n = sum(len(d.input_ids) for d in calls[c][1])
                for d in calls[c][1]:
                    run.data_hash.update(json.dumps(d.input_ids).encode())
                self.tokens_trained += n
        return results

    def _run_chunk(self, calls, runs, rows, losses, per, forward_only) -> None:
        T = max(len(calls[c][1][i].input_ids) for c, i in rows)
        ids = torch.zeros(len(rows), T, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.long)
        for r, (c, i) in enumerate(rows):
            x = calls[c][1][i].input_ids
            ids[r, : len(x)] = torch.tensor(x)
            mask[r, : len(x)] = 1
        segments: list[tuple[TrainingRun, int, int]] = []
        r = 0
        while r < len(rows):
            run = runs[rows[r][0]]
            e = r
            while e < len(rows) and runs[rows[e][0]] is run:
                e += 1
            segments.append((run, r * T, e * T))
            r = e
        with _Slicer(self) as sl, yield_points(sl):
            self._slicer = sl
            self.ctx.train = TrainBatch(segments)
            try:
                with torch.set_grad_enabled(not forward_only):
                    logits = self.model(
                        input_ids=ids.to(self.device), attention_mask=mask.to(self.device)
                    ).logits.float()
                    # log p(target) for every position of every row at once (kernels/train_ops:
                    # one logits-sized buffer in the backward; selecting rows of a log-softmax
                    # one by one made autograd zero-fill a tensor of that size per row).
                    tgt = torch.zeros(len(rows), T, dtype=torch.long)
                    for r, (c, i) in enumerate(rows):
                        t = calls[c][1][i].target_tokens
                        tgt[r, : len(t)] = torch.tensor(t)
                    # Its backward writes the gradient over the logits (no second logits-
                    # sized buffer) unless reverse_kl rows read them on their own.
                    kl = any(calls[c][2] == "reverse_kl" for c, _ in rows)
                    lp_all = target_logprobs(logits, tgt.to(logits.device), overwrite=not kl)
                    # A yield point after the vocabulary-sized log p(target): none falls inside
                    # it (the LM head's forward hook yields before it, and the gradient hook it
                    # put on the logits after its backward).
                    sl.point()
                    total = None
                    for r, (c, i) in enumerate(rows):
                        _, data, loss_fn, cfg = calls[c]
                        if loss_fn == "reverse_kl":
                            loss, lp = self._reverse_kl(logits[r], data[i], cfg or {})
                        else:
                            loss, lp = self._loss(lp_all[r], data[i], loss_fn, cfg or {})
                        per[(c, i)] = lp
                        losses[c] += float(loss.detach())
                        total = loss if total is None else total + loss
                    if not forward_only:
                        total.backward()
            finally:
                self.ctx.train = None
                self._slicer = None
                self.yields += sl.yields
                self.longest_slice_s = max(self.longest_slice_s, sl.longest)

    def _after_layer(self, module, args, output) -> None:
        """Forward hook of the slice points: a yield point now (forward) and, through a hook on
        its output, when the backward has computed that output's gradient."""
        sl = self._slicer
        if sl is None or threading.get_ident() != sl.thread:
            return  # a serving step between two slices, or no training forward at all
        out = output[0] if isinstance(output, tuple) else output
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(sl.backward_point)
        sl.point()

    def _reverse_kl(self, logits_row, d: Datum, cfg) -> tuple[torch.Tensor, list[float]]:
        """sum_t w_t * KL(p_t || q_t) over the vocabulary, p the student at temperature, q the
        reference's given log-probabilities; the per-position losses."""
        n = len(d.input_ids)
        tau = float(cfg.get("temperature", 1.0))
        w = torch.tensor(d.weights, dtype=logits_row.dtype, device=logits_row.device)
        used = (w != 0).nonzero()[:, 0]
        per = torch.zeros(n, dtype=logits_row.dtype, device=logits_row.device)
        if len(used):
            lp = torch.log_softmax(logits_row[used] / tau, dim=-1)
            lq = d.reference_logprobs[used.cpu()].to(lp.device, lp.dtype)
            kl = (lp.exp() * (lp - lq)).sum(-1)
            per = per.index_put((used,), w[used] * kl)
        return per.sum(), per.detach().tolist()

    def _loss(self, lp_row, d: Datum, loss_fn: str, cfg) -> tuple[torch.Tensor, list[float]]:
        """One datum's loss (a 0-d tensor in the graph) and its per-position logprobs, from its
        row of log p(target) (padded past its length)."""
        lp = lp_row[: len(d.input_ids)]
        if loss_fn == "cross_entropy":
            w = torch.tensor(d.weights, dtype=lp.dtype, device=lp.device)
            return -(w * lp).sum(), lp.detach().tolist()
        old = torch.tensor(d.logprobs, dtype=lp.dtype, device=lp.device)
        adv = torch.tensor(d.advantages, dtype=lp.dtype, device=lp.device)
        ratio = torch.exp(lp - old)
        if loss_fn == "importance_sampling":
            return -(ratio * adv).sum(), lp.detach().tolist()
        low = float(cfg.get("clip_low_threshold", 0.8))
        high = float(cfg.get("clip_high_threshold", 1.2))
        clipped = ratio.clamp(low, high)
        return -torch.minimum(ratio * adv, clipped * adv).sum(), lp.detach().tolist()


def _slice_points(model: nn.Module) -> list[nn.Module]:
    """The modules after which a training forward/backward may give the model to serving: the
    decoder layers (an HF causal LM's model.layers) and every Linear of the backbone (the LM
    head included; in the backward, before each one's input gradient)."""
    from mintmesh.kernels.dense import PackedLinear

    inner = getattr(model, "model", None)
    points = list(getattr(inner, "layers", []) or [])
    points += [m for m in model.modules() if isinstance(m, nn.Linear | PackedLinear)]
    return points


class _Slicer(YieldPoints):
    """The model lock for one training chunk, held in slices: at each yield point, once the
    slice has lasted slice_s and there are sequences to serve, the lock is let go until a
    serving step has run (the engine's yield_fn), then taken back. Yield points of other
    threads (the serving step running between two slices) do nothing. The packed Linears
    (kernels/dense.py) yield through it too, within a GEMM longer than a slice."""

    def __init__(self, trainer: Trainer) -> None:
        self.lock, self.busy_fn, self.yield_fn = trainer.lock, trainer.busy_fn, trainer.yield_fn
        self.slice_s = trainer.slice_s
        self.piece_macs = trainer.piece_macs
        self.thread = threading.get_ident()
        self.yields = 0
        self.t0 = 0.0
        # The longest the model was held, while there was serving to do, before a yield.
        self.longest = 0.0
        self._trainer = trainer
        self._hooks: list = []

    def __enter__(self) -> _Slicer:
        self.lock.acquire()
        self.t0 = time.monotonic()
        if self.yield_fn is not None:  # nothing to yield to: no yield points
            self._hooks = [
                m.register_forward_hook(self._trainer._after_layer) for m in self._trainer._points
            ]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.lock.release()

    def point(self) -> None:
        if threading.get_ident() != self.thread or self.yield_fn is None:
            return
        if self.busy_fn is None or not self.busy_fn():
            return
        held = time.monotonic() - self.t0
        if held < self.slice_s:
            return
        self.longest = max(self.longest, held)
        self.lock.release()
        try:
            self.yield_fn()
        finally:
            self.lock.acquire()
            self.t0 = time.monotonic()
            self.yields += 1

    def backward_point(self, grad: torch.Tensor) -> None:
        self.point()  # returns None: the gradient is unchanged

    def busy(self) -> bool:
        """Serving waits for the model (on this slicer's thread; elsewhere: no)."""
        if threading.get_ident() != self.thread or self.yield_fn is None:
            return False
        return self.busy_fn is not None and bool(self.busy_fn())

    def unlocked(self, fn):
        """fn() with the model let go (serving steps may run meanwhile): for work that reads
        only what serving never changes (unpacking a frozen weight)."""
        if not self.busy():
            return fn()
        self.longest = max(self.longest, time.monotonic() - self.t0)
        self.lock.release()
        try:
            return fn()
        finally:
            self.lock.acquire()
            self.t0 = time.monotonic()


class TrainingQueue:
    """forward_backward calls from many clients, batched: a worker takes every call pending
    when it is free (up to max_batch_tokens) and runs them in one Trainer.forward_backward, so
    the runs that are ready together share one pass. Each call is checked when it is submitted
    (its error is its own); the worker holds the model lock for one batch at a time, so serving
    steps go on between batches."""

    def __init__(
        self, trainer: Trainer, max_batch_tokens: int = 8192, batch_wait_s: float = 0.005
    ) -> None:
        self.trainer = trainer
        self.max_batch_tokens = max_batch_tokens
        # After the first call of a batch, wait up to this long for the other runs' calls (none
        # when every run of this executor has one pending): a dynamic-batching window.
        self.batch_wait_s = batch_wait_s
        self._cond = threading.Condition()
        self._pending: list[tuple[tuple, bool, dict]] = []
        self._closed = False
        self.batches = 0
        self.batched_calls = 0
        self._swept = time.monotonic()
        self._thread = threading.Thread(target=self._work, name="mint-training", daemon=True)
        self._thread.start()

    def submit(
        self,
        run_id: str,
        data: Sequence[Datum],
        loss_fn: str,
        cfg: Mapping[str, float] | None = None,
        *,
        forward_only: bool = False,
        timeout: float | None = None,
    ) -> CallResult:
        run = self.trainer.check_call(run_id, data, loss_fn, queue=True)
        slot: dict = {}
        with self._cond:
            if self._closed:
                self.trainer.dequeued(run)
                raise FailedPrecondition("the training queue is closed")
            self._pending.append(
                ((run_id, list(data), loss_fn, dict(cfg or {})), forward_only, slot, run)
            )
            self._cond.notify_all()
            if not self._cond.wait_for(lambda: "done" in slot, timeout):
                raise ResourceExhausted(
                    "forward_backward did not run within its deadline (the executor is busy)",
                    retry_after_s=1.0,
                )
        if "error" in slot:
            raise slot["error"]
        return slot["result"]

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(5)

    def _sweep_every(self) -> float | None:
        """How often idle runs are looked for (None: never)."""
        idle = self.trainer.idle_s
        return min(60.0, max(0.05, idle / 4)) if idle > 0 else None

    def _take(self) -> tuple[list, bool] | None | bool:
        """The next batch and its mode; None once closed; False when nothing came for a while
        (the worker then drops idle runs)."""
        every = self._sweep_every()
        with self._cond:
            if not self._cond.wait_for(lambda: self._pending or self._closed, every):
                return False
            if not self._pending:
                return None
            expected = len(self.trainer.runs)
            self._cond.wait_for(
                lambda: self._closed or len({c[0][0] for c in self._pending}) >= expected,
                self.batch_wait_s,
            )
            mode = self._pending[0][1]
            batch, tokens, rest = [], 0, []
            for item in self._pending:
                n = sum(len(d.input_ids) for d in item[0][1])
                if item[1] == mode and (not batch or tokens + n <= self.max_batch_tokens):
                    batch.append(item)
                    tokens += n
                else:
                    rest.append(item)
            self._pending = rest
            return batch, mode

    def _work(self) -> None:
        while True:
            taken = self._take()
            if taken is None:
                return
            every = self._sweep_every()
            if taken is False or (every and time.monotonic() - self._swept > every):
                self._swept = time.monotonic()  # idle runs dropped, busy or not
                self.trainer.expire_idle()
            if taken is False:
                continue
            batch, forward_only = taken
            # Each call's run as it is now: one dropped while its call waited fails that call
            # alone, and the others of the batch run.
            outcome: list[dict] = [{} for _ in batch]
            live: list[int] = []
            runs: list[TrainingRun] = []
            for i, (call, _, _, _) in enumerate(batch):
                try:
                    runs.append(self.trainer.run(call[0]))
                    live.append(i)
                except TrainingRunNotFound as e:
                    outcome[i] = {"error": e}
            try:
                if live:
                    # On a thread that ends with the batch, not this long-lived one (whose
                    # OpenMP team would stay beside the step thread's and throttle it;
                    # passing.py).
                    calls = [batch[i][0] for i in live]
                    results = on_a_passing_thread(
                        functools.partial(
                            self.trainer.forward_backward, calls, forward_only=forward_only,
                            runs=runs,
                        ),
                        name="mint-training-batch",
                    )  # fmt: skip
                    for i, r in zip(live, results, strict=True):
                        outcome[i] = {"result": r}
            except Exception as e:  # noqa: BLE001 - handed to every caller of the pass
                for i in live:
                    outcome[i] = {"error": e}
            finally:
                for _, _, _, run in batch:
                    self.trainer.dequeued(run)
            with self._cond:
                self.batches += 1
                self.batched_calls += len(batch)
                for (_, _, slot, _), out in zip(batch, outcome, strict=True):
                    slot.update(out, done=True)
                self._cond.notify_all()
