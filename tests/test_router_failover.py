"""The router's failover, on the wire: two real executors, each behind a fault-injecting proxy
(tests/faults.py), a real store and a real router. An executor that refuses before its first
chunk (its queue really full, or the node gone) is passed over for the next one; one that fails
after streaming has its error returned as it is, not retried, saying how far the stream got;
when all refuse the client gets RESOURCE_EXHAUSTED with the soonest RetryInfo. Status details
(google.rpc ErrorInfo / RetryInfo) are checked as a client reads them."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from faults import Fault, FaultProxy, rich
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from mintmesh import errors as E
from mintmesh.client import MintClient, sampling_params
from mintmesh.services.common.server import mesh_channel
from mintmesh.services.executor.config import ExecutorConfig
from mintmesh.services.executor.server import create_server as create_executor
from mintmesh.services.router.config import RouterConfig
from mintmesh.services.router.core import BASE_KEY
from mintmesh.services.router.placement import rendezvous_order
from mintmesh.services.router.server import create_server as create_router
from mintmesh.services.store.config import StoreConfig
from mintmesh.services.store.server import create_server as create_store
from mintmesh.v1 import common_pb2, executor_pb2, executor_pb2_grpc

PROMPT = [5, 9, 13, 17]


class Node:
    """One executor (batch 1, queue 1: easy to fill for real) behind its fault proxy."""

    def __init__(self, model_dir, name: str):
        cfg = ExecutorConfig(model_dir=model_dir, executor_id=name, max_batch_size=1, max_queue=1)
        self.server, self.engine = create_executor(cfg)
        self.proxy = FaultProxy(self.server.address)
        self.channel = mesh_channel(self.server.address, traced=False)
        self.direct = executor_pb2_grpc.ExecutorStub(self.channel)
        self.name = name

    def stop(self) -> None:
        self.channel.close()
        self.proxy.stop()
        self.server.stop(grace=0.5)


@pytest.fixture(scope="module")
def mesh(tiny_model_dir, tmp_path_factory):
    store = create_store(
        StoreConfig(data_dir=tmp_path_factory.mktemp("store"), model_dir=tiny_model_dir)
    )
    nodes = [Node(tiny_model_dir, "exec-a"), Node(tiny_model_dir, "exec-b")]
    by_address = {n.proxy.address: n for n in nodes}
    router, core = create_router(
        RouterConfig(
            store_address=store.address,
            executors=tuple(by_address),
            port=0,
            health_interval_s=0.2,
        )
    )
    # The base model's home executor and its fallback, as the router will rank them.
    home, other = (by_address[a] for a in rendezvous_order(list(by_address), BASE_KEY))
    client = MintClient(router.address, timeout=30, retries=0)
    _wait(lambda: all(e.healthy for e in client.status().executors))
    yield {"client": client, "home": home, "other": other, "core": core, "nodes": nodes}
    client.close()
    router.stop(0)
    for n in nodes:
        n.stop()
    store.stop(0)


@pytest.fixture(autouse=True)
def _fresh(mesh):
    for n in mesh["nodes"]:
        n.proxy.clear()
    _wait(lambda: all(e.healthy for e in mesh["client"].status().executors))
    yield
    for n in mesh["nodes"]:
        n.proxy.clear()
        _wait(lambda n=n: n.engine.running == 0 and n.engine.queue_depth == 0)


def _wait(cond, timeout=15.0):
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("condition not reached")
        time.sleep(0.01)


def _details(err: grpc.RpcError):
    """(ErrorInfo, RetryInfo or None) from a failed call, as a client decodes them."""
    st = rpc_status.from_call(err)
    assert st is not None, "the status carries no google.rpc details"
    info, retry = None, None
    for d in st.details:
        if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            d.Unpack(info)
        elif d.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            d.Unpack(retry)
    assert info is not None and info.domain == "mintmesh.v1"
    return info, retry


def _greedy(n: int = 6):
    return sampling_params(max_tokens=n, ignore_eos=True)


class Filled:
    """A node's batch slot and queue really occupied (calls straight to the executor, which
    the router's load counts do not see); the engine's model lock held so nothing finishes."""

    def __init__(self, node: Node):
        self.node, self.calls = node, []

    def __enter__(self):
        eng = self.node.engine
        req = executor_pb2.ExecutorGenerateRequest(
            prompt_token_ids=[1, 2, 3],
            sampling=common_pb2.SamplingParams(max_tokens=400, ignore_eos=True),
        )
        long = self.node.direct.Generate(req, timeout=120)
        next(long)  # running
        self.calls.append(long)
        eng._model_lock.acquire()
        self.calls.append(self.node.direct.Generate(req, timeout=120))
        _wait(lambda: eng.queue_depth == 1)
        return self

    def __exit__(self, *exc):
        for c in self.calls:
            c.cancel()
        self.node.engine._model_lock.release()


def _reference_tokens(mesh, n: int = 6) -> list[int]:
    """What the base model greedily generates for PROMPT (asked of the home executor directly:
    both run the same backbone)."""
    req = executor_pb2.ExecutorGenerateRequest(
        prompt_token_ids=PROMPT, sampling=common_pb2.SamplingParams(max_tokens=n, ignore_eos=True)
    )
    return [t for r in mesh["other"].direct.Generate(req, timeout=60) for t in r.chunk.token_ids]


def test_a_full_queue_before_the_first_chunk_is_retried_on_the_next_executor(mesh):
    client, home, other = mesh["client"], mesh["home"], mesh["other"]
    want = _reference_tokens(mesh)
    with Filled(home):
        res = client.generate(prompt_token_ids=PROMPT, sampling=_greedy())
    assert res.executor == other.name
    assert res.token_ids == want and res.completion_tokens == 6
    # The home executor really refused (its own RESOURCE_EXHAUSTED, passed through the proxy)
    # and the other served the one retry.
    assert [(s.code, s.chunks) for s in home.proxy.generates()] == [("RESOURCE_EXHAUSTED", 0)]
    assert [s.code for s in other.proxy.generates()] == ["OK"]


def test_a_node_gone_before_the_first_chunk_is_retried_and_marked_unhealthy(mesh):
    client, home, other = mesh["client"], mesh["home"], mesh["other"]
    home.proxy.fault = Fault((grpc.StatusCode.UNAVAILABLE, "connection reset (injected)"), times=1)
    res = client.generate(prompt_token_ids=PROMPT, sampling=_greedy())
    assert res.executor == other.name and res.token_ids == _reference_tokens(mesh)
    assert [s.code for s in home.proxy.generates()] == ["injected"]
    st = {e.address: e for e in client.status().executors}
    # status() re-checks health: the proxy answers it, so the node is back at once; the router
    # marked it unhealthy in between (its next request waits for the check, not a retry).
    assert st[home.proxy.address].healthy
    # With the node back, its own traffic goes home again.
    res2 = client.generate(prompt_token_ids=PROMPT, sampling=_greedy(2))
    assert res2.executor == home.name


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED])
@pytest.mark.parametrize("after", [1, 3])
def test_a_failure_after_the_first_chunk_is_returned_not_retried(mesh, code, after):
    client, home, other = mesh["client"], mesh["home"], mesh["other"]
    home.proxy.fault = Fault((code, "executor lost its device (injected)"), after_chunks=after)
    got = []
    stream = client.generate_stream(prompt_token_ids=PROMPT, sampling=_greedy(10))
    with pytest.raises(grpc.RpcError) as ei:
        for ch in stream:
            got.append(ch)
    err = ei.value
    # The chunks that arrived are the real ones, then the error: never a second start elsewhere.
    assert len(got) == after
    assert [t for c in got for t in c.token_ids] == _reference_tokens(mesh, 10)[:after]
    assert err.code() == code
    assert f"interrupted after {after} chunk(s) from executor {home.proxy.address}" in (
        err.details()
    )
    assert "executor lost its device" in err.details()
    info, retry = _details(err)
    assert info.reason == "GENERATION_INTERRUPTED"
    assert dict(info.metadata) == {
        "executor": home.proxy.address,
        "chunks_streamed": str(after),
        "downstream_code": code.name,
    }
    assert other.proxy.generates() == []
    assert [(s.code, s.chunks) for s in home.proxy.generates()] == [("injected", after)]
    # The executor behind the broken stream freed its sequence.
    _wait(lambda: home.engine.running == 0)


def test_every_executor_full_is_resource_exhausted_with_the_soonest_retry(mesh):
    client, home, other = mesh["client"], mesh["home"], mesh["other"]
    with Filled(home), Filled(other), pytest.raises(grpc.RpcError) as ei:
        client.generate(prompt_token_ids=PROMPT, sampling=_greedy())
    err = ei.value
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue of executor" in err.details() and "is full" in err.details()
    info, retry = _details(err)
    assert info.reason == "RESOURCE_EXHAUSTED"
    assert retry is not None
    assert 0.0 < retry.retry_delay.ToTimedelta().total_seconds() <= 5.0
    assert [s.code for s in home.proxy.generates()] == ["RESOURCE_EXHAUSTED"]
    assert [s.code for s in other.proxy.generates()] == ["RESOURCE_EXHAUSTED"]


def test_the_soonest_retry_delay_of_the_refusals_is_the_one_returned(mesh):
    client, home, other = mesh["client"], mesh["home"], mesh["other"]
    home.proxy.fault = Fault(rich(E.ResourceExhausted("home full", retry_after_s=4.0)))
    other.proxy.fault = Fault(rich(E.ResourceExhausted("other full", retry_after_s=1.25)))
    with pytest.raises(grpc.RpcError) as ei:
        client.generate(prompt_token_ids=PROMPT, sampling=_greedy())
    _, retry = _details(ei.value)
    assert retry.retry_delay.ToTimedelta().total_seconds() == pytest.approx(1.25)
    assert len(home.proxy.generates()) == len(other.proxy.generates()) == 1


def test_two_nodes_gone_is_unavailable(mesh):
    client, home, other = mesh["client"], mesh["home"], mesh["other"]
    for n in (home, other):
        n.proxy.fault = Fault((grpc.StatusCode.UNAVAILABLE, f"{n.name} gone (injected)"), times=1)
    with pytest.raises(grpc.RpcError) as ei:
        client.generate(prompt_token_ids=PROMPT, sampling=_greedy())
    assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "gone (injected)" in ei.value.details()
    info, _ = _details(ei.value)
    assert info.reason == "UNAVAILABLE"
    assert len(home.proxy.generates()) == len(other.proxy.generates()) == 1


def test_errors_that_are_not_about_capacity_are_not_retried(mesh):
    client, home, other = mesh["client"], mesh["home"], mesh["other"]
    vocab = home.engine.vocab_size
    with pytest.raises(grpc.RpcError) as ei:
        client.generate(prompt_token_ids=[1, vocab + 7], sampling=_greedy())
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert str(vocab + 7) in ei.value.details()
    info, retry = _details(ei.value)
    assert retry is None
    assert [s.code for s in home.proxy.generates()] == ["INVALID_ARGUMENT"]
    assert other.proxy.generates() == []


def test_a_client_that_goes_away_mid_stream_frees_the_sequence(mesh):
    client, home = mesh["client"], mesh["home"]
    before = home.engine.rows_cancelled
    stream = client.generate_stream(prompt_token_ids=PROMPT, sampling=_greedy(400))
    next(stream)
    _wait(lambda: home.engine.running == 1)
    stream.close()  # drops the call: router -> proxy -> executor all cancel
    _wait(lambda: home.engine.rows_cancelled > before and home.engine.running == 0)
    _wait(lambda: all(s.code for s in home.proxy.generates()))
    (seen,) = home.proxy.generates()
    assert seen.code == "CANCELLED" and 1 <= seen.chunks < 400


def test_concurrent_refusals_do_not_leak_in_flight_counts(mesh):
    client, core = mesh["client"], mesh["core"]
    errors = []

    def one():
        try:
            client.generate(prompt_token_ids=PROMPT, sampling=_greedy(3))
        except grpc.RpcError as err:  # a full queue somewhere is fine here; a leak is not
            errors.append(err.code())

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(errors) <= {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert len(errors) < 8
    for n in mesh["nodes"]:
        assert core.placement.inflight(n.proxy.address) == 0


def test_a_router_that_lost_its_map_of_runs_asks_the_executors(mesh, tiny_model_dir):
    """The router's map of training runs is its memory (a restart loses it; the e2e test kills
    one): a run it does not know is looked for on the executors, and found there it goes on;
    while an executor cannot say whether it holds the run, a call of it and a create of its id
    are UNAVAILABLE (neither NOT_FOUND for a run that may live, nor a second run of that id)."""
    from transformers import AutoTokenizer

    client, core = mesh["client"], mesh["core"]
    s = AutoTokenizer.from_pretrained(str(tiny_model_dir)).encode("find me again")
    data = [{"input_ids": s[:-1], "target_tokens": s[1:], "weights": [1.0] * (len(s) - 1)}]
    run = client.create_training_run(rank=2, targets=("q_proj",), seed=1, run_id="lost-map")
    client.forward_backward("lost-map", data)
    client.optim_step("lost-map", learning_rate=1e-2)
    holder = next(n for n in mesh["nodes"] if n.name == run.executor)
    try:
        with core._runs_lock:
            core._runs.clear()  # what a restart does to it
        client.forward_backward("lost-map", data)
        assert client.optim_step("lost-map", learning_rate=1e-2).steps == 2  # the same run
        with core._runs_lock:
            core._runs.clear()
        holder.proxy.unary_faults["/mintmesh.v1.Executor/LocateTrainingRun"] = (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "busy",
        )
        for call in (
            lambda: client.forward_backward("lost-map", data),
            lambda: client.create_training_run(rank=2, targets=("q_proj",), run_id="lost-map"),
        ):
            with pytest.raises(grpc.RpcError) as ei:
                call()
            assert ei.value.code() == grpc.StatusCode.UNAVAILABLE, ei.value.details()
            assert "could not ask every executor" in ei.value.details()
        other = next(n for n in mesh["nodes"] if n is not holder)
        st = other.direct.Status(executor_pb2.ExecutorStatusRequest(), timeout=10)
        assert st.training_runs == 0  # no second run of the id
        # An id no executor holds is NOT_FOUND, whoever answers.
        holder.proxy.unary_faults.clear()
        with pytest.raises(grpc.RpcError) as ei:
            client.forward_backward("never-made", data)
        assert ei.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        holder.proxy.unary_faults.clear()
        client.drop_run("lost-map")
