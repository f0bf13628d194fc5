"""The node cache sidecar over real gRPC against a real store: miss then hit, verified commits,
single flight, the byte budget, errors passed through, and a sidecar killed with SIGKILL that
loses nothing it committed (read back by the executor's reader from another process)."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from peft_util import make_peft_adapter

from mintmesh import peft_io
from mintmesh.cache import layout
from mintmesh.cache.config import CacheConfig
from mintmesh.cache.core import CacheCore
from mintmesh.cache.node import NodeCache
from mintmesh.cache.policy import LRUPolicy
from mintmesh.cache.server import create_core, create_server
from mintmesh.errors import DigestMismatch, ResourceExhausted
from mintmesh.services.common.server import CHUNK_BYTES, build_server
from mintmesh.services.store.config import StoreConfig
from mintmesh.services.store.core import StoreCore
from mintmesh.services.store.server import create_server as create_store_server
from mintmesh.v1 import cache_pb2, cache_pb2_grpc, store_pb2, store_pb2_grpc

TIMEOUT = 20.0
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _push(stub, name: str, peft_dir: Path) -> store_pb2.AdapterRevision:
    cfg, w = peft_io.read_peft_dir(peft_dir)

    def msgs():
        yield store_pb2.PushAdapterRequest(
            header=store_pb2.PushHeader(
                name=name,
                adapter_config_json=cfg,
                sha256=hashlib.sha256(w).hexdigest(),
                size_bytes=len(w),
            )
        )
        for i in range(0, len(w), CHUNK_BYTES):
            yield store_pb2.PushAdapterRequest(chunk=w[i : i + CHUNK_BYTES])

    return stub.PushAdapter(msgs(), timeout=TIMEOUT).revision


def _fetch(stub, digest: str) -> bytes:
    msgs = stub.FetchAdapter(store_pb2.FetchAdapterRequest(digest=digest), timeout=TIMEOUT)
    return b"".join(m.chunk for m in msgs)


def _rpc_error(fn, *a, **kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as ei:
        fn(*a, **kw)
    return ei.value


@pytest.fixture(scope="module")
def store(tiny_model_dir, base_info, tmp_path_factory):
    """A real store with a few adapters: (server, core, {name: revision})."""
    cfg = StoreConfig(data_dir=tmp_path_factory.mktemp("store"), model_dir=tiny_model_dir)
    core = StoreCore(cfg, base=base_info)
    srv = create_store_server(cfg, core=core)
    root = tmp_path_factory.mktemp("cache-adapters")
    revs = {}
    with grpc.insecure_channel(srv.address) as ch:
        stub = store_pb2_grpc.AdapterStoreStub(ch)
        for i, rank in enumerate((4, 8, 16, 2, 3, 5)):
            d = make_peft_adapter(tiny_model_dir, root / f"a{i}", rank=rank, seed=100 + i)
            revs[f"a{i}"] = _push(stub, f"cache/a{i}", d)
        big = make_peft_adapter(tiny_model_dir, root / "big", rank=16, targets=ALL_TARGETS, seed=7)
        revs["big"] = _push(stub, "cache/big", big)
    yield srv, core, revs
    srv.stop(0)


@pytest.fixture(scope="module")
def store_stub(store):
    with grpc.insecure_channel(store[0].address) as ch:
        yield store_pb2_grpc.AdapterStoreStub(ch)


@pytest.fixture(scope="module")
def sidecar(store, tmp_path_factory):
    """An in-process sidecar on the store: (server, core)."""
    cfg = CacheConfig(
        cache_dir=tmp_path_factory.mktemp("node"),
        store_address=store[0].address,
        capacity_bytes=64 << 20,
    )
    core = create_core(cfg)
    srv = create_server(cfg, core=core)
    yield srv, core
    srv.stop(0)


@pytest.fixture(scope="module")
def cache_stub(sidecar):
    with grpc.insecure_channel(sidecar[0].address) as ch:
        yield cache_pb2_grpc.AdapterCacheStub(ch)


def ensure(stub, digest: str) -> cache_pb2.EnsureAdapterResponse:
    return stub.EnsureAdapter(cache_pb2.EnsureAdapterRequest(digest=digest), timeout=TIMEOUT)


def stats(stub) -> cache_pb2.CacheStatsResponse:
    return stub.Stats(cache_pb2.CacheStatsRequest(), timeout=TIMEOUT)


# -- the sidecar over gRPC --------------------------------------------------------------------


def test_miss_then_hit(cache_stub, sidecar, store, store_stub):
    _, core = sidecar
    rev = store[2]["a0"]
    s0 = stats(cache_stub)
    first = ensure(cache_stub, rev.digest)
    assert (first.digest, first.size_bytes, first.hit) == (rev.digest, rev.size_bytes, False)
    assert first.fetch_ms > 0
    second = ensure(cache_stub, rev.digest)
    assert second.hit and second.size_bytes == rev.size_bytes and second.fetch_ms == 0
    s1 = stats(cache_stub)
    assert (s1.misses - s0.misses, s1.hits - s0.hits) == (1, 1)
    assert s1.entries == s0.entries + 1 and s1.bytes == s0.bytes + rev.size_bytes
    assert s1.fetch_p50_ms > 0 and s1.fetch_p99_ms >= s1.fetch_p50_ms
    assert s1.capacity_bytes == 64 << 20 and s1.path == str(core.node.path)
    assert core.node.get(rev.digest) == _fetch(store_stub, rev.digest)


def test_single_flight(cache_stub, sidecar, store):
    _, ccore = sidecar
    _, score, revs = store
    rev = revs["big"]
    n = 8
    barrier = threading.Barrier(n)
    store_before, cache_before, s0 = score.stats().fetches, ccore.store_fetches, stats(cache_stub)

    def one(_):
        barrier.wait()
        return ensure(cache_stub, rev.digest)

    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(one, range(n)))
    assert all(r.size_bytes == rev.size_bytes for r in results)
    assert score.stats().fetches - store_before == 1
    assert ccore.store_fetches - cache_before == 1
    s1 = stats(cache_stub)
    assert (s1.hits - s0.hits) + (s1.misses - s0.misses) == n
    assert sum(not r.hit for r in results) == s1.misses - s0.misses >= 1


@pytest.mark.parametrize(
    "digest,code,words",
    [
        ("e" * 64, grpc.StatusCode.NOT_FOUND, "e" * 64),
        ("not-a-digest", grpc.StatusCode.INVALID_ARGUMENT, "'not-a-digest'"),
    ],
)
def test_errors_pass_through(cache_stub, digest, code, words):
    before = stats(cache_stub).entries
    err = _rpc_error(ensure, cache_stub, digest)
    assert err.code() == code and words in err.details()
    assert stats(cache_stub).entries == before


def test_corrupt_store_blob_is_data_loss_and_not_committed(cache_stub, sidecar, store):
    _, ccore = sidecar
    _, score, revs = store
    rev = revs["a5"]
    path = score.blobs.path(rev.digest)
    good = path.read_bytes()
    bad = bytearray(good)
    bad[-1] ^= 0x55
    path.write_bytes(bytes(bad))
    try:
        before = stats(cache_stub)
        err = _rpc_error(ensure, cache_stub, rev.digest)
        assert err.code() == grpc.StatusCode.DATA_LOSS and rev.digest in err.details()
        assert not ccore.node.contains(rev.digest)
        assert stats(cache_stub).entries == before.entries
    finally:
        path.write_bytes(good)
    assert ensure(cache_stub, rev.digest).size_bytes == rev.size_bytes


class _LyingStore(store_pb2_grpc.AdapterStoreServicer):
    """A store peer that sends bytes which do not match the digest it announces (a bad disk or a
    bad network path the real store cannot produce on purpose)."""

    def __init__(self, data: bytes):
        self.data = data

    def FetchAdapter(self, request, context):
        yield store_pb2.FetchAdapterResponse(
            header=store_pb2.FetchHeader(digest=request.digest, size_bytes=len(self.data))
        )
        for i in range(0, len(self.data), CHUNK_BYTES):
            yield store_pb2.FetchAdapterResponse(chunk=self.data[i : i + CHUNK_BYTES])


def test_sidecar_refuses_bytes_that_do_not_match_their_digest(store, store_stub, tmp_path):
    rev = store[2]["a1"]
    data = bytearray(_fetch(store_stub, rev.digest))
    data[100] ^= 1
    liar = build_server(
        add_servicers=lambda s: (
            store_pb2_grpc.add_AdapterStoreServicer_to_server(_LyingStore(bytes(data)), s)
            or ["mintmesh.v1.AdapterStore"]
        )
    )
    node = NodeCache(tmp_path / "n", capacity_bytes=1 << 20)
    core = CacheCore(node, liar.address)
    try:
        with pytest.raises(DigestMismatch, match=rev.digest):
            core.ensure(rev.digest, timeout=10)
        assert not node.contains(rev.digest) and node.stats().entries == 0
        with pytest.raises(DigestMismatch, match="not committed"):
            node.put(rev.digest, bytes(data))
        assert not node.contains(rev.digest)
    finally:
        core.close()
        node.close()
        liar.stop(0)


# -- NodeCache: budget, eviction, map full ----------------------------------------------------


def _blob(rng: random.Random, size: int) -> tuple[str, bytes]:
    b = rng.randbytes(size)
    return hashlib.sha256(b).hexdigest(), b


def test_byte_budget_holds_under_random_puts(tmp_path):
    rng = random.Random(1234)
    cap = 256 * 1024
    node = NodeCache(tmp_path / "n", capacity_bytes=cap)
    pinned_d, pinned_b = _blob(rng, 20_000)
    node.put(pinned_d, pinned_b, pinned=True)
    pool = [_blob(rng, rng.randint(1, 48_000)) for _ in range(60)]
    try:
        for _ in range(400):
            d, b = rng.choice(pool)
            if rng.random() < 0.3:
                node.get(d)
            else:
                node.put(d, b)
            s = node.stats()
            assert s.bytes <= cap
            assert s.bytes == sum(e.size_bytes for e in node.entries())
        s = node.stats()
        assert s.evictions > 0 and s.hits > 0 and node.contains(pinned_d)
        entries = {e.digest: e.size_bytes for e in node.entries()}
    finally:
        node.close()
    # What is in the file is exactly what the index said, and survives a reopen.
    again = NodeCache(tmp_path / "n", capacity_bytes=cap)
    try:
        assert {e.digest: e.size_bytes for e in again.entries()} == entries
        for d in entries:
            assert hashlib.sha256(again.get(d)).hexdigest() == d
        assert [e.digest for e in again.entries() if e.pinned] == [pinned_d]
    finally:
        again.close()


def test_lru_evicts_least_recently_used_unpinned(tmp_path):
    rng = random.Random(5)
    a, b, c, d = (_blob(rng, 1000) for _ in range(4))
    node = NodeCache(tmp_path / "n", capacity_bytes=3000)
    try:
        for x in (a, b, c):
            node.put(*x)
        node.pin(a[0])
        node.get(b[0])  # b is now more recent than c; a is pinned
        node.put(*d)
        assert [node.contains(x[0]) for x in (a, b, c, d)] == [True, True, False, True]
        assert node.stats().evictions == 1
        with pytest.raises(ResourceExhausted, match="more than the node cache capacity"):
            node.put(*_blob(rng, 3001))
    finally:
        node.close()


def test_policy_is_a_separate_object():
    p = LRUPolicy()
    for k in "abc":
        p.on_insert(k, 1)
    p.on_hit("a")
    assert p.victim(lambda k: False) == "b"
    assert p.victim(lambda k: k == "b") == "c"
    p.remove("b")
    p.remove("c")
    assert p.victim(lambda k: k == "a") is None


def test_map_full_evicts_then_reports_resource_exhausted(tmp_path):
    rng = random.Random(9)
    node = NodeCache(tmp_path / "n", capacity_bytes=1 << 30, map_size=512 * 1024)
    try:
        blobs = [_blob(rng, 40_000) for _ in range(30)]
        for d, b in blobs:
            node.put(d, b)  # far more than the map holds: evicts to make room
        s = node.stats()
        assert 0 < s.entries < 30 and s.evictions > 0 and node.contains(blobs[-1][0])
        for e in node.entries():
            node.pin(e.digest)
        with pytest.raises(ResourceExhausted, match="map .* is full"):
            for d, b in (_blob(rng, 40_000) for _ in range(30)):
                node.put(d, b)
    finally:
        node.close()


# -- a real sidecar process killed with SIGKILL -----------------------------------------------


def _start_sidecar(cache_dir: Path, store_addr: str, log: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "mintmesh.cache", "--cache-dir", str(cache_dir)]
        + ["--store", store_addr, "--port", "0", "--capacity-bytes", str(32 << 20)],
        stdout=subprocess.PIPE,
        stderr=open(log, "ab"),  # noqa: SIM115 - the child owns it
        text=True,
    )
    line: list[str] = []
    t = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    t.start()
    t.join(30)
    if not line or not line[0].startswith("READY cache "):
        proc.kill()
        raise AssertionError(f"sidecar did not start: {line!r}\n{log.read_text()[-3000:]}")
    return proc, line[0].split()[2]


@pytest.mark.e2e
def test_sidecar_killed_loses_nothing_committed(store, store_stub, tmp_path):
    from mintmesh.cache.reader import NodeCacheReader

    revs = [store[2][k] for k in ("a2", "a3", "a4")]
    cache_dir, log = tmp_path / "node", tmp_path / "cache.log"
    proc, addr = _start_sidecar(cache_dir, store[0].address, log)
    try:
        with grpc.insecure_channel(addr) as ch:
            stub = cache_pb2_grpc.AdapterCacheStub(ch)
            assert [ensure(stub, r.digest).hit for r in revs] == [False] * 3
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    # The executor's reader (this process; the writer was another one) sees every commit.
    reader = NodeCacheReader(cache_dir)
    assert reader.path == layout.env_path(cache_dir)
    for r in revs:
        assert bytes(reader.read(r.digest)) == _fetch(store_stub, r.digest)
    assert not reader.contains("0" * 64)

    proc, addr = _start_sidecar(cache_dir, store[0].address, log)
    try:
        with grpc.insecure_channel(addr) as ch:
            stub = cache_pb2_grpc.AdapterCacheStub(ch)
            s = stats(stub)
            assert s.entries == 3 and s.bytes == sum(r.size_bytes for r in revs)
            assert [ensure(stub, r.digest).hit for r in revs] == [True] * 3
            new = store[2]["a0"]
            assert not ensure(stub, new.digest).hit  # and it still fetches after a restart
        assert reader.read(new.digest) is not None, "the open reader sees later commits"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
