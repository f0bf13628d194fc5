"""mintmesh.v1.AdapterStore: proto <-> StoreCore translation only. Domain errors raised here or
in the core become status codes in services.common.errors.ErrorInterceptor."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from mintmesh.errors import InvalidArgument, Unavailable
from mintmesh.services.common.server import CHUNK_BYTES
from mintmesh.services.store.catalog import AdapterSummary, RevisionRecord
from mintmesh.services.store.core import PushHeader, StoreCore
from mintmesh.v1 import common_pb2, store_pb2, store_pb2_grpc


def revision_to_proto(rec: RevisionRecord) -> common_pb2.AdapterRevision:
    return common_pb2.AdapterRevision(
        tenant=rec.tenant,
        name=rec.name,
        revision=rec.revision,
        digest=rec.digest,
        base_fingerprint=rec.base_fingerprint,
        rank=rec.rank,
        alpha=rec.alpha,
        target_modules=list(rec.target_modules),
        size_bytes=rec.size_bytes,
        created_at_unix_ms=rec.created_at_ms,
        ref=rec.ref,
        labels=rec.labels,
    )


def summary_to_proto(s: AdapterSummary) -> store_pb2.AdapterSummary:
    return store_pb2.AdapterSummary(
        tenant=s.tenant,
        name=s.name,
        revision_count=s.revision_count,
        latest=revision_to_proto(s.latest),
    )


def _guarded(
    requests: Iterator[store_pb2.PushAdapterRequest],
) -> Iterator[store_pb2.PushAdapterRequest]:
    """The request stream, with a client that went away mid-stream reported as such."""
    while True:
        try:
            msg = next(requests)
        except StopIteration:
            return
        except grpc.RpcError as e:
            raise Unavailable("push stream was cut: the client cancelled or disconnected") from e
        yield msg


def _push_stream(
    requests: Iterator[store_pb2.PushAdapterRequest],
) -> tuple[PushHeader, Iterator[bytes]]:
    """Split a push stream into its header and an iterator of chunk bytes, enforcing the
    protocol (header first, once; chunks of at most CHUNK_BYTES)."""
    first = next(_guarded(requests), None)
    if first is None or first.WhichOneof("payload") is None:
        raise InvalidArgument("push stream has no header: the first message must be a header")
    if first.WhichOneof("payload") != "header":
        raise InvalidArgument(
            "push stream must start with a header, got a chunk of "
            f"{len(first.chunk)} bytes before it"
        )
    h = first.header
    header = PushHeader(
        name=h.name,
        adapter_config_json=h.adapter_config_json,
        sha256=h.sha256,
        size_bytes=h.size_bytes,
        labels=dict(h.labels),
        base_fingerprint=h.base_fingerprint,
    )

    def chunks() -> Iterator[bytes]:
        for i, msg in enumerate(_guarded(requests), start=1):
            kind = msg.WhichOneof("payload")
            if kind != "chunk":
                raise InvalidArgument(
                    f"push message {i} is a {kind or 'empty message'}; after the header only "
                    "chunks may follow"
                )
            if len(msg.chunk) > CHUNK_BYTES:
                raise InvalidArgument(
                    f"push chunk {i} is {len(msg.chunk)} bytes; chunks are at most "
                    f"{CHUNK_BYTES} bytes"
                )
            yield msg.chunk

    return header, chunks()


class AdapterStoreServicer(store_pb2_grpc.AdapterStoreServicer):
    def __init__(self, core: StoreCore):
        self.core = core

    def PushAdapter(self, request_iterator, context):
        header, chunks = _push_stream(request_iterator)
        rec = self.core.push(header, chunks, is_cancelled=lambda: not context.is_active())
        return store_pb2.PushAdapterResponse(revision=revision_to_proto(rec))

    def ResolveAdapter(self, request, context):
        rec = self.core.resolve(request.ref)
        return store_pb2.ResolveAdapterResponse(revision=revision_to_proto(rec))

    def FetchAdapter(self, request, context):
        res = self.core.fetch(digest=request.digest, ref=request.ref)
        yield store_pb2.FetchAdapterResponse(
            header=store_pb2.FetchHeader(digest=res.digest, size_bytes=res.size_bytes)
        )
        for chunk in res.chunks(CHUNK_BYTES):
            if not context.is_active():
                return
            yield store_pb2.FetchAdapterResponse(chunk=chunk)

    def ListAdapters(self, request, context):
        items, token = self.core.list_adapters(
            tenant=request.tenant, page_size=request.page_size, page_token=request.page_token
        )
        return store_pb2.ListAdaptersResponse(
            adapters=[summary_to_proto(s) for s in items], next_page_token=token
        )

    def DeleteAdapter(self, request, context):
        doomed = self.core.delete(request.ref)
        return store_pb2.DeleteAdapterResponse(deleted=[revision_to_proto(r) for r in doomed])

    def GetBaseModel(self, request, context):
        b = self.core.base_model()
        return store_pb2.GetBaseModelResponse(
            fingerprint=b.fingerprint,
            model_type=b.model_type,
            target_modules=list(b.target_modules),
            max_rank=b.max_rank,
        )


def add_to_server(core: StoreCore, server: grpc.Server) -> list[str]:
    store_pb2_grpc.add_AdapterStoreServicer_to_server(AdapterStoreServicer(core), server)
    return [store_pb2.DESCRIPTOR.services_by_name["AdapterStore"].full_name]
