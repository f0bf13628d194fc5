"""The router authenticates each client once and speaks for it downstream.

A client sends ``authorization: Bearer <key>``. The router asks the store's Authenticate RPC (for
mesh peers only) who the key belongs to, then calls the store with the mesh's internal token and
``x-mint-tenant: <tenant>`` (no tenant = an admin). Executors never see keys. With auth off,
nothing is checked or sent.

Answers are cached (keyed by the key's sha256, never the key itself) only while the store's
WatchKeys stream is up: every revocation drops the whole cache, so a revoked key fails on its
next call; while the stream is down every call asks the store. Failed attempts are counted per
client address: past `failures_per_minute`, keys not already known are refused
(RESOURCE_EXHAUSTED) until the window moves on, so guessing keys through the router is slow.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import deque

import grpc

from mintmesh.errors import ResourceExhausted
from mintmesh.services.common.auth import (
    ADMIN,
    AUTHORIZATION,
    INTERNAL_TOKEN_HEADER,
    TENANT_HEADER,
    Principal,
    bearer_key,
)
from mintmesh.services.common.errors import reraise_downstream
from mintmesh.services.common.server import remaining_timeout
from mintmesh.v1 import store_pb2, store_pb2_grpc

logger = logging.getLogger(__name__)

MISSING_KEY = (
    "this mesh requires an API key: send 'authorization: Bearer <key>' (the CLI sends "
    "$MINT_API_KEY)"
)
WINDOW_S = 60.0


def peer_host(context: grpc.ServicerContext | None) -> str:
    """The client's address without its port ("ipv4:127.0.0.1:5555" -> "ipv4:127.0.0.1")."""
    peer = (context.peer() if context is not None else "") or "unknown"
    return peer.rpartition(":")[0] or peer


class RouterAuth:
    def __init__(
        self,
        store: store_pb2_grpc.AdapterStoreStub,
        *,
        enabled: bool,
        internal_token: str = "",
        ttl_s: float = 30.0,
        failures_per_minute: int = 30,
    ):
        if enabled and not internal_token:
            raise ValueError("router auth needs the mesh's internal token (--internal-token)")
        self.store = store
        self.enabled = enabled
        self.internal_token = internal_token
        self.ttl_s = ttl_s
        self.failures_per_minute = failures_per_minute
        self._cache: dict[str, tuple[Principal, float]] = {}
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()
        self._watching = False  # the cache is trusted only while WatchKeys is up
        self._gen = 0  # bumped on every drop: an answer asked before one is not cached
        self._stop = threading.Event()
        self._watch_call = None
        self._watcher: threading.Thread | None = None

    # -- the revocation watch ---------------------------------------------------------------

    def start(self) -> None:
        if self.enabled and self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="key-watch", daemon=True)
            self._watcher.start()

    def stop(self) -> None:
        self._stop.set()
        call = self._watch_call
        if call is not None:
            call.cancel()

    def _watch(self) -> None:
        backoff = 0.2
        while not self._stop.is_set():
            try:
                call = self.store.WatchKeys(
                    store_pb2.WatchKeysRequest(), metadata=self.internal_metadata(ADMIN)
                )
                self._watch_call = call
                for ev in call:
                    with self._lock:
                        self._cache.clear()
                        self._gen += 1
                        self._watching = True
                    backoff = 0.2
                    if ev.revoked_key_id:
                        logger.info("key %s revoked: cached keys dropped", ev.revoked_key_id)
            except grpc.RpcError as err:
                if self._stop.is_set():
                    return
                logger.debug("key watch down (%s): not caching keys", err.code())
            with self._lock:
                self._watching = False
                self._cache.clear()
                self._gen += 1
            self._stop.wait(backoff)
            backoff = min(5.0, backoff * 2)

    def forget(self) -> None:
        """Drop every cached answer (after a revocation this router proxied)."""
        with self._lock:
            self._cache.clear()
            self._gen += 1

    # -- authenticating ---------------------------------------------------------------------

    def caller(self, context: grpc.ServicerContext | None) -> Principal:
        """Who makes this call (ADMIN when auth is off); Unauthenticated otherwise."""
        if not self.enabled:
            return ADMIN
        md = dict(context.invocation_metadata() or ()) if context is not None else {}
        key = bearer_key(md.get(AUTHORIZATION), MISSING_KEY)
        return self.verify(key, peer_host(context), remaining_timeout(context, 30.0))

    def verify(self, key: str, peer: str, timeout: float = 30.0) -> Principal:
        """The principal of key, asked of the store unless cached (waiting up to timeout, e.g.
        for a store being restarted); failures count against peer, which is refused new keys
        once it has too many."""
        fp = hashlib.sha256(key.encode()).hexdigest()
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(fp)
            if hit is not None and hit[1] > now:
                return hit[0]
            gen = self._gen
            fails = self._failures.get(peer)
            while fails and fails[0] <= now - WINDOW_S:
                fails.popleft()
            if fails is not None and len(fails) >= self.failures_per_minute:
                wait = fails[0] + WINDOW_S - now
                raise ResourceExhausted(
                    f"too many failed authentications from this address "
                    f"({len(fails)} in {WINDOW_S:.0f} s); retry in {wait:.0f} s",
                    metadata={"retry_after_s": f"{wait:.1f}"},
                )
        try:
            resp = self.store.Authenticate(
                store_pb2.AuthenticateRequest(api_key=key),
                timeout=timeout,
                metadata=self.internal_metadata(ADMIN),
            )
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.UNAUTHENTICATED:
                with self._lock:
                    if len(self._failures) > 100_000:
                        self._failures.clear()
                    self._failures.setdefault(peer, deque()).append(now)
            raise reraise_downstream(err, "authenticating") from None
        who = Principal(tenant=resp.tenant, is_admin=resp.is_admin, key_id=resp.key_id)
        with self._lock:
            # Cached only while the watch is up and nothing was dropped since we asked.
            if self._watching and self._gen == gen:
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
