"""Tenants through the router: the router authenticates each key (via the store) and acts for
the verified tenant; the isolation matrix holds for every adapter-touching call."""

from __future__ import annotations

import grpc
import pytest

from mintmesh.client import MintClient, sampling_params
from mintmesh.services.router.config import RouterConfig
from mintmesh.services.router.server import create_server as create_router
from mintmesh.services.store.config import StoreConfig
from mintmesh.services.store.server import create_server as create_store
from mintmesh.synth import synth_peft_bytes

ADMIN_KEY = "mint_admin_" + "k" * 32
TOKEN = "internal-" + "t" * 32


@pytest.fixture(scope="module")
def mesh(tiny_model_dir, tmp_path_factory):
    store = create_store(
        StoreConfig(
            data_dir=tmp_path_factory.mktemp("store"),
            model_dir=tiny_model_dir,
            auth=True,
            admin_key=ADMIN_KEY,
            internal_token=TOKEN,
        )
    )
    router, _core = create_router(
        RouterConfig(
            store_address=store.address,
            executors=("127.0.0.1:1",),
            port=0,
            health_interval_s=5,
            auth=True,
            internal_token=TOKEN,
        )
    )
    yield router.address
    router.stop(0)
    store.stop(0)


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
