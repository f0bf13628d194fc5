"""Tenants' API keys and who a call comes from.

A key is ``mint_<key id>_<secret>``: the id (12 hex) finds the record, the secret (43 url-safe
characters, 256 bits) is checked against ``sha256(salt || secret)`` with a per-key random salt;
the catalog never holds a key in plaintext. The operator's admin key is given at start
(StoreConfig.admin_key) and never stored.

A call is authenticated in one place, `AuthInterceptor` (every AdapterStore RPC), from its
metadata (Authenticate and WatchKeys then take mesh peers only):

- ``authorization: Bearer <key>``: a tenant key or an admin key;
- ``x-mint-internal-token: <StoreConfig.internal_token>`` (a service inside the mesh, e.g. the
  router after it authenticated the client itself) with ``x-mint-tenant: <tenant>`` = that
  tenant, or without it = a service principal with admin rights.

The principal is handed to the servicer in a context variable; the core checks it against the
tenant of every adapter a call touches (PERMISSION_DENIED). With auth off every call is admin.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import logging
import re
import secrets
import time
from collections.abc import Mapping

import grpc

from mintmesh.errors import MintError, Unauthenticated
from mintmesh.identity import check_part
from mintmesh.services.common.auth import (
    ADMIN,
    AUTHORIZATION,
    INTERNAL_TOKEN_HEADER,
    TENANT_HEADER,
    Principal,
    bearer_key,
)
from mintmesh.services.common.errors import to_rpc_status, wrap_handler
from mintmesh.services.store.catalog import Catalog, KeyRecord

logger = logging.getLogger(__name__)

KEY_PREFIX = "mint_"
_KEY_RE = re.compile(r"^mint_(?P<id>[0-9a-f]{12})_(?P<secret>[A-Za-z0-9_\-]{20,128})$")
STORE_SERVICE = "/mintmesh.v1.AdapterStore/"
OPEN_METHODS: frozenset[str] = frozenset()


_current: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "mint_store_principal", default=None
)


def current_principal() -> Principal | None:
    """The principal of the RPC running in this thread (set by AuthInterceptor)."""
    return _current.get()


def hash_secret(salt: bytes, secret: str) -> str:
    return hashlib.sha256(salt + secret.encode()).hexdigest()


def new_key(tenant: str, *, admin: bool = False) -> tuple[str, KeyRecord]:
    """A fresh API key (plaintext, to hand out once) and the record to store (hashed)."""
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_bytes(16)
    rec = KeyRecord(
        key_id=key_id,
        tenant="" if admin else tenant,
        admin=admin,
        salt=salt.hex(),
        hash=hash_secret(salt, secret),
        created_at_ms=time.time_ns() // 1_000_000,
    )
    return f"{KEY_PREFIX}{key_id}_{secret}", rec


class Authenticator:
    """API key / internal token -> Principal."""

    def __init__(
        self,
        catalog: Catalog,
        *,
        enabled: bool,
        admin_key: str = "",
        internal_token: str = "",
    ):
        self.catalog = catalog
        self.enabled = enabled
        self._admin_key = admin_key.encode() if admin_key else b""
        self._internal_token = internal_token.encode() if internal_token else b""

    def verify_key(self, key: str) -> Principal:
        """The principal an API key stands for; Unauthenticated when it is not a valid key."""
        if not key:
            raise Unauthenticated("no API key given: send 'authorization: Bearer <key>'")
        if self._admin_key and hmac.compare_digest(key.encode(), self._admin_key):
            return Principal(tenant="", is_admin=True, key_id="admin")
        m = _KEY_RE.match(key)
        rec = self.catalog.get_key(m.group("id")) if m else None
        if rec is None or not hmac.compare_digest(
            hash_secret(bytes.fromhex(rec.salt), m.group("secret")), rec.hash
        ):
            shown = key[:9] + "…" if len(key) > 9 else "…"
            raise Unauthenticated(
                f"API key {shown} is not valid (unknown, revoked or mistyped)",
                metadata={"key_prefix": key[:9]},
            )
        return Principal(tenant=rec.tenant, is_admin=rec.admin, key_id=rec.key_id)

    def authenticate(self, metadata: Mapping[str, str]) -> Principal:
        """The principal of a call with this metadata (ADMIN when auth is off)."""
        if not self.enabled:
            return ADMIN
        token = metadata.get(INTERNAL_TOKEN_HEADER)
        if token is not None:
            if not self._internal_token or not hmac.compare_digest(
                token.encode(), self._internal_token
            ):
                raise Unauthenticated(f"{INTERNAL_TOKEN_HEADER} is not this store's internal token")
            tenant = metadata.get(TENANT_HEADER, "")
            if not tenant:
                return Principal(tenant="", is_admin=True, key_id="internal")
            check_part("tenant", tenant)
            return Principal(tenant=tenant, is_admin=False, key_id="internal")
        key = bearer_key(
            metadata.get(AUTHORIZATION),
            "this store requires an API key: send 'authorization: Bearer <key>'",
        )
        return self.verify_key(key)


def _reset(token: contextvars.Token) -> None:
    try:
        _current.reset(token)
    except ValueError:  # a stream closed from another context: nothing to undo there
        _current.set(None)


def _metadata(handler_call_details) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in handler_call_details.invocation_metadata or ():
        if isinstance(v, str):
            out[k.lower()] = v
    return out


class AuthInterceptor(grpc.ServerInterceptor):
    """Authenticate every AdapterStore call before its handler runs; a
    failure is UNAUTHENTICATED (the handler never runs). The principal is available to the
    handler through `current_principal()`."""

    def __init__(self, auth: Authenticator):
        self.auth = auth

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method or ""
        if handler is None or not method.startswith(STORE_SERVICE):
            return handler
        if method[len(STORE_SERVICE) :] in OPEN_METHODS:
            return handler
        md = _metadata(handler_call_details)
        auth = self.auth

        def principal_or_abort(context) -> Principal:
            try:
                return auth.authenticate(md)
            except MintError as exc:
                logger.info("%s -> UNAUTHENTICATED: %s", method, exc.message)
                context.abort_with_status(to_rpc_status(exc))
                raise  # not reached: abort raises

        def wrap_unary(fn):
            def inner(request, context):
                who = principal_or_abort(context)
                token = _current.set(who)
                try:
                    return fn(request, context)
                finally:
                    _reset(token)

            return inner

        def wrap_stream(fn):
            def inner(request, context):
                who = principal_or_abort(context)
                token = _current.set(who)
                try:
                    yield from fn(request, context)
                finally:
                    _reset(token)

            return inner

        return wrap_handler(handler, wrap_unary, wrap_stream)
