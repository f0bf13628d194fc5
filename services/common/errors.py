"""Domain exceptions -> gRPC status, in one server interceptor, with google.rpc details.

Every servicer raises mintmesh.errors.* (or lets core code raise them); this interceptor turns
them into the right status code with an ErrorInfo (reason, domain, metadata) and, for
RESOURCE_EXHAUSTED, a RetryInfo. Anything else is a bug and surfaces as INTERNAL (logged).
"""

from __future__ import annotations

import logging

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from mintmesh import errors as E

logger = logging.getLogger(__name__)
DOMAIN = "mintmesh.v1"

# Most specific first.
_CODES: list[tuple[type[E.MintError], grpc.StatusCode]] = [
    (E.AdapterNotFound, grpc.StatusCode.NOT_FOUND),
    (E.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (E.BaseModelMismatch, grpc.StatusCode.FAILED_PRECONDITION),
    (E.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (E.TenantDenied, grpc.StatusCode.PERMISSION_DENIED),
    (E.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (E.DigestMismatch, grpc.StatusCode.DATA_LOSS),
    (E.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (E.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (E.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
]


def status_code_for(exc: E.MintError) -> grpc.StatusCode:
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


# A status travels in trailing metadata (grpc's default limit: 8 KiB for all of it): the message
# and each ErrorInfo value are cut to these lengths, so a huge input echoed in an error never
# turns the status into another one (RESOURCE_EXHAUSTED "metadata too large") on the way.
MAX_MESSAGE_CHARS = 2000
MAX_METADATA_CHARS = 256


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text) - limit} more characters)"


def to_rpc_status(exc: E.MintError) -> grpc.Status:
    code = status_code_for(exc)
    meta = {_cut(str(k), 64): _cut(str(v), MAX_METADATA_CHARS) for k, v in exc.metadata.items()}
    info = error_details_pb2.ErrorInfo(reason=exc.reason, domain=DOMAIN, metadata=meta)
    details = [_pack(info)]
    if isinstance(exc, E.ResourceExhausted):
        secs = max(exc.retry_after_s, 0.0)
        delay = duration_pb2.Duration(seconds=int(secs), nanos=int((secs % 1) * 1e9))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    st = status_pb2.Status(
        code=code.value[0], message=_cut(exc.message, MAX_MESSAGE_CHARS), details=details
    )
    return rpc_status.to_status(st)


def _pack(msg) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)
    return a


def error_info(err: grpc.RpcError) -> tuple[str, dict[str, str], float | None]:
    """(reason, metadata, retry_after_s) from a failed call's rich status, if any."""
    reason, meta, retry = "", {}, None
    try:
        st = rpc_status.from_call(err)
    except Exception:  # a status without details, or not from a call
        st = None
    if st is None:
        return reason, meta, retry
    for d in st.details:
        if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            d.Unpack(info)
            reason, meta = info.reason, dict(info.metadata)
        elif d.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            ri = error_details_pb2.RetryInfo()
            d.Unpack(ri)
            retry = ri.retry_delay.seconds + ri.retry_delay.nanos / 1e9
    return reason, meta, retry


def _abort(context: grpc.ServicerContext, exc: BaseException, method: str):
    if isinstance(exc, E.MintError):
        logger.info("%s -> %s: %s", method, status_code_for(exc).name, exc.message)
        context.abort_with_status(to_rpc_status(exc))
    logger.exception("%s failed with an unexpected error", method)
    st = status_pb2.Status(
        code=code_pb2.INTERNAL,
        message=_cut(f"internal error in {method}: {type(exc).__name__}: {exc}", MAX_MESSAGE_CHARS),
    )
    context.abort_with_status(rpc_status.to_status(st))


def _is_abort(exc: BaseException) -> bool:
    # context.abort raises a bare Exception after setting the status; let it through.
    return type(exc) is Exception and not exc.args


class _Undecodable:
    """What a request's bytes became when they do not parse as the method's message."""

    def __init__(self, what: str, err: Exception) -> None:
        self.what, self.err = what, err

    def error(self, method: str) -> E.InvalidArgument:
        return E.InvalidArgument(
            f"the request of {method} does not parse as {self.what}: {type(self.err).__name__}: "
            f"{_cut(str(self.err), 200)}"
        )


def _lenient(deserializer):
    """A request deserializer that never raises (grpc-python turns a raising one into INTERNAL
    "Exception deserializing request!"): bytes that do not parse become an _Undecodable, which
    the behaviour refuses as INVALID_ARGUMENT."""
    if deserializer is None:
        return None
    owner = getattr(deserializer, "__self__", None)
    what = getattr(getattr(owner, "DESCRIPTOR", None), "full_name", "the request message")

    def parse(raw: bytes):
        try:
            return deserializer(raw)
        except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and kin
            return _Undecodable(what, e)

    return parse


def _checked_stream(requests, method: str):
    for r in requests:
        if isinstance(r, _Undecodable):
            raise r.error(method)
        yield r


class ErrorInterceptor(grpc.ServerInterceptor):
    """Map domain exceptions to statuses for every kind of RPC; request bytes that do not parse
    are INVALID_ARGUMENT (for every method of every service: this is the one place)."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        streaming = handler.request_streaming

        def request_of(request):
            if streaming:
                return _checked_stream(request, method)
            if isinstance(request, _Undecodable):
                raise request.error(method)
            return request

        def wrap_unary(fn):
            def inner(request, context):
                try:
                    return fn(request_of(request), context)
                except Exception as exc:
                    if _is_abort(exc) or isinstance(exc, grpc.RpcError) and context.code():
                        raise
                    _abort(context, exc, method)

            return inner

        def wrap_stream(fn):
            def inner(request, context):
                try:
                    yield from fn(request_of(request), context)
                except Exception as exc:
                    if _is_abort(exc):
                        raise
                    _abort(context, exc, method)

            return inner

        wrapped = wrap_handler(handler, wrap_unary, wrap_stream)
        return wrapped._replace(request_deserializer=_lenient(handler.request_deserializer))


def wrap_handler(handler: grpc.RpcMethodHandler, wrap_unary, wrap_stream) -> grpc.RpcMethodHandler:
    """The same handler with its behaviour wrapped, for a server interceptor: wrap_unary(fn) for
    RPCs with one response, wrap_stream(fn) (a generator) for server-streaming ones."""
    if handler.unary_unary:
        return handler._replace(unary_unary=wrap_unary(handler.unary_unary))
    if handler.unary_stream:
        return handler._replace(unary_stream=wrap_stream(handler.unary_stream))
    if handler.stream_unary:
        return handler._replace(stream_unary=wrap_unary(handler.stream_unary))
    if handler.stream_stream:
        return handler._replace(stream_stream=wrap_stream(handler.stream_stream))
    return handler


def reraise_downstream(err: grpc.RpcError, what: str) -> E.MintError:
    """Turn a failed downstream call into the domain error to raise upstream, keeping its code
    (so NOT_FOUND from the store stays NOT_FOUND through the router)."""
    code = err.code() if hasattr(err, "code") else None
    msg = err.details() if hasattr(err, "details") else str(err)
    reason, meta, retry = error_info(err)
    by_code: dict[grpc.StatusCode, type[E.MintError]] = {
        grpc.StatusCode.NOT_FOUND: E.AdapterNotFound,
        grpc.StatusCode.INVALID_ARGUMENT: E.InvalidArgument,
        grpc.StatusCode.FAILED_PRECONDITION: E.FailedPrecondition,
        grpc.StatusCode.PERMISSION_DENIED: E.TenantDenied,
        grpc.StatusCode.UNAUTHENTICATED: E.Unauthenticated,
        grpc.StatusCode.DATA_LOSS: E.DigestMismatch,
        grpc.StatusCode.RESOURCE_EXHAUSTED: E.ResourceExhausted,
        grpc.StatusCode.UNAVAILABLE: E.Unavailable,
        grpc.StatusCode.DEADLINE_EXCEEDED: E.Unavailable,
        grpc.StatusCode.ALREADY_EXISTS: E.AlreadyExists,
    }
    cls = by_code.get(code)
    if cls is None:
        return E.MintError(f"{what}: {code.name if code else 'error'}: {msg}")
    kwargs = {"metadata": meta}
    if cls is E.ResourceExhausted and retry is not None:
        kwargs["retry_after_s"] = retry
    exc = cls(msg or f"{what} failed with {code.name}", **kwargs)
    if reason:
        exc.reason = reason
    return exc
