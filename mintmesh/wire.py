"""Names the package uses <-> the protobuf enums that carry them, shared by the client and the
services (one table each, so the two ends cannot drift apart)."""

from __future__ import annotations

from mintmesh.v1 import common_pb2

# mintmesh.packed's storage format names <-> common.StorageFormat (0 = UNSPECIFIED).
STORAGE_TO_PROTO: dict[str, int] = {
    "float32": common_pb2.STORAGE_FORMAT_FLOAT32,
    "bfloat16": common_pb2.STORAGE_FORMAT_BFLOAT16,
    "float16": common_pb2.STORAGE_FORMAT_FLOAT16,
    "int8": common_pb2.STORAGE_FORMAT_INT8,
}
STORAGE_FROM_PROTO: dict[int, str] = {v: k for k, v in STORAGE_TO_PROTO.items()}
