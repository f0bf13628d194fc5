"""Training and serving on one resident model: the executor's training queue (training.py's
TrainingQueue over a Trainer of the engine's backbone, LoRA context and adapter layers), made on
first use, whose batches take the model lock the serving steps take and give it back between
micro-batches while there are sequences to serve (time-slicing: a served stream never waits for
a whole training batch)."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from mintmesh.services.executor.batch_state import BatchState, StepLimits
    from mintmesh.services.executor.config import ExecutorConfig
    from mintmesh.services.executor.lora import LoraContext
    from mintmesh.services.executor.training import TrainingQueue

__all__ = ["TrainingTimeshare"]


class TrainingTimeshare:
    """The training queue of one engine (`queue`: None until get() made it)."""

    def __init__(
        self,
        model: torch.nn.Module,
        ctx: LoraContext,
        layer_shapes,
        *,
        config: ExecutorConfig,
        limits: StepLimits,
        batch: BatchState,
        model_lock: threading.Lock,
        device: torch.device,
    ) -> None:
        self.model = model
        self.ctx = ctx
        self.layer_shapes = layer_shapes
        self.config = config
        self.limits = limits
        self.batch = batch
        self.model_lock = model_lock
        self.device = device
        self.queue: TrainingQueue | None = None
        self._lock = threading.Lock()

    def get(self) -> TrainingQueue:
        """The training queue, made on first use."""
        from mintmesh.services.executor.training import Trainer, TrainingQueue

        with self._lock:
            if self.queue is None:
                cfg = self.config
                trainer = Trainer(
                    self.model,
                    self.ctx,
                    self.layer_shapes,
                    vocab_size=self.limits.vocab_size,
                    max_positions=self.limits.max_positions,
                    max_rank=int(cfg.max_rank),
                    max_bytes=cfg.training_max_bytes,
                    lock=self.model_lock,
                    device=self.device,
                    micro_tokens=cfg.training_micro_tokens,
                    slice_s=cfg.training_slice_ms / 1e3,
                    idle_s=cfg.training_run_idle_s,
                    yield_fn=self.yield_to_serving,
                    busy_fn=self.batch.busy,
                )
                self.queue = TrainingQueue(trainer)
            return self.queue

    def yield_to_serving(self, timeout: float = 0.5) -> None:
        """Between two training micro-batches: while there are sequences to serve, wait for the
        step loop to run one step."""
        b = self.batch
        s0 = b.step_no
        end = time.monotonic() + timeout
        while b.busy() and b.step_no == s0 and time.monotonic() < end:
            time.sleep(0.0005)

    def close(self) -> None:
        if self.queue is not None:
            self.queue.close()
