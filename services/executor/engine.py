"""The executor's core, plain Python and torch (no gRPC): one resident backbone whose targeted
Linears are multi-LoRA layers, a paged KV cache, the adapter tiers, and a step loop that does
continuous batching over mixed adapters (Orca's iteration-level scheduling, vLLM's paged KV
with preemption by recompute, S-LoRA's fairness and adapter paging).

Each step (`Engine.step()`; a background thread calls it while there is work):

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
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

import torch

from mintmesh.errors import InvalidArgument, MintError, Unavailable
from mintmesh.identity import check_digest
from mintmesh.services.executor.config import ExecutorConfig
from mintmesh.services.executor.intake import Intake, encode, encode_chat
from mintmesh.services.executor.kv_manager import KVManager, build_kv_cache
from mintmesh.services.executor.output import OutputProcessor
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
from mintmesh.services.executor.runner import pack_rows, pack_step
from mintmesh.services.executor.runners import make_runner
from mintmesh.services.executor.sampling import (
    IncrementalText,
    SamplingOptions,
    TokenPieces,
    sample_token,
)
from mintmesh.services.executor.scheduler import Scheduler
from mintmesh.services.executor.sequence import FairQueue
from mintmesh.services.executor.sequence import Sequence as Seq
from mintmesh.services.executor.sources import AdapterSource
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
        self.max_batch_size = int(config.max_batch_size)
        self.max_step_tokens = max(int(config.max_step_tokens), self.max_batch_size)
        self.max_adapters = int(config.max_adapters)
        self.max_step_adapters = int(config.max_step_adapters)
        self.max_queue = int(config.max_queue)
        self.max_queue_per_tenant = int(config.max_queue_per_tenant) or self.max_queue
        self.fair_share_preemption = bool(config.fair_share_preemption)
        self.stream_buffer_outputs = int(config.stream_buffer_outputs)
        self.stream_stall_timeout_s = float(config.stream_stall_timeout_s)
        self.fair_preemptions = 0
        param = next(model.parameters())
        self.device = param.device
        self.dtype = param.dtype
        cfg = model.config
        self.vocab_size = int(cfg.vocab_size)
        self.max_positions = int(getattr(cfg, "max_position_embeddings", 0) or 2**31 - 1)
        self.max_prompt_tokens = min(
            int(config.max_prompt_tokens) or self.max_positions - 1, self.max_positions - 1
        )
        eos = cfg.eos_token_id if cfg.eos_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}

        # Model: multi-LoRA wrappers, paged attention, the adapter pool (torch_runner.py).
        self.runner = make_runner(
            model, config, max_batch_size=self.max_batch_size, fingerprint=base_fingerprint
        )
        layer_shapes = self.runner.layer_shapes
        self.ctx = self.runner.ctx
        self.dense_kernels = self.runner.dense_kernels
        self.pool = self.runner.pool
        self.kernel_backend = self.runner.kernel_backend

        self.kv = build_kv_cache(cfg, config, max_batch_size=self.max_batch_size,
                                 max_positions=self.max_positions, device=self.device,
                                 dtype=self.dtype)  # fmt: skip
        # Blocks kept free when admitting (so running sequences can grow a little).
        self._watermark = max(1, self.kv.num_blocks // 100)
        # Block tables and automatic prefix caching (kv_manager.py).
        self.kvm = KVManager(
            self.kv, prefix_caching=bool(config.prefix_caching), max_positions=self.max_positions
        )
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0
        self.prefill_tokens_computed = 0

        # Validation, queue limits, the inbox, the waiting counters, the sequences waiting for
        # their adapter's load (intake.py).
        self.intake = Intake(self)
        # Adapter tiers and the background loader.
        self.residency = AdapterResidency(
            self.runner,
            source,
            layer_shapes=layer_shapes,
            base_fingerprint=base_fingerprint,
            max_rank=int(config.max_rank),
            fetch_timeout_s=float(config.fetch_timeout_s),
            host_bytes=int(config.host_cache_bytes),
            host_prefault=bool(config.host_prefault),
        )
        self.loader = AdapterLoader(
            self.residency, self.intake.on_loaded, threads=int(config.loader_threads)
        )

        # State touched by request threads (under self._lock).
        self._lock = threading.Condition()
        self._accepting = True
        self._stopping = False
        # State of the step loop (its thread only, under the model lock).
        self._model_lock = threading.Lock()
        self._training = None  # training(): made on first use
        self._fair = FairQueue()
        self._running: list[Seq] = []
        self.scheduler = Scheduler(self)
        # Sampling, streaming, slow readers, retiring (output.py).
        self.output = OutputProcessor(self)
        self.step_no = 0
        self.preemptions = 0
        self.rows_cancelled = 0
        # Per token sampled, on the step thread (the executor's metrics): (seconds since the
        # request's submit for its first token, else since its previous token; first).
        self.on_token: Callable[[float, bool], None] | None = None
        self._num_running = 0
        self._num_loading = 0

        self._acc = self._new_acc()
        self._thread: threading.Thread | None = None
        if autostart:
            self._thread = threading.Thread(target=self._loop, name="executor-steps", daemon=True)
            self._thread.start()
        logger.info(
            "executor %s: %d LoRA layers, device %s, dtype %s, kernels %s, %d sequences x "
            "%d tokens per step, KV %d blocks of %d, dense %s",
            self.executor_id,
            len(layer_shapes),
            self.device,
            self.dtype,
            self.kernel_backend,
            self.max_batch_size,
            self.max_step_tokens,
            self.kv.num_blocks,
            self.kv.block_size,
            self.dense_kernels,
        )

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
        model, tok, fingerprint = load_backbone(config)
        return cls(
            model,
            tok,
            base_fingerprint=fingerprint,
            config=config,
            source=source,
            autostart=autostart,
        )

    # -- public API -------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return encode(self.tokenizer, text)

    def encode_chat(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        """A chat's prompt, rendered by the tokenizer's chat template (intake.encode_chat)."""
        return encode_chat(self.tokenizer, messages)

    @property
    def queue_depth(self) -> int:
        """Requests waiting: for a sequence slot, or for their adapter to load."""
        return self._num_waiting

    @property
    def _num_waiting(self) -> int:
        return self.intake.num_waiting

    @property
    def running(self) -> int:
        return self._num_running

    @property
    def draining(self) -> bool:
        return not self._accepting

    @property
    def prefix_caching(self) -> bool:
        return self.kvm.prefix_caching

    @property
    def _block_hashes(self) -> dict[int, list[bytes]]:
        return self.kvm._block_hashes

    @property
    def _after_hit(self) -> set[int]:
        return self.kvm._after_hit

    @property
    def _paused(self) -> dict[int, tuple[Seq, float]]:
        return self.output.paused

    @property
    def tokens_generated(self) -> int:
        return self.output.tokens_generated

    @property
    def streams_paused(self) -> int:
        return self.output.streams_paused

    @property
    def streams_stalled(self) -> int:
        return self.output.streams_stalled

    def kv_blocks_used(self) -> int:
        return self.kv.allocator.num_used

    def tokens_per_s(self) -> float:
        return self.output.tokens_per_s()

    def status(self, *, node_cache: bool = False) -> EngineStatus:
        res = self.residency
        return EngineStatus(
            executor_id=self.executor_id,
            base_fingerprint=self.base_fingerprint,
            resident_adapters=sorted(res.resident()),
            queue_depth=self.queue_depth,
            running=self.running,
            max_batch_size=self.max_batch_size,
            max_adapters=self.max_adapters,
            device=str(self.device),
            draining=self.draining,
            kernel_backend=self.kernel_backend,
            loading=self._num_loading,
            tokens_per_s=self.tokens_per_s(),
            kv_blocks_used=self.kv.allocator.num_used,
            kv_blocks_total=self.kv.num_blocks,
            kv_block_size=self.kv.block_size,
            host_adapters=sorted(res.host.digests()),
            node_cache_adapters=sorted(res.node_cache_digests()) if node_cache else [],
            loading_adapters=self.loader.pending(),
            adapter_pool_bytes_used=self.pool.nbytes(),
            adapter_pool_bytes_total=self.pool.capacity_bytes,
            host_bytes_used=res.host.nbytes,
            host_bytes_total=res.host.max_bytes,
            steps=self.step_no,
            preemptions=self.preemptions,
            tokens_generated=self.tokens_generated,
            prefix_caching=self.prefix_caching,
            prefix_query_tokens=self.prefix_query_tokens,
            prefix_hit_tokens=self.prefix_hit_tokens,
            kv_blocks_cached=self.kv.allocator.num_cached,
            dense_kernels=self.dense_kernels,
            runner=self.runner.describe(),
            adapter_states={d: s.value for d, s in res.states().items()},
        )

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
        if not rows:
            raise InvalidArgument("rows is empty: give at least one row")
        ids_list: list[list[int]] = []
        wanted: list[str] = []
        for i, (digest, ids) in enumerate(rows):
            ids_list.append(
                self.intake.check_tokens(ids, f"rows[{i}].token_ids", limit=self.max_positions)
            )
            if digest:
                check_digest(digest)
                if digest not in wanted:
                    wanted.append(digest)
        if len(wanted) > self.max_adapters:
            raise InvalidArgument(
                f"rows use {len(wanted)} distinct adapters, more than max_adapters "
                f"{self.max_adapters} of this executor"
            )
        end = None if timeout is None else time.monotonic() + timeout
        slots: dict[str, int] = {}
        try:
            for d in wanted:
                left = None if end is None else max(0.001, end - time.monotonic())
                slots[d] = self.residency.ensure(d, timeout=left)
            packed = [(ids, slots[digest] if digest else -1)
                      for (digest, _), ids in zip(rows, ids_list, strict=True)]  # fmt: skip
            with self._model_lock:
                logits = self.runner.run(pack_rows(packed))
        finally:
            for d in slots:
                self.residency.release(d)
        logits = logits.float().cpu()
        out, start = [], 0
        for ids in ids_list:
            out.append(logits[start : start + len(ids)].clone())
            start += len(ids)
        return out

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
        host tier and the node cache. Requests still waiting for it fail NOT_FOUND when their
        load reaches the (deleted) store. Returns (purged, still busy)."""
        purged, busy = [], []
        for d in digests:
            check_digest(d)
            present, still = self.residency.delete(d, timeout)
            if still:
                busy.append(d)
                continue
            # No prefix computed with a deleted adapter is reused (its KV blocks go too); after
            # the node-cache eviction, so a request that slipped in before it is forgotten too.
            with self._model_lock:  # the step loop's lock: it owns the allocator
                self.kv.allocator.forget(d)
            if present:
                purged.append(d)
        logger.info("purged %d adapters (%d busy)", len(purged), len(busy))
        return purged, busy

    def training(self):
        """The executor's training queue (services/executor/training.py), made on first use: its
        runs share this resident model, its batches the model lock with the serving steps."""
        from mintmesh.services.executor.training import Trainer, TrainingQueue

        with self._lock:
            if self._training is None:
                trainer = Trainer(
                    self.model,
                    self.ctx,
                    self.pool.layer_shapes,
                    vocab_size=self.vocab_size,
                    max_positions=self.max_positions,
                    max_rank=self.residency.max_rank,
                    max_bytes=self.config.training_max_bytes,
                    lock=self._model_lock,
                    device=self.device,
                    micro_tokens=self.config.training_micro_tokens,
                    slice_s=self.config.training_slice_ms / 1e3,
                    yield_fn=self._yield_to_serving,
                    busy_fn=lambda: bool(self._num_running or self._num_waiting),
                )
                self._training = TrainingQueue(trainer)
            return self._training

    def _yield_to_serving(self, timeout: float = 0.5) -> None:
        """Between two training micro-batches: while there are sequences to serve, wait for the
        step loop to run one step (time-slicing: a served stream never waits for a whole
        training batch)."""
        s0 = self.step_no
        end = time.monotonic() + timeout
        while (
            (self._num_running or self._num_waiting)
            and self.step_no == s0
            and time.monotonic() < end
        ):
            time.sleep(0.0005)

    def close(self, timeout: float = 30.0) -> None:
        """Drain: stop accepting, let queued and running requests finish (up to timeout), then
        stop the step loop and the loader."""
        if self._training is not None:
            self._training.close()
        with self._lock:
            self._accepting = False
            self._lock.notify_all()
        end = time.monotonic() + timeout
        while (self._num_waiting or self._num_running) and time.monotonic() < end:
            if self._thread is None:
                break
            time.sleep(0.02)
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10.0)
        with self._model_lock:
            left = list(self.intake.inbox) + list(self._fair) + list(self._running)
            left += [s for s, _ in self._paused.values()]
            left += [s for v in self.intake.loading.values() for s in v]
            for s in left:
                if not s.handle.done:
                    s.handle._put(
                        Unavailable(f"executor {self.executor_id} stopped before the request ended")
                    )
            for s in self._running:  # their KV blocks and prefix references go too
                self.kvm.release_blocks(s)
        self.residency.close()
        self.loader.close()
        self.residency.source.close()

    # -- the step loop ---------------------------------------------------------------------

    def _stopped(self) -> bool:
        return self._stopping and (self._thread is None or not self._thread.is_alive())

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    def _has_work(self) -> bool:
        return bool(self.intake.inbox or self.intake.landed or self._running or len(self._fair))

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._has_work() and not self._stopping:
                    self._lock.wait(0.5)
                    if self._paused:
                        break  # resume, cancel or time out paused streams
                    if self.intake.loading and any(
                        s.handle.cancelled or s.handle.expired()
                        for v in self.intake.loading.values()
                        for s in v
                    ):
                        break
                if self._stopping:
                    return
            try:
                t = time.perf_counter()
                st = self.step()
                self._account(st, time.perf_counter() - t)
            except Exception as e:
                logger.exception("engine step failed")
                self._fail_running(e)

    def _account(self, st: StepStats, seconds: float) -> None:
        """Step statistics, logged every ~30 s while busy."""
        acc = self._acc
        acc["steps"] += 1
        acc["busy_s"] += seconds
        acc["tokens"] += st.num_tokens
        acc["sampled"] += st.sampled
        acc["seqs"] += st.num_seqs
        now = time.monotonic()
        if now - acc["since"] >= 30.0:
            n = max(1, acc["steps"])
            logger.info(
                "engine: %d steps in %.0f s (%.0f%% busy), %.0f ms/step, %.1f sequences and "
                "%.0f tokens per step, %.1f generated tokens/s, %d waiting, KV %d/%d blocks",
                acc["steps"],
                now - acc["since"],
                100 * acc["busy_s"] / (now - acc["since"]),
                1000 * acc["busy_s"] / n,
                acc["seqs"] / n,
                acc["tokens"] / n,
                acc["sampled"] / (now - acc["since"]),
                self._num_waiting,
                self.kv.allocator.num_used,
                self.kv.num_blocks,
            )
            self._acc = self._new_acc()

    @staticmethod
    def _new_acc() -> dict[str, float]:
        return {"since": time.monotonic(), "steps": 0, "busy_s": 0.0, "tokens": 0,
                "sampled": 0, "seqs": 0}  # fmt: skip

    def _fail_running(self, e: Exception) -> None:
        err = e if isinstance(e, MintError) else MintError(f"generation failed: {e!r}")
        with self._model_lock:
            for s in list(self._running):
                self.output.retire(s, error=err)

    def step(self) -> StepStats:
        """One iteration: intake, reaping, scheduling, one forward, sampling, streaming."""
        with self._model_lock:
            return self._step()

    def _step(self) -> StepStats:
        self.step_no += 1
        step = self.step_no
        self.intake.take()
        now = time.monotonic()
        self.intake.reap(now)
        self.output.slow_readers(now)
        plan = self.scheduler.schedule()
        sched, admitted, preempted = plan.seqs, plan.admitted, plan.preempted
        self._num_running = len(self._running)
        self._num_loading = sum(len(v) for v in self.intake.loading.values())
        if not sched:
            return StepStats(step=step, admitted=admitted, preempted=preempted)

        # One packed row: every scheduled token of every sequence (runner.pack_step).
        packed = pack_step(sched, self.kv)
        self.prefill_tokens_computed += packed.prefill
        logits = self.runner.run(packed.batch)
        for seq, n in sched:
            seq.num_computed += n
            if self.prefix_caching:
                self.kvm.register_blocks(seq, seq.num_computed - n)
            if n > 1 or seq.generated == 0:
                self._fair.charge(seq.tenant, prompt_tokens=n)
        finished = self.output.sample_and_stream(packed.samplers, logits, step)
        self._num_running = len(self._running)
        if step % 256 == 0:
            self._fair.forget_idle({s.tenant for s in self._running})
        return StepStats(
            step=step,
            num_tokens=len(packed.batch.token_ids),
            num_seqs=len(sched),
            prefill_tokens=packed.prefill,
            decode_tokens=packed.decode,
            sampled=len(packed.samplers),
            admitted=admitted,
            preempted=preempted,
            finished=finished,
            adapters=len({seq.slot for seq, _ in sched if seq.slot >= 0}),
        )
