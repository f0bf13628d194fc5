"""The executor's configuration: one frozen dataclass, built once at start (CLI flags over
MINT_EXECUTOR_* environment variables over defaults) and passed down."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mintmesh.kernels.dense import DENSE_MODES
from mintmesh.packed import DTYPES
from mintmesh.services.common.config import check_metrics_port


@dataclass(frozen=True)
class ExecutorConfig:
    # Local Hugging Face model directory of the backbone (`mint model init`).
    model_dir: Path
    # The node cache directory (the sidecar's LMDB file lives inside it), read-only here.
    cache_dir: Path | None = None
    # host:port of the cache sidecar; empty = no adapter source (base model only).
    cache_address: str = ""
    host: str = "127.0.0.1"
    port: int = 0
    executor_id: str = "executor-0"
    device: str = "cpu"
    dtype: str = "float32"
    # Sequences running at once (the step loop's sequence budget).
    max_batch_size: int = 32
    # Tokens through the model per step (prefill chunks + decode tokens; >= max_batch_size).
    max_step_tokens: int = 512
    # Adapters resident in the device pool at once (slots), and the pool's bytes (0 = room for
    # max_adapters adapters of rank 32).
    max_adapters: int = 64
    adapter_pool_bytes: int = 0
    # Distinct adapters among running sequences (the step's adapter budget); 0 = max_adapters.
    max_step_adapters: int = 0
    # Host tier: checked, unpacked adapters kept in one staging arena of host memory, in bytes
    # (page-locked on CUDA, where torch's pinned allocator rounds the size up to a power of 2).
    host_cache_bytes: int = 512 << 20
    # Touch the host tier's staging arena at start (CPU), so no load page-faults fresh memory.
    host_prefault: bool = True
    # Background threads moving adapters node cache -> host -> device.
    loader_threads: int = 2
    # Generation requests waiting (for a sequence slot or their adapter); more are refused with
    # RESOURCE_EXHAUSTED + RetryInfo. Per tenant: 0 = max_queue.
    max_queue: int = 256
    # Training runs on this executor: their LoRA weights, gradients and AdamW state, in bytes
    # (a run that does not fit is refused with RESOURCE_EXHAUSTED).
    training_max_bytes: int = 256 << 20
    # While there are sequences to serve, training runs in micro-batches of this many padded
    # tokens (one datum at the least), a serving step before each; and within one, the
    # forward/backward gives the model to a serving step at the first layer boundary after
    # training_slice_ms (time-slicing at layer granularity).
    training_micro_tokens: int = 64
    training_slice_ms: float = 10.0
    max_queue_per_tenant: int = 0
    # Fairness within the batch: when it is full and a tenant under its share (max_batch_size
    # over the tenants running or waiting) waits, the newest sequence of the tenant most over
    # its share is preempted (recomputed later) for it.
    fair_share_preemption: bool = True
    # Slow readers: a stream its client has started reading, with this many outputs unread, is
    # paused (its KV freed, out of the batch; recomputed when the client has read half of
    # them), and failed RESOURCE_EXHAUSTED after stream_stall_timeout_s paused. A caller that
    # takes the whole result at the end is never paused. 0 = never paused.
    stream_buffer_outputs: int = 64
    stream_stall_timeout_s: float = 60.0
    # The paged KV cache: bytes (0 = max_batch_size sequences of min(512, max positions)
    # tokens) and tokens per block.
    kv_cache_bytes: int = 0
    kv_block_size: int = 16
    # Automatic prefix caching: full KV blocks stay cached after their sequence leaves, keyed by
    # (adapter digest, every token up to the block's end); a new request with the same digest
    # and prefix reuses them instead of recomputing (multi-turn chat re-sends its history).
    prefix_caching: bool = True
    # Longest prompt accepted; 0 = the model's max_position_embeddings - 1.
    max_prompt_tokens: int = 0
    # The backbone's Linears: "auto" (oneDNN with weights packed once on CPU float32, else
    # torch's nn.Linear), "onednn" (required; start fails where it cannot serve) or "torch".
    dense_kernels: str = "auto"
    # Largest LoRA rank this executor serves.
    max_rank: int = 256
    # Deadline of one EnsureAdapter call to the sidecar (capped by the caller's deadline).
    fetch_timeout_s: float = 30.0
    otlp_endpoint: str = ""
    # Prometheus endpoint (http://host:PORT/metrics): None = none, 0 = a free port.
    metrics_port: int | None = None

    def __post_init__(self) -> None:
        if self.training_micro_tokens < 1:
            raise ValueError(f"training_micro_tokens {self.training_micro_tokens} must be >= 1")
        if not self.training_slice_ms >= 0:
            raise ValueError(f"training_slice_ms {self.training_slice_ms} must be >= 0")
        if self.training_max_bytes < 0:
            raise ValueError(f"training_max_bytes {self.training_max_bytes} must be >= 0")
        # load_config passes strings for Path | None fields; normalise here.
        object.__setattr__(self, "model_dir", Path(self.model_dir))
        if self.cache_dir is not None and str(self.cache_dir) != "":
            object.__setattr__(self, "cache_dir", Path(self.cache_dir))
        else:
            object.__setattr__(self, "cache_dir", None)
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not supported; use one of {sorted(DTYPES)}")
        for name in (
            "max_batch_size",
            "max_step_tokens",
            "max_adapters",
            "max_queue",
            "max_rank",
            "kv_block_size",
            "loader_threads",
        ):
            val = getattr(self, name)
            if int(val) < 1:
                raise ValueError(f"{name}={val} must be >= 1")
        for name in ("adapter_pool_bytes", "host_cache_bytes", "kv_cache_bytes",
                     "max_queue_per_tenant", "max_step_adapters",
                     "stream_buffer_outputs"):  # fmt: skip
            val = getattr(self, name)
            if int(val) < 0:
                raise ValueError(f"{name}={val} must be >= 0")
        if self.dense_kernels not in DENSE_MODES:
            raise ValueError(
                f"dense_kernels {self.dense_kernels!r} is not supported; use one of "
                f"{', '.join(DENSE_MODES)}"
            )
        if self.max_prompt_tokens < 0:
            raise ValueError(f"max_prompt_tokens={self.max_prompt_tokens} must be >= 0")
        if self.stream_stall_timeout_s <= 0:
            raise ValueError(f"stream_stall_timeout_s={self.stream_stall_timeout_s} must be > 0")
        if self.fetch_timeout_s <= 0:
            raise ValueError(f"fetch_timeout_s={self.fetch_timeout_s} must be > 0")
        check_metrics_port(self.metrics_port)
