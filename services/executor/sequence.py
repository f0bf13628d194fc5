"""Sequences and the fair waiting queue of the step loop, plain Python.

Fairness is S-LoRA's Virtual Token Counter (OSDI 2024, "Fairness in Serving Large Language
Models"): every tenant has a counter of the service it received (prompt tokens weighted 1,
generated tokens weighted 2); the next request admitted is the head of the queue of the waiting
tenant with the smallest counter. A tenant that becomes active again is lifted to the smallest
counter of the tenants already waiting, so idling banks no credit. A tenant with a thousand
queued requests therefore cannot starve another tenant's single request: that request is taken
as soon as a sequence slot frees; and when no slot frees (the batch is full of one tenant's long
streams) the engine preempts the newest sequence of a tenant over its share of the batch
(max_batch_size over the tenants running or waiting) for a waiting tenant under it, so that
request is admitted within a step whatever the other tenant does.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

BASE_TENANT = "__base__"
PROMPT_WEIGHT = 1.0
OUTPUT_WEIGHT = 2.0


@dataclass(eq=False)
class Sequence:
    """One generation request inside the engine."""

    seq_id: int
    tenant: str
    digest: str | None
    prompt_len: int
    # Prompt, then every generated token. KV of tokens[:num_computed] is in the cache.
    tokens: list[int]
    handle: Any = None
    text: Any = None  # IncrementalText
    generator: Any = None  # torch.Generator for sampling, None for greedy
    deadline: float | None = None
    otel_context: Any = None
    num_computed: int = 0
    blocks: list[int] = field(default_factory=list)
    slot: int = -1  # adapter pool slot while running, -1 = no adapter
    holds_adapter: bool = False  # holds a reference on its adapter (AdapterResidency.acquire)
    admit_order: int = -1
    preemptions: int = 0
    first_step: int | None = None  # step of its first generated token
    last_step: int | None = None

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def remaining(self) -> int:
        """Tokens still to run through the model before the next sample."""
        return len(self.tokens) - self.num_computed

    @property
    def decoding(self) -> bool:
        """One token to run after a sampled one (a prompt whose prefix came from the cache
        but for its last token is still a prefill)."""
        return self.num_computed > 0 and self.remaining == 1 and self.generated > 0


class FairQueue:
    """Per-tenant FIFO queues picked by the smallest virtual token counter."""

    def __init__(self) -> None:
        self._queues: dict[str, deque[Sequence]] = {}
        self.counters: dict[str, float] = {}
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[Sequence]:
        for q in self._queues.values():
            yield from q

    def push(self, seq: Sequence, *, front: bool = False) -> None:
        q = self._queues.get(seq.tenant)
        if not q:
            # (Re)activation: no credit for the time spent idle.
            active = [self.counters[t] for t, qq in self._queues.items() if qq]
            if active:
                floor = min(active)
                self.counters[seq.tenant] = max(self.counters.get(seq.tenant, 0.0), floor)
            else:
                self.counters.setdefault(seq.tenant, 0.0)
            if q is None:
                q = self._queues[seq.tenant] = deque()
        if front:
            q.appendleft(seq)
        else:
            q.append(seq)
        self._size += 1

    def tenants(self) -> set[str]:
        """The tenants with a request waiting."""
        return {t for t, q in self._queues.items() if q}

    def peek(self, exclude: frozenset[str] | set[str] = frozenset()) -> Sequence | None:
        """The next request by virtual token counter, of a tenant not in exclude."""
        best: tuple[float, int] | None = None
        pick = None
        for t, q in self._queues.items():
            if not q or t in exclude:
                continue
            key = (self.counters.get(t, 0.0), q[0].seq_id)
            if best is None or key < best:
                best, pick = key, q[0]
        return pick

    def remove(self, seq: Sequence) -> None:
        q = self._queues.get(seq.tenant)
        if q is None:
            raise KeyError(f"sequence {seq.seq_id} of tenant {seq.tenant!r} is not queued")
        q.remove(seq)
        self._size -= 1
        if not q:
            del self._queues[seq.tenant]

    def charge(self, tenant: str, prompt_tokens: int = 0, output_tokens: int = 0) -> None:
        self.counters[tenant] = (
            self.counters.get(tenant, 0.0)
            + PROMPT_WEIGHT * prompt_tokens
            + OUTPUT_WEIGHT * output_tokens
        )

    def forget_idle(self, keep: set[str]) -> None:
        """Drop the counters of tenants neither waiting nor in keep (bounded memory)."""
        for t in [t for t in self.counters if t not in keep and not self._queues.get(t)]:
            del self.counters[t]
