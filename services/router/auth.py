"""The router authenticates each client once and speaks for it downstream.

A client sends ``authorization: Bearer <key>``. The router asks the store's Authenticate RPC who
the key belongs to (cached for a short TTL, keyed by the key's sha256, never the key itself),
then calls the store with the mesh's internal token and ``x-mint-tenant: <tenant>`` (no tenant
= an admin). Executors never see keys. With auth off, nothing is checked or sent.
"""

from __future__ import annotations

import hashlib
import threading
import time

import grpc

from mintmesh.services.common.auth import (
    ADMIN,
    AUTHORIZATION,
    INTERNAL_TOKEN_HEADER,
    TENANT_HEADER,
    Principal,
    bearer_key,
)
from mintmesh.services.common.errors import reraise_downstream
from mintmesh.v1 import store_pb2, store_pb2_grpc


class RouterAuth:
    def __init__(
        self,
        store: store_pb2_grpc.AdapterStoreStub,
        *,
        enabled: bool,
        internal_token: str = "",
        ttl_s: float = 30.0,
    ):
        if enabled and not internal_token:
            raise ValueError("router auth needs the mesh's internal token (--internal-token)")
        self.store = store
        self.enabled = enabled
        self.internal_token = internal_token
        self.ttl_s = ttl_s
        self._cache: dict[str, tuple[Principal, float]] = {}
        self._lock = threading.Lock()

    def caller(self, context: grpc.ServicerContext | None) -> Principal:
        """Who makes this call (ADMIN when auth is off); Unauthenticated otherwise."""
        if not self.enabled:
            return ADMIN
        md = dict(context.invocation_metadata() or ()) if context is not None else {}
        key = bearer_key(
            md.get(AUTHORIZATION),
            "this mesh requires an API key: send 'authorization: Bearer <key>' (the CLI sends "
            "$MINT_API_KEY)",
        )
        fp = hashlib.sha256(key.encode()).hexdigest()
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(fp)
            if hit is not None and hit[1] > now:
                return hit[0]
        try:
            resp = self.store.Authenticate(
                store_pb2.AuthenticateRequest(api_key=key),
                timeout=5.0,
                metadata=self.internal_metadata(ADMIN),
            )
        except grpc.RpcError as err:
            raise reraise_downstream(err, "authenticating") from None
        who = Principal(tenant=resp.tenant, is_admin=resp.is_admin)
        with self._lock:
            if len(self._cache) > 100_000:
                self._cache.clear()
            self._cache[fp] = (who, now + self.ttl_s)
        return who

    def internal_metadata(self, caller: Principal) -> list[tuple[str, str]]:
        """Metadata that makes the store act for caller."""
        if not self.enabled:
            return []
        md = [(INTERNAL_TOKEN_HEADER, self.internal_token)]
        if not caller.is_admin:
            md.append((TENANT_HEADER, caller.tenant))
        return md
