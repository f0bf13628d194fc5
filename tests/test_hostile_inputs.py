"""Hostile inputs against a real cluster (processes, auth on): request bytes that do not parse
are INVALID_ARGUMENT naming the message, for every method of every service (the store, the
router, an executor, a cache sidecar), through one mechanism (services/common/errors.py), never
grpc-python's INTERNAL "Exception deserializing request!"; a revision past uint32 in a ref is
INVALID_ARGUMENT in the router's Generate and Prefetch; a huge input gives a short message."""

from __future__ import annotations

import grpc
import pytest

from mintmesh.client import MintClient
from mintmesh.cluster import ClusterConfig, LocalCluster
from mintmesh.services.common.auth import INTERNAL_TOKEN_HEADER
from mintmesh.v1 import (
    cache_pb2,
    cache_pb2_grpc,
    executor_pb2,
    executor_pb2_grpc,
    router_pb2,
    store_pb2,
    store_pb2_grpc,
)

pytestmark = pytest.mark.e2e
# Field 1, length-delimited, with a length far past the end: no message of any type parses it.
GARBAGE = b"\x0a\xff\xff\xff\xff\x0f\x01"


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, tmp_path_factory):
    c = LocalCluster(
        ClusterConfig(
            model_dir=tiny_model_dir,
            data_dir=tmp_path_factory.mktemp("hostile"),
            executors=1,
            port=0,
            http_port=None,
        )
    )
    c.start()
    yield c
    c.stop()


def _services(cluster):
    return [
        (cluster.store_address, store_pb2.DESCRIPTOR.services_by_name["AdapterStore"]),
        (cluster.router_address, router_pb2.DESCRIPTOR.services_by_name["Router"]),
        (cluster.executor_addresses[0], executor_pb2.DESCRIPTOR.services_by_name["Executor"]),
        (cluster.cache_addresses[0], cache_pb2.DESCRIPTOR.services_by_name["AdapterCache"]),
    ]


def test_undecodable_request_bytes_are_invalid_argument_for_every_method(cluster):
    md = [
        ("authorization", f"Bearer {cluster.admin_key}"),
        (INTERNAL_TOKEN_HEADER, cluster._internal_token),
    ]
    seen = {}
    for address, service in _services(cluster):
        router = address == cluster.router_address  # a client port; the rest: mesh peers only
        ch = grpc.insecure_channel(address) if router else cluster.mesh_channel(address)
        with ch:
            for m in service.methods:
                path = f"/{service.full_name}/{m.name}"
                ident = lambda b: b  # noqa: E731 - raw bytes both ways
                kind = (m.client_streaming, m.server_streaming)
                if kind == (False, False):
                    call = ch.unary_unary(path, ident, ident)
                    run = lambda c=call: c(GARBAGE, timeout=20, metadata=md)  # noqa: E731
                elif kind == (False, True):
                    call = ch.unary_stream(path, ident, ident)
                    run = lambda c=call: list(c(GARBAGE, timeout=20, metadata=md))  # noqa: E731
                elif kind == (True, False):
                    call = ch.stream_unary(path, ident, ident)
                    run = lambda c=call: c(iter([GARBAGE]), timeout=20, metadata=md)  # noqa: E731
                else:
                    call = ch.stream_stream(path, ident, ident)
                    run = lambda c=call: list(  # noqa: E731
                        c(iter([GARBAGE]), timeout=20, metadata=md)
                    )
                with pytest.raises(grpc.RpcError) as ei:
                    run()
                seen[path] = ei.value.code()
                assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (path, ei.value)
                assert m.input_type.full_name in ei.value.details(), ei.value.details()
    assert len(seen) >= 40, sorted(seen)  # every method of the four services was tried
    # Every service still serves.
    with MintClient(cluster.router_address, timeout=60, api_key=cluster.admin_key) as cl:
        assert cl.generate("Hello", sampling=None).token_ids


def test_refs_past_uint32_and_huge_inputs_through_the_router(cluster):
    with MintClient(cluster.router_address, timeout=60, retries=0, api_key=cluster.admin_key) as cl:
        for call in (
            lambda: cl.generate("Hi", adapter="t/x@4294967296"),
            lambda: cl.prefetch("t/x@4294967296"),
            lambda: cl.resolve("t/x@99999999999999999999999"),
        ):
            with pytest.raises(grpc.RpcError) as ei:
                call()
            assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, ei.value
            assert "must be in [1, 4294967295]" in ei.value.details()
        with pytest.raises(grpc.RpcError) as ei:
            cl.generate("Hi", adapter="t/" + "y" * 10_000)
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, ei.value
        assert len(ei.value.details()) < 1000


def test_data_files_are_private(cluster, base_info):
    """Catalog, blobs, the node cache and the logs hold tenants' adapters and key hashes: no
    file or directory the cluster wrote may be readable by group or others."""
    from mintmesh.synth import synth_peft_bytes

    with MintClient(cluster.router_address, timeout=60, api_key=cluster.admin_key) as cl:
        cl.create_tenant("private")
        cl.push_adapter_bytes("private/a", *synth_peft_bytes(base_info, rank=2, seed=5))
        cl.prefetch("private/a")  # into the sidecar's LMDB file too
    seen = []
    data = cluster.config.data_dir
    for path in [data, *data.rglob("*")]:
        mode = path.stat().st_mode & 0o777
        seen.append(path)
        assert mode & 0o077 == 0, f"{path} is {oct(mode)}"
    kinds = {p.name for p in seen}
    assert {"data.mdb", "store.log", "executor-0.log"} <= kinds, sorted(kinds)[:40]
    assert any(p.parent.parent.name == "blobs" or "blobs" in p.parts for p in seen if p.is_file())


def _status_call(address: str, service: str, channel, md=()) -> grpc.StatusCode | None:
    """The code of one Status-like call on a service over channel (None when it answers)."""
    stubs = {
        "executor": lambda: executor_pb2_grpc.ExecutorStub(channel).Status(
            executor_pb2.ExecutorStatusRequest(), timeout=5
        ),
        "cache": lambda: cache_pb2_grpc.AdapterCacheStub(channel).Stats(
            cache_pb2.CacheStatsRequest(), timeout=5
        ),
        "store": lambda: store_pb2_grpc.AdapterStoreStub(channel).GetBaseModel(
            store_pb2.GetBaseModelRequest(), timeout=5, metadata=md
        ),
    }
    try:
        stubs[service]()
    except grpc.RpcError as err:
        return err.code()
    return None


def test_internal_services_serve_mesh_peers_only(cluster, tmp_path):
    """An executor, a sidecar and the store refuse a caller without a mesh certificate: in
    plaintext, over TLS with no client certificate, and with a certificate from another CA.
    The router's client port serves keys as before."""
    from mintmesh.services.common.tls import MESH_NAME, make_mesh_pki

    other = make_mesh_pki(tmp_path / "other-ca", ["intruder"])
    ca = (cluster.certs_dir / "ca.pem").read_bytes()
    override = [("grpc.ssl_target_name_override", MESH_NAME)]
    targets = [
        (cluster.executor_addresses[0], "executor"),
        (cluster.cache_addresses[0], "cache"),
        (cluster.store_address, "store"),
    ]
    for address, service in targets:
        tries = {
            "plaintext": grpc.insecure_channel(address),
            "no client certificate": grpc.secure_channel(
                address, grpc.ssl_channel_credentials(root_certificates=ca), options=override
            ),
            "another CA's certificate": grpc.secure_channel(
                address,
                grpc.ssl_channel_credentials(
                    root_certificates=ca,
                    private_key=(other / "intruder-key.pem").read_bytes(),
                    certificate_chain=(other / "intruder.pem").read_bytes(),
                ),
                options=override,
            ),
        }
        for how, ch in tries.items():
            with ch:
                code = _status_call(address, service, ch)
            assert code == grpc.StatusCode.UNAVAILABLE, (service, how, code)
        with cluster.mesh_channel(address) as ch:  # a mesh peer's certificate (and its token)
            md = [(INTERNAL_TOKEN_HEADER, cluster._internal_token)]
            assert _status_call(address, service, ch, md) is None, service
    with MintClient(cluster.router_address, timeout=30, api_key=cluster.admin_key) as cl:
        assert cl.status().executors[0].healthy


def test_a_service_without_a_mesh_identity_refuses_to_start(tiny_model_dir, tmp_path):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("MINT_")}
    argv = [sys.executable, "-m", "mintmesh.services.store", "--data-dir", str(tmp_path / "d")]
    argv += ["--model-dir", str(tiny_model_dir), "--port", "0"]
    r = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r
    assert "no mesh identity" in r.stderr and "--insecure-mesh" in r.stderr, r.stderr
    r = subprocess.run(
        [*argv, "--mesh-ca", str(tmp_path / "missing.pem")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "all three" in r.stderr, r.stderr
