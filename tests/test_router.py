"""The router in-process against a real store: the store API through one address, errors
passed through with their codes, and no executor -> UNAVAILABLE."""

from __future__ import annotations

import grpc
import pytest

from mintmesh.client import MintClient, sampling_params
from mintmesh.services.router.config import RouterConfig
from mintmesh.services.router.server import create_server as create_router
from mintmesh.services.store.config import StoreConfig
from mintmesh.services.store.server import create_server as create_store
from mintmesh.synth import synth_peft_bytes


@pytest.fixture(scope="module")
def router(tiny_model_dir, tmp_path_factory):
    store = create_store(
        StoreConfig(data_dir=tmp_path_factory.mktemp("store"), model_dir=tiny_model_dir)
    )
    server, core = create_router(
        RouterConfig(
            store_address=store.address, executors=("127.0.0.1:1",), port=0, health_interval_s=0.2
        )
    )
    yield server
    server.stop(0)
    store.stop(0)


@pytest.fixture(scope="module")
def client(router):
    with MintClient(router.address, timeout=20, retries=0) as cl:
        yield cl


def test_store_api_through_the_router(client, base_info):
    cfg, w = synth_peft_bytes(base_info, rank=4, seed=1)
    rev = client.push_adapter_bytes("acme/one", cfg, w, labels={"team": "x"})
    assert rev.ref == "acme/one@1" and rev.labels["team"] == "x"
    rev2 = client.push_adapter_bytes("acme/one", *synth_peft_bytes(base_info, rank=8, seed=2))
    assert rev2.ref == "acme/one@2" and rev2.digest != rev.digest
    assert client.resolve("acme/one").digest == rev2.digest
    assert client.resolve("acme/one@1").digest == rev.digest
    data = client.fetch(ref="acme/one@1")
    import hashlib

    assert hashlib.sha256(data).hexdigest() == rev.digest
    (summary,) = [a for a in client.list_adapters("acme")]
    assert summary.revision_count == 2 and summary.latest.digest == rev2.digest
    assert client.base_model().fingerprint == base_info.fingerprint
    deleted = client.delete("acme/one@2")
    assert [d.ref for d in deleted] == ["acme/one@2"]
    assert client.resolve("acme/one").digest == rev.digest


@pytest.mark.parametrize(
    "call, code, needle",
    [
        (lambda c: c.resolve("ghost/none"), grpc.StatusCode.NOT_FOUND, "ghost/none"),
        (lambda c: c.resolve("bad ref"), grpc.StatusCode.INVALID_ARGUMENT, "bad ref"),
        (lambda c: c.fetch(digest="0" * 64), grpc.StatusCode.NOT_FOUND, "0000"),
        (
            lambda c: c.push_adapter_bytes("acme/bad", "{not json", b"x"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "adapter_config.json",
        ),
    ],
)
def test_store_errors_keep_their_code_through_the_router(client, call, code, needle):
    with pytest.raises(grpc.RpcError) as ei:
        call(client)
    assert ei.value.code() == code
    assert needle in ei.value.details()


def test_generate_without_a_healthy_executor_is_unavailable(client):
    with pytest.raises(grpc.RpcError) as ei:
        client.generate("hi", sampling=sampling_params(max_tokens=2))
    assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "no healthy executor" in ei.value.details()
    st = client.status()
    assert st.store_healthy
    assert [e.healthy for e in st.executors] == [False]


def test_health_and_reflection_are_served(router):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    ch = grpc.insecure_channel(router.address)
    h = health_pb2_grpc.HealthStub(ch)
    for svc in ("", "mintmesh.v1.Router", "mintmesh.v1.AdapterStore"):
        resp = h.Check(health_pb2.HealthCheckRequest(service=svc), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING, svc
    r = reflection_pb2_grpc.ServerReflectionStub(ch)
    resp = next(
        iter(
            r.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
            )
        )
    )
    names = {s.name for s in resp.list_services_response.service}
    assert {"mintmesh.v1.Router", "mintmesh.v1.AdapterStore", "grpc.health.v1.Health"} <= names
    ch.close()
