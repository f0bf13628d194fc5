"""gRPC translation for the router: mintmesh.v1.Router, and mintmesh.v1.AdapterStore proxied to
the store (so a client needs one address)."""

from __future__ import annotations

import grpc
from google.protobuf.message import DecodeError

from mintmesh.errors import InvalidArgument, TenantDenied
from mintmesh.services.common.auth import ADMIN
from mintmesh.services.common.errors import reraise_downstream
from mintmesh.services.common.server import remaining_timeout
from mintmesh.services.router.auth import peer_host
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

    def Score(self, request, context):
        caller = self.core.auth.caller(context)
        return self.core.score(request, context.time_remaining(), caller)

    def _training(name):
        def rpc(self, request, context):
            caller = self.core.auth.caller(context)
            return getattr(self.core, name)(request, context.time_remaining(), caller)

        return rpc

    CreateTrainingRun = _training("create_run")
    ForwardBackward = _training("forward_backward")
    OptimStep = _training("optim_step")
    SaveRunWeights = _training("save_run_weights")
    DropTrainingRun = _training("drop_run")
    del _training

    def Status(self, request, context):
        return self.core.status(self.core.auth.caller(context))

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
        """Metadata for the store: the verified caller."""
        return self.core.auth.internal_metadata(self.core.auth.caller(context))

    def _authenticate(self, request: bytes, context) -> bytes:
        """Authenticate answered here, not forwarded: the store's is for mesh peers, and here
        failures count against the client's address (RouterAuth.verify)."""
        try:
            req = store_pb2.AuthenticateRequest.FromString(request)
        except DecodeError:
            raise InvalidArgument(
                "the request bytes do not parse as a mintmesh.v1.AuthenticateRequest"
            ) from None
        auth = self.core.auth
        if not auth.enabled:
            who = ADMIN
        elif req.api_key:
            who = auth.verify(req.api_key, peer_host(context), remaining_timeout(context, 30.0))
        else:
            who = auth.caller(context)
        return store_pb2.AuthenticateResponse(
            tenant=who.tenant, is_admin=who.is_admin, key_id=who.key_id
        ).SerializeToString()

    def _refuse(self, request, context):
        raise TenantDenied("WatchKeys is for the mesh's own services")

    def _make(self, path: str, client_stream: bool, server_stream: bool):
        ident = None  # bytes in, bytes out
        what = path.rsplit("/", 1)[-1]
        if what == "Authenticate":
            return grpc.unary_unary_rpc_method_handler(self._authenticate)
        if what == "WatchKeys":
            return grpc.unary_stream_rpc_method_handler(self._refuse)
        after = {
            "DeleteAdapter": self.core.after_delete,
            # This router forgets cached keys at once (the store's WatchKeys tells the others).
            "RevokeApiKey": lambda _resp: self.core.auth.forget(),
        }.get(what)
        # "unary_unary", "stream_unary", ...: the channel's callable and grpc's handler factory.
        kind = f"{'stream' if client_stream else 'unary'}_{'stream' if server_stream else 'unary'}"
        call = getattr(self.channel, kind)(path, ident, ident)

        if server_stream:

            def handler(request, context):  # request: a message or an iterator of them
                it = call(request, timeout=self._t(context), metadata=self._md(context, what))
                try:
                    yield from it
                except grpc.RpcError as err:
                    raise reraise_downstream(err, what) from None
                finally:
                    it.cancel()

        else:

            def handler(request, context):
                try:
                    md = self._md(context, what)
                    resp = call(request, timeout=self._t(context), metadata=md)
                except grpc.RpcError as err:
                    raise reraise_downstream(err, what) from None
                if after is not None:
                    after(resp)
                return resp

        return getattr(grpc, f"{kind}_rpc_method_handler")(handler)
