"""The step loop's intake: requests from submit() to a waiting queue.

submit() (a request thread) validates a request (its sampling options, prompt and stop token
ids against the vocabulary and the model's positions, its adapter digest, its prompt against
the KV cache), refuses it when the executor is draining or the queue (max_queue, and per tenant
max_queue_per_tenant) is full, and puts its new sequence in the inbox; a cold adapter's load
starts at once, in the request's trace. Each step then moves the inbox's sequences to the
waiting queue of their tenant when their adapter is on the device (they hold a reference on
it), else to the queue of their adapter's load; and reaps cancelled and expired requests
wherever they are.

The waiting counters (all requests and per tenant) every part of the step loop updates when a
sequence starts or stops waiting live in the shared BatchState (batch_state.py); they and the
inbox are guarded by its state lock. The Intake is given what it works on at construction (the
shared state, the KV cache it checks prompts against, the adapter residency and loader, the
OutputProcessor that finishes what leaves while waiting), like the Scheduler.
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
    from mintmesh.services.executor.batch_state import BatchState, StepLimits
    from mintmesh.services.executor.kv import PagedKVCache
    from mintmesh.services.executor.output import OutputProcessor
    from mintmesh.services.executor.residency import AdapterLoader, AdapterResidency

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
    """Validation, queue limits and the inbox of one engine."""

    def __init__(
        self,
        batch: BatchState,
        limits: StepLimits,
        *,
        kv: PagedKVCache,
        residency: AdapterResidency,
        loader: AdapterLoader,
        output: OutputProcessor,
        tokenizer,
        device: torch.device,
        executor_id: str,
    ) -> None:
        self.batch = batch
        self.limits = limits
        self.kv = kv
        self.residency = residency
        self.loader = loader
        self.output = output
        self.tokenizer = tokenizer
        self.device = device
        self.executor_id = executor_id
        # Under the state lock (request threads and the step thread).
        self.inbox: deque[Seq] = deque()
        # Adapter loads that landed (digest, error or None) since the last step.
        self.landed: deque[tuple[str, BaseException | None]] = deque()
        self.next_seq_id = 0
        # The step thread's: digest -> the sequences waiting for its load.
        self.loading: dict[str, list[Seq]] = {}

    # -- request threads ------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> GenerationHandle:
        """Validate and queue a request (RESOURCE_EXHAUSTED when the queue is full). A request
        whose adapter is not on the device waits for the background loader; errors of that
        load arrive on its handle."""
        b, lim, kv = self.batch, self.limits, self.kv
        request.sampling.validate()
        request.prompt_token_ids = self.check_tokens(
            request.prompt_token_ids, "prompt", limit=lim.max_prompt_tokens
        )
        for t in request.sampling.stop_token_ids:
            if not 0 <= t < lim.vocab_size:
                raise InvalidArgument(
                    f"stop_token_ids has {t}, not a token id (vocab size {lim.vocab_size})"
                )
        digest = request.adapter_digest or None
        if digest:
            check_digest(digest)
        request.adapter_digest = digest
        prompt_len = len(request.prompt_token_ids)
        if kv.blocks_for(prompt_len + 1) > kv.num_blocks:
            raise InvalidArgument(
                f"prompt has {prompt_len} tokens; the KV cache of this executor holds "
                f"{kv.capacity_tokens}"
            )
        tenant = request.tenant or (digest if digest else BASE_TENANT)
        handle = GenerationHandle(
            request,
            b,
            resume_unread=lim.stream_buffer_outputs // 2,
            messages_per_s=lim.stream_messages_per_s,
            max_interval_s=lim.stream_max_interval_s,
        )
        opts = request.sampling
        gen = None
        if opts.temperature > 0:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(opts.seed if opts.seed is not None else random.getrandbits(63))
        from opentelemetry import context as otel_context

        with b.lock:
            if not b.accepting:
                raise Unavailable(f"executor {self.executor_id} is draining")
            if b.num_waiting >= lim.max_queue:
                raise self.queue_full(f"{b.num_waiting} requests waiting")
            if b.tenant_waiting.get(tenant, 0) >= lim.max_queue_per_tenant:
                raise self.queue_full(
                    f"tenant {tenant!r} has {b.tenant_waiting[tenant]} requests waiting, "
                    f"its limit is {lim.max_queue_per_tenant}"
                )
            self.next_seq_id += 1
            seq = Seq(
                seq_id=self.next_seq_id,
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
            handle.submit_step = b.step_no
            if digest and digest not in self.residency:
                # Cold: the load starts now, in this request's trace; the request waits for
                # it in the step loop's intake.
                self.loader.request(digest, otel_context=seq.otel_context)
            b.waiting_new(tenant)
            self.inbox.append(seq)
            b.lock.notify_all()
        return handle

    def queue_full(self, why: str) -> ResourceExhausted:
        rate = self.output.tokens_per_s()
        # About the time the requests ahead need for a sequence slot to free up.
        retry = 0.2 if rate <= 0 else min(5.0, max(0.05, self.batch.num_waiting * 16 / rate))
        return ResourceExhausted(
            f"generation queue of executor {self.executor_id} is full ({why}; max_queue "
            f"{self.limits.max_queue})",
            retry_after_s=retry,
        )

    def check_rows(
        self, rows: Sequence[tuple[str | None, Sequence[int]]]
    ) -> tuple[list[list[int]], list[str]]:
        """Engine.forward's rows (adapter digest or None, token ids), checked: their token ids
        and the distinct adapters they use (at most max_adapters), in order."""
        if not rows:
            raise InvalidArgument("rows is empty: give at least one row")
        lim = self.limits
        ids_list: list[list[int]] = []
        wanted: list[str] = []
        for i, (digest, ids) in enumerate(rows):
            ids_list.append(self.check_tokens(ids, f"rows[{i}].token_ids", limit=lim.max_positions))
            if digest:
                check_digest(digest)
                if digest not in wanted:
                    wanted.append(digest)
        if len(wanted) > lim.max_adapters:
            raise InvalidArgument(
                f"rows use {len(wanted)} distinct adapters, more than max_adapters "
                f"{lim.max_adapters} of this executor"
            )
        return ids_list, wanted

    def check_tokens(self, ids: Sequence[int], what: str, *, limit: int) -> list[int]:
        """ids as ints, checked: not empty, at most limit, each a token id of the vocabulary."""
        lim = self.limits
        ids = [int(t) for t in ids]
        if not ids:
            raise InvalidArgument(f"{what} is empty: give at least one token")
        if len(ids) > limit:
            raise InvalidArgument(
                f"{what} has {len(ids)} tokens, more than the {limit} this executor accepts "
                f"(model max positions {lim.max_positions})"
            )
        for j, t in enumerate(ids):
            if not 0 <= t < lim.vocab_size:
                raise InvalidArgument(
                    f"{what}[{j}] = {t} is not a token id (vocab size {lim.vocab_size})"
                )
        return ids

    def on_loaded(self, digest: str, err: BaseException | None) -> None:
        """The loader's callback (a loader thread): hand the result to the next step."""
        with self.batch.lock:
            self.landed.append((digest, err))
            self.batch.lock.notify_all()

    # -- the step thread ------------------------------------------------------------------

    def has_work(self) -> bool:
        """Requests in the inbox, or loads that landed (under the state lock)."""
        return bool(self.inbox or self.landed)

    def waiting_sequences(self) -> list[Seq]:
        """The sequences in the inbox or waiting for their adapter's load."""
        return list(self.inbox) + [s for v in self.loading.values() for s in v]

    def take(self) -> None:
        """A step's intake: the loads that landed release (or fail) their waiting sequences,
        then the inbox's sequences join their queues."""
        with self.batch.lock:
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
        seqs = self.loading.pop(digest, [])
        if err is not None:
            for s in seqs:
                self.output.fail_waiting(s, err)
            return
        for s in seqs:
            slot = self.residency.acquire(digest)
            assert slot is not None, "a landed adapter is referenced until its requests take it"
            s.holds_adapter = True
            self.batch.fair.push(s)
        # The loader's own reference.
        self.residency.release(digest)

    def enqueue(self, seq: Seq) -> None:
        """seq (from the inbox) to its tenant's queue when its adapter is on the device (taking
        a reference on it), else to the queue of its adapter's load."""
        fair, d = self.batch.fair, seq.digest
        if d is None:
            fair.push(seq)
        elif d in self.loading:
            self.loading[d].append(seq)
        elif self.residency.acquire(d) is not None:
            seq.holds_adapter = True
            fair.push(seq)
        else:
            self.loading[d] = [seq]
            self.loader.request(d, otel_context=seq.otel_context)

    def reap(self, now: float) -> None:
        """Cancelled and expired requests leave, running, waiting or waiting for their load."""
        b, out = self.batch, self.output
        for s in list(b.running):
            if s.handle.cancelled or s.handle.expired(now):
                b.rows_cancelled += 1
                out.retire(s, reason=FINISH_CANCELLED)
        for s in [s for s in b.fair if s.handle.cancelled or s.handle.expired(now)]:
            b.fair.remove(s)
            out.cancel_waiting(s)
        for d, seqs in list(self.loading.items()):
            gone = [s for s in seqs if s.handle.cancelled or s.handle.expired(now)]
            for s in gone:
                seqs.remove(s)
                out.cancel_waiting(s)
            if not seqs:
                # The load goes on (it warms the tiers); nobody waits for it any more.
                self.loading[d] = []
