"""A fault-injecting gRPC proxy for tests: a real server that forwards every RPC, as bytes, to a
real upstream (an executor), and on request fails a Generate before its first chunk or after
its n-th, the way a dying, draining or overloaded node does on the wire. It records each
Generate it saw and how it ended, so a test can tell which executor a router tried."""

from __future__ import annotations

import threading
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from google.rpc import status_pb2
from grpc_status import rpc_status

from mintmesh.services.common.errors import to_rpc_status
from mintmesh.v1 import executor_pb2

_STREAMING = {
    f"/{s.full_name}/{m.name}"
    for s in executor_pb2.DESCRIPTOR.services_by_name.values()
    for m in s.methods
    if m.server_streaming
} | {"/grpc.health.v1.Health/Watch"}
GENERATE = "/mintmesh.v1.Executor/Generate"


@dataclass
class Fault:
    """Fail the next Generate calls (`times` of them; -1 = all) after `after_chunks` chunks
    (0 = before the first) with `status`: a grpc.Status (rich, from to_rpc_status) or a bare
    (code, message)."""

    status: grpc.Status | tuple[grpc.StatusCode, str]
    after_chunks: int = 0
    times: int = -1


@dataclass
class Seen:
    chunks: int = 0
    code: str = ""  # how the call ended at the proxy: "OK" or the injected/upstream code


@dataclass
class FaultProxy:
    upstream: str
    fault: Fault | None = None
    seen: list[Seen] = field(default_factory=list)
    # Unary methods ("/mintmesh.v1.Executor/Name") failed with a status while set here.
    unary_faults: dict[str, tuple[grpc.StatusCode, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._channel = grpc.insecure_channel(self.upstream)
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
        self._server.add_generic_rpc_handlers([_Handler(self)])
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def generates(self) -> list[Seen]:
        with self._lock:
            return list(self.seen)

    def clear(self) -> None:
        with self._lock:
            self.fault = None
            self.seen.clear()
            self.unary_faults.clear()

    def _take_fault(self) -> Fault | None:
        with self._lock:
            f = self.fault
            if f is None or f.times == 0:
                return None
            if f.times > 0:
                f.times -= 1
            return f

    def stop(self) -> None:
        self._server.stop(0).wait()
        self._channel.close()


def _abort(context: grpc.ServicerContext, status) -> None:
    if not isinstance(status, grpc.Status):
        code, msg = status
        status = rpc_status.to_status(status_pb2.Status(code=code.value[0], message=msg))
    context.abort_with_status(status)


def _pass_on(context: grpc.ServicerContext, err: grpc.RpcError) -> None:
    """Fail as the upstream did, its google.rpc details (ErrorInfo, RetryInfo) included."""
    try:
        st = rpc_status.from_call(err)
    except ValueError:
        st = None
    _abort(context, rpc_status.to_status(st) if st is not None else (err.code(), err.details()))


class _Handler(grpc.GenericRpcHandler):
    def __init__(self, proxy: FaultProxy):
        self.proxy = proxy

    def service(self, details):
        method = details.method
        if method in _STREAMING:
            call = self.proxy._channel.unary_stream(method)
            return grpc.unary_stream_rpc_method_handler(self._stream(method, call))
        call = self.proxy._channel.unary_unary(method)
        return grpc.unary_unary_rpc_method_handler(self._unary(method, call))

    def _unary(self, method: str, call):
        def handler(request, context):
            with self.proxy._lock:
                fault = self.proxy.unary_faults.get(method)
            if fault is not None:
                _abort(context, fault)
            try:
                return call(request, timeout=context.time_remaining())
            except grpc.RpcError as err:
                _pass_on(context, err)

        return handler

    def _stream(self, method: str, call):
        proxy = self.proxy

        def handler(request, context):
            fault = proxy._take_fault() if method == GENERATE else None
            seen = Seen()
            if method == GENERATE:
                with proxy._lock:
                    proxy.seen.append(seen)
            if fault is not None and fault.after_chunks == 0:
                seen.code = "injected"
                _abort(context, fault.status)
            it = call(request, timeout=context.time_remaining())
            context.add_callback(it.cancel)  # the caller went away: so does the upstream call
            try:
                for resp in it:
                    yield resp
                    seen.chunks += 1
                    if fault is not None and seen.chunks >= fault.after_chunks:
                        seen.code = "injected"
                        it.cancel()
                        _abort(context, fault.status)
                seen.code = "OK"
            except grpc.RpcError as err:
                seen.code = err.code().name
                _pass_on(context, err)
            finally:
                seen.code = seen.code or "CANCELLED"  # the caller went away mid-stream
                it.cancel()

        return handler


def rich(exc) -> grpc.Status:
    """The status an executor sends for a domain error (ErrorInfo, RetryInfo)."""
    return to_rpc_status(exc)
