"""The executor's configuration: one frozen dataclass, built once at start (CLI flags over
MINT_EXECUTOR_* environment variables over defaults) and passed down."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mintmesh.kernels.dense import DENSE_MODES
from mintmesh.kernels.settings import KernelSettings
from mintmesh.packed import DTYPES
from mintmesh.services.common.config import check_metrics_port

# The model runners (services/executor/runners.py).
BACKENDS = ("torch", "onnxruntime")


@dataclass(frozen=True)
class ExecutorConfig:
    # Local Hugging Face model directory of the backbone (`mint model init`).
    model_dir: Path = field(metadata={"help": "local backbone directory (mint model init)"})
    # The node cache directory (the sidecar's LMDB file lives inside it), read-only here.
    cache_dir: Path | None = field(
        default=None, metadata={"help": "the cache sidecar's node cache directory"}
    )
    # host:port of the cache sidecar; empty = no adapter source (base model only).
    cache_address: str = field(
        default="",
        metadata={
            "help": "the cache sidecar's host:port; empty = base model only",
            "flag": "--cache",
            "metavar": "HOST:PORT",
        },
    )
    host: str = field(default="127.0.0.1", metadata={"help": "bind address"})
    port: int = field(default=0, metadata={"help": "port; 0 picks a free one"})
    executor_id: str = field(
        default="executor-0", metadata={"help": "this executor's id in the mesh"}
    )
    device: str = field(default="cpu", metadata={"help": "torch device, e.g. cpu or cuda:0"})
    dtype: str = field(default="float32", metadata={"help": "float32, float16 or bfloat16"})
    # Sequences running at once (the step loop's sequence budget).
    max_batch_size: int = field(default=32, metadata={"help": "sequences running at once"})
    # Tokens through the model per step (prefill chunks + decode tokens; >= max_batch_size).
    max_step_tokens: int = field(
        default=512, metadata={"help": "tokens through the model per step"}
    )
    # Adapters resident in the device pool at once (slots), and the pool's bytes (0 = room for
    # max_adapters adapters of rank 32).
    max_adapters: int = field(default=64, metadata={"help": "adapter slots of the device pool"})
    adapter_pool_bytes: int = field(
        default=0,
        metadata={"help": "device pool bytes (0 = room for max-adapters adapters of rank 32)"},
    )
    # Distinct adapters among running sequences (the step's adapter budget); 0 = max_adapters.
    max_step_adapters: int = field(
        default=0, metadata={"help": "distinct adapters running at once (0 = max-adapters)"}
    )
    # Host tier: checked, unpacked adapters kept in one staging arena of host memory, in bytes
    # (page-locked on CUDA, where torch's pinned allocator rounds the size up to a power of 2).
    host_cache_bytes: int = field(
        default=512 << 20, metadata={"help": "host tier bytes", "default_help": "512 MiB"}
    )
    # Touch the host tier's staging arena at start (CPU), so no load page-faults fresh memory.
    host_prefault: bool = field(
        default=True, metadata={"help": "touch the host tier's staging arena at start (CPU)"}
    )
    # Background threads moving adapters node cache -> host -> device.
    loader_threads: int = field(
        default=2, metadata={"help": "threads moving adapters node cache -> host -> device"}
    )
    # Generation requests waiting (for a sequence slot or their adapter); more are refused with
    # RESOURCE_EXHAUSTED + RetryInfo. Per tenant: 0 = max_queue.
    max_queue: int = field(
        default=256, metadata={"help": "waiting requests before RESOURCE_EXHAUSTED"}
    )
    # Training runs on this executor: their LoRA weights, gradients and AdamW state, in bytes
    # (a run that does not fit is refused with RESOURCE_EXHAUSTED).
    training_max_bytes: int = field(
        default=256 << 20,
        metadata={
            "help": "training runs' weights, gradients and AdamW state",
            "default_help": "256 MiB",
        },
    )
    # A training run that no call has touched for this long is dropped and its memory freed:
    # a client or gateway that died without ending its runs does not hold this executor's
    # training memory for ever. Its saved states and revisions stay in the store. 0 = never.
    training_run_idle_s: float = field(
        default=6 * 3600.0,
        metadata={
            "help": "a training run no call has touched for this long is dropped, in seconds "
            "(0 = never)",
            "default_help": "6 hours",
        },
    )
    # While there are sequences to serve, training runs in micro-batches of this many padded
    # tokens (one datum at the least), a serving step before each; and within one, the
    # forward/backward gives the model to a serving step at the first layer boundary after
    # training_slice_ms (time-slicing at layer granularity).
    training_micro_tokens: int = field(
        default=64, metadata={"help": "while serving: tokens per training micro-batch"}
    )
    training_slice_ms: float = field(
        default=10.0,
        metadata={
            "help": "while serving: the longest a training forward/backward holds the model "
            "before a serving step runs, at the next layer boundary"
        },
    )
    max_queue_per_tenant: int = field(
        default=0, metadata={"help": "waiting requests of one tenant (0 = max-queue)"}
    )
    # Fairness within the batch: when it is full and a tenant under its share (max_batch_size
    # over the tenants running or waiting) waits, the newest sequence of the tenant most over
    # its share is preempted (recomputed later) for it.
    fair_share_preemption: bool = field(
        default=True,
        metadata={"help": "preempt a tenant over its share of the batch for one under it"},
    )
    # First tokens: while the batch holds at least FIRST_TOKEN_MIN_RUNNING sequences of other
    # tenants, the prefill of a tenant with none running (a lone request in another tenant's
    # flood) runs in a step of its own, the others' decodes waiting that one step (never two
    # steps in a row): its time to first token is not a full batch's step.
    first_token_steps: bool = field(
        default=True,
        metadata={
            "help": "a tenant with nothing running gets its prefill in a step of its own "
            "while other tenants fill the batch"
        },
    )
    # Slow readers: a stream its client has started reading, with this many outputs unread, is
    # paused (its KV freed, out of the batch; recomputed when the client has read half of
    # them), and failed RESOURCE_EXHAUSTED after stream_stall_timeout_s paused. A caller that
    # takes the whole result at the end is never paused. 0 = never paused.
    stream_buffer_outputs: int = field(
        default=64, metadata={"help": "unread outputs before a stream is paused (0 = never)"}
    )
    stream_stall_timeout_s: float = field(
        default=60.0,
        metadata={"help": "a paused stream fails RESOURCE_EXHAUSTED after this long unread"},
    )
    # Stream messages: after its first token (always sent at once), a stream's outputs are
    # sent at most every (running streams / stream_messages_per_s) seconds, capped at
    # stream_max_interval_s, several tokens to a message when steps are faster than that.
    # Each message costs CPU on every hop, and in the executor it is interpreter time the
    # step loop waits for (thread-per-stream gRPC: ~0.4 ms per message under a flood on a
    # 2-core host, so 1000 a second took ~40% of the interpreter and stretched a 32-row step
    # from 5 ms of its own CPU to 12-20 ms). 500 a second keeps that near a fifth, and 32
    # streams still get a message every 64 ms. Below budget (a few streams) every step's
    # output goes out alone. 0 = every output at once.
    stream_messages_per_s: float = field(
        default=500.0,
        metadata={"help": "stream messages per second across running streams (0 = no bound)"},
    )
    # The most a stream's outputs wait to go out together. With many streams and steps slower
    # than this, every stream still gets a message each step: on a host whose cores the router
    # and clients share with the executor, their CPU for each message also stalls the step's
    # OpenMP team (one thread taken off a core holds the other at the next barrier). Small
    # backbone, 48 streams on 2 cores: a decode step took 144-159 ms at 0.1 s, 133-139 ms at
    # 0.45 s (50 messages a second): smoother streams against more tokens a second.
    stream_max_interval_s: float = field(
        default=0.1,
        metadata={"help": "longest a stream's outputs wait to be sent together, seconds"},
    )
    # The paged KV cache: bytes (0 = max_batch_size sequences of min(512, max positions)
    # tokens) and tokens per block.
    kv_cache_bytes: int = field(
        default=0,
        metadata={
            "help": "paged KV cache bytes (0 = max-batch-size sequences of min(512, max "
            "positions) tokens)"
        },
    )
    kv_block_size: int = field(default=16, metadata={"help": "tokens per KV block"})
    # Automatic prefix caching: full KV blocks stay cached after their sequence leaves, keyed by
    # (adapter digest, every token up to the block's end); a new request with the same digest
    # and prefix reuses them instead of recomputing (multi-turn chat re-sends its history).
    prefix_caching: bool = field(
        default=True,
        metadata={"help": "reuse cached KV blocks of a prompt's prefix (same adapter digest)"},
    )
    # Longest prompt accepted; 0 = the model's max_position_embeddings - 1.
    max_prompt_tokens: int = field(
        default=0, metadata={"help": "longest prompt accepted (0 = the model's max positions - 1)"}
    )
    # The backbone's Linears: "auto" (oneDNN with weights packed once on CPU float32, else
    # torch's nn.Linear), "onednn" (required; start fails where it cannot serve) or "torch".
    dense_kernels: str = field(
        default="auto",
        metadata={
            "help": "the backbone's Linears: auto (oneDNN packed on CPU fp32), onednn, torch",
            "choices": DENSE_MODES,
        },
    )
    # The model runner: "torch" (HF modules, native CPU kernels) or "onnxruntime" (the backbone
    # exported to ONNX, every row's adapter mixed in one run; CUDA where ORT finds it).
    backend: str = field(
        default="torch",
        metadata={"help": "the model runner: torch or onnxruntime", "choices": BACKENDS},
    )
    # Largest LoRA rank this executor serves.
    max_rank: int = field(default=256, metadata={"help": "largest LoRA rank served"})
    # Deadline of one EnsureAdapter call to the sidecar (capped by the caller's deadline).
    fetch_timeout_s: float = field(
        default=30.0,
        metadata={"help": "deadline of one EnsureAdapter call to the cache sidecar, in seconds"},
    )
    # The kernels' settings (kernels/settings.py), applied once when the executor process starts.
    native_kernels: bool = field(
        default=KernelSettings.native,
        metadata={"help": "the native CPU kernels (off: the torch strategies serve)"},
    )
    lora_threads: int = field(
        default=0,
        metadata={
            "help": "threads of the native LoRA kernels, the caller included (torch's OpenMP "
            "team where torch runs on OpenMP, else helper threads of the kernels' own); 0 "
            f"(auto): {KernelSettings.lora_threads}, or one where torch runs on one thread"
        },
    )
    attn_threads: int = field(
        default=0,
        metadata={
            "help": "threads of the native paged decode attention, the caller included (as "
            f"--lora-threads); 0 (auto): {KernelSettings.attn_threads}, or one where torch runs "
            "on one thread"
        },
    )
    torch_threads: int = field(
        default=0,
        metadata={
            "help": "torch's intra-op threads in the executor process; 0 (auto): one when the "
            "backbone's largest decode GEMM (max_batch_size x its largest Linear) is under "
            "2^24 multiply-adds, else torch's default (OMP_NUM_THREADS)"
        },
    )
    otlp_endpoint: str = field(
        default="", metadata={"help": "OTLP/gRPC endpoint for traces (else env MINT_OTLP_ENDPOINT)"}
    )
    # Prometheus endpoint (http://host:PORT/metrics): None = none, 0 = a free port.
    metrics_port: int | None = field(
        default=None,
        metadata={
            "help": "serve Prometheus metrics on http://HOST:PORT/metrics; 0 picks a free port"
        },
    )

    def __post_init__(self) -> None:
        if self.training_micro_tokens < 1:
            raise ValueError(f"training_micro_tokens {self.training_micro_tokens} must be >= 1")
        if not self.training_slice_ms >= 0:
            raise ValueError(f"training_slice_ms {self.training_slice_ms} must be >= 0")
        if not self.training_run_idle_s >= 0:
            raise ValueError(f"training_run_idle_s {self.training_run_idle_s} must be >= 0")
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
                     "stream_buffer_outputs", "torch_threads", "lora_threads",
                     "attn_threads"):  # fmt: skip
            val = getattr(self, name)
            if int(val) < 0:
                raise ValueError(f"{name}={val} must be >= 0")
        if self.dense_kernels not in DENSE_MODES:
            raise ValueError(
                f"dense_kernels {self.dense_kernels!r} is not supported; use one of "
                f"{', '.join(DENSE_MODES)}"
            )
        if self.backend not in BACKENDS:
            raise ValueError(
                f"backend {self.backend!r} is not supported; use one of {', '.join(BACKENDS)}"
            )
        if self.max_prompt_tokens < 0:
            raise ValueError(f"max_prompt_tokens={self.max_prompt_tokens} must be >= 0")
        if not self.stream_messages_per_s >= 0:  # NaN too
            raise ValueError(f"stream_messages_per_s={self.stream_messages_per_s} must be >= 0")
        if not 0 < self.stream_max_interval_s < float("inf"):  # NaN too
            raise ValueError(
                f"stream_max_interval_s={self.stream_max_interval_s} must be a finite number > 0"
            )
        if self.stream_stall_timeout_s <= 0:
            raise ValueError(f"stream_stall_timeout_s={self.stream_stall_timeout_s} must be > 0")
        if self.fetch_timeout_s <= 0:
            raise ValueError(f"fetch_timeout_s={self.fetch_timeout_s} must be > 0")
        check_metrics_port(self.metrics_port)
