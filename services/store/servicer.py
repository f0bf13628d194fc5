"""mintmesh.v1.AdapterStore: proto <-> StoreCore translation only. Domain errors raised here or
in the core become status codes in services.common.errors.ErrorInterceptor; the caller's
principal comes from services.store.auth.AuthInterceptor."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from mintmesh.errors import InvalidArgument, MintError, TenantDenied, Unavailable
from mintmesh.services.common.errors import status_code_for
from mintmesh.services.common.server import CHUNK_BYTES
from mintmesh.services.store.auth import current_principal
from mintmesh.services.store.catalog import (
    AT_LEAST,
    AT_MOST,
    DELETED,
    DEPRECATED,
    MERGE,
    READY,
    TRAINING,
    UPLOAD,
    AdapterSummary,
    Gate,
    RevisionRecord,
    TenantRecord,
)
from mintmesh.services.store.core import PushHeader, StoreCore
from mintmesh.v1 import common_pb2, store_pb2, store_pb2_grpc
from mintmesh.wire import STORAGE_FROM_PROTO, STORAGE_TO_PROTO

STATE_TO_PROTO = {
    READY: common_pb2.REVISION_STATE_READY,
    DEPRECATED: common_pb2.REVISION_STATE_DEPRECATED,
    DELETED: common_pb2.REVISION_STATE_DELETED,
}
STATE_FROM_PROTO = {v: k for k, v in STATE_TO_PROTO.items()}
SOURCE_TO_PROTO = {
    UPLOAD: common_pb2.REVISION_SOURCE_UPLOAD,
    MERGE: common_pb2.REVISION_SOURCE_MERGE,
    TRAINING: common_pb2.REVISION_SOURCE_TRAINING,
}
SOURCE_FROM_PROTO = {v: k for k, v in SOURCE_TO_PROTO.items()}
DIRECTION_TO_PROTO = {
    AT_LEAST: store_pb2.GATE_DIRECTION_AT_LEAST,
    AT_MOST: store_pb2.GATE_DIRECTION_AT_MOST,
}
DIRECTION_FROM_PROTO = {v: k for k, v in DIRECTION_TO_PROTO.items()}


def _enum(table: dict, value: int, what: str, default: str = "") -> str:
    if value == 0:
        return default
    try:
        return table[value]
    except KeyError:
        raise InvalidArgument(f"{what} {value} is not a known value") from None


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
        storage_format=STORAGE_TO_PROTO.get(rec.storage_format, 0),
        state=STATE_TO_PROTO[rec.state],
        provenance=common_pb2.Provenance(
            source=SOURCE_TO_PROTO[rec.source],
            parents=[
                common_pb2.ParentRevision(ref=p.ref, digest=p.digest, weight=p.weight)
                for p in rec.parents
            ],
            data_digest=rec.data_digest,
            method=rec.merge_method,
        ),
        evaluations=[
            common_pb2.Evaluation(
                metric=e.metric,
                value=e.value,
                evaluator=e.evaluator,
                evaluated_at_unix_ms=e.at_ms,
                dataset_digest=e.dataset_digest,
            )
            for e in rec.evaluations
        ],
        state_digest=rec.state_digest,
        state_size_bytes=rec.state_size_bytes,
    )


def summary_to_proto(s: AdapterSummary) -> store_pb2.AdapterSummary:
    return store_pb2.AdapterSummary(
        tenant=s.tenant,
        name=s.name,
        revision_count=s.revision_count,
        latest=revision_to_proto(s.latest),
        aliases=s.aliases,
    )


def gate_to_proto(g: Gate) -> store_pb2.AliasGate:
    return store_pb2.AliasGate(
        alias=g.alias,
        metric=g.metric,
        threshold=g.threshold,
        direction=DIRECTION_TO_PROTO[g.direction],
    )


def tenant_to_proto(t: TenantRecord) -> store_pb2.TenantInfo:
    return store_pb2.TenantInfo(
        tenant=t.tenant, created_at_unix_ms=t.created_at_ms, key_count=t.key_count
    )


def header_from_proto(h: store_pb2.PushHeader) -> PushHeader:
    return PushHeader(
        name=h.name,
        adapter_config_json=h.adapter_config_json,
        sha256=h.sha256,
        size_bytes=h.size_bytes,
        labels=dict(h.labels),
        base_fingerprint=h.base_fingerprint,
        storage_format=_enum(STORAGE_FROM_PROTO, h.storage_format, "storage_format"),
        source=_enum(SOURCE_FROM_PROTO, h.source, "source", UPLOAD),
        parents=tuple(h.parents),
        data_digest=h.data_digest,
        state_sha256=h.state_sha256,
        state_size_bytes=h.state_size_bytes,
    )


def _guarded(requests: Iterator) -> Iterator:
    """The request stream, with a client that went away mid-stream reported as such."""
    while True:
        try:
            msg = next(requests)
        except StopIteration:
            return
        except grpc.RpcError as e:
            raise Unavailable("push stream was cut: the client cancelled or disconnected") from e
        yield msg


def _check_chunk(i: int, msg) -> bytes:
    kind = msg.WhichOneof("payload")
    if kind != "chunk":
        raise InvalidArgument(
            f"push message {i} is a {kind or 'empty message'}; after the header only "
            "chunks may follow"
        )
    if len(msg.chunk) > CHUNK_BYTES:
        raise InvalidArgument(
            f"push chunk {i} is {len(msg.chunk)} bytes; chunks are at most {CHUNK_BYTES} bytes"
        )
    return msg.chunk


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
    header = header_from_proto(first.header)

    def chunks() -> Iterator[bytes]:
        for i, msg in enumerate(_guarded(requests), start=1):
            yield _check_chunk(i, msg)

    return header, chunks()


def _many_stream(
    requests: Iterator[store_pb2.PushAdaptersRequest],
) -> Iterator[tuple[PushHeader, bytes]]:
    """A PushAdapters stream as (header, bytes) per adapter: a header, then chunks adding up to
    exactly its size_bytes, then the next header; or an inline message of whole adapters."""
    header: PushHeader | None = None
    parts: list[bytes] = []
    got = 0
    for i, msg in enumerate(_guarded(requests)):
        kind = msg.WhichOneof("payload")
        if header is None:
            if kind == "inline":
                total = sum(len(a.data) for a in msg.inline.adapters)
                if total > CHUNK_BYTES:
                    raise InvalidArgument(
                        f"push message {i} inlines {total} bytes of adapters; at most "
                        f"{CHUNK_BYTES} bytes may travel in one message"
                    )
                for a in msg.inline.adapters:
                    yield header_from_proto(a.header), a.data
                continue
            if kind != "header":
                raise InvalidArgument(
                    f"push message {i} is a {kind or 'empty message'}; each adapter must "
                    "start with a header"
                )
            header = header_from_proto(msg.header)
            if header.size_bytes <= 0:
                raise InvalidArgument(
                    f"push message {i}: header size_bytes {header.size_bytes} must be > 0"
                )
            parts, got = [], 0
            continue
        chunk = _check_chunk(i, msg)
        parts.append(chunk)
        got += len(chunk)
        if got >= header.size_bytes:
            # More bytes than declared: the core refuses this adapter with the usual message.
            yield header, b"".join(parts)
            header = None
    if header is not None:
        yield header, b"".join(parts)  # truncated: refused by the core


def push_result_to_proto(r) -> store_pb2.PushResult:
    if r.record is not None:
        return store_pb2.PushResult(index=r.index, revision=revision_to_proto(r.record))
    err = r.error
    assert isinstance(err, MintError)
    return store_pb2.PushResult(
        index=r.index,
        error=store_pb2.PushError(
            code=status_code_for(err).name, message=err.message, reason=err.reason
        ),
    )


class AdapterStoreServicer(store_pb2_grpc.AdapterStoreServicer):
    def __init__(self, core: StoreCore):
        self.core = core

    # -- adapters -----------------------------------------------------------------------------

    def PushAdapter(self, request_iterator, context):
        header, chunks = _push_stream(request_iterator)
        rec = self.core.push(
            header,
            chunks,
            is_cancelled=lambda: not context.is_active(),
            principal=current_principal(),
        )
        return store_pb2.PushAdapterResponse(revision=revision_to_proto(rec))

    def PushAdapters(self, request_iterator, context):
        batches = self.core.push_many(
            _many_stream(request_iterator),
            principal=current_principal(),
            is_cancelled=lambda: not context.is_active(),
        )
        for results in batches:
            yield store_pb2.PushAdaptersResponse(results=[push_result_to_proto(r) for r in results])

    def ResolveAdapter(self, request, context):
        rec = self.core.resolve(request.ref, principal=current_principal())
        return store_pb2.ResolveAdapterResponse(revision=revision_to_proto(rec))

    def FetchAdapter(self, request, context):
        res = self.core.fetch(
            digest=request.digest,
            ref=request.ref,
            state=request.state,
            principal=current_principal(),
        )
        yield store_pb2.FetchAdapterResponse(
            header=store_pb2.FetchHeader(digest=res.digest, size_bytes=res.size_bytes)
        )
        for chunk in res.chunks(CHUNK_BYTES):
            if not context.is_active():
                return
            yield store_pb2.FetchAdapterResponse(chunk=chunk)

    def ListAdapters(self, request, context):
        items, token = self.core.list_adapters(
            tenant=request.tenant,
            page_size=request.page_size,
            page_token=request.page_token,
            name_prefix=request.name_prefix,
            label=request.label,
            principal=current_principal(),
        )
        return store_pb2.ListAdaptersResponse(
            adapters=[summary_to_proto(s) for s in items], next_page_token=token
        )

    def ListRevisions(self, request, context):
        items, token, info = self.core.list_revisions(
            request.name,
            page_size=request.page_size,
            page_token=request.page_token,
            label=request.label,
            state=_enum(STATE_FROM_PROTO, request.state, "state"),
            principal=current_principal(),
        )
        return store_pb2.ListRevisionsResponse(
            revisions=[revision_to_proto(r) for r in items],
            next_page_token=token,
            aliases=info.aliases,
            gates=[gate_to_proto(g) for g in info.gates],
        )

    def DeleteAdapter(self, request, context):
        res = self.core.delete(request.ref, principal=current_principal())
        return store_pb2.DeleteAdapterResponse(
            deleted=[revision_to_proto(r) for r in res.revisions], deleted_digests=res.digests
        )

    def GetBaseModel(self, request, context):
        b = self.core.base_model()
        return store_pb2.GetBaseModelResponse(
            fingerprint=b.fingerprint,
            model_type=b.model_type,
            target_modules=list(b.target_modules),
            max_rank=b.max_rank,
            name=self.core.config.base_model_name or self.core.config.model_dir.name,
        )

    # -- lifecycle ----------------------------------------------------------------------------

    def SetAlias(self, request, context):
        rec, prev = self.core.set_alias(
            request.name,
            request.alias,
            request.revision,
            rollback=request.rollback,
            principal=current_principal(),
        )
        return store_pb2.SetAliasResponse(revision=revision_to_proto(rec), previous_revision=prev)

    def DeleteAlias(self, request, context):
        rev = self.core.delete_alias(request.name, request.alias, principal=current_principal())
        return store_pb2.DeleteAliasResponse(revision=rev)

    def AddEvaluation(self, request, context):
        rec = self.core.add_evaluation(
            request.ref,
            request.metric,
            request.value,
            request.evaluator,
            dataset_digest=request.dataset_digest,
            principal=current_principal(),
        )
        return store_pb2.AddEvaluationResponse(revision=revision_to_proto(rec))

    def SetAliasGate(self, request, context):
        gate = self.core.set_gate(
            request.name,
            request.alias,
            metric=request.metric,
            threshold=request.threshold,
            direction=_enum(DIRECTION_FROM_PROTO, request.direction, "direction", AT_LEAST),
            clear=request.clear,
            principal=current_principal(),
        )
        return store_pb2.SetAliasGateResponse(
            gate=gate_to_proto(gate) if gate is not None else None
        )

    def DeprecateRevision(self, request, context):
        rec = self.core.deprecate(request.ref, undo=request.undo, principal=current_principal())
        return store_pb2.DeprecateRevisionResponse(revision=revision_to_proto(rec))

    def MergeAdapters(self, request, context):
        linear = (store_pb2.MERGE_METHOD_UNSPECIFIED, store_pb2.MERGE_METHOD_LINEAR)
        if request.method not in linear:
            raise InvalidArgument(f"merge method {request.method} is not supported")
        rec = self.core.merge(
            request.name,
            [(s.ref, s.weight) for s in request.sources],
            storage=_enum(STORAGE_FROM_PROTO, request.storage_format, "storage_format"),
            labels=dict(request.labels),
            principal=current_principal(),
        )
        return store_pb2.MergeAdaptersResponse(revision=revision_to_proto(rec))

    # -- tenants ------------------------------------------------------------------------------

    def CreateTenant(self, request, context):
        t = self.core.create_tenant(request.tenant, principal=current_principal())
        return store_pb2.CreateTenantResponse(
            tenant=t.tenant.tenant, api_key=t.api_key, key_id=t.key_id
        )

    def CreateApiKey(self, request, context):
        key, key_id, tenant = self.core.create_api_key(
            request.tenant, admin=request.admin, principal=current_principal()
        )
        return store_pb2.CreateApiKeyResponse(api_key=key, key_id=key_id, tenant=tenant)

    def RevokeApiKey(self, request, context):
        self.core.revoke_api_key(request.key_id, principal=current_principal())
        return store_pb2.RevokeApiKeyResponse()

    def ListTenants(self, request, context):
        items, token = self.core.list_tenants(
            page_size=request.page_size,
            page_token=request.page_token,
            principal=current_principal(),
        )
        return store_pb2.ListTenantsResponse(
            tenants=[tenant_to_proto(t) for t in items], next_page_token=token
        )

    def Authenticate(self, request, context):
        _require_peer("Authenticate")
        who = self.core.authenticate(request.api_key) if request.api_key else current_principal()
        return store_pb2.AuthenticateResponse(
            tenant=who.tenant, is_admin=who.is_admin, key_id=who.key_id
        )

    def WatchKeys(self, request, context):
        _require_peer("WatchKeys")
        epoch, revoked = self.core.key_epoch()
        yield store_pb2.KeyEvent(epoch=epoch)
        while context.is_active():
            now, revoked = self.core.wait_key_epoch(epoch, timeout=1.0)
            if now != epoch:
                epoch = now
                yield store_pb2.KeyEvent(epoch=epoch, revoked_key_id=revoked)


def _require_peer(what: str) -> None:
    """Refuse a caller that is not a mesh peer (the internal token; any caller with auth off):
    Authenticate answers for any key, so a client could test guessed keys with it."""
    who = current_principal()
    if who is None or who.key_id not in ("internal", ""):
        raise TenantDenied(
            f"{what} is for the mesh's own services; clients ask the router "
            "(which authenticates them and rate-limits failures)"
        )


def add_to_server(core: StoreCore, server: grpc.Server) -> list[str]:
    store_pb2_grpc.add_AdapterStoreServicer_to_server(AdapterStoreServicer(core), server)
    return [store_pb2.DESCRIPTOR.services_by_name["AdapterStore"].full_name]
