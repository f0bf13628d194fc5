"""A cluster that survives a dead process (real processes, auth on, supervision on): kill -9 of
an executor, a cache sidecar and the store under load of streaming clients. Every request that
had not started streaming succeeds (placed elsewhere, or waiting out the restart), with the
tokens it had before; a stream cut mid-way ends with UNAVAILABLE, never a hang or a silent
truncation; the dead process is back within seconds on the same address; acknowledged
revisions are all intact. And kill -9 of the router loses no training run."""

from __future__ import annotations

import hashlib
import threading
import time

import grpc
import pytest

from mintmesh.client import MintClient, sampling_params
from mintmesh.cluster import ClusterConfig, LocalCluster
from mintmesh.synth import synth_peft_bytes

pytestmark = pytest.mark.e2e
ADAPTERS = [f"sup/a{i}" for i in range(4)]
PROMPTS = ["the quick brown fox", "once upon a time"]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, tmp_path_factory):
    c = LocalCluster(
        ClusterConfig(
            model_dir=tiny_model_dir,
            data_dir=tmp_path_factory.mktemp("supervised"),
            executors=2,
            port=0,
            http_port=None,
        )
    )
    c.start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def client(cluster):
    with MintClient(cluster.router_address, timeout=60, api_key=cluster.admin_key) as cl:
        yield cl


@pytest.fixture(scope="module")
def reference(client, base_info):
    """Each (adapter, prompt)'s greedy tokens on the whole cluster, before anything dies."""
    client.create_tenant("sup")
    for i, name in enumerate(ADAPTERS):
        client.push_adapter_bytes(name, *synth_peft_bytes(base_info, rank=4, seed=40 + i))
    sp = sampling_params(max_tokens=MAX_TOKENS)
    return {
        (a, p): client.generate(p, adapter=a, sampling=sp).token_ids
        for a in ADAPTERS
        for p in PROMPTS
    }


class Load:
    """n clients streaming greedy generations in a loop; each outcome recorded."""

    def __init__(self, cluster, n: int = 6):
        self.cluster = cluster
        self.stop = threading.Event()
        self.outcomes: list[tuple[str, str, list[int], int, grpc.StatusCode | None, str]] = []
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(n)]

    def _run(self, i: int) -> None:
        sp = sampling_params(max_tokens=MAX_TOKENS)
        with MintClient(
            self.cluster.router_address, timeout=60, retries=0, api_key=self.cluster.admin_key
        ) as cl:
            k = i
            while not self.stop.is_set():
                a, p = ADAPTERS[k % len(ADAPTERS)], PROMPTS[(k // len(ADAPTERS)) % len(PROMPTS)]
                k += 1
                ids: list[int] = []
                chunks = 0
                try:
                    for ch in cl.generate_stream(p, adapter=a, sampling=sp, timeout=60):
                        chunks += 1
                        ids.extend(ch.token_ids)
                    self.outcomes.append((a, p, ids, chunks, None, ""))
                except grpc.RpcError as err:
                    self.outcomes.append((a, p, ids, chunks, err.code(), err.details()))

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(90)
        assert not any(t.is_alive() for t in self.threads), "a client hung"


def _check(load: Load, reference, since: int) -> None:
    done = load.outcomes[since:]
    assert len(done) >= 10, f"too few requests completed under load: {len(done)}"
    for a, p, ids, chunks, code, details in done:
        if code is None:
            assert ids == reference[(a, p)], (a, p, "tokens changed")
        else:
            # Only a stream already under way may fail, and then as UNAVAILABLE.
            assert chunks > 0, (a, p, code, details)
            assert code == grpc.StatusCode.UNAVAILABLE, (a, p, code, details)
            assert ids == reference[(a, p)][: len(ids)], "a cut stream's tokens were wrong"
    assert sum(code is None for *_, code, _ in done) >= len(done) // 2


def _kill_and_wait_back(cluster, name: str, client) -> float:
    child = cluster.children[name]
    address, restarts = child.address, child.restarts
    child.signal(9)
    child.wait(10)
    t0 = time.monotonic()
    while not (child.restarts > restarts and child.alive and child._ready.is_set()):
        assert time.monotonic() - t0 < 60, f"{name} not restarted: {cluster.events}"
        time.sleep(0.05)
    assert child.address == address, "restarted on another address"
    while not (st := client.status()).store_healthy or not all(e.healthy for e in st.executors):
        assert time.monotonic() - t0 < 60, f"not healthy again: {st}"
        time.sleep(0.1)
    return time.monotonic() - t0


@pytest.mark.parametrize("victim", ["executor-0", "cache-1", "store"])
def test_kill_9_under_load(cluster, client, reference, base_info, victim):
    acked: list[tuple[str, str]] = []
    stop_push = threading.Event()

    def pusher():
        with MintClient(
            cluster.router_address, timeout=30, retries=0, api_key=cluster.admin_key
        ) as cl:
            i = 0
            while not stop_push.is_set():
                i += 1
                name = f"sup/{victim.replace('-', '')}-push{i}"
                try:
                    rev = cl.push_adapter_bytes(name, *synth_peft_bytes(base_info, rank=2, seed=i))
                    acked.append((rev.ref, rev.digest))
                except grpc.RpcError as err:
                    assert err.code() in (
                        grpc.StatusCode.UNAVAILABLE,
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                    ), err

    pt = threading.Thread(target=pusher)
    pt.start()
    try:
        with Load(cluster) as load:
            time.sleep(2.0)
            since = len(load.outcomes)
            back_s = _kill_and_wait_back(cluster, victim, client)
            time.sleep(2.0)  # and serving on the restarted one too
    finally:
        stop_push.set()
        pt.join(60)
    _check(load, reference, since)
    assert back_s < 45, back_s
    assert any(victim in e and "back on" in e for e in cluster.events), cluster.events
    # Every acknowledged revision is intact after the kill.
    assert acked, "no push was acknowledged"
    for ref, digest in acked:
        assert client.resolve(ref).digest == digest
        assert hashlib.sha256(client.fetch(ref=ref)).hexdigest() == digest
    # The cluster serves every adapter again, fresh ones included (fetched through sidecars).
    sp = sampling_params(max_tokens=MAX_TOKENS)
    for a in ADAPTERS:
        assert (
            client.generate(PROMPTS[0], adapter=a, sampling=sp).token_ids
            == reference[(a, PROMPTS[0])]
        )
    assert client.generate(PROMPTS[0], adapter=acked[-1][0], sampling=sp).token_ids


def test_kill_9_of_the_router_loses_no_training_run(cluster, client, tiny_model_dir):
    """The router's map of training runs is in its memory: a restarted router finds a run on
    the executor that holds it at its next call, with its owner (another tenant still gets
    NOT_FOUND) and the revision its next save descends from; the run goes on where it was."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    s = tok.encode("Survive the router.")
    data = [{"input_ids": s[:-1], "target_tokens": s[1:], "weights": [1.0] * (len(s) - 1)}]
    keys = {t: client.create_tenant(t).api_key for t in ("runner", "other")}
    with (
        MintClient(cluster.router_address, timeout=60, api_key=keys["runner"]) as cl,
        MintClient(cluster.router_address, timeout=60, api_key=keys["other"]) as other,
    ):
        cl.create_training_run(rank=2, targets=("q_proj",), seed=3, run_id="keep-me")
        cl.forward_backward("keep-me", data)
        assert cl.optim_step("keep-me", learning_rate=1e-2).steps == 1
        first = cl.save_run("keep-me", "runner/kept")
        _kill_and_wait_back(cluster, "router", client)
        with pytest.raises(grpc.RpcError) as ei:
            other.forward_backward("keep-me", data)
        assert ei.value.code() == grpc.StatusCode.NOT_FOUND, ei.value.details()
        loss = cl.forward_backward("keep-me", data).metrics["loss:sum"]
        assert loss > 0
        assert cl.optim_step("keep-me", learning_rate=1e-2).steps == 2  # the same run
        with pytest.raises(grpc.RpcError) as ei:
            cl.create_training_run(rank=2, targets=("q_proj",), run_id="keep-me")
        assert ei.value.code() == grpc.StatusCode.ALREADY_EXISTS, ei.value.details()
        second = cl.save_run("keep-me", "runner/kept")
        assert second.parent_ref == first.ref
        assert [p.ref for p in client.resolve(second.ref).provenance.parents] == [first.ref]
        assert client.resolve(second.ref).labels["mint.train.steps"] == "2"
        cl.drop_run("keep-me")
        with pytest.raises(grpc.RpcError) as ei:
            cl.forward_backward("keep-me", data)
        assert ei.value.code() == grpc.StatusCode.NOT_FOUND
