"""Tenants through the router: the router authenticates each key (via the store) and acts for
the verified tenant; the isolation matrix holds for every adapter-touching call. Status needs a
key and shows placement to admins only; a revoked key fails on its next call; the store's
Authenticate is for mesh peers, and the router's rate-limits failed attempts."""

from __future__ import annotations

import time

import grpc
import pytest

from mintmesh.client import MintClient, sampling_params
from mintmesh.services.router.config import RouterConfig
from mintmesh.services.router.server import create_server as create_router
from mintmesh.services.store.config import StoreConfig
from mintmesh.services.store.server import create_server as create_store
from mintmesh.synth import synth_peft_bytes
from mintmesh.v1 import store_pb2

ADMIN_KEY = "mint_admin_" + "k" * 32
TOKEN = "internal-" + "t" * 32


@pytest.fixture(scope="module")
def parts(tiny_model_dir, tmp_path_factory):
    store = create_store(
        StoreConfig(
            data_dir=tmp_path_factory.mktemp("store"),
            model_dir=tiny_model_dir,
            auth=True,
            admin_key=ADMIN_KEY,
            internal_token=TOKEN,
        )
    )
    router, _core = create_router(_router_config(store.address))
    yield {"router": router.address, "store": store.address}
    router.stop(0)
    store.stop(0)


@pytest.fixture(scope="module")
def mesh(parts):
    return parts["router"]


def _router_config(store: str, **kw) -> RouterConfig:
    """A router with auth on, in front of store, with one executor address nobody serves."""
    return RouterConfig(
        store_address=store,
        executors=("127.0.0.1:1",),
        port=0,
        health_interval_s=5,
        auth=True,
        internal_token=TOKEN,
        **kw,
    )


def client(addr: str, key: str | None) -> MintClient:
    return MintClient(addr, timeout=20, retries=0, api_key=key)


@pytest.fixture(scope="module")
def keys(mesh, base_info):
    with client(mesh, ADMIN_KEY) as admin:
        a = admin.create_tenant("acme").api_key
        b = admin.create_tenant("bolt").api_key
    for key, name in ((a, "acme/chat"), (b, "bolt/chat")):
        with client(mesh, key) as cl:
            cl.push_adapter_bytes(name, *synth_peft_bytes(base_info, rank=2, seed=len(name)))
    return {"acme": a, "bolt": b}


CROSS_TENANT = [
    ("resolve", lambda c: c.resolve("bolt/chat")),
    ("fetch", lambda c: c.fetch(ref="bolt/chat")),
    ("list", lambda c: list(c.list_adapters("bolt"))),
    ("revisions", lambda c: c.revisions("bolt/chat")),
    ("alias", lambda c: c.set_alias("bolt/chat", "prod", 1)),
    ("delete", lambda c: c.delete("bolt/chat")),
    (
        "generate",
        lambda c: c.generate("hi", adapter="bolt/chat", sampling=sampling_params(max_tokens=2)),
    ),
    ("prefetch", lambda c: c.prefetch("acme/chat", "bolt/chat")),
]


@pytest.mark.parametrize("what, call", CROSS_TENANT, ids=[w for w, _ in CROSS_TENANT])
def test_a_tenant_cannot_touch_another_tenants_adapter(mesh, keys, what, call):
    with client(mesh, keys["acme"]) as cl, pytest.raises(grpc.RpcError) as ei:
        call(cl)
    assert ei.value.code() == grpc.StatusCode.PERMISSION_DENIED, (what, ei.value.details())
    with client(mesh, keys["bolt"]) as owner:  # and nothing changed for the owner
        assert owner.resolve("bolt/chat").ref == "bolt/chat@1"


def test_own_adapters_work_and_generate_passes_auth(mesh, keys):
    with client(mesh, keys["acme"]) as cl:
        assert cl.resolve("acme/chat").tenant == "acme"
        assert [f"{a.tenant}/{a.name}" for a in cl.list_adapters("acme")] == ["acme/chat"]
        with pytest.raises(grpc.RpcError) as ei:  # auth passed; no executor is up
            cl.generate("hi", adapter="acme/chat", sampling=sampling_params(max_tokens=2))
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("key", [None, "mint_000000000000_" + "x" * 43, "not-a-key"])
def test_missing_or_wrong_key_is_unauthenticated(mesh, keys, key):
    with client(mesh, key) as cl:
        for call in (
            lambda: cl.resolve("acme/chat"),
            lambda: cl.generate("hi", sampling=sampling_params(max_tokens=2)),
        ):
            with pytest.raises(grpc.RpcError) as ei:
                call()
            assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_admin_sees_every_tenant(mesh, keys):
    with client(mesh, ADMIN_KEY) as admin:
        names = {f"{a.tenant}/{a.name}" for a in admin.list_adapters()}
        assert {"acme/chat", "bolt/chat"} <= names
        assert admin.resolve("bolt/chat").tenant == "bolt"


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as ei:
        call()
    return ei.value.code()


def test_status_needs_a_key_and_shows_placement_to_admins_only(mesh, parts, keys):
    with client(mesh, None) as anon:
        assert _code(anon.status) == grpc.StatusCode.UNAUTHENTICATED
    with client(mesh, keys["acme"]) as cl:
        st = cl.status()
        assert st.store_healthy and len(st.executors) == 1
        assert st.store_address == "" and st.executors[0].address == ""
        assert not st.executors[0].healthy and st.executors[0].error == "unhealthy"
    with client(mesh, ADMIN_KEY) as admin:
        st = admin.status()
        assert st.store_address == parts["store"]
        assert st.executors[0].address == "127.0.0.1:1" and st.executors[0].error not in (
            "",
            "unhealthy",
        )


def test_a_revoked_key_fails_on_its_next_call(mesh, parts, keys):
    with client(mesh, keys["acme"]) as owner:
        made = owner.create_api_key("acme")
        made2 = owner.create_api_key("acme")
    with client(mesh, made.api_key) as cl, client(mesh, made2.api_key) as cl2:
        for _ in range(3):  # cached by now
            assert cl.resolve("acme/chat").tenant == "acme"
            assert cl2.resolve("acme/chat").tenant == "acme"
        # Revoked through this router: the very next call is refused.
        with client(mesh, keys["acme"]) as owner:
            owner.revoke_api_key(made.key_id)
        assert _code(lambda: cl.resolve("acme/chat")) == grpc.StatusCode.UNAUTHENTICATED
        # Revoked at the store by another way in (here: a peer with the internal token): the
        # store's WatchKeys tells the router, which drops what it cached.
        with MintClient(
            parts["store"],
            timeout=20,
            metadata=[("x-mint-internal-token", TOKEN)],
        ) as peer:
            peer.revoke_api_key(made2.key_id)
        deadline = time.monotonic() + 2.0
        while True:
            try:
                cl2.resolve("acme/chat")
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.UNAUTHENTICATED
                break
            assert time.monotonic() < deadline, "the revoked key still works after 2 s"
            time.sleep(0.01)
    with client(mesh, keys["acme"]) as owner:  # the other keys still work
        assert owner.resolve("acme/chat").tenant == "acme"


def test_store_authenticate_is_for_mesh_peers_only(parts, keys):
    guess = "mint_000000000000_" + "x" * 43
    with client(parts["store"], None) as anon:
        assert _code(lambda: anon.authenticate(ADMIN_KEY)) == grpc.StatusCode.UNAUTHENTICATED
    for key in (keys["acme"], ADMIN_KEY):  # a client's own key does not open it either
        with client(parts["store"], key) as cl:
            assert _code(lambda cl=cl: cl.authenticate(guess)) == grpc.StatusCode.PERMISSION_DENIED
            watch = lambda cl=cl: list(  # noqa: E731
                cl.store.WatchKeys(store_pb2.WatchKeysRequest(), metadata=cl.metadata)
            )
            assert _code(watch) == grpc.StatusCode.PERMISSION_DENIED
    with MintClient(
        parts["store"], timeout=20, metadata=[("x-mint-internal-token", TOKEN)]
    ) as peer:
        assert peer.authenticate(keys["acme"]).tenant == "acme"
        assert _code(lambda: peer.authenticate(guess)) == grpc.StatusCode.UNAUTHENTICATED


def test_router_authenticate_answers_clients_and_rate_limits_failures(parts, keys):
    router, core = create_router(_router_config(parts["store"], auth_failures_per_minute=3))
    try:
        deadline = time.monotonic() + 10
        while not core.auth._watching:  # answers are cached once the key watch is up
            assert time.monotonic() < deadline, "the router's key watch never came up"
            time.sleep(0.02)
        with client(router.address, keys["acme"]) as cl:
            who = cl.authenticate()
            assert (who.tenant, who.is_admin) == ("acme", False)
            assert cl.authenticate(keys["bolt"]).tenant == "bolt"
            watch = lambda: list(  # noqa: E731
                cl.store.WatchKeys(store_pb2.WatchKeysRequest(), metadata=cl.metadata)
            )
            assert _code(watch) == grpc.StatusCode.PERMISSION_DENIED
            for i in range(3):
                guess = f"mint_00000000000{i}_" + "x" * 43
                assert _code(lambda g=guess: cl.authenticate(g)) == grpc.StatusCode.UNAUTHENTICATED
            # The address is out of attempts: even a right key it has not used is refused...
            assert _code(lambda: cl.authenticate(ADMIN_KEY)) == grpc.StatusCode.RESOURCE_EXHAUSTED
            with client(router.address, "mint_000000000009_" + "y" * 43) as bad:
                err = pytest.raises(grpc.RpcError, bad.resolve, "acme/chat").value
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "too many failed authentications" in err.details()
            # ...while keys it already authenticated keep working.
            assert cl.resolve("acme/chat").tenant == "acme"
    finally:
        router.stop(0)


def test_router_client_port_with_the_operators_certificate(parts, keys, tmp_path):
    """--tls-cert/--tls-key: the router's client port speaks TLS; a client that trusts the
    certificate's CA (tls_ca, or MINT_TLS_CA) is served, a plaintext one is not."""
    from mintmesh.services.common.tls import ServerTLS, make_mesh_pki

    d = make_mesh_pki(tmp_path / "public", ["router-public"])
    router, _core = create_router(
        _router_config(parts["store"]),
        client_tls=ServerTLS(
            (d / "router-public.pem").read_bytes(), (d / "router-public-key.pem").read_bytes()
        ),
    )
    addr = f"localhost:{router.port}"  # the certificate names localhost
    try:
        with MintClient(addr, timeout=20, api_key=keys["acme"], tls_ca=str(d / "ca.pem")) as cl:
            assert cl.resolve("acme/chat").tenant == "acme"
        with client(addr, keys["acme"]) as plain:
            assert _code(lambda: plain.resolve("acme/chat")) == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(ValueError, match="cannot read the TLS CA"):
            MintClient(addr, tls_ca=str(d / "missing.pem"))
    finally:
        router.stop(0)
