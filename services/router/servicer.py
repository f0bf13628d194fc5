"""gRPC translation for the router: mintmesh.v1.Router, and mintmesh.v1.AdapterStore proxied to
the store (so a client needs one address)."""

from __future__ import annotations

import grpc

from mintmesh.services.common.errors import reraise_downstream
from mintmesh.services.common.server import remaining_timeout
from mintmesh.services.router.core import RouterCore
from mintmesh.v1 import router_pb2_grpc, store_pb2


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(self, core: RouterCore):
        self.core = core

    def Generate(self, request, context):
        caller = self.core.auth.caller(context)
        left = context.time_remaining()
        gen = self.core.generate(request, left, caller)
        try:
            yield from gen
        finally:
            gen.close()

    def Status(self, request, context):
        return self.core.status()

    def Prefetch(self, request, context):
        caller = self.core.auth.caller(context)
        return self.core.prefetch(list(request.adapters), context.time_remaining(), caller)


class StoreProxy(grpc.GenericRpcHandler):
    """Serves every mintmesh.v1.AdapterStore RPC by forwarding its bytes to the store, with the
    caller's remaining deadline. Generic over the service descriptor, so a new store RPC is
    proxied without code here; messages are not even parsed."""

    SERVICE = store_pb2.DESCRIPTOR.services_by_name["AdapterStore"]

    def __init__(self, core: RouterCore):
        self.core = core
        self.channel = core.store_channel
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}
        for m in self.SERVICE.methods:
            path = f"/{self.SERVICE.full_name}/{m.name}"
            self._handlers[path] = self._make(path, m.client_streaming, m.server_streaming)

    def service(self, handler_call_details):
        return self._handlers.get(handler_call_details.method)

    def _t(self, context) -> float:
        return remaining_timeout(context, self.core.config.store_timeout_s)

    def _md(self, context, what: str) -> list[tuple[str, str]]:
        """Metadata for the store: the verified caller, or (Authenticate) the client's own."""
        if what == "Authenticate":
            return [(k, v) for k, v in context.invocation_metadata() if k == "authorization"]
        return self.core.auth.internal_metadata(self.core.auth.caller(context))

    def _make(self, path: str, client_stream: bool, server_stream: bool):
        ident = None  # bytes in, bytes out
        what = path.rsplit("/", 1)[-1]
        after = self.core.after_delete if what == "DeleteAdapter" else None
        if client_stream and not server_stream:
            call = self.channel.stream_unary(path, ident, ident)

            def stream_unary(request_iterator, context):
                try:
                    md = self._md(context, what)
                    return call(request_iterator, timeout=self._t(context), metadata=md)
                except grpc.RpcError as err:
                    raise reraise_downstream(err, what) from None

            return grpc.stream_unary_rpc_method_handler(stream_unary)
        if server_stream and not client_stream:
            call = self.channel.unary_stream(path, ident, ident)

            def unary_stream(request, context):
                it = call(request, timeout=self._t(context), metadata=self._md(context, what))
                try:
                    yield from it
                except grpc.RpcError as err:
                    raise reraise_downstream(err, what) from None
                finally:
                    it.cancel()

            return grpc.unary_stream_rpc_method_handler(unary_stream)
        if client_stream and server_stream:
            call = self.channel.stream_stream(path, ident, ident)

            def stream_stream(request_iterator, context):
                md = self._md(context, what)
                it = call(request_iterator, timeout=self._t(context), metadata=md)
                try:
                    yield from it
                except grpc.RpcError as err:
                    raise reraise_downstream(err, what) from None
                finally:
                    it.cancel()

            return grpc.stream_stream_rpc_method_handler(stream_stream)
        call = self.channel.unary_unary(path, ident, ident)

        def unary_unary(request, context):
            try:
                resp = call(request, timeout=self._t(context), metadata=self._md(context, what))
            except grpc.RpcError as err:
                raise reraise_downstream(err, what) from None
            if after is not None:
                after(resp)
            return resp

        return grpc.unary_unary_rpc_method_handler(unary_unary)
