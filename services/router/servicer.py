"""gRPC translation for the router: mintmesh.v1.Router, and mintmesh.v1.AdapterStore proxied to
the store (so a client needs one address)."""

from __future__ import annotations

import grpc

from mintmesh.services.common.errors import reraise_downstream
from mintmesh.services.common.server import remaining_timeout
from mintmesh.services.router.core import RouterCore
from mintmesh.v1 import router_pb2_grpc, store_pb2_grpc


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(self, core: RouterCore):
        self.core = core

    def Generate(self, request, context):
        left = context.time_remaining()
        gen = self.core.generate(request, left)
        try:
            yield from gen
        finally:
            gen.close()

    def Status(self, request, context):
        return self.core.status()


class StoreProxyServicer(store_pb2_grpc.AdapterStoreServicer):
    """Forwards every AdapterStore RPC to the store with the caller's remaining deadline."""

    def __init__(self, core: RouterCore):
        self.core = core
        self.stub = core.store

    def _t(self, context) -> float:
        return remaining_timeout(context, self.core.config.store_timeout_s)

    def _unary(self, method: str, request, context):
        try:
            return getattr(self.stub, method)(request, timeout=self._t(context))
        except grpc.RpcError as err:
            raise reraise_downstream(err, method) from None

    def PushAdapter(self, request_iterator, context):
        try:
            return self.stub.PushAdapter(request_iterator, timeout=self._t(context))
        except grpc.RpcError as err:
            raise reraise_downstream(err, "PushAdapter") from None

    def ResolveAdapter(self, request, context):
        return self._unary("ResolveAdapter", request, context)

    def ListAdapters(self, request, context):
        return self._unary("ListAdapters", request, context)

    def DeleteAdapter(self, request, context):
        return self._unary("DeleteAdapter", request, context)

    def GetBaseModel(self, request, context):
        return self._unary("GetBaseModel", request, context)

    def FetchAdapter(self, request, context):
        call = self.stub.FetchAdapter(request, timeout=self._t(context))
        try:
            yield from call
        except grpc.RpcError as err:
            raise reraise_downstream(err, "FetchAdapter") from None
        finally:
            call.cancel()
