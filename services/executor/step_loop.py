"""The step loop: one iteration over the parts of the engine (intake.py's intake and reaping,
output.py's slow readers, scheduler.py's plan, ONE forward of the model runner over the packed
plan, output.py's sampling and streaming), and the thread that runs iterations while there is
work, logs their statistics (stats.StepLog) and fails the batch when one raises.

Every iteration runs under the model lock (Forward calls and training batches take it too).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from mintmesh.errors import MintError
from mintmesh.services.executor.requests import StepStats
from mintmesh.services.executor.runner import pack_step
from mintmesh.services.executor.stats import StepLog

if TYPE_CHECKING:
    from mintmesh.services.executor.batch_state import BatchState
    from mintmesh.services.executor.intake import Intake
    from mintmesh.services.executor.kv_manager import KVManager
    from mintmesh.services.executor.output import OutputProcessor
    from mintmesh.services.executor.runner import ModelRunner
    from mintmesh.services.executor.scheduler import Scheduler

logger = logging.getLogger("mintmesh.services.executor.engine")

__all__ = ["StepLoop"]


class StepLoop:
    """Iterations of one engine's parts (step()), and the body of its step thread (run())."""

    def __init__(
        self,
        batch: BatchState,
        *,
        intake: Intake,
        scheduler: Scheduler,
        runner: ModelRunner,
        kvm: KVManager,
        output: OutputProcessor,
        model_lock: threading.Lock,
    ) -> None:
        self.batch = batch
        self.intake = intake
        self.scheduler = scheduler
        self.runner = runner
        self.kvm = kvm
        self.output = output
        self.model_lock = model_lock
        self.log = StepLog()
        # Per iteration of the step thread (the executor's metrics): (its statistics, seconds,
        # the model lock's wait included).
        self.on_step: Callable[[StepStats, float], None] | None = None

    def step(self) -> StepStats:
        """One iteration: intake, reaping, scheduling, one forward, sampling, streaming."""
        with self.model_lock:
            return self._step()

    def has_work(self) -> bool:
        """Requests in the inbox or landed loads, or sequences running or waiting (under the
        state lock)."""
        return bool(self.intake.has_work() or self.batch.running or len(self.batch.fair))

    def run(self) -> None:
        """The step thread: iterations while there is work, until the engine stops."""
        b = self.batch
        kv = self.kvm.kv
        while True:
            with b.lock:
                while not self.has_work() and not b.stopping:
                    b.lock.wait(0.5)
                    if self.output.paused:
                        break  # resume, cancel or time out paused streams
                    if any(
                        s.handle.cancelled or s.handle.expired()
                        for v in self.intake.loading.values()
                        for s in v
                    ):
                        break
                if b.stopping:
                    return
            try:
                t = time.perf_counter()
                st = self.step()
                seconds = time.perf_counter() - t
                used = (kv.allocator.num_used, kv.num_blocks)
                self.log.account(st, seconds, waiting=b.num_waiting, kv=used)
                if self.on_step is not None:
                    self.on_step(st, seconds)
            except Exception as e:
                logger.exception("engine step failed")
                self.fail_running(e)

    def fail_running(self, e: Exception) -> None:
        """A step raised: every running sequence ends with its error."""
        err = e if isinstance(e, MintError) else MintError(f"generation failed: {e!r}")
        with self.model_lock:
            for s in list(self.batch.running):
                self.output.retire(s, error=err)

    def _step(self) -> StepStats:
        b, kvm = self.batch, self.kvm
        b.step_no += 1
        step = b.step_no
        self.intake.take()
        now = time.monotonic()
        self.intake.reap(now)
        self.output.slow_readers(now)
        plan = self.scheduler.schedule()
        sched, admitted, preempted = plan.seqs, plan.admitted, plan.preempted
        b.num_running = len(b.running)
        b.num_loading = sum(len(v) for v in self.intake.loading.values())
        if not sched:
            return StepStats(step=step, admitted=admitted, preempted=preempted)

        # One packed row: every scheduled token of every sequence (runner.pack_step).
        packed = pack_step(sched, kvm.kv)
        b.prefill_tokens_computed += packed.prefill
        logits = self.runner.run(packed.batch)
        for seq, n in sched:
            seq.num_computed += n
            if kvm.prefix_caching:
                kvm.register_blocks(seq, seq.num_computed - n)
            if n > 1 or seq.generated == 0:
                b.fair.charge(seq.tenant, prompt_tokens=n)
        finished = self.output.sample_and_stream(packed.samplers, logits, step)
        b.num_running = len(b.running)
        if step % 256 == 0:
            b.fair.forget_idle({s.tenant for s in b.running})
        return StepStats(
            step=step,
            num_tokens=len(packed.batch.token_ids),
            num_seqs=len(sched),
            prefill_tokens=packed.prefill,
            decode_tokens=packed.decode,
            sampled=len(packed.samplers),
            attention_keys=sum(packed.batch.positions) + len(packed.batch.positions),
            admitted=admitted,
            preempted=preempted,
            finished=finished,
            adapters=len({seq.slot for seq, _ in sched if seq.slot >= 0}),
        )
