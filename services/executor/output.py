"""The step loop's output side: sampling each sampled row's next token (per request:
temperature, top-k, top-p, seed, logprobs), streaming it to the request's handle, deciding when
a sequence is finished (EOS, stop strings and token ids, max_tokens, the model's positions),
and retiring sequences: running ones (their KV blocks freed, their adapter reference dropped,
their final message) and waiting ones (cancelled, expired or failed before they ran).

Streams whose client stopped reading are paused here too (slow_readers): out of the batch with
their KV freed, back in their tenant's queue once read down, failed when never read again.

The OutputProcessor works on the step loop's shared state (batch_state.py), the KV manager (the
blocks of what it retires) and the adapter residency (their adapter references), given at
construction like the Scheduler's, on the step thread.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from mintmesh.errors import ResourceExhausted
from mintmesh.services.executor.requests import (
    FINISH_CANCELLED,
    FINISH_LENGTH,
    FINISH_STOP,
    GenerationOutput,
)
from mintmesh.services.executor.sampling import sample_token
from mintmesh.services.executor.sequence import Sequence as Seq

if TYPE_CHECKING:
    from mintmesh.services.executor.batch_state import BatchState, StepLimits
    from mintmesh.services.executor.kv_manager import KVManager
    from mintmesh.services.executor.residency import AdapterResidency

logger = logging.getLogger(__name__)

# Window of the tokens/s figure in Status.
RATE_WINDOW_S = 10.0

__all__ = ["OutputProcessor", "final_output"]


def final_output(seq: Seq, reason: str) -> GenerationOutput:
    """The last message of a sequence that ends without a token of its own (cancelled)."""
    return GenerationOutput(
        token_ids=[],
        text="",
        logprobs=[],
        finish_reason=reason,
        prompt_tokens=seq.prompt_len,
        completion_tokens=seq.generated,
    )


class OutputProcessor:
    """Sampling, streaming, finishing and retiring for one engine (its step thread)."""

    def __init__(
        self,
        batch: BatchState,
        limits: StepLimits,
        kvm: KVManager,
        residency: AdapterResidency,
        *,
        token_piece: Callable[[int], str],
    ) -> None:
        self.batch = batch
        self.limits = limits
        self.kvm = kvm
        self.residency = residency
        self.token_piece = token_piece
        # Per token sampled, on the step thread (the executor's metrics): (seconds since the
        # request's submit for its first token, else since its previous token; first).
        self.on_token: Callable[[float, bool], None] | None = None
        # Sequences whose client stopped reading: seq_id -> (sequence, paused since).
        self.paused: dict[int, tuple[Seq, float]] = {}
        self.streams_paused = 0
        self.streams_stalled = 0
        self.tokens_generated = 0
        # (when, tokens sampled) of each step that sampled, over the last RATE_WINDOW_S.
        self._rate: deque[tuple[float, int]] = deque()

    def tokens_per_s(self) -> float:
        """Tokens sampled per second over the last RATE_WINDOW_S."""
        now = time.monotonic()
        rate = list(self._rate)
        rate = [(t, n) for t, n in rate if now - t <= RATE_WINDOW_S]
        if not rate:
            return 0.0
        span = max(now - rate[0][0], 1e-3)
        return sum(n for _, n in rate) / span if len(rate) > 1 else rate[0][1] / span

    # -- sampling and streaming -----------------------------------------------------------

    def sample_and_stream(self, seqs: list[Seq], logits: torch.Tensor, step: int) -> int:
        """Sample the next token of each of seqs (row i of logits is seqs[i]'s), stream it and
        retire the sequences that finished; returns how many did."""
        if not seqs:
            return 0
        b, lim = self.batch, self.limits
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
            b.fair.charge(seq.tenant, output_tokens=1)
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
            if tok in lim.eos_ids and not opts.ignore_eos or tok in opts.stop_token_ids:
                finish = FINISH_STOP
                text = seq.text.flush()
            else:
                text, stopped = seq.text.add(tok)
                if stopped:
                    finish = FINISH_STOP
                elif seq.generated >= opts.max_tokens or len(seq.tokens) >= lim.max_positions:
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
                self.retire(seq)
                finished += 1
        self._rate.append((time.monotonic(), len(seqs)))
        while self._rate and time.monotonic() - self._rate[0][0] > RATE_WINDOW_S:
            self._rate.popleft()
        return finished

    # -- slow readers ---------------------------------------------------------------------

    def slow_readers(self, now: float) -> None:
        """Pause running streams whose client has stream_buffer_outputs unread (their KV freed,
        out of the batch, the adapter still held); put back in their tenant's queue (front) the
        paused ones read down to half of it, to be recomputed (prefix caching keeps most of
        their blocks); fail those paused past stream_stall_timeout_s; retire cancelled ones."""
        b, stall_s = self.batch, self.limits.stream_stall_timeout_s
        limit = self.limits.stream_buffer_outputs
        if limit <= 0:
            return
        for s in [s for s in b.running if s.handle.reads and s.handle.unread >= limit]:
            self.kvm.release_blocks(s)
            b.running.remove(s)
            s.handle.paused = True
            self.paused[s.seq_id] = (s, now)
            self.streams_paused += 1
            logger.debug("sequence %d paused: %d outputs unread", s.seq_id, s.handle.unread)
        for sid, (s, since) in list(self.paused.items()):
            h = s.handle
            if h.cancelled or h.expired(now):
                del self.paused[sid]
                b.rows_cancelled += 1
                self.retire(s, reason=FINISH_CANCELLED)
            elif h.unread <= limit // 2:
                del self.paused[sid]
                h.paused = False
                b.fair.push(s, front=True)
                b.waiting_again(s.tenant)
            elif now - since > stall_s:
                del self.paused[sid]
                self.streams_stalled += 1
                self.retire(
                    s,
                    error=ResourceExhausted(
                        f"the stream of request {h.request.request_id or s.seq_id} was not read "
                        f"for {stall_s:.0f} s with {h.unread} outputs "
                        "waiting: cancelled, its resources given to others"
                    ),
                )

    # -- retiring -------------------------------------------------------------------------

    def retire(
        self, seq: Seq, *, reason: str | None = None, error: BaseException | None = None
    ) -> None:
        """A running sequence leaves: blocks freed, adapter reference dropped, final message."""
        b = self.batch
        if seq in b.running:
            b.running.remove(seq)
        self.kvm.release_blocks(seq)
        self.kvm.forget(seq)
        self.release_adapter(seq)
        if error is not None:
            seq.handle._put(error)
        elif reason is not None:
            seq.handle._put(final_output(seq, reason))
        b.num_running = len(b.running)

    def release_adapter(self, seq: Seq) -> None:
        """seq's reference on its adapter goes (when it holds one)."""
        if seq.holds_adapter and seq.digest:
            seq.holds_adapter = False
            self.residency.release(seq.digest)

    def finish_waiting(self, seq: Seq, item: GenerationOutput | BaseException) -> None:
        """A waiting sequence (never running, or preempted) leaves with item as its last."""
        self.kvm.forget(seq)
        self.release_adapter(seq)
        self.batch.waiting_left(seq.tenant)
        seq.handle._put(item)

    def abort(self, waiting: list[Seq], err: Callable[[], BaseException]) -> None:
        """The engine stopped: every sequence not done (waiting, in the waiting queues,
        running, paused) ends with an err(); the running ones release their KV blocks."""
        b = self.batch
        left = waiting + list(b.fair) + list(b.running) + [s for s, _ in self.paused.values()]
        for s in left:
            if not s.handle.done:
                s.handle._put(err())
        for s in b.running:  # their KV blocks and prefix references go too
            self.kvm.release_blocks(s)

    def fail_waiting(self, seq: Seq, err: BaseException) -> None:
        self.finish_waiting(seq, err)

    def cancel_waiting(self, seq: Seq) -> None:
        """A waiting sequence cancelled (or past its deadline) leaves."""
        self.batch.rows_cancelled += 1
        self.finish_waiting(seq, final_output(seq, FINISH_CANCELLED))
