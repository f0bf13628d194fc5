"""The step loop's output side: sampling each sampled row's next token (per request:
temperature, top-k, top-p, seed, logprobs), streaming it to the request's handle, deciding when
a sequence is finished (EOS, stop strings and token ids, max_tokens, the model's positions),
and retiring sequences: running ones (their KV blocks freed, their adapter reference dropped,
their final message) and waiting ones (cancelled, expired or failed before they ran).

Streams whose client stopped reading are paused here too (slow_readers): out of the batch with
their KV freed, back in their tenant's queue once read down, failed when never read again.

The OutputProcessor works on its engine's running list, waiting queues, KV manager and adapter
residency through a back-reference, like the Scheduler, on the step thread.
"""

from __future__ import annotations

import logging
import time
from collections import deque
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
    from mintmesh.services.executor.engine import Engine

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

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
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
        e = self.engine
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
            e._fair.charge(seq.tenant, output_tokens=1)
            if seq.first_step is None:
                seq.first_step = h.first_step = step
            seq.last_step = h.last_step = step
            if e.on_token is not None:
                now, first = time.monotonic(), h.token_at is None
                e.on_token(now - (h.submitted_at if first else h.token_at), first)
                h.token_at = now
            lp, pieces, top = [], [], []
            if opts.logprobs and logprobs is not None:
                lp, pieces = [float(logprobs[i, tok])], [e.token_piece(tok)]
                if opts.top_logprobs:
                    vals, idx = torch.topk(logprobs[i], opts.top_logprobs)
                    top = [list(zip(idx.tolist(), vals.tolist(), strict=True))]
            finish = None
            if tok in e.eos_ids and not opts.ignore_eos or tok in opts.stop_token_ids:
                finish = FINISH_STOP
                text = seq.text.flush()
            else:
                text, stopped = seq.text.add(tok)
                if stopped:
                    finish = FINISH_STOP
                elif seq.generated >= opts.max_tokens or len(seq.tokens) >= e.max_positions:
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
        e = self.engine
        limit = e.stream_buffer_outputs
        if limit <= 0:
            return
        for s in [s for s in e._running if s.handle.reads and s.handle.unread >= limit]:
            e.kvm.release_blocks(s)
            e._running.remove(s)
            s.handle.paused = True
            self.paused[s.seq_id] = (s, now)
            self.streams_paused += 1
            logger.debug("sequence %d paused: %d outputs unread", s.seq_id, s.handle.unread)
        for sid, (s, since) in list(self.paused.items()):
            h = s.handle
            if h.cancelled or h.expired(now):
                del self.paused[sid]
                e.rows_cancelled += 1
                self.retire(s, reason=FINISH_CANCELLED)
            elif h.unread <= limit // 2:
                del self.paused[sid]
                h.paused = False
                e._fair.push(s, front=True)
                e.intake.waiting_again(s.tenant)
            elif now - since > e.stream_stall_timeout_s:
                del self.paused[sid]
                self.streams_stalled += 1
                self.retire(
                    s,
                    error=ResourceExhausted(
                        f"the stream of request {h.request.request_id or s.seq_id} was not read "
                        f"for {e.stream_stall_timeout_s:.0f} s with {h.unread} outputs "
                        "waiting: cancelled, its resources given to others"
                    ),
                )

    # -- retiring -------------------------------------------------------------------------

    def retire(
        self, seq: Seq, *, reason: str | None = None, error: BaseException | None = None
    ) -> None:
        """A running sequence leaves: blocks freed, adapter reference dropped, final message."""
        e = self.engine
        if seq in e._running:
            e._running.remove(seq)
        e.kvm.release_blocks(seq)
        e.kvm.forget(seq)
        self.release_adapter(seq)
        if error is not None:
            seq.handle._put(error)
        elif reason is not None:
            seq.handle._put(final_output(seq, reason))
        e._num_running = len(e._running)

    def release_adapter(self, seq: Seq) -> None:
        """seq's reference on its adapter goes (when it holds one)."""
        if seq.holds_adapter and seq.digest:
            seq.holds_adapter = False
            self.engine.residency.release(seq.digest)

    def finish_waiting(self, seq: Seq, item: GenerationOutput | BaseException) -> None:
        """A waiting sequence (never running, or preempted) leaves with item as its last."""
        e = self.engine
        e.kvm.forget(seq)
        self.release_adapter(seq)
        e.intake.waiting_left(seq.tenant)
        seq.handle._put(item)

    def fail_waiting(self, seq: Seq, err: BaseException) -> None:
        self.finish_waiting(seq, err)

    def cancel_waiting(self, seq: Seq) -> None:
        """A waiting sequence cancelled (or past its deadline) leaves."""
        self.engine.rows_cancelled += 1
        self.finish_waiting(seq, final_output(seq, FINISH_CANCELLED))
