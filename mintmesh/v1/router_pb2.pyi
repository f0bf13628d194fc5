from mintmesh.v1 import common_pb2 as _common_pb2
from mintmesh.v1 import training_pb2 as _training_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ScoreRequest(_message.Message):
    __slots__ = ("adapter", "prompt", "prompt_token_ids", "top_logprobs", "request_id")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    adapter: str
    prompt: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    top_logprobs: int
    request_id: str
    def __init__(self, adapter: _Optional[str] = ..., prompt: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., top_logprobs: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("result",)
    RESULT_FIELD_NUMBER: _ClassVar[int]
    result: _common_pb2.ScoreResult
    def __init__(self, result: _Optional[_Union[_common_pb2.ScoreResult, _Mapping]] = ...) -> None: ...

class RouterPrefetchRequest(_message.Message):
    __slots__ = ("adapters",)
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, adapters: _Optional[_Iterable[str]] = ...) -> None: ...

class PrefetchPlacement(_message.Message):
    __slots__ = ("adapter", "digest", "executor", "resident", "dropped")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    EXECUTOR_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    adapter: str
    digest: str
    executor: str
    resident: bool
    dropped: bool
    def __init__(self, adapter: _Optional[str] = ..., digest: _Optional[str] = ..., executor: _Optional[str] = ..., resident: _Optional[bool] = ..., dropped: _Optional[bool] = ...) -> None: ...

class RouterPrefetchResponse(_message.Message):
    __slots__ = ("placements",)
    PLACEMENTS_FIELD_NUMBER: _ClassVar[int]
    placements: _containers.RepeatedCompositeFieldContainer[PrefetchPlacement]
    def __init__(self, placements: _Optional[_Iterable[_Union[PrefetchPlacement, _Mapping]]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("adapter", "prompt", "prompt_token_ids", "sampling", "request_id", "messages")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    adapter: str
    prompt: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _common_pb2.SamplingParams
    request_id: str
    messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.ChatMessage]
    def __init__(self, adapter: _Optional[str] = ..., prompt: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., request_id: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[_common_pb2.ChatMessage, _Mapping]]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("chunk",)
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    chunk: _common_pb2.GenerationChunk
    def __init__(self, chunk: _Optional[_Union[_common_pb2.GenerationChunk, _Mapping]] = ...) -> None: ...

class RouterStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExecutorHealth(_message.Message):
    __slots__ = ("address", "healthy", "executor_id", "resident_adapters", "queue_depth", "error")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    EXECUTOR_ID_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    address: str
    healthy: bool
    executor_id: str
    resident_adapters: _containers.RepeatedScalarFieldContainer[str]
    queue_depth: int
    error: str
    def __init__(self, address: _Optional[str] = ..., healthy: _Optional[bool] = ..., executor_id: _Optional[str] = ..., resident_adapters: _Optional[_Iterable[str]] = ..., queue_depth: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class RouterStatusResponse(_message.Message):
    __slots__ = ("store_address", "store_healthy", "executors")
    STORE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STORE_HEALTHY_FIELD_NUMBER: _ClassVar[int]
    EXECUTORS_FIELD_NUMBER: _ClassVar[int]
    store_address: str
    store_healthy: bool
    executors: _containers.RepeatedCompositeFieldContainer[ExecutorHealth]
    def __init__(self, store_address: _Optional[str] = ..., store_healthy: _Optional[bool] = ..., executors: _Optional[_Iterable[_Union[ExecutorHealth, _Mapping]]] = ...) -> None: ...
