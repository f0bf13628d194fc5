from mintmesh.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GateDirection(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GATE_DIRECTION_UNSPECIFIED: _ClassVar[GateDirection]
    GATE_DIRECTION_AT_LEAST: _ClassVar[GateDirection]
    GATE_DIRECTION_AT_MOST: _ClassVar[GateDirection]

class MergeMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MERGE_METHOD_UNSPECIFIED: _ClassVar[MergeMethod]
    MERGE_METHOD_LINEAR: _ClassVar[MergeMethod]
GATE_DIRECTION_UNSPECIFIED: GateDirection
GATE_DIRECTION_AT_LEAST: GateDirection
GATE_DIRECTION_AT_MOST: GateDirection
MERGE_METHOD_UNSPECIFIED: MergeMethod
MERGE_METHOD_LINEAR: MergeMethod

class PushHeader(_message.Message):
    __slots__ = ("name", "adapter_config_json", "sha256", "size_bytes", "labels", "base_fingerprint", "storage_format", "source", "parents", "data_digest", "state_sha256", "state_size_bytes")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    BASE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    STORAGE_FORMAT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    PARENTS_FIELD_NUMBER: _ClassVar[int]
    DATA_DIGEST_FIELD_NUMBER: _ClassVar[int]
    STATE_SHA256_FIELD_NUMBER: _ClassVar[int]
    STATE_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    adapter_config_json: str
    sha256: str
    size_bytes: int
    labels: _containers.ScalarMap[str, str]
    base_fingerprint: str
    storage_format: _common_pb2.StorageFormat
    source: _common_pb2.RevisionSource
    parents: _containers.RepeatedScalarFieldContainer[str]
    data_digest: str
    state_sha256: str
    state_size_bytes: int
    def __init__(self, name: _Optional[str] = ..., adapter_config_json: _Optional[str] = ..., sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ..., base_fingerprint: _Optional[str] = ..., storage_format: _Optional[_Union[_common_pb2.StorageFormat, str]] = ..., source: _Optional[_Union[_common_pb2.RevisionSource, str]] = ..., parents: _Optional[_Iterable[str]] = ..., data_digest: _Optional[str] = ..., state_sha256: _Optional[str] = ..., state_size_bytes: _Optional[int] = ...) -> None: ...

class PushAdapterRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: PushHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[PushHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class PushAdapterResponse(_message.Message):
    __slots__ = ("revision",)
    REVISION_FIELD_NUMBER: _ClassVar[int]
    revision: _common_pb2.AdapterRevision
    def __init__(self, revision: _Optional[_Union[_common_pb2.AdapterRevision, _Mapping]] = ...) -> None: ...

class ResolveAdapterRequest(_message.Message):
    __slots__ = ("ref",)
    REF_FIELD_NUMBER: _ClassVar[int]
    ref: str
    def __init__(self, ref: _Optional[str] = ...) -> None: ...

class ResolveAdapterResponse(_message.Message):
    __slots__ = ("revision",)
    REVISION_FIELD_NUMBER: _ClassVar[int]
    revision: _common_pb2.AdapterRevision
    def __init__(self, revision: _Optional[_Union[_common_pb2.AdapterRevision, _Mapping]] = ...) -> None: ...

class FetchAdapterRequest(_message.Message):
    __slots__ = ("digest", "ref", "state")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    REF_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    digest: str
    ref: str
    state: bool
    def __init__(self, digest: _Optional[str] = ..., ref: _Optional[str] = ..., state: _Optional[bool] = ...) -> None: ...

class FetchHeader(_message.Message):
    __slots__ = ("digest", "size_bytes")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    digest: str
    size_bytes: int
    def __init__(self, digest: _Optional[str] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class FetchAdapterResponse(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: FetchHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[FetchHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class ListAdaptersRequest(_message.Message):
    __slots__ = ("tenant", "page_size", "page_token", "name_prefix", "label")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    NAME_PREFIX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    page_size: int
    page_token: str
    name_prefix: str
    label: str
    def __init__(self, tenant: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., name_prefix: _Optional[str] = ..., label: _Optional[str] = ...) -> None: ...

class AdapterSummary(_message.Message):
    __slots__ = ("tenant", "name", "revision_count", "latest", "aliases")
    class AliasesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    TENANT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    REVISION_COUNT_FIELD_NUMBER: _ClassVar[int]
    LATEST_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    name: str
    revision_count: int
    latest: _common_pb2.AdapterRevision
    aliases: _containers.ScalarMap[str, int]
    def __init__(self, tenant: _Optional[str] = ..., name: _Optional[str] = ..., revision_count: _Optional[int] = ..., latest: _Optional[_Union[_common_pb2.AdapterRevision, _Mapping]] = ..., aliases: _Optional[_Mapping[str, int]] = ...) -> None: ...

class ListAdaptersResponse(_message.Message):
    __slots__ = ("adapters", "next_page_token")
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedCompositeFieldContainer[AdapterSummary]
    next_page_token: str
    def __init__(self, adapters: _Optional[_Iterable[_Union[AdapterSummary, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteAdapterRequest(_message.Message):
    __slots__ = ("ref",)
    REF_FIELD_NUMBER: _ClassVar[int]
    ref: str
    def __init__(self, ref: _Optional[str] = ...) -> None: ...

class DeleteAdapterResponse(_message.Message):
    __slots__ = ("deleted", "deleted_digests")
    DELETED_FIELD_NUMBER: _ClassVar[int]
    DELETED_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    deleted: _containers.RepeatedCompositeFieldContainer[_common_pb2.AdapterRevision]
    deleted_digests: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, deleted: _Optional[_Iterable[_Union[_common_pb2.AdapterRevision, _Mapping]]] = ..., deleted_digests: _Optional[_Iterable[str]] = ...) -> None: ...

class GetBaseModelRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetBaseModelResponse(_message.Message):
    __slots__ = ("fingerprint", "model_type", "target_modules", "max_rank", "name")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    MAX_RANK_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    fingerprint: str
    model_type: str
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    max_rank: int
    name: str
    def __init__(self, fingerprint: _Optional[str] = ..., model_type: _Optional[str] = ..., target_modules: _Optional[_Iterable[str]] = ..., max_rank: _Optional[int] = ..., name: _Optional[str] = ...) -> None: ...

class PushAdaptersRequest(_message.Message):
    __slots__ = ("header", "chunk", "inline")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    INLINE_FIELD_NUMBER: _ClassVar[int]
    header: PushHeader
    chunk: bytes
    inline: InlineAdapters
    def __init__(self, header: _Optional[_Union[PushHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ..., inline: _Optional[_Union[InlineAdapters, _Mapping]] = ...) -> None: ...

class InlineAdapter(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: PushHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[PushHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class InlineAdapters(_message.Message):
    __slots__ = ("adapters",)
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedCompositeFieldContainer[InlineAdapter]
    def __init__(self, adapters: _Optional[_Iterable[_Union[InlineAdapter, _Mapping]]] = ...) -> None: ...

class PushError(_message.Message):
    __slots__ = ("code", "message", "reason")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    reason: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class PushResult(_message.Message):
    __slots__ = ("index", "revision", "error")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    index: int
    revision: _common_pb2.AdapterRevision
    error: PushError
    def __init__(self, index: _Optional[int] = ..., revision: _Optional[_Union[_common_pb2.AdapterRevision, _Mapping]] = ..., error: _Optional[_Union[PushError, _Mapping]] = ...) -> None: ...

class PushAdaptersResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[PushResult]
    def __init__(self, results: _Optional[_Iterable[_Union[PushResult, _Mapping]]] = ...) -> None: ...

class ListRevisionsRequest(_message.Message):
    __slots__ = ("name", "page_size", "page_token", "label", "state")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    name: str
    page_size: int
    page_token: str
    label: str
    state: _common_pb2.RevisionState
    def __init__(self, name: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., label: _Optional[str] = ..., state: _Optional[_Union[_common_pb2.RevisionState, str]] = ...) -> None: ...

class AliasGate(_message.Message):
    __slots__ = ("alias", "metric", "threshold", "direction")
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    alias: str
    metric: str
    threshold: float
    direction: GateDirection
    def __init__(self, alias: _Optional[str] = ..., metric: _Optional[str] = ..., threshold: _Optional[float] = ..., direction: _Optional[_Union[GateDirection, str]] = ...) -> None: ...

class ListRevisionsResponse(_message.Message):
    __slots__ = ("revisions", "next_page_token", "aliases", "gates")
    class AliasesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    REVISIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    GATES_FIELD_NUMBER: _ClassVar[int]
    revisions: _containers.RepeatedCompositeFieldContainer[_common_pb2.AdapterRevision]
    next_page_token: str
    aliases: _containers.ScalarMap[str, int]
    gates: _containers.RepeatedCompositeFieldContainer[AliasGate]
    def __init__(self, revisions: _Optional[_Iterable[_Union[_common_pb2.AdapterRevision, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., aliases: _Optional[_Mapping[str, int]] = ..., gates: _Optional[_Iterable[_Union[AliasGate, _Mapping]]] = ...) -> None: ...

class SetAliasRequest(_message.Message):
    __slots__ = ("name", "alias", "revision", "rollback")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_FIELD_NUMBER: _ClassVar[int]
    name: str
    alias: str
    revision: int
    rollback: bool
    def __init__(self, name: _Optional[str] = ..., alias: _Optional[str] = ..., revision: _Optional[int] = ..., rollback: _Optional[bool] = ...) -> None: ...

class SetAliasResponse(_message.Message):
    __slots__ = ("revision", "previous_revision")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_REVISION_FIELD_NUMBER: _ClassVar[int]
    revision: _common_pb2.AdapterRevision
    previous_revision: int
    def __init__(self, revision: _Optional[_Union[_common_pb2.AdapterRevision, _Mapping]] = ..., previous_revision: _Optional[int] = ...) -> None: ...

class DeleteAliasRequest(_message.Message):
    __slots__ = ("name", "alias")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    name: str
    alias: str
    def __init__(self, name: _Optional[str] = ..., alias: _Optional[str] = ...) -> None: ...

class DeleteAliasResponse(_message.Message):
    __slots__ = ("revision",)
    REVISION_FIELD_NUMBER: _ClassVar[int]
    revision: int
    def __init__(self, revision: _Optional[int] = ...) -> None: ...

class AddEvaluationRequest(_message.Message):
    __slots__ = ("ref", "metric", "value", "evaluator", "dataset_digest")
    REF_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    EVALUATOR_FIELD_NUMBER: _ClassVar[int]
    DATASET_DIGEST_FIELD_NUMBER: _ClassVar[int]
    ref: str
    metric: str
    value: float
    evaluator: str
    dataset_digest: str
    def __init__(self, ref: _Optional[str] = ..., metric: _Optional[str] = ..., value: _Optional[float] = ..., evaluator: _Optional[str] = ..., dataset_digest: _Optional[str] = ...) -> None: ...

class AddEvaluationResponse(_message.Message):
    __slots__ = ("revision",)
    REVISION_FIELD_NUMBER: _ClassVar[int]
    revision: _common_pb2.AdapterRevision
    def __init__(self, revision: _Optional[_Union[_common_pb2.AdapterRevision, _Mapping]] = ...) -> None: ...

class SetAliasGateRequest(_message.Message):
    __slots__ = ("name", "alias", "metric", "threshold", "direction", "clear")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    CLEAR_FIELD_NUMBER: _ClassVar[int]
    name: str
    alias: str
    metric: str
    threshold: float
    direction: GateDirection
    clear: bool
    def __init__(self, name: _Optional[str] = ..., alias: _Optional[str] = ..., metric: _Optional[str] = ..., threshold: _Optional[float] = ..., direction: _Optional[_Union[GateDirection, str]] = ..., clear: _Optional[bool] = ...) -> None: ...

class SetAliasGateResponse(_message.Message):
    __slots__ = ("gate",)
    GATE_FIELD_NUMBER: _ClassVar[int]
    gate: AliasGate
    def __init__(self, gate: _Optional[_Union[AliasGate, _Mapping]] = ...) -> None: ...

class DeprecateRevisionRequest(_message.Message):
    __slots__ = ("ref", "undo")
    REF_FIELD_NUMBER: _ClassVar[int]
    UNDO_FIELD_NUMBER: _ClassVar[int]
    ref: str
    undo: bool
    def __init__(self, ref: _Optional[str] = ..., undo: _Optional[bool] = ...) -> None: ...

class DeprecateRevisionResponse(_message.Message):
    __slots__ = ("revision",)
    REVISION_FIELD_NUMBER: _ClassVar[int]
    revision: _common_pb2.AdapterRevision
    def __init__(self, revision: _Optional[_Union[_common_pb2.AdapterRevision, _Mapping]] = ...) -> None: ...

class MergeSource(_message.Message):
    __slots__ = ("ref", "weight")
    REF_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    ref: str
    weight: float
    def __init__(self, ref: _Optional[str] = ..., weight: _Optional[float] = ...) -> None: ...

class MergeAdaptersRequest(_message.Message):
    __slots__ = ("name", "sources", "method", "storage_format", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    STORAGE_FORMAT_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    name: str
    sources: _containers.RepeatedCompositeFieldContainer[MergeSource]
    method: MergeMethod
    storage_format: _common_pb2.StorageFormat
    labels: _containers.ScalarMap[str, str]
    def __init__(self, name: _Optional[str] = ..., sources: _Optional[_Iterable[_Union[MergeSource, _Mapping]]] = ..., method: _Optional[_Union[MergeMethod, str]] = ..., storage_format: _Optional[_Union[_common_pb2.StorageFormat, str]] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class MergeAdaptersResponse(_message.Message):
    __slots__ = ("revision",)
    REVISION_FIELD_NUMBER: _ClassVar[int]
    revision: _common_pb2.AdapterRevision
    def __init__(self, revision: _Optional[_Union[_common_pb2.AdapterRevision, _Mapping]] = ...) -> None: ...

class CreateTenantRequest(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    def __init__(self, tenant: _Optional[str] = ...) -> None: ...

class CreateTenantResponse(_message.Message):
    __slots__ = ("tenant", "api_key", "key_id")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    api_key: str
    key_id: str
    def __init__(self, tenant: _Optional[str] = ..., api_key: _Optional[str] = ..., key_id: _Optional[str] = ...) -> None: ...

class CreateApiKeyRequest(_message.Message):
    __slots__ = ("tenant", "admin")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    ADMIN_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    admin: bool
    def __init__(self, tenant: _Optional[str] = ..., admin: _Optional[bool] = ...) -> None: ...

class CreateApiKeyResponse(_message.Message):
    __slots__ = ("api_key", "key_id", "tenant")
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    api_key: str
    key_id: str
    tenant: str
    def __init__(self, api_key: _Optional[str] = ..., key_id: _Optional[str] = ..., tenant: _Optional[str] = ...) -> None: ...

class RevokeApiKeyRequest(_message.Message):
    __slots__ = ("key_id",)
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    def __init__(self, key_id: _Optional[str] = ...) -> None: ...

class RevokeApiKeyResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TenantInfo(_message.Message):
    __slots__ = ("tenant", "created_at_unix_ms", "key_count")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    KEY_COUNT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    created_at_unix_ms: int
    key_count: int
    def __init__(self, tenant: _Optional[str] = ..., created_at_unix_ms: _Optional[int] = ..., key_count: _Optional[int] = ...) -> None: ...

class ListTenantsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListTenantsResponse(_message.Message):
    __slots__ = ("tenants", "next_page_token")
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    tenants: _containers.RepeatedCompositeFieldContainer[TenantInfo]
    next_page_token: str
    def __init__(self, tenants: _Optional[_Iterable[_Union[TenantInfo, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class AuthenticateRequest(_message.Message):
    __slots__ = ("api_key",)
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    api_key: str
    def __init__(self, api_key: _Optional[str] = ...) -> None: ...

class AuthenticateResponse(_message.Message):
    __slots__ = ("tenant", "is_admin", "key_id")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    IS_ADMIN_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    is_admin: bool
    key_id: str
    def __init__(self, tenant: _Optional[str] = ..., is_admin: _Optional[bool] = ..., key_id: _Optional[str] = ...) -> None: ...

class WatchKeysRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class KeyEvent(_message.Message):
    __slots__ = ("epoch", "revoked_key_id")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    REVOKED_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    revoked_key_id: str
    def __init__(self, epoch: _Optional[int] = ..., revoked_key_id: _Optional[str] = ...) -> None: ...
