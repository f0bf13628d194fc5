"""The step loop's intake: requests from submit() to a waiting queue.

submit() (a request thread) validates a request (its sampling options, prompt and stop token
ids against the vocabulary and the model's positions, its adapter digest, its prompt against
the KV cache), refuses it when the executor is draining or the queue (max_queue, and per tenant
max_queue_per_tenant) is full, and puts its new sequence in the inbox; a cold adapter's load
starts at once, in the request's trace. Each step then moves the inbox's sequences to the
waiting queue of their tenant when their adapter is on the device (they hold a reference on
it), else to the queue of their adapter's load; and reaps cancelled and expired requests
wherever they are.

The Intake keeps the waiting counters (all requests and per tenant) every part of the step loop
updates when a sequence starts or stops waiting; they and the inbox are guarded by the
engine's state lock. It works on its engine through a back-reference, like the Scheduler.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from mintmesh.errors import InvalidArgument, ResourceExhausted, Unavailable
from mintmesh.identity import check_digest
from mintmesh.services.executor.requests import (
    FINISH_CANCELLED,
    GenerationHandle,
    GenerationRequest,
)
from mintmesh.services.executor.sampling import IncrementalText
from mintmesh.services.executor.sequence import BASE_TENANT
from mintmesh.services.executor.sequence import Sequence as Seq

if TYPE_CHECKING:
    from mintmesh.services.executor.engine import Engine

__all__ = ["CHAT_ROLES", "Intake", "encode", "encode_chat"]

# Roles a chat template is given.
CHAT_ROLES = frozenset({"system", "user", "assistant", "tool", "developer"})


def encode(tokenizer, text: str) -> list[int]:
    """A prompt's token ids (with the tokenizer's special tokens)."""
    return list(tokenizer.encode(text, add_special_tokens=True))


def encode_chat(tokenizer, messages: Sequence[tuple[str, str]]) -> list[int]:
    """A chat's prompt: (role, content) turns rendered by the tokenizer's chat template,
    with the assistant's turn opened."""
    if not messages:
        raise InvalidArgument("messages is empty: give at least one message")
    for i, (role, _) in enumerate(messages):
        if role not in CHAT_ROLES:
            raise InvalidArgument(
                f"messages[{i}].role is {role!r}; one of {sorted(CHAT_ROLES)} is needed"
            )
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidArgument(
            "this backbone's tokenizer has no chat template (tokenizer_config.json "
            "chat_template): send a prompt instead of messages"
        )
    turns = [{"role": r, "content": c} for r, c in messages]
    try:
        text = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # the template's own raise_exception, or a jinja error
        raise InvalidArgument(f"the chat template refused these messages: {e}") from None
    # The template writes the special tokens it wants (BOS among them): none added here.
    return list(tokenizer.encode(text, add_special_tokens=False))


class Intake:
    """Validation, queue limits, the inbox and the waiting counters of one engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # Under the engine's state lock (request threads and the step thread).
        self.inbox: deque[Seq] = deque()
        # Adapter loads that landed (digest, error or None) since the last step.
        self.landed: deque[tuple[str, BaseException | None]] = deque()
        self.num_waiting = 0
        self.tenant_waiting: dict[str, int] = {}
        self.next_seq_id = 0
        # The step thread's: digest -> the sequences waiting for its load.
        self.loading: dict[str, list[Seq]] = {}

    # -- request threads ------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> GenerationHandle:
        """Validate and queue a request (RESOURCE_EXHAUSTED when the queue is full). A request
        whose adapter is not on the device waits for the background loader; errors of that
        load arrive on its handle."""
        e = self.engine
        request.sampling.validate()
        request.prompt_token_ids = self.check_tokens(
            request.prompt_token_ids, "prompt", limit=e.max_prompt_tokens
        )
        for t in request.sampling.stop_token_ids:
            if not 0 <= t < e.vocab_size:
                raise InvalidArgument(
                    f"stop_token_ids has {t}, not a token id (vocab size {e.vocab_size})"
                )
        digest = request.adapter_digest or None
        if digest:
            check_digest(digest)
        request.adapter_digest = digest
        prompt_len = len(request.prompt_token_ids)
        if e.kv.blocks_for(prompt_len + 1) > e.kv.num_blocks:
            raise InvalidArgument(
                f"prompt has {prompt_len} tokens; the KV cache of this executor holds "
                f"{e.kv.capacity_tokens}"
            )
        tenant = request.tenant or (digest if digest else BASE_TENANT)
        handle = GenerationHandle(request, e)
        opts = request.sampling
        gen = None
        if opts.temperature > 0:
            gen = torch.Generator(device=e.device)
            gen.manual_seed(opts.seed if opts.seed is not None else random.getrandbits(63))
        from opentelemetry import context as otel_context

        with e._lock:
            if not e._accepting:
                raise Unavailable(f"executor {e.executor_id} is draining")
            if self.num_waiting >= e.max_queue:
                raise self.queue_full(f"{self.num_waiting} requests waiting")
            if self.tenant_waiting.get(tenant, 0) >= e.max_queue_per_tenant:
                raise self.queue_full(
                    f"tenant {tenant!r} has {self.tenant_waiting[tenant]} requests waiting, "
                    f"its limit is {e.max_queue_per_tenant}"
                )
            self.next_seq_id += 1
            seq = Seq(
                seq_id=self.next_seq_id,
                tenant=tenant,
                digest=digest,
                prompt_len=prompt_len,
                tokens=list(request.prompt_token_ids),
                handle=handle,
                text=IncrementalText(e.tokenizer, opts.stop),
                generator=gen,
                deadline=request.deadline,
                otel_context=otel_context.get_current(),
            )
            handle.submit_step = e.step_no
            if digest and digest not in e.pool:
                # Cold: the load starts now, in this request's trace; the request waits for
                # it in the step loop's intake.
                e.loader.request(digest, otel_context=seq.otel_context)
            self.num_waiting += 1
            self.tenant_waiting[tenant] = self.tenant_waiting.get(tenant, 0) + 1
            self.inbox.append(seq)
            e._lock.notify_all()
        return handle

    def queue_full(self, why: str) -> ResourceExhausted:
        e = self.engine
        rate = e.tokens_per_s()
        # About the time the requests ahead need for a sequence slot to free up.
        retry = 0.2 if rate <= 0 else min(5.0, max(0.05, self.num_waiting * 16 / rate))
        return ResourceExhausted(
            f"generation queue of executor {e.executor_id} is full ({why}; max_queue "
            f"{e.max_queue})",
            retry_after_s=retry,
        )

    def check_tokens(self, ids: Sequence[int], what: str, *, limit: int) -> list[int]:
        """ids as ints, checked: not empty, at most limit, each a token id of the vocabulary."""
        e = self.engine
        ids = [int(t) for t in ids]
        if not ids:
            raise InvalidArgument(f"{what} is empty: give at least one token")
        if len(ids) > limit:
            raise InvalidArgument(
                f"{what} has {len(ids)} tokens, more than the {limit} this executor accepts "
                f"(model max positions {e.max_positions})"
            )
        for j, t in enumerate(ids):
            if not 0 <= t < e.vocab_size:
                raise InvalidArgument(
                    f"{what}[{j}] = {t} is not a token id (vocab size {e.vocab_size})"
                )
        return ids

    # -- the waiting counters -------------------------------------------------------------

    def waiting_again(self, tenant: str) -> None:
        """A sequence of tenant waits again (preempted, or a paused stream resumed)."""
        e = self.engine
        with e._lock:
            self.num_waiting += 1
            self.tenant_waiting[tenant] = self.tenant_waiting.get(tenant, 0) + 1

    def waiting_left(self, tenant: str) -> None:
        """A sequence of tenant stopped waiting (admitted, or it ended while waiting)."""
        with self.engine._lock:
            self.num_waiting -= 1
            self._tenant_left(tenant)

    def _tenant_left(self, tenant: str) -> None:
        n = self.tenant_waiting.get(tenant, 0) - 1
        if n > 0:
            self.tenant_waiting[tenant] = n
        else:
            self.tenant_waiting.pop(tenant, None)

    def on_loaded(self, digest: str, err: BaseException | None) -> None:
        """The loader's callback (a loader thread): hand the result to the next step."""
        e = self.engine
        with e._lock:
            self.landed.append((digest, err))
            e._lock.notify_all()

    # -- the step thread ------------------------------------------------------------------

    def take(self) -> None:
        """A step's intake: the loads that landed release (or fail) their waiting sequences,
        then the inbox's sequences join their queues."""
        e = self.engine
        with e._lock:
            inbox = list(self.inbox)
            self.inbox.clear()
            landed = list(self.landed)
            self.landed.clear()
        for digest, err in landed:
            self.land(digest, err)
        for seq in inbox:
            self.enqueue(seq)

    def land(self, digest: str, err: BaseException | None) -> None:
        """digest's load ended: its waiting sequences fail with err, or each takes a reference
        on the adapter and joins its tenant's queue (the loader's own reference goes)."""
        e = self.engine
        seqs = self.loading.pop(digest, [])
        if err is not None:
            for s in seqs:
                e.output.fail_waiting(s, err)
            return
        for s in seqs:
            slot = e.residency.acquire(digest)
            assert slot is not None, "a landed adapter is referenced until its requests take it"
            s.holds_adapter = True
            e._fair.push(s)
        # The loader's own reference.
        e.residency.release(digest)

    def enqueue(self, seq: Seq) -> None:
        """seq (from the inbox) to its tenant's queue when its adapter is on the device (taking
        a reference on it), else to the queue of its adapter's load."""
        e = self.engine
        d = seq.digest
        if d is None:
            e._fair.push(seq)
        elif d in self.loading:
            self.loading[d].append(seq)
        elif e.residency.acquire(d) is not None:
            seq.holds_adapter = True
            e._fair.push(seq)
        else:
            self.loading[d] = [seq]
            e.loader.request(d, otel_context=seq.otel_context)

    def reap(self, now: float) -> None:
        """Cancelled and expired requests leave, running, waiting or waiting for their load."""
        e = self.engine
        for s in list(e._running):
            if s.handle.cancelled or s.handle.expired(now):
                e.rows_cancelled += 1
                e.output.retire(s, reason=FINISH_CANCELLED)
        for s in [s for s in e._fair if s.handle.cancelled or s.handle.expired(now)]:
            e._fair.remove(s)
            e.output.cancel_waiting(s)
        for d, seqs in list(self.loading.items()):
            gone = [s for s in seqs if s.handle.cancelled or s.handle.expired(now)]
            for s in gone:
                seqs.remove(s)
                e.output.cancel_waiting(s)
            if not seqs:
                # The load goes on (it warms the tiers); nobody waits for it any more.
                self.loading[d] = []
