from mintmesh.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PushHeader(_message.Message):
    __slots__ = ("name", "adapter_config_json", "sha256", "size_bytes", "labels", "base_fingerprint")
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
    name: str
    adapter_config_json: str
    sha256: str
    size_bytes: int
    labels: _containers.ScalarMap[str, str]
    base_fingerprint: str
    def __init__(self, name: _Optional[str] = ..., adapter_config_json: _Optional[str] = ..., sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ..., base_fingerprint: _Optional[str] = ...) -> None: ...

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
    __slots__ = ("digest", "ref")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    REF_FIELD_NUMBER: _ClassVar[int]
    digest: str
    ref: str
    def __init__(self, digest: _Optional[str] = ..., ref: _Optional[str] = ...) -> None: ...

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
    __slots__ = ("tenant", "page_size", "page_token")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    page_size: int
    page_token: str
    def __init__(self, tenant: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class AdapterSummary(_message.Message):
    __slots__ = ("tenant", "name", "revision_count", "latest")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    REVISION_COUNT_FIELD_NUMBER: _ClassVar[int]
    LATEST_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    name: str
    revision_count: int
    latest: _common_pb2.AdapterRevision
    def __init__(self, tenant: _Optional[str] = ..., name: _Optional[str] = ..., revision_count: _Optional[int] = ..., latest: _Optional[_Union[_common_pb2.AdapterRevision, _Mapping]] = ...) -> None: ...

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
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: _containers.RepeatedCompositeFieldContainer[_common_pb2.AdapterRevision]
    def __init__(self, deleted: _Optional[_Iterable[_Union[_common_pb2.AdapterRevision, _Mapping]]] = ...) -> None: ...

class GetBaseModelRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetBaseModelResponse(_message.Message):
    __slots__ = ("fingerprint", "model_type", "target_modules", "max_rank")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    MAX_RANK_FIELD_NUMBER: _ClassVar[int]
    fingerprint: str
    model_type: str
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    max_rank: int
    def __init__(self, fingerprint: _Optional[str] = ..., model_type: _Optional[str] = ..., target_modules: _Optional[_Iterable[str]] = ..., max_rank: _Optional[int] = ...) -> None: ...
