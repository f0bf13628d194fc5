"""What the engine reports about itself: the step log (StepLog: step statistics accumulated on
the step thread and logged every ~30 s while busy) and the Status snapshot (engine_status)."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from mintmesh.services.executor.requests import EngineStatus, StepStats

if TYPE_CHECKING:
    from mintmesh.services.executor.engine import Engine

logger = logging.getLogger("mintmesh.services.executor.engine")

__all__ = ["StepLog", "engine_status", "log_started"]

LOG_EVERY_S = 30.0


class StepLog:
    """Step statistics of the step loop, logged every LOG_EVERY_S while busy."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.since = time.monotonic()
        self.steps = 0
        self.busy_s = 0.0
        self.tokens = self.sampled = self.seqs = 0

    def account(self, st: StepStats, seconds: float, *, waiting: int, kv: tuple[int, int]) -> None:
        """One step of `seconds`; waiting: requests waiting now; kv: (blocks used, total)."""
        self.steps += 1
        self.busy_s += seconds
        self.tokens += st.num_tokens
        self.sampled += st.sampled
        self.seqs += st.num_seqs
        now = time.monotonic()
        span = now - self.since
        if span < LOG_EVERY_S:
            return
        n = max(1, self.steps)
        logger.info(
            "engine: %d steps in %.0f s (%.0f%% busy), %.0f ms/step, %.1f sequences and "
            "%.0f tokens per step, %.1f generated tokens/s, %d waiting, KV %d/%d blocks",
            self.steps,
            span,
            100 * self.busy_s / span,
            1000 * self.busy_s / n,
            self.seqs / n,
            self.tokens / n,
            self.sampled / span,
            waiting,
            *kv,
        )
        self._reset()


def log_started(e: Engine) -> None:
    """What the engine serves with, once at start."""
    logger.info(
        "executor %s: %d LoRA layers, device %s, dtype %s, kernels %s, %d sequences x "
        "%d tokens per step, KV %d blocks of %d, dense %s",
        e.executor_id,
        len(e.runner.layer_shapes),
        e.device,
        e.dtype,
        e.runner.kernel_backend,
        e.limits.max_batch_size,
        e.limits.max_step_tokens,
        e.kv.num_blocks,
        e.kv.block_size,
        e.runner.dense_kernels,
    )


def engine_status(e: Engine, *, node_cache: bool = False) -> EngineStatus:
    """A snapshot of the engine for Status (node_cache: list the node cache's digests too)."""
    res, kv, b = e.residency, e.kv, e.batch
    return EngineStatus(
        executor_id=e.executor_id,
        base_fingerprint=e.base_fingerprint,
        resident_adapters=sorted(res.resident()),
        queue_depth=e.queue_depth,
        running=e.running,
        max_batch_size=e.limits.max_batch_size,
        max_adapters=e.limits.max_adapters,
        device=str(e.device),
        draining=e.draining,
        kernel_backend=e.runner.kernel_backend,
        loading=b.num_loading,
        tokens_per_s=e.output.tokens_per_s(),
        kv_blocks_used=kv.allocator.num_used,
        kv_blocks_total=kv.num_blocks,
        kv_block_size=kv.block_size,
        host_adapters=sorted(res.host.digests()),
        node_cache_adapters=sorted(res.node_cache_digests()) if node_cache else [],
        loading_adapters=e.loader.pending(),
        adapter_pool_bytes_used=res.pool.nbytes(),
        adapter_pool_bytes_total=res.pool.capacity_bytes,
        host_bytes_used=res.host.nbytes,
        host_bytes_total=res.host.max_bytes,
        steps=b.step_no,
        preemptions=b.preemptions,
        tokens_generated=e.output.tokens_generated,
        prefix_caching=e.kvm.prefix_caching,
        prefix_query_tokens=b.prefix_query_tokens,
        prefix_hit_tokens=b.prefix_hit_tokens,
        kv_blocks_cached=kv.allocator.num_cached,
        dense_kernels=e.runner.dense_kernels,
        runner=e.runner.describe(),
        adapter_states={d: s.value for d, s in res.states().items()},
    )
