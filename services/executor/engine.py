"""The executor's core, plain Python and torch (no gRPC): one resident backbone whose targeted
Linears are multi-LoRA layers, an adapter pool, and

- `Engine.forward(rows)`: logits of a batch of rows, each with its own adapter (or none), in one
  forward (right-padded, attention mask, per-row position ids; padding rows use no adapter);
- `Engine.submit(request) -> GenerationHandle`: streamed generation with static batching: a
  batcher thread collects the requests that arrive within `batch_window_ms` (up to
  `max_batch_size`), prefills them in one forward (left-padded) and decodes them together, one
  forward per step with the KV cache, every forward mixing adapters (and rows without one).

Every forward and every pool change runs under one model lock; a generation batch takes it
per step, so Forward calls interleave with running generations.
"""

from __future__ import annotations

import inspect
import logging
import math
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mintmesh.errors import InvalidArgument, MintError, ResourceExhausted, Unavailable
from mintmesh.kernels import AdapterPool, BatchMeta
from mintmesh.packed import DTYPES
from mintmesh.services.executor.lora import LoraContext, inject_lora
from mintmesh.services.executor.sources import (
    AdapterResidency,
    AdapterSource,
    PreparedAdapter,
    check_digest,
)

logger = logging.getLogger(__name__)

FINISH_LENGTH = "length"
FINISH_STOP = "stop"
FINISH_CANCELLED = "cancelled"


@dataclass(frozen=True)
class SamplingOptions:
    """Per-request sampling. temperature 0 = greedy; top_p 1 and top_k 0 = no filtering."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 16
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logprobs: bool = False
    ignore_eos: bool = False

    def validate(self) -> None:
        if self.max_tokens < 1:
            raise InvalidArgument(f"max_tokens={self.max_tokens} must be >= 1")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidArgument(f"temperature={self.temperature} must be a number >= 0")
        if not (0 < self.top_p <= 1):
            raise InvalidArgument(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise InvalidArgument(f"top_k={self.top_k} must be >= 0")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise InvalidArgument(f"seed={self.seed} must be in [0, 2**64)")


@dataclass
class GenerationRequest:
    prompt_token_ids: Sequence[int]
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    # sha256 digest of the packed adapter; None or "" = the base model alone.
    adapter_digest: str | None = None
    request_id: str = ""
    # time.monotonic() after which the request is abandoned (finish_reason "cancelled").
    deadline: float | None = None


@dataclass
class GenerationOutput:
    """One streamed step: the new token(s), their text (may be empty while a UTF-8 sequence or a
    possible stop string is incomplete), and on the last one finish_reason and usage."""

    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    batch_id: int | None


@dataclass(frozen=True)
class EngineStatus:
    executor_id: str
    base_fingerprint: str
    resident_adapters: list[str]
    queue_depth: int
    running: int
    max_batch_size: int
    max_adapters: int
    device: str
    draining: bool
    kernel_backend: str


class GenerationHandle:
    """A submitted generation: iterate it for GenerationOutput steps (the last one has a
    finish_reason); cancel() stops its row at the next step."""

    def __init__(self, request: GenerationRequest, engine: Engine) -> None:
        self.request = request
        self._engine = engine
        self._q: queue.Queue[GenerationOutput | BaseException] = queue.Queue()
        self._cancelled = threading.Event()
        self.prepared: PreparedAdapter | None = None
        self.batch_id: int | None = None
        self.enqueued_at = time.monotonic()
        self.done = False

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        self._cancelled.set()
        self._engine._wake()

    def expired(self, now: float | None = None) -> bool:
        dl = self.request.deadline
        return dl is not None and (now or time.monotonic()) > dl

    def _put(self, item: GenerationOutput | BaseException) -> None:
        if isinstance(item, BaseException) or item.finish_reason is not None:
            self.done = True
        self._q.put(item)

    def __iter__(self) -> Iterator[GenerationOutput]:
        while True:
            try:
                item = self._q.get(timeout=0.25)
            except queue.Empty:
                if not self._engine._thread.is_alive():
                    raise Unavailable("the executor's engine has stopped") from None
                continue
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason is not None:
                return

    def result(self) -> GenerationResult:
        """Wait for the whole generation."""
        ids: list[int] = []
        texts: list[str] = []
        lps: list[float] = []
        last = None
        for out in self:
            ids += out.token_ids
            texts.append(out.text)
            lps += out.logprobs
            last = out
        assert last is not None and last.finish_reason is not None
        return GenerationResult(
            token_ids=ids,
            text="".join(texts),
            logprobs=lps,
            finish_reason=last.finish_reason,
            prompt_tokens=last.prompt_tokens,
            completion_tokens=last.completion_tokens,
            batch_id=self.batch_id,
        )


class IncrementalText:
    """Detokenize a growing token sequence: emit only complete UTF-8 text, and hold back text
    that may be the start of a stop string (the stop string itself is never emitted)."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self._tok = tokenizer
        self._stop = [s for s in stop if s]
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0
        self._held = ""

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> tuple[str, bool]:
        """(text to emit, whether a stop string ended the text)."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        delta = ""
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self._ids)
        return self._filter(delta, final=False)

    def flush(self) -> str:
        """The rest of the text at the end of a generation (incomplete UTF-8 included)."""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        delta = new_text[len(prefix_text) :]
        self._prefix = self._read = len(self._ids)
        return self._filter(delta, final=True)[0]

    def _filter(self, delta: str, *, final: bool) -> tuple[str, bool]:
        text = self._held + delta
        self._held = ""
        if not self._stop:
            return text, False
        hits = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        if hits:
            return text[: min(hits)], True
        if final:
            return text, False
        hold = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:k]):
                    hold = k
                    break
        if hold:
            self._held = text[-hold:]
            text = text[:-hold]
        return text, False


def sample_token(
    logits: torch.Tensor, opts: SamplingOptions, generator: torch.Generator | None
) -> int:
    """One token from logits [vocab] under opts: greedy, or temperature + top-k + top-p."""
    if opts.temperature == 0:
        return int(torch.argmax(logits))
    scores = logits.float() / opts.temperature
    if 0 < opts.top_k < scores.numel():
        kth = torch.topk(scores, opts.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if opts.top_p < 1:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        cum = torch.cumsum(probs, dim=-1)
        # Drop a token when the tokens before it already reach top_p (keep at least one).
        drop = (cum - probs) >= opts.top_p
        drop[0] = False
        scores = scores.scatter(0, order[drop], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclass
class _Row:
    handle: GenerationHandle
    slot: int
    prompt_len: int
    text: IncrementalText
    generator: torch.Generator | None
    generated: int = 0


class Engine:
    """The resident backbone with multi-LoRA layers, the adapter pool and the batcher."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        *,
        base_fingerprint: str,
        source: AdapterSource | None = None,
        executor_id: str = "executor-0",
        max_batch_size: int = 32,
        batch_window_ms: float = 5.0,
        max_adapters: int = 64,
        max_queue: int = 256,
        max_prompt_tokens: int = 0,
        max_rank: int = 256,
        fetch_timeout_s: float = 30.0,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.base_fingerprint = base_fingerprint
        self.executor_id = executor_id
        self.max_batch_size = int(max_batch_size)
        self.batch_window_s = float(batch_window_ms) / 1000.0
        self.max_adapters = int(max_adapters)
        self.max_queue = int(max_queue)
        param = next(model.parameters())
        self.device = param.device
        self.dtype = param.dtype
        cfg = model.config
        self.vocab_size = int(cfg.vocab_size)
        self.max_positions = int(getattr(cfg, "max_position_embeddings", 0) or 2**31 - 1)
        self.max_prompt_tokens = min(
            int(max_prompt_tokens) or self.max_positions - 1, self.max_positions - 1
        )
        eos = cfg.eos_token_id if cfg.eos_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(pad if pad is not None else next(iter(self.eos_ids), 0))

        self.ctx = LoraContext()
        layer_shapes = inject_lora(model, self.ctx)
        self.pool = AdapterPool(
            layer_shapes, max_adapters=self.max_adapters, device=self.device, dtype=self.dtype
        )
        self.ctx.pool = self.pool
        self.kernel_backend = str(getattr(self.pool, "backend", None) or "torch")
        self.residency = AdapterResidency(
            self.pool,
            source,
            layer_shapes=layer_shapes,
            base_fingerprint=base_fingerprint,
            max_rank=max_rank,
            fetch_timeout_s=fetch_timeout_s,
            max_staged=self.max_adapters,
        )
        self._source = source
        self._meta = BatchMeta.make()
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._has_logits_to_keep = "logits_to_keep" in params

        self._model_lock = threading.Lock()
        self._cv = threading.Condition()
        self._pending: deque[GenerationHandle] = deque()
        self._pinned: frozenset[str] = frozenset()
        self._running = 0
        self._accepting = True
        self._stopping = False
        self.batches_run = 0
        self.forwards_run = 0
        self.rows_cancelled = 0
        self._thread = threading.Thread(target=self._loop, name="executor-batcher", daemon=True)
        self._thread.start()
        logger.info(
            "executor %s: %d LoRA layers, device %s, dtype %s, kernels %s, max batch %d",
            executor_id,
            len(layer_shapes),
            self.device,
            self.dtype,
            self.kernel_backend,
            self.max_batch_size,
        )

    @classmethod
    def from_config(cls, config, *, source: AdapterSource | None = None) -> Engine:
        """Load the backbone of config.model_dir and build the engine. Without an injected
        source, a SidecarSource on config.cache_address (none when it is empty)."""
        from mintmesh.model import base_model_info, load_model
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
        model, tok = load_model(
            Path(config.model_dir), device=config.device, dtype=DTYPES[config.dtype]
        )
        info = base_model_info(config.model_dir)
        return cls(
            model,
            tok,
            base_fingerprint=info.fingerprint,
            source=source,
            executor_id=config.executor_id,
            max_batch_size=config.max_batch_size,
            batch_window_ms=config.batch_window_ms,
            max_adapters=config.max_adapters,
            max_queue=config.max_queue,
            max_prompt_tokens=config.max_prompt_tokens,
            max_rank=config.max_rank,
            fetch_timeout_s=config.fetch_timeout_s,
        )

    # -- public API -------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=True))

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return self._running

    @property
    def draining(self) -> bool:
        return not self._accepting

    def status(self) -> EngineStatus:
        return EngineStatus(
            executor_id=self.executor_id,
            base_fingerprint=self.base_fingerprint,
            resident_adapters=sorted(self.residency.resident()),
            queue_depth=self.queue_depth,
            running=self.running,
            max_batch_size=self.max_batch_size,
            max_adapters=self.max_adapters,
            device=str(self.device),
            draining=self.draining,
            kernel_backend=self.kernel_backend,
        )

    def forward(
        self,
        rows: Sequence[tuple[str | None, Sequence[int]]],
        *,
        timeout: float | None = None,
    ) -> list[torch.Tensor]:
        """Logits [n_i, vocab] (float32, CPU) of every row (adapter digest or None, token ids),
        all rows in one forward."""
        if not rows:
            raise InvalidArgument("rows is empty: give at least one row")
        ids_list: list[list[int]] = []
        wanted: dict[str, PreparedAdapter | None] = {}
        for i, (digest, ids) in enumerate(rows):
            ids = self._check_tokens(ids, f"rows[{i}].token_ids", limit=self.max_positions)
            ids_list.append(ids)
            if digest:
                check_digest(digest)
                if digest not in wanted:
                    wanted[digest] = None
        if len(wanted) > self.max_adapters:
            raise InvalidArgument(
                f"rows use {len(wanted)} distinct adapters, more than max_adapters "
                f"{self.max_adapters} of this executor"
            )
        for digest in wanted:
            wanted[digest] = self.residency.prepare(digest, timeout=timeout)
        B, L = len(ids_list), max(len(x) for x in ids_list)
        input_ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, L), dtype=torch.long)
        for i, ids in enumerate(ids_list):
            input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[i, : len(ids)] = 1
        positions = torch.arange(L, dtype=torch.long).expand(B, L)
        with self._model_lock:
            slots = self.residency.ensure_loaded(wanted, keep=self._pinned)
            row_slots = torch.tensor([slots[d] if d else -1 for d, _ in rows], dtype=torch.long)
            token_slots = torch.where(mask.bool(), row_slots[:, None], -1).flatten()
            logits, _ = self._run_model(input_ids, mask, positions, token_slots, None, 0)
            self.forwards_run += 1
        logits = logits.float().cpu()
        return [logits[i, : len(ids)].clone() for i, ids in enumerate(ids_list)]

    def submit(self, request: GenerationRequest) -> GenerationHandle:
        """Validate, fetch the adapter if it is not resident, and queue the request."""
        request.sampling.validate()
        request.prompt_token_ids = self._check_tokens(
            request.prompt_token_ids, "prompt", limit=self.max_prompt_tokens
        )
        digest = request.adapter_digest or None
        request.adapter_digest = digest
        if not self._accepting:
            raise Unavailable(f"executor {self.executor_id} is draining")
        if len(self._pending) >= self.max_queue:
            raise self._queue_full()
        handle = GenerationHandle(request, self)
        if digest:
            timeout = None
            if request.deadline is not None:
                timeout = max(0.001, request.deadline - time.monotonic())
            handle.prepared = self.residency.prepare(check_digest(digest), timeout=timeout)
        with self._cv:
            if not self._accepting:
                raise Unavailable(f"executor {self.executor_id} is draining")
            if len(self._pending) >= self.max_queue:
                raise self._queue_full()
            handle.enqueued_at = time.monotonic()
            self._pending.append(handle)
            self._cv.notify_all()
        return handle

    def generate(self, request: GenerationRequest) -> GenerationResult:
        """submit() and wait for the whole result."""
        return self.submit(request).result()

    def close(self, timeout: float = 30.0) -> None:
        """Drain: stop accepting, let queued and running requests finish (up to timeout), then
        stop the batcher."""
        with self._cv:
            self._accepting = False
            end = time.monotonic() + timeout
            while (self._pending or self._running) and time.monotonic() < end:
                self._cv.wait(0.05)
            self._stopping = True
            left = list(self._pending)
            self._pending.clear()
            self._cv.notify_all()
        for h in left:
            h._put(Unavailable(f"executor {self.executor_id} stopped before running the request"))
        self._thread.join(timeout=5.0)
        close = getattr(self._source, "close", None)
        if callable(close):
            close()

    # -- internals --------------------------------------------------------------------------

    def _queue_full(self) -> ResourceExhausted:
        return ResourceExhausted(
            f"generation queue of executor {self.executor_id} is full "
            f"({self.max_queue} requests waiting)",
            retry_after_s=0.2,
        )

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

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

    def _run_model(
        self,
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        token_slots: torch.Tensor,
        cache,
        keep_last: int,
    ):
        """One forward under the model lock: (logits, cache). keep_last=1: last position only."""
        dev = self.device
        token_slots = token_slots.to(dev)
        self.ctx.meta = self._meta.prepare(token_slots) if bool((token_slots >= 0).any()) else None
        kwargs = {}
        use_cache = keep_last > 0
        if use_cache:
            kwargs["use_cache"] = True
            if cache is not None:
                kwargs[self._cache_arg] = cache
            if self._has_logits_to_keep:
                kwargs["logits_to_keep"] = keep_last
        else:
            kwargs["use_cache"] = False
        try:
            with torch.inference_mode():
                out = self.model(
                    input_ids=input_ids.to(dev),
                    attention_mask=mask.to(dev),
                    position_ids=positions.to(dev),
                    **kwargs,
                )
        finally:
            self.ctx.meta = None
        logits = out.logits
        if keep_last:
            logits = logits[:, -keep_last:]
        new_cache = out.get("cache") if "cache" in out else out.get("past_key_values")
        return logits, new_cache

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._run_batch(batch)
            except Exception as e:
                logger.exception("generation batch of %d requests failed", len(batch))
                err = e if isinstance(e, MintError) else MintError(f"generation failed: {e!r}")
                for h in batch:
                    if not h.done:
                        h._put(err)
            finally:
                with self._cv:
                    self._running = 0
                    self._pinned = frozenset()
                    self._cv.notify_all()

    def _next_batch(self) -> list[GenerationHandle] | None:
        with self._cv:
            while not self._pending:
                if self._stopping:
                    return None
                self._cv.wait(0.5)
            end = self._pending[0].enqueued_at + self.batch_window_s
            while len(self._pending) < self.max_batch_size and not self._stopping:
                left = end - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
            batch: list[GenerationHandle] = []
            digests: set[str] = set()
            deferred: list[GenerationHandle] = []
            now = time.monotonic()
            while self._pending and len(batch) < self.max_batch_size:
                h = self._pending.popleft()
                if h.cancelled or h.expired(now):
                    self.rows_cancelled += 1
                    h._put(self._final(h, FINISH_CANCELLED, 0))
                    continue
                d = h.request.adapter_digest
                if d and d not in digests and len(digests) >= self.max_adapters:
                    deferred.append(h)
                    continue
                batch.append(h)
                if d:
                    digests.add(d)
            self._pending.extendleft(reversed(deferred))
            self._running = len(batch)
            self._pinned = frozenset(digests)
            self._cv.notify_all()
            return batch

    def _final(self, h: GenerationHandle, reason: str, generated: int) -> GenerationOutput:
        return GenerationOutput(
            token_ids=[],
            text="",
            logprobs=[],
            finish_reason=reason,
            prompt_tokens=len(h.request.prompt_token_ids),
            completion_tokens=generated,
        )

    def _load_batch_adapters(self, batch: list[GenerationHandle]) -> list[GenerationHandle]:
        """Load the batch's adapters; fail (and drop) the requests whose adapter cannot load."""
        by_digest: dict[str, list[GenerationHandle]] = {}
        for h in batch:
            if h.request.adapter_digest:
                by_digest.setdefault(h.request.adapter_digest, []).append(h)
        failed: set[int] = set()
        prepared: dict[str, PreparedAdapter | None] = {}
        for d, hs in by_digest.items():
            p = next((h.prepared for h in hs if h.prepared is not None), None)
            try:
                prepared[d] = p if p is not None or d in self.pool else self.residency.prepare(d)
            except MintError as e:
                for h in hs:
                    h._put(e)
                    failed.add(id(h))
        with self._model_lock:
            for d, p in prepared.items():
                try:
                    self.residency.ensure_loaded({d: p}, keep=self._pinned)
                except MintError as e:
                    for h in by_digest[d]:
                        h._put(e)
                        failed.add(id(h))
        for h in batch:
            h.prepared = None
        return [h for h in batch if id(h) not in failed]

    def _run_batch(self, batch: list[GenerationHandle]) -> None:
        batch = self._load_batch_adapters(batch)
        if not batch:
            return
        self.batches_run += 1
        batch_id = self.batches_run
        rows: list[_Row] = []
        for h in batch:
            h.batch_id = batch_id
            d = h.request.adapter_digest
            slot = self.pool.slot(d) if d else -1
            if slot is None:  # evicted between load and here: cannot happen while pinned
                h._put(Unavailable(f"adapter {d[:12]}… is not resident"))
                continue
            opts = h.request.sampling
            gen = None
            if opts.temperature > 0:
                gen = torch.Generator(device=self.device)
                seed = opts.seed if opts.seed is not None else random.getrandbits(63)
                gen.manual_seed(seed)
            rows.append(
                _Row(
                    handle=h,
                    slot=slot,
                    prompt_len=len(h.request.prompt_token_ids),
                    text=IncrementalText(self.tokenizer, opts.stop),
                    generator=gen,
                )
            )
        if not rows:
            return
        logger.debug(
            "batch %d: %d rows, %d adapters",
            batch_id,
            len(rows),
            len({r.slot for r in rows if r.slot >= 0}),
        )
        B = len(rows)
        L = max(r.prompt_len for r in rows)
        input_ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, L), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, L - r.prompt_len :] = torch.tensor(r.handle.request.prompt_token_ids)
            mask[i, L - r.prompt_len :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        row_slots = torch.tensor([r.slot for r in rows], dtype=torch.long)
        token_slots = torch.where(mask.bool(), row_slots[:, None], -1).flatten()
        with self._model_lock:
            logits, cache = self._run_model(input_ids, mask, positions, token_slots, None, 1)
        next_pos = torch.tensor([r.prompt_len for r in rows], dtype=torch.long)
        while True:
            tokens = self._step_rows(rows, logits[:, -1])
            keep = [i for i, r in enumerate(rows) if not r.handle.done]
            with self._cv:
                self._running = len(keep)
            if not keep:
                return
            if len(keep) < len(rows):
                idx = torch.tensor(keep, dtype=torch.long)
                if hasattr(cache, "batch_select_indices"):
                    cache.batch_select_indices(idx.to(self.device))
                    rows = [rows[i] for i in keep]
                    mask, next_pos, tokens = mask[idx], next_pos[idx], tokens[idx]
                    row_slots = row_slots[idx]
            active = torch.tensor([not r.handle.done for r in rows])
            mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=torch.long)], dim=1)
            step_slots = torch.where(active, row_slots, -1)
            with self._model_lock:
                logits, cache = self._run_model(
                    tokens[:, None], mask, next_pos[:, None], step_slots, cache, 1
                )
            next_pos = next_pos + 1

    def _step_rows(self, rows: list[_Row], logits: torch.Tensor) -> torch.Tensor:
        """Sample one token for every live row, stream it, and finish rows that are done.
        Returns the tokens [rows] to feed next (finished rows feed padding)."""
        now = time.monotonic()
        need_lp = any(r.handle.request.sampling.logprobs for r in rows)
        logprobs = torch.log_softmax(logits.float(), dim=-1) if need_lp else None
        greedy = torch.argmax(logits, dim=-1).tolist()
        out = [self.pad_id] * len(rows)
        for i, r in enumerate(rows):
            h = r.handle
            if h.done:
                continue
            if h.cancelled or h.expired(now):
                self.rows_cancelled += 1
                h._put(self._final(h, FINISH_CANCELLED, r.generated))
                continue
            opts = h.request.sampling
            tok = greedy[i] if opts.temperature == 0 else sample_token(logits[i], opts, r.generator)
            r.generated += 1
            lp = [float(logprobs[i, tok])] if opts.logprobs and logprobs is not None else []
            finish = None
            text = ""
            if tok in self.eos_ids and not opts.ignore_eos or tok in opts.stop_token_ids:
                finish = FINISH_STOP
                text = r.text.flush()
            else:
                text, stopped = r.text.add(tok)
                if stopped:
                    finish = FINISH_STOP
                elif r.generated >= opts.max_tokens or r.prompt_len + r.generated >= (
                    self.max_positions
                ):
                    finish = FINISH_LENGTH
                    text += r.text.flush()
            h._put(
                GenerationOutput(
                    token_ids=[tok],
                    text=text,
                    logprobs=lp,
                    finish_reason=finish,
                    prompt_tokens=r.prompt_len if finish else 0,
                    completion_tokens=r.generated if finish else 0,
                )
            )
            out[i] = tok
        return torch.tensor(out, dtype=torch.long)
