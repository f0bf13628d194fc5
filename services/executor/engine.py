"""The executor's core, plain Python and torch (no gRPC): one resident backbone whose targeted
Linears are multi-LoRA layers, a paged KV cache, the adapter tiers, and a step loop that does
continuous batching over mixed adapters (Orca's iteration-level scheduling, vLLM's paged KV
with preemption by recompute, S-LoRA's fairness and adapter paging).

Each step (`Engine.step()`, step_loop.py; a background thread runs it while there is work):

1. intake: new requests join the waiting queue of their tenant when their adapter is on the
   device (they then hold a reference on it), else the queue of their adapter's load, which the
   AdapterLoader runs in the background (node cache -> host -> device); adapters that landed
   since the last step release their waiting requests; loads that failed fail their requests
   with the loader's error (NOT_FOUND, DATA_LOSS, FAILED_PRECONDITION, ...);
2. reaping: cancelled and expired requests leave, wherever they are, and free their KV blocks;
3. scheduling, within a token budget (max_step_tokens), a sequence budget (max_batch_size) and
   the KV blocks free: every running sequence gets its next token (decode) or its next prefill
   chunk; a sequence that needs a block when none is free preempts the most recently admitted
   running sequences (their blocks are freed; they wait again at the front of their tenant's
   queue and are recomputed later); then waiting requests are admitted, tenant by tenant in
   virtual-token-counter order, while budgets and blocks allow;
4. ONE forward over every scheduled token, packed into one ragged row: per-token positions, the
   per-token adapter slot in BatchMeta (adapters and ranks mixed) and an AttentionPlan that
   writes K/V into each sequence's blocks and attends per sequence (kv.py);
5. sampling (per request: temperature, top-k, top-p, seed, logprobs), streaming, retiring
   finished sequences (their blocks freed and adapter reference dropped): output.py.

`Engine.forward(rows)` computes logits of rows in one forward between steps (no KV cache).
The model lock serializes forwards; the state lock guards what request threads touch.

The parts, each given what it works on when the engine wires them here: batch_state.py (the
shared running list, waiting queues, counters and limits), intake.py (1, 2), scheduler.py (3:
it decides admission), kv_manager.py (it owns the KV blocks and prefix cache), runner.py and
torch_runner.py / ort_runner.py (4: they run the model), output.py (5), step_loop.py (the
iteration and its thread), residency.py (the adapter tiers and loader), timeshare.py (training
on the same model), stats.py (step log, Status).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

import torch

from mintmesh.errors import Unavailable
from mintmesh.services.executor.batch_state import BatchState, StepLimits
from mintmesh.services.executor.batch_state import PartAttribute as _Of
from mintmesh.services.executor.config import ExecutorConfig
from mintmesh.services.executor.intake import Intake, encode, encode_chat
from mintmesh.services.executor.kv_manager import KVManager, build_kv_cache
from mintmesh.services.executor.output import OutputProcessor
from mintmesh.services.executor.passing import on_a_passing_thread
from mintmesh.services.executor.requests import (
    FINISH_CANCELLED,
    FINISH_LENGTH,
    FINISH_STOP,
    EngineStatus,
    GenerationHandle,
    GenerationOutput,
    GenerationRequest,
    GenerationResult,
    StepStats,
)
from mintmesh.services.executor.residency import AdapterLoader, AdapterResidency
from mintmesh.services.executor.runner import pack_rows
from mintmesh.services.executor.runners import make_runner
from mintmesh.services.executor.sampling import (
    IncrementalText,
    SamplingOptions,
    TokenPieces,
    sample_token,
)
from mintmesh.services.executor.scheduler import Scheduler
from mintmesh.services.executor.sources import AdapterSource
from mintmesh.services.executor.stats import engine_status, log_started
from mintmesh.services.executor.step_loop import StepLoop
from mintmesh.services.executor.timeshare import TrainingTimeshare
from mintmesh.services.executor.torch_runner import load_backbone

logger = logging.getLogger(__name__)

__all__ = [
    "FINISH_CANCELLED",
    "FINISH_LENGTH",
    "FINISH_STOP",
    "Engine",
    "EngineStatus",
    "GenerationHandle",
    "GenerationOutput",
    "GenerationRequest",
    "GenerationResult",
    "IncrementalText",
    "SamplingOptions",
    "StepStats",
    "sample_token",
]


class Engine:
    """The resident backbone with multi-LoRA layers, paged KV cache, adapter tiers, step loop."""

    # The figures of its parts that Status, the metrics, benches and tests read on the engine.
    step_no = _Of("batch")
    preemptions = _Of("batch")
    fair_preemptions = _Of("batch")
    first_token_steps = _Of("batch")
    rows_cancelled = _Of("batch")
    prefix_query_tokens = _Of("batch")
    prefix_hit_tokens = _Of("batch")
    prefill_tokens_computed = _Of("batch")
    tokens_generated = _Of("output")
    streams_paused = _Of("output")
    streams_stalled = _Of("output")
    # Per token sampled, on the step thread (the executor's metrics): (seconds since the
    # request's submit for its first token, else since its previous token; first).
    on_token = _Of("output")
    # Per iteration of the step thread, on it: (StepStats, seconds).
    on_step = _Of("loop")
    prefix_caching = _Of("kvm")
    vocab_size = _Of("limits")
    max_positions = _Of("limits")
    max_batch_size = _Of("limits")
    max_step_tokens = _Of("limits")
    max_adapters = _Of("limits")
    ctx = _Of("runner")
    dense_kernels = _Of("runner")
    kernel_backend = _Of("runner")

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        *,
        base_fingerprint: str,
        config: ExecutorConfig,
        source: AdapterSource | None = None,
        autostart: bool = True,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.token_piece = TokenPieces(tokenizer)
        self.config = config
        self.base_fingerprint = base_fingerprint
        self.executor_id = config.executor_id
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.limits = lim = StepLimits.of(config, model.config, tokenizer)
        # State shared by the parts of the step loop (under its lock where request threads
        # touch it), and the model lock: the step loop's, around every forward.
        self.batch = BatchState()
        self._model_lock = threading.Lock()

        # Model: multi-LoRA wrappers, paged attention, the adapter pool (torch_runner.py).
        self.runner = make_runner(
            model, config, max_batch_size=lim.max_batch_size, fingerprint=base_fingerprint
        )
        self.pool = self.runner.pool
        self.kv = build_kv_cache(model.config, config, max_batch_size=lim.max_batch_size,
                                 max_positions=lim.max_positions, device=self.device,
                                 dtype=self.dtype)  # fmt: skip
        # Block tables and automatic prefix caching (kv_manager.py).
        self.kvm = KVManager(
            self.kv, prefix_caching=bool(config.prefix_caching), max_positions=lim.max_positions
        )
        # Adapter tiers (loading through the runner) and the background loader.
        self.residency = AdapterResidency.of(self.runner, source, config, base_fingerprint)
        self.loader = AdapterLoader(self.residency, lambda d, err: self.intake.on_loaded(d, err),
                                    threads=int(config.loader_threads))  # fmt: skip
        # Sampling, streaming, slow readers, retiring (output.py); admission (scheduler.py);
        # validation, queue limits, the inbox, the sequences waiting for a load (intake.py).
        self.output = OutputProcessor(
            self.batch, lim, self.kvm, self.residency, token_piece=self.token_piece
        )
        self.scheduler = Scheduler(self.batch, lim, self.kvm, self.residency, self.output)
        self.intake = Intake(self.batch, lim, kv=self.kv, residency=self.residency,
                             loader=self.loader, output=self.output, tokenizer=tokenizer,
                             device=self.device, executor_id=self.executor_id)  # fmt: skip
        # Training runs on this model, time-sliced with the serving steps (timeshare.py).
        self.timeshare = TrainingTimeshare(model, self.runner.ctx, self.pool.layer_shapes,
                                           config=config, limits=lim, batch=self.batch,
                                           model_lock=self._model_lock,
                                           device=self.device)  # fmt: skip
        # One iteration over the parts, and the step thread (step_loop.py).
        self.loop = StepLoop(self.batch, intake=self.intake, scheduler=self.scheduler,
                             runner=self.runner, kvm=self.kvm, output=self.output,
                             model_lock=self._model_lock)  # fmt: skip
        if autostart:
            self.batch.thread = threading.Thread(
                target=self.loop.run, name="executor-steps", daemon=True
            )
            self.batch.thread.start()
        log_started(self)

    @classmethod
    def from_config(
        cls,
        config: ExecutorConfig,
        *,
        source: AdapterSource | None = None,
        autostart: bool = True,
    ) -> Engine:
        """Load the backbone of config.model_dir and build the engine over source (without
        one it serves the base model only; the executor's server wires in the SidecarSource on
        config.cache_address, grpc_source.py)."""
        if source is None:
            if config.cache_address:
                raise ValueError(
                    f"cache_address {config.cache_address!r} is set but no source was given: "
                    "pass grpc_source.sidecar_source(config) (server.create_server does)"
                )
            logger.warning("no cache sidecar configured: serving the base model only")

        def build() -> Engine:
            model, tok, fingerprint = load_backbone(config)
            return cls(model, tok, base_fingerprint=fingerprint, config=config, source=source,
                       autostart=autostart)  # fmt: skip

        return on_a_passing_thread(build, name="executor-load")

    # -- public API -------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return encode(self.tokenizer, text)

    def encode_chat(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        """A chat's prompt, rendered by the tokenizer's chat template (intake.encode_chat)."""
        return encode_chat(self.tokenizer, messages)

    @property
    def queue_depth(self) -> int:
        """Requests waiting: for a sequence slot, or for their adapter to load."""
        return self.batch.num_waiting

    @property
    def running(self) -> int:
        return self.batch.num_running

    @property
    def draining(self) -> bool:
        return not self.batch.accepting

    def kv_blocks_used(self) -> int:
        return self.kv.allocator.num_used

    def tokens_per_s(self) -> float:
        return self.output.tokens_per_s()

    def status(self, *, node_cache: bool = False) -> EngineStatus:
        """A snapshot for Status (stats.engine_status)."""
        return engine_status(self, node_cache=node_cache)

    def submit(self, request: GenerationRequest) -> GenerationHandle:
        """Validate and queue a request (intake.py; RESOURCE_EXHAUSTED when the queue is full).
        A request whose adapter is not on the device waits for the background loader; errors
        of that load arrive on its handle."""
        return self.intake.submit(request)

    def generate(self, request: GenerationRequest) -> GenerationResult:
        """submit() and wait for the whole result (a background step loop must be running)."""
        return self.submit(request).result()

    def run_until_done(self, handles: Sequence[GenerationHandle], max_steps: int = 100_000) -> int:
        """Drive the step loop by hand (engines built with autostart=False) until every handle
        is done; returns the number of steps run."""
        n = 0
        while not all(h.done for h in handles):
            if n >= max_steps:
                raise RuntimeError(f"requests not done after {max_steps} steps")
            self.wait_loads()
            self.step()
            n += 1
        return n

    def wait_loads(self, timeout: float = 30.0) -> None:
        """Block until the loader has nothing queued or running (tests, manual stepping)."""
        end = time.monotonic() + timeout
        while self.loader.pending():
            if time.monotonic() > end:
                raise TimeoutError(f"adapter loads still pending: {self.loader.pending()}")
            time.sleep(0.002)

    def forward(
        self,
        rows: Sequence[tuple[str | None, Sequence[int]]],
        *,
        timeout: float | None = None,
    ) -> list[torch.Tensor]:
        """Logits [n_i, vocab] (float32, CPU) of every row (adapter digest or None, token ids),
        all rows in one forward, between steps of the step loop."""
        ids_list, wanted = self.intake.check_rows(rows)

        def work() -> list[torch.Tensor]:
            with self.residency.acquired(wanted, timeout=timeout) as slots:  # loads cold ones
                packed = [(ids, slots[digest] if digest else -1)
                          for (digest, _), ids in zip(rows, ids_list, strict=True)]  # fmt: skip
                with self._model_lock:
                    logits = self.runner.run(pack_rows(packed))
                # Copied out before the references go: on CUDA the forward may still be
                # reading the adapters' pages, which an eviction could then hand to another.
                logits = logits.float().cpu()
            out, start = [], 0
            for ids in ids_list:
                out.append(logits[start : start + len(ids)].clone())
                start += len(ids)
            return out

        # Not on the caller's thread, the cold adapters' loads included (an in-process caller's
        # long-lived thread: its OpenMP team would stay beside the step thread's, and throttle
        # the step loop from then on; passing.py). The servicer's RPCs are on one already.
        return on_a_passing_thread(work, name="executor-forward")

    def prefetch(self, digests: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
        """Prefetch hints: start loading these adapters in the background, into free device room
        or else the host tier (see AdapterLoader). Returns (already resident, queued or already
        loading, dropped: too many hints pending)."""
        return self.loader.prefetch(list(digests))

    def install_layout(self, layout, check) -> tuple[str, bool]:
        """A training run's save made ready to serve (AdapterResidency.install_layout)."""
        return self.residency.install_layout(layout, check)

    def purge(self, digests: Sequence[str], timeout: float = 30.0) -> tuple[list[str], list[str]]:
        """Deleted adapters: once no running request uses one, drop it from the device pool, the
        host tier and the node cache, and its prefixes from the KV cache. Requests still
        waiting for it fail NOT_FOUND when their load reaches the (deleted) store. Returns
        (purged, still busy)."""
        return self.residency.delete_all(list(digests), timeout, self._forget_prefixes)

    def _forget_prefixes(self, digest: str) -> None:
        with self._model_lock:  # the step loop's lock: it owns the allocator
            self.kv.allocator.forget(digest)

    def training(self):
        """The executor's training queue (training.py's TrainingQueue, timeshare.py), made on
        first use: its runs share this resident model, its batches the model lock."""
        return self.timeshare.get()

    def close(self, timeout: float = 30.0) -> None:
        """Drain: stop accepting, let queued and running requests finish (up to timeout), then
        stop the step loop and the loader."""
        b = self.batch
        self.timeshare.close()
        with b.lock:
            b.accepting = False
            b.lock.notify_all()
        end = time.monotonic() + timeout
        while b.busy() and b.thread is not None and time.monotonic() < end:
            time.sleep(0.02)
        with b.lock:
            b.stopping = True
            b.lock.notify_all()
        if b.thread is not None:
            b.thread.join(timeout=10.0)
        why = f"executor {self.executor_id} stopped before the request ended"
        with self._model_lock:
            self.output.abort(self.intake.waiting_sequences(), lambda: Unavailable(why))
        self.residency.close()
        self.loader.close()
        self.residency.source.close()

    # -- the step loop (step_loop.py) -------------------------------------------------------

    def step(self) -> StepStats:
        """One iteration: intake, reaping, scheduling, one forward, sampling, streaming."""
        return self.loop.step()
