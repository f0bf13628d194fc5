"""The engine's request and result types: what a caller submits (GenerationRequest), what it
streams back (GenerationOutput) and collects (GenerationResult), the handle that carries them
(GenerationHandle), and what a step and the engine report (StepStats, EngineStatus)."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mintmesh.errors import Unavailable
from mintmesh.services.executor.sampling import SamplingOptions

if TYPE_CHECKING:
    from mintmesh.services.executor.batch_state import BatchState

__all__ = [
    "FINISH_CANCELLED",
    "FINISH_LENGTH",
    "FINISH_STOP",
    "EngineStatus",
    "GenerationHandle",
    "GenerationOutput",
    "GenerationRequest",
    "GenerationResult",
    "merge_outputs",
    "StepStats",
    "stream_interval",
]

FINISH_LENGTH = "length"
FINISH_STOP = "stop"
FINISH_CANCELLED = "cancelled"

# How often a reader waiting for its next output checks that the engine still runs.
STOPPED_POLL_S = 1.0


def stream_interval(running: int, messages_per_s: float, max_interval_s: float) -> float:
    """Seconds between one stream's messages after its first: the executor's message budget
    shared by its running streams, at most max_interval_s (ExecutorConfig's
    stream_messages_per_s and stream_max_interval_s; a budget of 0: each output goes out as it
    comes)."""
    if messages_per_s <= 0 or running <= 0:
        return 0.0
    return min(max_interval_s, running / messages_per_s)


@dataclass
class GenerationRequest:
    prompt_token_ids: Sequence[int]
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    # sha256 digest of the packed adapter; None or "" = the base model alone.
    adapter_digest: str | None = None
    request_id: str = ""
    # time.monotonic() after which the request is abandoned (finish_reason "cancelled").
    deadline: float | None = None
    # Fairness key: the adapter's tenant ("" = the digest for adapters, BASE_TENANT without).
    tenant: str = ""


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
    # With logprobs: each token's own text, and (top_logprobs) the likeliest (id, logprob)s.
    tokens: list[str] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)


def merge_outputs(outs: Sequence[GenerationOutput]) -> GenerationOutput:
    """Consecutive outputs of one stream as one (what the stream would have said in one step)."""
    last = outs[-1]
    return GenerationOutput(
        token_ids=[t for o in outs for t in o.token_ids],
        text="".join(o.text for o in outs),
        logprobs=[lp for o in outs for lp in o.logprobs],
        finish_reason=last.finish_reason,
        prompt_tokens=last.prompt_tokens,
        completion_tokens=last.completion_tokens,
        tokens=[t for o in outs for t in o.tokens],
        top_logprobs=[tl for o in outs for tl in o.top_logprobs],
    )


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    # Engine steps of the first and the last generated token (None: none generated).
    first_step: int | None
    last_step: int | None
    submit_step: int
    preemptions: int


@dataclass(frozen=True)
class StepStats:
    """What one step did."""

    step: int
    num_tokens: int = 0  # tokens through the model (prefill + decode)
    num_seqs: int = 0  # sequences in the forward
    prefill_tokens: int = 0
    decode_tokens: int = 0
    sampled: int = 0  # tokens generated
    attention_keys: int = 0  # keys its tokens attended to (a token at position p: p + 1)
    admitted: int = 0
    preempted: int = 0
    finished: int = 0
    adapters: int = 0  # distinct adapters in the forward


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
    loading: int = 0
    tokens_per_s: float = 0.0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    kv_block_size: int = 0
    host_adapters: list[str] = field(default_factory=list)
    node_cache_adapters: list[str] = field(default_factory=list)
    loading_adapters: list[str] = field(default_factory=list)
    adapter_pool_bytes_used: int = 0
    adapter_pool_bytes_total: int = 0
    host_bytes_used: int = 0
    host_bytes_total: int = 0
    steps: int = 0
    preemptions: int = 0
    tokens_generated: int = 0
    # Automatic prefix caching: prompt tokens looked up at admission, and of those the tokens
    # whose K/V was reused from cached blocks (same adapter digest, same prefix); unreferenced
    # blocks kept for their prefix (counted free in kv_blocks_used/total).
    prefix_caching: bool = False
    prefix_query_tokens: int = 0
    prefix_hit_tokens: int = 0
    kv_blocks_cached: int = 0
    dense_kernels: str = "torch"
    # The model runner: "torch", or "onnxruntime:<the execution provider its session got>".
    runner: str = "torch"
    # Every adapter digest in some tier or transition -> its residency.AdapterState's value
    # (fetching, host, loading, device, draining).
    adapter_states: dict[str, str] = field(default_factory=dict)


class GenerationHandle:
    """A submitted generation: iterate it for GenerationOutput steps (the last one has a
    finish_reason); cancel() stops it at the next step and frees its KV blocks."""

    def __init__(
        self,
        request: GenerationRequest,
        loop: BatchState,
        *,
        resume_unread: int = 0,
        messages_per_s: float = 0.0,
        max_interval_s: float = 0.0,
    ) -> None:
        self.request = request
        # The engine's step loop (woken on cancel and read-down, asked whether it stopped and
        # how many sequences run); a paused stream is resumed once at most resume_unread
        # outputs are left unread; chunks() paces its messages by messages_per_s, at most
        # max_interval_s apart.
        self._loop = loop
        self._resume_unread = resume_unread
        self._messages_per_s = messages_per_s
        self._max_interval_s = max_interval_s
        self._q: queue.Queue[GenerationOutput | BaseException] = queue.Queue()
        # A reader holding outputs for its next message (chunks()) waits on this, not on the
        # queue, so the steps in between do not wake it once each: set by the output (or
        # error) that ends the stream, and once _full_at outputs are queued (a full message).
        self._wake = threading.Event()
        self._full_at = 0
        # chunks() has come for the queued outputs (holding them for its next message, or
        # taking them): they are not unread.
        self._reading = False
        self._cancelled = threading.Event()
        self.done = False
        self.submit_step = 0
        self.submitted_at = time.monotonic()
        self.token_at: float | None = None  # when its latest token was sampled (on_token)
        self.first_step: int | None = None
        self.last_step: int | None = None
        self.preemptions = 0
        self.paused = False  # its client stopped reading (Engine: stream_buffer_outputs)
        # Outputs taken so far: only a stream someone has started reading can be paused (a
        # caller that collects the whole result at the end is not a slow reader).
        self.reads = 0
        self._result: GenerationResult | None = None

    @property
    def unread(self) -> int:
        """Outputs streamed that the reader has not come for yet (those chunks() holds for its
        next message do not count: that reader keeps up)."""
        if self._reading:
            return 0
        return self._q.qsize()

    @property
    def queued(self) -> int:
        """Outputs streamed that the reader has not taken yet, held or unread."""
        return self._q.qsize()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        if not self._cancelled.is_set():
            self._cancelled.set()
            self._loop.wake()

    def expired(self, now: float | None = None) -> bool:
        dl = self.request.deadline
        return dl is not None and (now or time.monotonic()) > dl

    def _put(self, item: GenerationOutput | BaseException) -> None:
        last = isinstance(item, BaseException) or item.finish_reason is not None
        if last:
            self.done = True
        self._q.put(item)
        if last or (self._full_at and self._q.qsize() >= self._full_at):
            self._wake.set()

    def get(self, timeout: float | None = None) -> GenerationOutput | BaseException:
        """The next streamed item (an output or the error that ended the request)."""
        item = self._q.get(timeout=timeout)
        self.reads += 1
        return item

    def _take(self) -> GenerationOutput:
        """The next output, waiting for it (the error that ended the request is raised)."""
        while True:
            try:
                # Engine.close ends every stream with an error; the poll only finds an engine
                # whose step thread is gone without that. Each waiting stream's thread wakes
                # for it (200 queued streams at 0.25 s were 800 wake-ups a second).
                item = self._q.get(timeout=STOPPED_POLL_S)
                self.reads += 1
            except queue.Empty:
                if self._loop.stopped():
                    raise Unavailable("the executor's engine has stopped") from None
                continue
            if isinstance(item, BaseException):
                raise item
            return item

    def __iter__(self) -> Iterator[GenerationOutput]:
        while True:
            item = self._take()
            if self.paused and self.unread <= self._resume_unread:
                self._loop.wake()  # read down: the engine resumes it
            yield item
            if item.finish_reason is not None:
                return

    def chunks(self, max_merge: int = 64) -> Iterator[GenerationOutput]:
        """Like iterating the handle, but outputs are merged into one (tokens, text, logprobs
        concatenated; the last one's finish_reason and usage), at most max_merge at a time:
        those already waiting when the reader comes back (one that fell behind, on a loaded
        server or a slow network, catches up in one message instead of one per token), and,
        after the first output (sent at once), those produced until stream_interval() has
        passed since the previous message (the executor's message budget over its running
        streams). The last output goes out as soon as it comes. An error waiting behind outputs
        is raised after they are yielded.

        Between messages the reader sleeps until the interval is over, the last output is in
        or max_merge outputs are: not on the queue, for with many streams a wake-up per stream
        per step would cost the step loop the CPU it needs (the reader threads and the step
        thread share one interpreter)."""
        self._full_at = max_merge
        sent: float | None = None  # when the previous message was taken
        while True:
            self._reading = True
            try:
                if sent is not None:
                    interval = stream_interval(
                        self._loop.num_running, self._messages_per_s, self._max_interval_s
                    )
                    self._hold(sent + interval)
                group, err = self._group(max_merge)
            finally:
                self._reading = False
            out = group[0] if len(group) == 1 else merge_outputs(group)
            if self.paused and self.unread <= self._resume_unread:
                self._loop.wake()  # read down: the engine resumes it
            yield out
            sent = time.monotonic()
            if err is not None:
                raise err
            if out.finish_reason is not None:
                return

    def _group(self, max_merge: int) -> tuple[list[GenerationOutput], BaseException | None]:
        """The next output (waiting for it) and those queued behind it, at most max_merge,
        up to the last; and the error queued behind them, if one is."""
        group, err = [self._take()], None
        while group[-1].finish_reason is None and len(group) < max_merge:
            try:
                nxt = self._q.get_nowait()
            except queue.Empty:
                break
            self.reads += 1
            if isinstance(nxt, BaseException):
                err = nxt
                break
            group.append(nxt)
        return group, err

    def _hold(self, until: float) -> None:
        """chunks() between messages: sleep until `until` (monotonic), the last output or a
        full message's worth, whichever comes first; what is queued meanwhile is not unread."""
        self._wake.clear()  # then the checks: a put after them sets it again
        left = until - time.monotonic()
        if left <= 0 or self.done or self._q.qsize() >= self._full_at:
            return
        self._wake.wait(left)

    def result(self) -> GenerationResult:
        """Wait for the whole generation (consumes the stream; later calls return the same)."""
        if self._result is not None:
            return self._result
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
        self._result = GenerationResult(
            token_ids=ids,
            text="".join(texts),
            logprobs=lps,
            finish_reason=last.finish_reason,
            prompt_tokens=last.prompt_tokens,
            completion_tokens=last.completion_tokens,
            first_step=self.first_step,
            last_step=self.last_step,
            submit_step=self.submit_step,
            preemptions=self.preemptions,
        )
        return self._result
