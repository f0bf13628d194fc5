from mintmesh.v1 import common_pb2 as _common_pb2
from mintmesh.v1 import training_pb2 as _training_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ForwardOutput(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FORWARD_OUTPUT_UNSPECIFIED: _ClassVar[ForwardOutput]
    FORWARD_OUTPUT_LOGITS: _ClassVar[ForwardOutput]
    FORWARD_OUTPUT_LOGPROBS: _ClassVar[ForwardOutput]
FORWARD_OUTPUT_UNSPECIFIED: ForwardOutput
FORWARD_OUTPUT_LOGITS: ForwardOutput
FORWARD_OUTPUT_LOGPROBS: ForwardOutput

class PrefetchAdaptersRequest(_message.Message):
    __slots__ = ("digests",)
    DIGESTS_FIELD_NUMBER: _ClassVar[int]
    digests: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, digests: _Optional[_Iterable[str]] = ...) -> None: ...

class PrefetchAdaptersResponse(_message.Message):
    __slots__ = ("resident", "queued", "dropped")
    RESIDENT_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    resident: _containers.RepeatedScalarFieldContainer[str]
    queued: _containers.RepeatedScalarFieldContainer[str]
    dropped: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, resident: _Optional[_Iterable[str]] = ..., queued: _Optional[_Iterable[str]] = ..., dropped: _Optional[_Iterable[str]] = ...) -> None: ...

class PurgeAdaptersRequest(_message.Message):
    __slots__ = ("digests",)
    DIGESTS_FIELD_NUMBER: _ClassVar[int]
    digests: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, digests: _Optional[_Iterable[str]] = ...) -> None: ...

class PurgeAdaptersResponse(_message.Message):
    __slots__ = ("purged", "busy")
    PURGED_FIELD_NUMBER: _ClassVar[int]
    BUSY_FIELD_NUMBER: _ClassVar[int]
    purged: _containers.RepeatedScalarFieldContainer[str]
    busy: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, purged: _Optional[_Iterable[str]] = ..., busy: _Optional[_Iterable[str]] = ...) -> None: ...

class ExecutorGenerateRequest(_message.Message):
    __slots__ = ("adapter", "prompt", "prompt_token_ids", "sampling", "request_id", "messages", "tenant")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    adapter: _common_pb2.AdapterRevision
    prompt: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _common_pb2.SamplingParams
    request_id: str
    messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.ChatMessage]
    tenant: str
    def __init__(self, adapter: _Optional[_Union[_common_pb2.AdapterRevision, _Mapping]] = ..., prompt: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., request_id: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[_common_pb2.ChatMessage, _Mapping]]] = ..., tenant: _Optional[str] = ...) -> None: ...

class ExecutorScoreRequest(_message.Message):
    __slots__ = ("adapter", "prompt", "prompt_token_ids", "top_logprobs")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    adapter: _common_pb2.AdapterRevision
    prompt: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    top_logprobs: int
    def __init__(self, adapter: _Optional[_Union[_common_pb2.AdapterRevision, _Mapping]] = ..., prompt: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., top_logprobs: _Optional[int] = ...) -> None: ...

class ExecutorScoreResponse(_message.Message):
    __slots__ = ("result",)
    RESULT_FIELD_NUMBER: _ClassVar[int]
    result: _common_pb2.ScoreResult
    def __init__(self, result: _Optional[_Union[_common_pb2.ScoreResult, _Mapping]] = ...) -> None: ...

class ExecutorGenerateResponse(_message.Message):
    __slots__ = ("chunk",)
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    chunk: _common_pb2.GenerationChunk
    def __init__(self, chunk: _Optional[_Union[_common_pb2.GenerationChunk, _Mapping]] = ...) -> None: ...

class ForwardRow(_message.Message):
    __slots__ = ("adapter_digest", "token_ids")
    ADAPTER_DIGEST_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    adapter_digest: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, adapter_digest: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("rows", "output")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[ForwardRow]
    output: ForwardOutput
    def __init__(self, rows: _Optional[_Iterable[_Union[ForwardRow, _Mapping]]] = ..., output: _Optional[_Union[ForwardOutput, str]] = ...) -> None: ...

class ForwardRowResult(_message.Message):
    __slots__ = ("num_tokens", "vocab_size", "logits", "logprobs")
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    num_tokens: int
    vocab_size: int
    logits: _containers.RepeatedScalarFieldContainer[float]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, num_tokens: _Optional[int] = ..., vocab_size: _Optional[int] = ..., logits: _Optional[_Iterable[float]] = ..., logprobs: _Optional[_Iterable[float]] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("rows",)
    ROWS_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[ForwardRowResult]
    def __init__(self, rows: _Optional[_Iterable[_Union[ForwardRowResult, _Mapping]]] = ...) -> None: ...

class ExecutorStatusRequest(_message.Message):
    __slots__ = ("include_node_cache",)
    INCLUDE_NODE_CACHE_FIELD_NUMBER: _ClassVar[int]
    include_node_cache: bool
    def __init__(self, include_node_cache: _Optional[bool] = ...) -> None: ...

class ExecutorStatusResponse(_message.Message):
    __slots__ = ("executor_id", "base_fingerprint", "resident_adapters", "queue_depth", "running", "max_batch_size", "max_adapters", "device", "draining", "kernel_backend", "loading", "tokens_per_s", "kv_blocks_used", "kv_blocks_total", "kv_block_size", "host_adapters", "node_cache_adapters", "loading_adapters", "adapter_pool_bytes_used", "adapter_pool_bytes_total", "host_bytes_used", "host_bytes_total", "steps", "preemptions", "tokens_generated", "prefix_caching", "prefix_query_tokens", "prefix_hit_tokens", "kv_blocks_cached", "dense_kernels", "training_runs", "training_bytes", "training_batches", "training_calls", "training_tokens", "runner", "training_runs_expired")
    EXECUTOR_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    KERNEL_BACKEND_FIELD_NUMBER: _ClassVar[int]
    LOADING_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_USED_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    HOST_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    NODE_CACHE_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    LOADING_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_POOL_BYTES_USED_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_POOL_BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    HOST_BYTES_USED_FIELD_NUMBER: _ClassVar[int]
    HOST_BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_GENERATED_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHING_FIELD_NUMBER: _ClassVar[int]
    PREFIX_QUERY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_HIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_CACHED_FIELD_NUMBER: _ClassVar[int]
    DENSE_KERNELS_FIELD_NUMBER: _ClassVar[int]
    TRAINING_RUNS_FIELD_NUMBER: _ClassVar[int]
    TRAINING_BYTES_FIELD_NUMBER: _ClassVar[int]
    TRAINING_BATCHES_FIELD_NUMBER: _ClassVar[int]
    TRAINING_CALLS_FIELD_NUMBER: _ClassVar[int]
    TRAINING_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RUNNER_FIELD_NUMBER: _ClassVar[int]
    TRAINING_RUNS_EXPIRED_FIELD_NUMBER: _ClassVar[int]
    executor_id: str
    base_fingerprint: str
    resident_adapters: _containers.RepeatedScalarFieldContainer[str]
    queue_depth: int
    running: int
    max_batch_size: int
    max_adapters: int
    device: str
    draining: bool
    kernel_backend: str
    loading: int
    tokens_per_s: float
    kv_blocks_used: int
    kv_blocks_total: int
    kv_block_size: int
    host_adapters: _containers.RepeatedScalarFieldContainer[str]
    node_cache_adapters: _containers.RepeatedScalarFieldContainer[str]
    loading_adapters: _containers.RepeatedScalarFieldContainer[str]
    adapter_pool_bytes_used: int
    adapter_pool_bytes_total: int
    host_bytes_used: int
    host_bytes_total: int
    steps: int
    preemptions: int
    tokens_generated: int
    prefix_caching: bool
    prefix_query_tokens: int
    prefix_hit_tokens: int
    kv_blocks_cached: int
    dense_kernels: str
    training_runs: int
    training_bytes: int
    training_batches: int
    training_calls: int
    training_tokens: int
    runner: str
    training_runs_expired: int
    def __init__(self, executor_id: _Optional[str] = ..., base_fingerprint: _Optional[str] = ..., resident_adapters: _Optional[_Iterable[str]] = ..., queue_depth: _Optional[int] = ..., running: _Optional[int] = ..., max_batch_size: _Optional[int] = ..., max_adapters: _Optional[int] = ..., device: _Optional[str] = ..., draining: _Optional[bool] = ..., kernel_backend: _Optional[str] = ..., loading: _Optional[int] = ..., tokens_per_s: _Optional[float] = ..., kv_blocks_used: _Optional[int] = ..., kv_blocks_total: _Optional[int] = ..., kv_block_size: _Optional[int] = ..., host_adapters: _Optional[_Iterable[str]] = ..., node_cache_adapters: _Optional[_Iterable[str]] = ..., loading_adapters: _Optional[_Iterable[str]] = ..., adapter_pool_bytes_used: _Optional[int] = ..., adapter_pool_bytes_total: _Optional[int] = ..., host_bytes_used: _Optional[int] = ..., host_bytes_total: _Optional[int] = ..., steps: _Optional[int] = ..., preemptions: _Optional[int] = ..., tokens_generated: _Optional[int] = ..., prefix_caching: _Optional[bool] = ..., prefix_query_tokens: _Optional[int] = ..., prefix_hit_tokens: _Optional[int] = ..., kv_blocks_cached: _Optional[int] = ..., dense_kernels: _Optional[str] = ..., training_runs: _Optional[int] = ..., training_bytes: _Optional[int] = ..., training_batches: _Optional[int] = ..., training_calls: _Optional[int] = ..., training_tokens: _Optional[int] = ..., runner: _Optional[str] = ..., training_runs_expired: _Optional[int] = ...) -> None: ...
