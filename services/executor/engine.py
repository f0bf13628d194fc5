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
   finished sequences (their blocks freed and adapter reference dropped).

`Engine.forward(rows)` computes logits of rows in one forward between steps (no KV cache).
The model lock serializes forwards; the state lock guards what request threads touch.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

import torch

from mintmesh.errors import InvalidArgument, MintError, ResourceExhausted, Unavailable
from mintmesh.identity import check_digest
from mintmesh.services.executor.config import ExecutorConfig
from mintmesh.services.executor.kv import (
    AttentionPlan,
    PagedKVCache,
    SeqSpan,
)
from mintmesh.services.executor.kv_manager import KVManager
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
from mintmesh.services.executor.runner import ForwardBatch
from mintmesh.services.executor.runners import make_runner
from mintmesh.services.executor.sampling import (
    IncrementalText,
    SamplingOptions,
    TokenPieces,
    sample_token,
)
from mintmesh.services.executor.scheduler import Scheduler
from mintmesh.services.executor.sequence import BASE_TENANT, FairQueue
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

# Roles a chat template is given.
CHAT_ROLES = frozenset({"system", "user", "assistant", "tool", "developer"})
# Window of the tokens/s figure in Status.
_RATE_WINDOW_S = 10.0


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
        # Sequences whose client stopped reading: seq_id -> (sequence, paused since).
        self._paused: dict[int, tuple[Seq, float]] = {}
        self.streams_paused = 0
        self.streams_stalled = 0
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

        kv_bytes = int(config.kv_cache_bytes)
        if not kv_bytes:
            tokens = self.max_batch_size * min(self.max_positions, 512)
            per_block = PagedKVCache.block_nbytes(cfg, config.kv_block_size, self.dtype)
            kv_bytes = per_block * -(-tokens // config.kv_block_size)
        self.kv = PagedKVCache.for_model(
            cfg,
            max_bytes=kv_bytes,
            block_size=int(config.kv_block_size),
            device=self.device,
            dtype=self.dtype,
        )
        # Blocks kept free when admitting (so running sequences can grow a little).
        self._watermark = max(1, self.kv.num_blocks // 100)
        # Block tables and automatic prefix caching (kv_manager.py).
        self.kvm = KVManager(
            self.kv, prefix_caching=bool(config.prefix_caching), max_positions=self.max_positions
        )
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0
        self.prefill_tokens_computed = 0

        # Adapter tiers and the background loader.
        self._source = source
        self.residency = AdapterResidency(
            self.pool,
            source,
            layer_shapes=layer_shapes,
            base_fingerprint=base_fingerprint,
            max_rank=int(config.max_rank),
            fetch_timeout_s=float(config.fetch_timeout_s),
            host_bytes=int(config.host_cache_bytes),
            host_prefault=bool(config.host_prefault),
        )
        self.loader = AdapterLoader(
            self.residency, self._on_loaded, threads=int(config.loader_threads)
        )

        # State touched by request threads (under self._lock).
        self._lock = threading.Condition()
        self._inbox: deque[Seq] = deque()
        self._landed: deque[tuple[str, BaseException | None]] = deque()
        self._num_waiting = 0
        self._tenant_waiting: dict[str, int] = {}
        self._accepting = True
        self._stopping = False
        self._next_seq_id = 0
        # State of the step loop (its thread only, under the model lock).
        self._model_lock = threading.Lock()
        self._training = None  # training(): made on first use
        self._fair = FairQueue()
        self._loading: dict[str, list[Seq]] = {}
        self._running: list[Seq] = []
        self.scheduler = Scheduler(self)
        self.step_no = 0
        self.preemptions = 0
        self.rows_cancelled = 0
        self.tokens_generated = 0
        # Per token sampled, on the step thread (the executor's metrics): (seconds since the
        # request's submit for its first token, else since its previous token; first).
        self.on_token: Callable[[float, bool], None] | None = None
        self._rate: deque[tuple[float, int]] = deque()
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
        """Load the backbone of config.model_dir and build the engine. Without an injected
        source, a SidecarSource on config.cache_address (none when it is empty)."""
        from mintmesh.services.executor.sources import SidecarSource

        if source is None and config.cache_address:
            if config.cache_dir is None:
                raise ValueError(
                    f"cache_address {config.cache_address!r} needs cache_dir, the sidecar's "
                    "node cache directory"
                )
            source = SidecarSource(
                config.cache_address, config.cache_dir, timeout_s=config.fetch_timeout_s
            )
        if source is None:
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
        return list(self.tokenizer.encode(text, add_special_tokens=True))

    def encode_chat(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        """A chat's prompt: (role, content) turns rendered by the tokenizer's chat template,
        with the assistant's turn opened."""
        if not messages:
            raise InvalidArgument("messages is empty: give at least one message")
        for i, (role, _) in enumerate(messages):
            if role not in CHAT_ROLES:
                raise InvalidArgument(
                    f"messages[{i}].role is {role!r}; one of {sorted(CHAT_ROLES)} is needed"
                )
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidArgument(
                "this backbone's tokenizer has no chat template (tokenizer_config.json "
                "chat_template): send a prompt instead of messages"
            )
        turns = [{"role": r, "content": c} for r, c in messages]
        try:
            text = self.tokenizer.apply_chat_template(
                turns, add_generation_prompt=True, tokenize=False
            )
        except Exception as e:  # the template's own raise_exception, or a jinja error
            raise InvalidArgument(f"the chat template refused these messages: {e}") from None
        # The template writes the special tokens it wants (BOS among them): none added here.
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    @property
    def queue_depth(self) -> int:
        """Requests waiting: for a sequence slot, or for their adapter to load."""
        return self._num_waiting

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

    def kv_blocks_used(self) -> int:
        return self.kv.allocator.num_used

    def tokens_per_s(self) -> float:
        now = time.monotonic()
        rate = list(self._rate)
        rate = [(t, n) for t, n in rate if now - t <= _RATE_WINDOW_S]
        if not rate:
            return 0.0
        span = max(now - rate[0][0], 1e-3)
        return sum(n for _, n in rate) / span if len(rate) > 1 else rate[0][1] / span

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
        )

    def submit(self, request: GenerationRequest) -> GenerationHandle:
        """Validate and queue a request (RESOURCE_EXHAUSTED when the queue is full). A request
        whose adapter is not on the device waits for the background loader; errors of that
        load arrive on its handle."""
        request.sampling.validate()
        request.prompt_token_ids = self._check_tokens(
            request.prompt_token_ids, "prompt", limit=self.max_prompt_tokens
        )
        for t in request.sampling.stop_token_ids:
            if not 0 <= t < self.vocab_size:
                raise InvalidArgument(
                    f"stop_token_ids has {t}, not a token id (vocab size {self.vocab_size})"
                )
        digest = request.adapter_digest or None
        if digest:
            check_digest(digest)
        request.adapter_digest = digest
        prompt_len = len(request.prompt_token_ids)
        if self.kv.blocks_for(prompt_len + 1) > self.kv.num_blocks:
            raise InvalidArgument(
                f"prompt has {prompt_len} tokens; the KV cache of this executor holds "
                f"{self.kv.capacity_tokens}"
            )
        tenant = request.tenant or (digest if digest else BASE_TENANT)
        handle = GenerationHandle(request, self)
        opts = request.sampling
        gen = None
        if opts.temperature > 0:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(opts.seed if opts.seed is not None else random.getrandbits(63))
        from opentelemetry import context as otel_context

        with self._lock:
            if not self._accepting:
                raise Unavailable(f"executor {self.executor_id} is draining")
            if self._num_waiting >= self.max_queue:
                raise self._queue_full(f"{self._num_waiting} requests waiting")
            if self._tenant_waiting.get(tenant, 0) >= self.max_queue_per_tenant:
                raise self._queue_full(
                    f"tenant {tenant!r} has {self._tenant_waiting[tenant]} requests waiting, "
                    f"its limit is {self.max_queue_per_tenant}"
                )
            self._next_seq_id += 1
            seq = Seq(
                seq_id=self._next_seq_id,
                tenant=tenant,
                digest=digest,
                prompt_len=prompt_len,
                tokens=list(request.prompt_token_ids),
                handle=handle,
                text=IncrementalText(self.tokenizer, opts.stop),
                generator=gen,
                deadline=request.deadline,
                otel_context=otel_context.get_current(),
            )
            handle.submit_step = self.step_no
            if digest and digest not in self.pool:
                # Cold: the load starts now, in this request's trace; the request waits for
                # it in the step loop's intake.
                self.loader.request(digest, otel_context=seq.otel_context)
            self._num_waiting += 1
            self._tenant_waiting[tenant] = self._tenant_waiting.get(tenant, 0) + 1
            self._inbox.append(seq)
            self._lock.notify_all()
        return handle

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
                self._check_tokens(ids, f"rows[{i}].token_ids", limit=self.max_positions)
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
            spans, flat, token_slots, start = [], [], [], 0
            for (digest, _), ids in zip(rows, ids_list, strict=True):
                spans.append(SeqSpan(start, len(ids), len(ids)))
                flat += ids
                token_slots += [slots[digest] if digest else -1] * len(ids)
                start += len(ids)
            with self._model_lock:
                batch = ForwardBatch(flat, _fresh_positions(ids_list), token_slots,
                                     AttentionPlan(spans), None)  # fmt: skip
                logits = self.runner.run(batch)
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
        wanted = list(dict.fromkeys(check_digest(d) for d in digests))
        resident, queued, dropped = [], [], []
        for d in wanted:
            if d in self.pool:
                resident.append(d)
            elif self.loader.hint(d) is None:
                dropped.append(d)
            else:
                queued.append(d)
        if queued or dropped:
            logger.info("prefetch: %d queued, %d dropped", len(queued), len(dropped))
        return resident, queued, dropped

    def install_layout(self, layout, check) -> tuple[str, bool]:
        """A pack this executor plans itself (packed.PackLayout: a training run's save) made
        ready to serve at once: written straight into the host tier (check(buf) vets it), then
        loaded into free device room (no other adapter is evicted for it; without room it
        waits on the host). (its digest, resident)."""
        digest, kept = self.residency.offer_layout(layout, check)
        if digest in self.pool:
            return digest, True
        return digest, kept and self._load_free(digest)

    def _load_free(self, digest: str) -> bool:
        """digest (on the host tier) into free device room, no eviction; True when resident."""
        prepared = self.residency.prepare(digest)
        try:
            self.residency.load(prepared, timeout=0.0, evict=False)
        except ResourceExhausted:
            return False
        self.residency.release(digest)
        return True

    def purge(self, digests: Sequence[str], timeout: float = 30.0) -> tuple[list[str], list[str]]:
        """Deleted adapters: once no running request uses one, drop it from the device pool, the
        host tier and the node cache. Requests still waiting for it fail NOT_FOUND when their
        load reaches the (deleted) store. Returns (purged, still busy)."""
        purged, busy = [], []
        for d in digests:
            check_digest(d)
            present, still = self.residency.purge(d, timeout)
            if still:
                busy.append(d)
                continue
            evict = getattr(self.residency.source, "evict", None)
            in_cache = bool(evict(d)) if callable(evict) else False
            # No prefix computed with a deleted adapter is reused (its KV blocks go too); after
            # the node-cache eviction, so a request that slipped in before it is forgotten too.
            with self._model_lock:  # the step loop's lock: it owns the allocator
                self.kv.allocator.forget(d)
            if present or in_cache:
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
            left = list(self._inbox) + list(self._fair) + list(self._running)
            left += [s for s, _ in self._paused.values()]
            left += [s for v in self._loading.values() for s in v]
            for s in left:
                if not s.handle.done:
                    s.handle._put(
                        Unavailable(f"executor {self.executor_id} stopped before the request ended")
                    )
            for s in self._running:  # their KV blocks and prefix references go too
                self.kvm.drop_blocks(s)
        self.residency.close()
        self.loader.close()
        close = getattr(self._source, "close", None)
        if callable(close):
            close()

    # -- the step loop ---------------------------------------------------------------------

    def _stopped(self) -> bool:
        return self._stopping and (self._thread is None or not self._thread.is_alive())

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    def _has_work(self) -> bool:
        return bool(self._inbox or self._landed or self._running or len(self._fair))

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._has_work() and not self._stopping:
                    self._lock.wait(0.5)
                    if self._paused:
                        break  # resume, cancel or time out paused streams
                    if self._loading and any(
                        s.handle.cancelled or s.handle.expired()
                        for v in self._loading.values()
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
                self._retire(s, error=err)

    def step(self) -> StepStats:
        """One iteration: intake, reaping, scheduling, one forward, sampling, streaming."""
        with self._model_lock:
            return self._step()

    def _step(self) -> StepStats:
        self.step_no += 1
        step = self.step_no
        with self._lock:
            inbox = list(self._inbox)
            self._inbox.clear()
            landed = list(self._landed)
            self._landed.clear()
        for digest, err in landed:
            self._on_landed(digest, err)
        for seq in inbox:
            self._enqueue(seq)
        now = time.monotonic()
        self._reap(now)
        self._slow_readers(now)
        plan = self.scheduler.schedule()
        sched, admitted, preempted = plan.seqs, plan.admitted, plan.preempted
        self._num_running = len(self._running)
        self._num_loading = sum(len(v) for v in self._loading.values())
        if not sched:
            return StepStats(step=step, admitted=admitted, preempted=preempted)

        # One packed row: every scheduled token of every sequence.
        flat: list[int] = []
        positions: list[int] = []
        token_slots: list[int] = []
        spans: list[SeqSpan] = []
        samplers: list[Seq] = []
        sample_rows: list[int] = []
        prefill = decode = 0
        for seq, n in sched:
            start = len(flat)
            c = seq.num_computed
            flat += seq.tokens[c : c + n]
            positions += range(c, c + n)
            token_slots += [seq.slot] * n
            spans.append(SeqSpan(start, n, c + n, seq.blocks))
            if c + n == len(seq.tokens):
                samplers.append(seq)
                sample_rows.append(start + n - 1)
            if seq.decoding:
                decode += n
            else:
                prefill += n
        self.prefill_tokens_computed += prefill
        plan = AttentionPlan(spans, self.kv)
        logits = self.runner.run(ForwardBatch(flat, positions, token_slots, plan, sample_rows))
        for seq, n in sched:
            seq.num_computed += n
            if self.prefix_caching:
                self.kvm.register_blocks(seq, seq.num_computed - n)
            if n > 1 or seq.generated == 0:
                self._fair.charge(seq.tenant, prompt_tokens=n)
        finished = self._sample_and_stream(samplers, logits, step)
        self._num_running = len(self._running)
        if samplers:
            self._rate.append((time.monotonic(), len(samplers)))
            while self._rate and time.monotonic() - self._rate[0][0] > _RATE_WINDOW_S:
                self._rate.popleft()
        if step % 256 == 0:
            self._fair.forget_idle({s.tenant for s in self._running})
        return StepStats(
            step=step,
            num_tokens=len(flat),
            num_seqs=len(sched),
            prefill_tokens=prefill,
            decode_tokens=decode,
            sampled=len(samplers),
            admitted=admitted,
            preempted=preempted,
            finished=finished,
            adapters=len({seq.slot for seq, _ in sched if seq.slot >= 0}),
        )

    # -- intake ------------------------------------------------------------------------------

    def _on_loaded(self, digest: str, err: BaseException | None) -> None:
        """Loader callback (a loader thread): hand the result to the next step."""
        with self._lock:
            self._landed.append((digest, err))
            self._lock.notify_all()

    def _on_landed(self, digest: str, err: BaseException | None) -> None:
        seqs = self._loading.pop(digest, [])
        if err is not None:
            for s in seqs:
                self._fail_waiting(s, err)
            return
        for s in seqs:
            slot = self.residency.acquire(digest)
            assert slot is not None, "a landed adapter is referenced until its requests take it"
            s.pinned = True
            self._fair.push(s)
        # The loader's own reference.
        self.residency.release(digest)

    def _enqueue(self, seq: Seq) -> None:
        d = seq.digest
        if d is None:
            self._fair.push(seq)
        elif d in self._loading:
            self._loading[d].append(seq)
        elif self.residency.acquire(d) is not None:
            seq.pinned = True
            self._fair.push(seq)
        else:
            self._loading[d] = [seq]
            self.loader.request(d, otel_context=seq.otel_context)

    def _reap(self, now: float) -> None:
        for s in list(self._running):
            if s.handle.cancelled or s.handle.expired(now):
                self.rows_cancelled += 1
                self._retire(s, reason=FINISH_CANCELLED)
        for s in [s for s in self._fair if s.handle.cancelled or s.handle.expired(now)]:
            self._fair.remove(s)
            self.rows_cancelled += 1
            self._finish_waiting(s, self._final(s, FINISH_CANCELLED))
        for d, seqs in list(self._loading.items()):
            gone = [s for s in seqs if s.handle.cancelled or s.handle.expired(now)]
            for s in gone:
                seqs.remove(s)
                self.rows_cancelled += 1
                self._finish_waiting(s, self._final(s, FINISH_CANCELLED))
            if not seqs:
                # The load goes on (it warms the tiers); nobody waits for it any more.
                self._loading[d] = []

    def _slow_readers(self, now: float) -> None:
        """Pause running streams whose client has stream_buffer_outputs unread (their KV freed,
        out of the batch, the adapter still held); put back in their tenant's queue (front) the
        paused ones read down to half of it, to be recomputed (prefix caching keeps most of
        their blocks); fail those paused past stream_stall_timeout_s; retire cancelled ones."""
        limit = self.stream_buffer_outputs
        if limit <= 0:
            return
        for s in [s for s in self._running if s.handle.reads and s.handle.unread >= limit]:
            self.kvm.drop_blocks(s)
            self._running.remove(s)
            s.handle.paused = True
            self._paused[s.seq_id] = (s, now)
            self.streams_paused += 1
            logger.debug("sequence %d paused: %d outputs unread", s.seq_id, s.handle.unread)
        for sid, (s, since) in list(self._paused.items()):
            h = s.handle
            if h.cancelled or h.expired(now):
                del self._paused[sid]
                self.rows_cancelled += 1
                self._retire(s, reason=FINISH_CANCELLED)
            elif h.unread <= limit // 2:
                del self._paused[sid]
                h.paused = False
                self._fair.push(s, front=True)
                with self._lock:
                    self._num_waiting += 1
                    self._tenant_waiting[s.tenant] = self._tenant_waiting.get(s.tenant, 0) + 1
            elif now - since > self.stream_stall_timeout_s:
                del self._paused[sid]
                self.streams_stalled += 1
                self._retire(
                    s,
                    error=ResourceExhausted(
                        f"the stream of request {h.request.request_id or s.seq_id} was not read "
                        f"for {self.stream_stall_timeout_s:.0f} s with {h.unread} outputs "
                        "waiting: cancelled, its resources given to others"
                    ),
                )

    # -- sampling and retiring ------------------------------------------------------------------

    def _sample_and_stream(self, seqs: list[Seq], logits: torch.Tensor, step: int) -> int:
        if not seqs:
            return 0
        need_lp = any(s.handle.request.sampling.logprobs for s in seqs)
        logprobs = torch.log_softmax(logits.float(), dim=-1) if need_lp else None
        greedy = torch.argmax(logits, dim=-1).tolist()
        finished = 0
        for i, seq in enumerate(seqs):
            h = seq.handle
            opts = h.request.sampling
            if opts.temperature == 0:
                tok = greedy[i]
            else:
                tok = sample_token(logits[i], opts, seq.generator)
            seq.tokens.append(tok)
            self.tokens_generated += 1
            self._fair.charge(seq.tenant, output_tokens=1)
            if seq.first_step is None:
                seq.first_step = h.first_step = step
            seq.last_step = h.last_step = step
            if self.on_token is not None:
                now, first = time.monotonic(), h.token_at is None
                self.on_token(now - (h.submitted_at if first else h.token_at), first)
                h.token_at = now
            lp, pieces, top = [], [], []
            if opts.logprobs and logprobs is not None:
                lp, pieces = [float(logprobs[i, tok])], [self.token_piece(tok)]
                if opts.top_logprobs:
                    vals, idx = torch.topk(logprobs[i], opts.top_logprobs)
                    top = [list(zip(idx.tolist(), vals.tolist(), strict=True))]
            finish = None
            if tok in self.eos_ids and not opts.ignore_eos or tok in opts.stop_token_ids:
                finish = FINISH_STOP
                text = seq.text.flush()
            else:
                text, stopped = seq.text.add(tok)
                if stopped:
                    finish = FINISH_STOP
                elif seq.generated >= opts.max_tokens or len(seq.tokens) >= self.max_positions:
                    finish = FINISH_LENGTH
                    text += seq.text.flush()
            h._put(
                GenerationOutput(
                    token_ids=[tok],
                    text=text,
                    logprobs=lp,
                    finish_reason=finish,
                    prompt_tokens=seq.prompt_len if finish else 0,
                    completion_tokens=seq.generated if finish else 0,
                    tokens=pieces,
                    top_logprobs=top,
                )
            )
            if finish:
                self._retire(seq)
                finished += 1
        return finished

    def _retire(
        self, seq: Seq, *, reason: str | None = None, error: BaseException | None = None
    ) -> None:
        """A running sequence leaves: blocks freed, adapter reference dropped, final message."""
        if seq in self._running:
            self._running.remove(seq)
        self.kvm.drop_blocks(seq)
        self.kvm.forget(seq)
        self._unpin(seq)
        if error is not None:
            seq.handle._put(error)
        elif reason is not None:
            seq.handle._put(self._final(seq, reason))
        self._num_running = len(self._running)

    def _unpin(self, seq: Seq) -> None:
        if seq.pinned and seq.digest:
            seq.pinned = False
            self.residency.release(seq.digest)

    def _finish_waiting(self, seq: Seq, item: GenerationOutput | BaseException) -> None:
        self.kvm.forget(seq)
        self._unpin(seq)
        with self._lock:
            self._num_waiting -= 1
            self._tenant_left(seq.tenant)
        seq.handle._put(item)

    def _fail_waiting(self, seq: Seq, err: BaseException) -> None:
        self._finish_waiting(seq, err)

    def _tenant_left(self, tenant: str) -> None:
        n = self._tenant_waiting.get(tenant, 0) - 1
        if n > 0:
            self._tenant_waiting[tenant] = n
        else:
            self._tenant_waiting.pop(tenant, None)

    def _final(self, seq: Seq, reason: str) -> GenerationOutput:
        return GenerationOutput(
            token_ids=[],
            text="",
            logprobs=[],
            finish_reason=reason,
            prompt_tokens=seq.prompt_len,
            completion_tokens=seq.generated,
        )

    # -- checks ---------------------------------------------------------------------------------

    def _queue_full(self, why: str) -> ResourceExhausted:
        rate = self.tokens_per_s()
        # About the time the requests ahead need for a sequence slot to free up.
        retry = 0.2 if rate <= 0 else min(5.0, max(0.05, self._num_waiting * 16 / rate))
        return ResourceExhausted(
            f"generation queue of executor {self.executor_id} is full ({why}; max_queue "
            f"{self.max_queue})",
            retry_after_s=retry,
        )

    def _check_tokens(self, ids: Sequence[int], what: str, *, limit: int) -> list[int]:
        ids = [int(t) for t in ids]
        if not ids:
            raise InvalidArgument(f"{what} is empty: give at least one token")
        if len(ids) > limit:
            raise InvalidArgument(
                f"{what} has {len(ids)} tokens, more than the {limit} this executor accepts "
                f"(model max positions {self.max_positions})"
            )
        for j, t in enumerate(ids):
            if not 0 <= t < self.vocab_size:
                raise InvalidArgument(
                    f"{what}[{j}] = {t} is not a token id (vocab size {self.vocab_size})"
                )
        return ids


def _fresh_positions(ids_list: list[list[int]]) -> list[int]:
    out: list[int] = []
    for ids in ids_list:
        out += range(len(ids))
    return out
