from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StorageFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STORAGE_FORMAT_UNSPECIFIED: _ClassVar[StorageFormat]
    STORAGE_FORMAT_FLOAT32: _ClassVar[StorageFormat]
    STORAGE_FORMAT_BFLOAT16: _ClassVar[StorageFormat]
    STORAGE_FORMAT_FLOAT16: _ClassVar[StorageFormat]
    STORAGE_FORMAT_INT8: _ClassVar[StorageFormat]

class RevisionState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REVISION_STATE_UNSPECIFIED: _ClassVar[RevisionState]
    REVISION_STATE_READY: _ClassVar[RevisionState]
    REVISION_STATE_DEPRECATED: _ClassVar[RevisionState]
    REVISION_STATE_DELETED: _ClassVar[RevisionState]

class RevisionSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REVISION_SOURCE_UNSPECIFIED: _ClassVar[RevisionSource]
    REVISION_SOURCE_UPLOAD: _ClassVar[RevisionSource]
    REVISION_SOURCE_MERGE: _ClassVar[RevisionSource]
    REVISION_SOURCE_TRAINING: _ClassVar[RevisionSource]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_CANCELLED: _ClassVar[FinishReason]
STORAGE_FORMAT_UNSPECIFIED: StorageFormat
STORAGE_FORMAT_FLOAT32: StorageFormat
STORAGE_FORMAT_BFLOAT16: StorageFormat
STORAGE_FORMAT_FLOAT16: StorageFormat
STORAGE_FORMAT_INT8: StorageFormat
REVISION_STATE_UNSPECIFIED: RevisionState
REVISION_STATE_READY: RevisionState
REVISION_STATE_DEPRECATED: RevisionState
REVISION_STATE_DELETED: RevisionState
REVISION_SOURCE_UNSPECIFIED: RevisionSource
REVISION_SOURCE_UPLOAD: RevisionSource
REVISION_SOURCE_MERGE: RevisionSource
REVISION_SOURCE_TRAINING: RevisionSource
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_CANCELLED: FinishReason

class AdapterRevision(_message.Message):
    __slots__ = ("tenant", "name", "revision", "digest", "base_fingerprint", "rank", "alpha", "target_modules", "size_bytes", "created_at_unix_ms", "ref", "labels", "storage_format", "state", "provenance", "evaluations", "state_digest", "state_size_bytes")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TENANT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    BASE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    REF_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    STORAGE_FORMAT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PROVENANCE_FIELD_NUMBER: _ClassVar[int]
    EVALUATIONS_FIELD_NUMBER: _ClassVar[int]
    STATE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    STATE_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    name: str
    revision: int
    digest: str
    base_fingerprint: str
    rank: int
    alpha: float
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    size_bytes: int
    created_at_unix_ms: int
    ref: str
    labels: _containers.ScalarMap[str, str]
    storage_format: StorageFormat
    state: RevisionState
    provenance: Provenance
    evaluations: _containers.RepeatedCompositeFieldContainer[Evaluation]
    state_digest: str
    state_size_bytes: int
    def __init__(self, tenant: _Optional[str] = ..., name: _Optional[str] = ..., revision: _Optional[int] = ..., digest: _Optional[str] = ..., base_fingerprint: _Optional[str] = ..., rank: _Optional[int] = ..., alpha: _Optional[float] = ..., target_modules: _Optional[_Iterable[str]] = ..., size_bytes: _Optional[int] = ..., created_at_unix_ms: _Optional[int] = ..., ref: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., storage_format: _Optional[_Union[StorageFormat, str]] = ..., state: _Optional[_Union[RevisionState, str]] = ..., provenance: _Optional[_Union[Provenance, _Mapping]] = ..., evaluations: _Optional[_Iterable[_Union[Evaluation, _Mapping]]] = ..., state_digest: _Optional[str] = ..., state_size_bytes: _Optional[int] = ...) -> None: ...

class ParentRevision(_message.Message):
    __slots__ = ("ref", "digest", "weight")
    REF_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    ref: str
    digest: str
    weight: float
    def __init__(self, ref: _Optional[str] = ..., digest: _Optional[str] = ..., weight: _Optional[float] = ...) -> None: ...

class Provenance(_message.Message):
    __slots__ = ("source", "parents", "data_digest", "method")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    PARENTS_FIELD_NUMBER: _ClassVar[int]
    DATA_DIGEST_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    source: RevisionSource
    parents: _containers.RepeatedCompositeFieldContainer[ParentRevision]
    data_digest: str
    method: str
    def __init__(self, source: _Optional[_Union[RevisionSource, str]] = ..., parents: _Optional[_Iterable[_Union[ParentRevision, _Mapping]]] = ..., data_digest: _Optional[str] = ..., method: _Optional[str] = ...) -> None: ...

class Evaluation(_message.Message):
    __slots__ = ("metric", "value", "evaluator", "evaluated_at_unix_ms", "dataset_digest")
    METRIC_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    EVALUATOR_FIELD_NUMBER: _ClassVar[int]
    EVALUATED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    DATASET_DIGEST_FIELD_NUMBER: _ClassVar[int]
    metric: str
    value: float
    evaluator: str
    evaluated_at_unix_ms: int
    dataset_digest: str
    def __init__(self, metric: _Optional[str] = ..., value: _Optional[float] = ..., evaluator: _Optional[str] = ..., evaluated_at_unix_ms: _Optional[int] = ..., dataset_digest: _Optional[str] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "max_tokens", "seed", "stop", "stop_token_ids", "logprobs", "ignore_eos", "top_logprobs")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    max_tokens: int
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: bool
    ignore_eos: bool
    top_logprobs: int
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., max_tokens: _Optional[int] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[bool] = ..., ignore_eos: _Optional[bool] = ..., top_logprobs: _Optional[int] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ...) -> None: ...

class GenerationChunk(_message.Message):
    __slots__ = ("token_ids", "text", "logprobs", "finish_reason", "adapter", "executor", "usage", "request_id", "tokens", "top_logprobs")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    EXECUTOR_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    finish_reason: FinishReason
    adapter: AdapterRevision
    executor: str
    usage: Usage
    request_id: str
    tokens: _containers.RepeatedScalarFieldContainer[str]
    top_logprobs: _containers.RepeatedCompositeFieldContainer[TopLogprobs]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., logprobs: _Optional[_Iterable[float]] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., adapter: _Optional[_Union[AdapterRevision, _Mapping]] = ..., executor: _Optional[str] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., request_id: _Optional[str] = ..., tokens: _Optional[_Iterable[str]] = ..., top_logprobs: _Optional[_Iterable[_Union[TopLogprobs, _Mapping]]] = ...) -> None: ...

class TopLogprobs(_message.Message):
    __slots__ = ("token_ids", "tokens", "logprobs")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    tokens: _containers.RepeatedScalarFieldContainer[str]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., tokens: _Optional[_Iterable[str]] = ..., logprobs: _Optional[_Iterable[float]] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class ScoreResult(_message.Message):
    __slots__ = ("token_ids", "tokens", "logprobs", "top_logprobs", "adapter", "executor")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    EXECUTOR_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    tokens: _containers.RepeatedScalarFieldContainer[str]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    top_logprobs: _containers.RepeatedCompositeFieldContainer[TopLogprobs]
    adapter: AdapterRevision
    executor: str
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., tokens: _Optional[_Iterable[str]] = ..., logprobs: _Optional[_Iterable[float]] = ..., top_logprobs: _Optional[_Iterable[_Union[TopLogprobs, _Mapping]]] = ..., adapter: _Optional[_Union[AdapterRevision, _Mapping]] = ..., executor: _Optional[str] = ...) -> None: ...
