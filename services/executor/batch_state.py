"""What the parts of the step loop share, handed to each at construction (intake.py,
scheduler.py, output.py), so that no part reaches into another's attributes or the engine's.

- StepLimits: the budgets and bounds, fixed when the engine starts (ExecutorConfig and the
  model's vocabulary, positions and EOS ids).
- BatchState: what changes while the engine runs: the running sequences and the tenants'
  waiting queues (sequence.py's FairQueue), the waiting counters (all requests and per tenant),
  the step number and the counters Status and the metrics read; and the state lock, a
  Condition that request threads and the step thread take around the waiting counters, the
  intake's inbox and the accepting/stopping flags (the step loop waits on it for work).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from mintmesh.services.executor.config import ExecutorConfig
from mintmesh.services.executor.sequence import FairQueue
from mintmesh.services.executor.sequence import Sequence as Seq

__all__ = ["BatchState", "PartAttribute", "StepLimits"]


@dataclass(frozen=True)
class StepLimits:
    """The step loop's budgets and bounds."""

    max_batch_size: int
    max_step_tokens: int
    max_adapters: int
    max_step_adapters: int
    max_queue: int
    max_queue_per_tenant: int
    fair_share_preemption: bool
    first_token_steps: bool
    stream_buffer_outputs: int
    stream_stall_timeout_s: float
    stream_messages_per_s: float
    stream_max_interval_s: float
    vocab_size: int
    max_positions: int
    max_prompt_tokens: int
    eos_ids: frozenset[int]

    @classmethod
    def of(cls, config: ExecutorConfig, model_config, tokenizer) -> StepLimits:
        """The limits of config over a model (its HF config) and tokenizer."""
        batch = int(config.max_batch_size)
        positions = int(getattr(model_config, "max_position_embeddings", 0) or 2**31 - 1)
        eos = model_config.eos_token_id
        eos = eos if eos is not None else tokenizer.eos_token_id
        return cls(
            max_batch_size=batch,
            max_step_tokens=max(int(config.max_step_tokens), batch),
            max_adapters=int(config.max_adapters),
            max_step_adapters=int(config.max_step_adapters),
            max_queue=int(config.max_queue),
            max_queue_per_tenant=int(config.max_queue_per_tenant) or int(config.max_queue),
            fair_share_preemption=bool(config.fair_share_preemption),
            first_token_steps=bool(config.first_token_steps),
            stream_buffer_outputs=int(config.stream_buffer_outputs),
            stream_stall_timeout_s=float(config.stream_stall_timeout_s),
            stream_messages_per_s=float(config.stream_messages_per_s),
            stream_max_interval_s=float(config.stream_max_interval_s),
            vocab_size=int(model_config.vocab_size),
            max_positions=positions,
            max_prompt_tokens=min(int(config.max_prompt_tokens) or positions - 1, positions - 1),
            eos_ids=frozenset(eos if isinstance(eos, (list, tuple)) else [eos]) - {None},
        )


class PartAttribute:
    """A class attribute that reads (and writes through) the attribute of the same name of one
    of the instance's parts: `step_no = PartAttribute("batch")` makes obj.step_no
    obj.batch.step_no."""

    def __init__(self, part: str) -> None:
        self.part = part

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, obj, owner=None):
        return self if obj is None else getattr(getattr(obj, self.part), self.name)

    def __set__(self, obj, value) -> None:
        setattr(getattr(obj, self.part), self.name, value)


class BatchState:
    """The running list, the waiting queues and counters, the state lock and the flags."""

    def __init__(self) -> None:
        # Under `lock` (request threads and the step thread).
        self.lock = threading.Condition()
        self.accepting = True
        self.stopping = False
        self.num_waiting = 0  # requests waiting: for a sequence slot or their adapter's load
        self.tenant_waiting: dict[str, int] = {}
        # The step thread's (the step loop's thread; set by the engine that runs one).
        self.thread: threading.Thread | None = None
        self.running: list[Seq] = []
        self.fair = FairQueue()
        self.step_no = 0
        # Snapshots for other threads, updated by the step thread.
        self.num_running = 0
        self.num_loading = 0
        # Counters (Status, the metrics).
        self.preemptions = 0
        self.fair_preemptions = 0
        self.first_token_steps = 0  # steps of first-token prefills alone (scheduler.py)
        self.last_first_token_step = False
        self.rows_cancelled = 0
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0
        self.prefill_tokens_computed = 0

    # -- the waiting counters --------------------------------------------------------------

    def waiting_new(self, tenant: str) -> None:
        """A new request of tenant waits (the caller holds the lock)."""
        self.num_waiting += 1
        self.tenant_waiting[tenant] = self.tenant_waiting.get(tenant, 0) + 1

    def waiting_again(self, tenant: str) -> None:
        """A sequence of tenant waits again (preempted, or a paused stream resumed)."""
        with self.lock:
            self.waiting_new(tenant)

    def waiting_left(self, tenant: str) -> None:
        """A sequence of tenant stopped waiting (admitted, or it ended while waiting)."""
        with self.lock:
            self.num_waiting -= 1
            n = self.tenant_waiting.get(tenant, 0) - 1
            if n > 0:
                self.tenant_waiting[tenant] = n
            else:
                self.tenant_waiting.pop(tenant, None)

    # -- the step loop's thread ------------------------------------------------------------

    def busy(self) -> bool:
        """Sequences running or waiting."""
        return bool(self.num_running or self.num_waiting)

    def wake(self) -> None:
        """Wake the step loop (a request cancelled, a stream read down, new work)."""
        with self.lock:
            self.lock.notify_all()

    def stopped(self) -> bool:
        """The engine stopped and its step loop is gone."""
        return self.stopping and (self.thread is None or not self.thread.is_alive())
