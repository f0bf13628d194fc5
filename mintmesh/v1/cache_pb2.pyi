from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class EnsureAdapterRequest(_message.Message):
    __slots__ = ("digest",)
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    digest: str
    def __init__(self, digest: _Optional[str] = ...) -> None: ...

class EnsureAdapterResponse(_message.Message):
    __slots__ = ("digest", "size_bytes", "hit", "fetch_ms")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    HIT_FIELD_NUMBER: _ClassVar[int]
    FETCH_MS_FIELD_NUMBER: _ClassVar[int]
    digest: str
    size_bytes: int
    hit: bool
    fetch_ms: float
    def __init__(self, digest: _Optional[str] = ..., size_bytes: _Optional[int] = ..., hit: _Optional[bool] = ..., fetch_ms: _Optional[float] = ...) -> None: ...

class CacheStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CacheStatsResponse(_message.Message):
    __slots__ = ("bytes", "entries", "hits", "misses", "evictions", "fetch_p50_ms", "fetch_p99_ms", "capacity_bytes", "path")
    BYTES_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    FETCH_P50_MS_FIELD_NUMBER: _ClassVar[int]
    FETCH_P99_MS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    bytes: int
    entries: int
    hits: int
    misses: int
    evictions: int
    fetch_p50_ms: float
    fetch_p99_ms: float
    capacity_bytes: int
    path: str
    def __init__(self, bytes: _Optional[int] = ..., entries: _Optional[int] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., evictions: _Optional[int] = ..., fetch_p50_ms: _Optional[float] = ..., fetch_p99_ms: _Optional[float] = ..., capacity_bytes: _Optional[int] = ..., path: _Optional[str] = ...) -> None: ...
