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
from mintmesh.v1 import cache_pb2, executor_pb2, router_pb2, store_pb2

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
        with grpc.insecure_channel(address) as ch:
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
