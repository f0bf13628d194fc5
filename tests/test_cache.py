"""The node cache sidecar over real gRPC against a real store: miss then hit, verified commits,
single flight, the byte budget, errors passed through, Prefetch / Evict / Pin / Unpin / Stats,
the map or the disk full, and a sidecar killed with SIGKILL that loses nothing it committed (read
back by the executor's reader from another process) and rebuilds its eviction order from the
hints it persisted. The policies themselves are tested in test_cache_policy.py."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import lmdb
import pytest
from peft_util import make_peft_adapter

from mintmesh import peft_io
from mintmesh.cache import layout
from mintmesh.cache.config import CacheConfig
from mintmesh.cache.core import CacheCore
from mintmesh.cache.node import NodeCache
from mintmesh.cache.policy import DEFAULT_POLICY, POLICIES, LRUPolicy
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


@pytest.fixture
def make_sidecar(store, tmp_path):
    """Fresh in-process sidecars on the store, each with its own cache dir: make(**config)
    returns (core, stub). All are stopped at the end of the test."""
    made = []

    def make(**kw) -> tuple[CacheCore, cache_pb2_grpc.AdapterCacheStub]:
        kw.setdefault("capacity_bytes", 64 << 20)
        cfg = CacheConfig(
            cache_dir=tmp_path / f"node{len(made)}", store_address=store[0].address, **kw
        )
        core = create_core(cfg)
        srv = create_server(cfg, core=core)
        ch = grpc.insecure_channel(srv.address)
        made.append((srv, ch))
        return core, cache_pb2_grpc.AdapterCacheStub(ch)

    yield make
    for srv, ch in made:
        ch.close()
        srv.stop(0)


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
    node = NodeCache(tmp_path / "n", capacity_bytes=3000, policy="lru")
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


# -- Prefetch, Evict, Pin, Unpin, Stats over gRPC --------------------------------------------


def _wait(cond, timeout: float = 15.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("timed out waiting")
        time.sleep(0.01)


def _count_concurrency(core: CacheCore, delay_s: float) -> dict[str, int]:
    """Wrap the store fetch of core to record the most fetches in flight at once."""
    seen = {"now": 0, "max": 0}
    lock = threading.Lock()
    real = core._fetch

    def fetch(digest, timeout):
        with lock:
            seen["now"] += 1
            seen["max"] = max(seen["max"], seen["now"])
        try:
            time.sleep(delay_s)
            return real(digest, timeout)
        finally:
            with lock:
                seen["now"] -= 1

    core._fetch = fetch
    return seen


def test_prefetch_fetches_in_the_background_with_bounded_concurrency(make_sidecar, store):
    core, stub = make_sidecar(prefetch_concurrency=2)
    revs = store[2]
    seen = _count_concurrency(core, 0.05)
    known = [revs[k].digest for k in ("a0", "a1", "a2", "a3", "a4", "a5", "big")]
    unknown = "f" * 64
    res = stub.Prefetch(cache_pb2.PrefetchRequest(digests=[*known, unknown]), timeout=TIMEOUT)
    assert list(res.present) == [] and list(res.queued) == [*known, unknown]
    _wait(lambda: core.prefetch_pending() == 0)
    assert all(core.node.contains(d) for d in known) and not core.node.contains(unknown)
    assert 1 <= seen["max"] <= 2
    s = stats(stub)
    assert (s.entries, s.hits, s.misses) == (7, 0, 0)  # a prefetch is neither hit nor miss
    again = stub.Prefetch(cache_pb2.PrefetchRequest(digests=[*known, unknown]), timeout=TIMEOUT)
    assert list(again.present) == known and list(again.queued) == [unknown]
    assert ensure(stub, known[0]).hit
    _wait(lambda: core.prefetch_pending() == 0)
    err = _rpc_error(
        stub.Prefetch, cache_pb2.PrefetchRequest(digests=[known[0], "nope"]), timeout=TIMEOUT
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "'nope'" in err.details()


def test_prefetch_and_ensure_share_one_fetch(make_sidecar, store):
    core, stub = make_sidecar()
    _, score, revs = store
    rev = revs["big"]
    _count_concurrency(core, 0.2)  # keep the fetch in flight while Ensure arrives
    before = score.stats().fetches
    res = stub.Prefetch(cache_pb2.PrefetchRequest(digests=[rev.digest]), timeout=TIMEOUT)
    assert list(res.queued) == [rev.digest]
    got = ensure(stub, rev.digest)
    assert got.size_bytes == rev.size_bytes
    _wait(lambda: core.prefetch_pending() == 0)
    assert score.stats().fetches - before == 1 and core.store_fetches == 1


def test_evict_pin_unpin(make_sidecar, store):
    core, stub = make_sidecar()
    revs = store[2]
    a1, a2 = revs["a1"], revs["a2"]
    ensure(stub, a1.digest)
    assert stub.Evict(cache_pb2.EvictRequest(digest=a1.digest), timeout=TIMEOUT).evicted
    assert stats(stub).entries == 0 and not core.node.contains(a1.digest)
    assert not stub.Evict(cache_pb2.EvictRequest(digest=a1.digest), timeout=TIMEOUT).evicted

    def pin(digest, fetch):
        return stub.Pin(cache_pb2.PinRequest(digest=digest, fetch=fetch), timeout=TIMEOUT)

    err = _rpc_error(pin, a2.digest, False)
    assert err.code() == grpc.StatusCode.NOT_FOUND and a2.digest in err.details()
    assert pin(a2.digest, True).size_bytes == a2.size_bytes
    assert pin(a2.digest, True).size_bytes == a2.size_bytes  # idempotent
    s = stats(stub)
    assert (s.pinned_entries, s.pinned_bytes, s.entries) == (1, a2.size_bytes, 1)
    err = _rpc_error(stub.Evict, cache_pb2.EvictRequest(digest=a2.digest), timeout=TIMEOUT)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and a2.digest in err.details()
    assert core.node.contains(a2.digest)
    unpin = stub.Unpin
    assert unpin(cache_pb2.UnpinRequest(digest=a2.digest), timeout=TIMEOUT).was_pinned
    assert not unpin(cache_pb2.UnpinRequest(digest=a2.digest), timeout=TIMEOUT).was_pinned
    assert stats(stub).pinned_entries == 0
    assert stub.Evict(cache_pb2.EvictRequest(digest=a2.digest), timeout=TIMEOUT).evicted
    err = _rpc_error(pin, "e" * 64, True)
    assert err.code() == grpc.StatusCode.NOT_FOUND and "e" * 64 in err.details()
    err = _rpc_error(stub.Evict, cache_pb2.EvictRequest(digest="bad"), timeout=TIMEOUT)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "'bad'" in err.details()


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_pinned_survive_pressure_and_pins_cannot_exceed_the_budget(make_sidecar, store, policy):
    revs = store[2]
    big, a2 = revs["big"], revs["a2"]
    cap = big.size_bytes + a2.size_bytes + 1000
    core, stub = make_sidecar(capacity_bytes=cap, policy=policy)
    stub.Pin(cache_pb2.PinRequest(digest=big.digest, fetch=True), timeout=TIMEOUT)
    for _ in range(2):
        for k in ("a0", "a1", "a2", "a3", "a4", "a5"):
            ensure(stub, revs[k].digest)
            s = stats(stub)
            assert s.bytes <= cap and core.node.contains(big.digest)
    assert s.evictions > 0
    stub.Pin(cache_pb2.PinRequest(digest=a2.digest, fetch=True), timeout=TIMEOUT)
    # The pinned entries leave 1000 bytes: neither pinning nor caching a1 can fit.
    a1 = revs["a1"]
    err = _rpc_error(stub.Pin, cache_pb2.PinRequest(digest=a1.digest, fetch=True), timeout=TIMEOUT)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "pinned" in err.details()
    assert a1.digest in err.details()
    err = _rpc_error(ensure, stub, a1.digest)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    s = stats(stub)
    assert (s.pinned_entries, s.pinned_bytes) == (2, big.size_bytes + a2.size_bytes)
    assert s.policy == policy and s.capacity_bytes == cap
    assert list(s.digests) == sorted(e.digest for e in core.node.entries())
    assert s.entries == len(s.digests) and s.bytes <= cap
    stub.Unpin(cache_pb2.UnpinRequest(digest=a2.digest), timeout=TIMEOUT)
    assert not ensure(stub, a1.digest).hit  # room again: a2 is evictable
    assert core.node.contains(big.digest) and stats(stub).pinned_entries == 1


def test_stats_on_an_empty_cache(make_sidecar):
    _, stub = make_sidecar()
    s = stats(stub)
    assert (s.entries, s.bytes, s.pinned_entries, s.pinned_bytes) == (0, 0, 0, 0)
    assert s.policy == DEFAULT_POLICY and list(s.digests) == []


def test_concurrent_rpcs_keep_the_budget_the_pins_and_the_file(store, tmp_path):
    """Ensure, Prefetch, Evict, Pin and Unpin from 6 threads on a budget of ~3 adapters: only
    the expected refusals, the budget holds, pinned entries stay, the file stays whole."""
    revs = [store[2][k] for k in ("a0", "a1", "a3", "a4", "a5")]
    cap = 30_000
    cfg = CacheConfig(cache_dir=tmp_path / "n", store_address=store[0].address, capacity_bytes=cap)
    core = create_core(cfg)
    srv = create_server(cfg, core=core)
    allowed = {
        grpc.StatusCode.RESOURCE_EXHAUSTED,  # pinned entries leave no room
        grpc.StatusCode.FAILED_PRECONDITION,  # evicting a pinned entry
    }
    failures: list[str] = []
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = cache_pb2_grpc.AdapterCacheStub(ch)

            def worker(seed: int) -> None:
                rng = random.Random(seed)
                for _ in range(60):
                    d = rng.choice(revs).digest
                    op = rng.choice(["ensure"] * 4 + ["prefetch", "evict", "pin", "unpin"])
                    try:
                        if op == "ensure":
                            ensure(stub, d)
                        elif op == "prefetch":
                            stub.Prefetch(cache_pb2.PrefetchRequest(digests=[d]), timeout=TIMEOUT)
                        elif op == "evict":
                            stub.Evict(cache_pb2.EvictRequest(digest=d), timeout=TIMEOUT)
                        elif op == "pin":
                            stub.Pin(cache_pb2.PinRequest(digest=d, fetch=True), timeout=TIMEOUT)
                        else:
                            stub.Unpin(cache_pb2.UnpinRequest(digest=d), timeout=TIMEOUT)
                    except grpc.RpcError as e:
                        # Under this much churn a pin's fetch can lose its entry to eviction
                        # three times in a row: UNAVAILABLE (retryable), by design.
                        thrashed = (
                            op == "pin"
                            and e.code() == grpc.StatusCode.UNAVAILABLE
                            and "evicted three times" in (e.details() or "")
                        )
                        if e.code() not in allowed and not thrashed:
                            failures.append(f"{op} {d}: {e.code()} {e.details()}")
                    if core.node.stats().bytes > cap:
                        failures.append(f"over budget after {op}")

            with ThreadPoolExecutor(6) as pool:
                list(pool.map(worker, range(6)))
            _wait(lambda: core.prefetch_pending() == 0)
            s = stats(stub)
        assert not failures, failures[:5]
        entries = {e.digest: e for e in core.node.entries()}
        assert s.bytes == sum(e.size_bytes for e in entries.values()) <= cap
        assert s.pinned_bytes == sum(e.size_bytes for e in entries.values() if e.pinned)
        assert s.hits > 0 and s.evictions > 0
    finally:
        srv.stop(0)
    again = NodeCache(tmp_path / "n", capacity_bytes=cap, flush_interval_s=0)
    try:
        assert {e.digest: e.pinned for e in again.entries()} == {
            d: e.pinned for d, e in entries.items()
        }
        for d in entries:
            assert hashlib.sha256(again.get(d)).hexdigest() == d
    finally:
        again.close()


# -- the disk full: evict and retry, then RESOURCE_EXHAUSTED, never a corrupt file ------------


class _FailingCommit:
    def __init__(self, txn, exc: BaseException):
        self.txn, self.exc = txn, exc

    def __enter__(self):
        return self.txn.__enter__()

    def __exit__(self, *exc_info):
        self.txn.abort()
        if exc_info[0] is None:
            raise self.exc
        return False


class _FullDisk:
    """Wraps a NodeCache's environment: the next `fails` write transactions fail to commit
    with exc (and are aborted, as LMDB does when a write fails)."""

    def __init__(self, env, fails: int, exc: BaseException):
        self.env, self.fails, self.exc = env, fails, exc

    def begin(self, **kw):
        txn = self.env.begin(**kw)
        if kw.get("write") and self.fails > 0:
            self.fails -= 1
            return _FailingCommit(txn, self.exc)
        return txn

    def __getattr__(self, name):
        return getattr(self.env, name)


@pytest.mark.parametrize(
    "exc",
    [
        lmdb.DiskError("mdb_txn_commit: No space left on device"),
        OSError(errno.ENOSPC, "No space left on device"),
    ],
    ids=["lmdb.DiskError", "OSError-ENOSPC"],
)
def test_disk_full_evicts_and_retries_then_resource_exhausted(tmp_path, exc):
    rng = random.Random(17)
    node = NodeCache(tmp_path / "n", capacity_bytes=1 << 20, flush_interval_s=0)
    blobs = [_blob(rng, 10_000) for _ in range(6)]
    real_env = node._env
    try:
        for d, b in blobs[:5]:
            node.put(d, b)
        node.pin(blobs[0][0])
        node._env = _FullDisk(real_env, fails=1, exc=exc)
        assert node.put(*blobs[5])  # fails once: one entry evicted on its own, then it fits
        s = node.stats()
        assert s.evictions == 1 and s.entries == 5 and node.contains(blobs[5][0])
        node._env = _FullDisk(real_env, fails=10**6, exc=exc)
        with pytest.raises(ResourceExhausted, match="disk under the node cache .* is full"):
            node.put(*_blob(rng, 10_000))
        node._env = real_env
        kept = {e.digest for e in node.entries()}
        assert blobs[0][0] in kept and node.stats().bytes == 10_000 * len(kept)
    finally:
        node._env = real_env
        node.close()
    again = NodeCache(tmp_path / "n", capacity_bytes=1 << 20, flush_interval_s=0)
    try:  # the file holds exactly what the index said, every entry whole
        assert {e.digest for e in again.entries()} == kept
        for d in kept:
            assert hashlib.sha256(again.get(d)).hexdigest() == d
    finally:
        again.close()


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_use_hints_persist_and_rebuild_the_policy(tmp_path, policy):
    rng = random.Random(23)
    blobs = [_blob(rng, 1000) for _ in range(4)]
    node = NodeCache(tmp_path / "n", capacity_bytes=10_000, policy=policy, flush_interval_s=0.05)
    try:
        for d, b in blobs:
            node.put(d, b)
        time.sleep(0.005)  # later uses are later in the file's millisecond clock
        for _ in range(3):
            for d, _b in blobs[1:]:
                node.touch(d)
        _wait(lambda: not node._dirty)  # written by the background flush
    finally:
        node.close()
    # Reopened with room for 3: the entry never hit is the one evicted to fit.
    again = NodeCache(tmp_path / "n", capacity_bytes=3000, policy=policy, flush_interval_s=0)
    try:
        assert {e.digest: e.hits for e in again.entries()} == {d: 3 for d, _ in blobs[1:]}
        assert again.stats().evictions == 1
    finally:
        again.close()


# -- a real sidecar process killed with SIGKILL -----------------------------------------------


def _start_sidecar(
    cache_dir: Path, store_addr: str, log: Path, *extra: str, capacity: int = 32 << 20
) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "mintmesh.cache", "--cache-dir", str(cache_dir)]
        + ["--store", store_addr, "--port", "0", "--capacity-bytes", str(capacity), *extra]
        + ["--insecure-mesh"],  # its store here is an in-process, plaintext one
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
    """SIGKILL after commits, hits and a pin: the executor's reader sees every commit; the
    restarted sidecar (another policy, a smaller budget) rebuilds its eviction order from the
    persisted hints, so the entry never hit is the one evicted to fit, and the pin holds."""
    from mintmesh.cache.reader import NodeCacheReader

    revs = store[2]
    cold, warm, hot, pinned = (revs[k] for k in ("a2", "a3", "a4", "a5"))
    cache_dir, log = tmp_path / "node", tmp_path / "cache.log"
    proc, addr = _start_sidecar(cache_dir, store[0].address, log)
    try:
        with grpc.insecure_channel(addr) as ch:
            stub = cache_pb2_grpc.AdapterCacheStub(ch)
            assert [ensure(stub, r.digest).hit for r in (cold, warm, hot)] == [False] * 3
            assert [ensure(stub, r.digest).hit for r in (warm, hot, hot)] == [True] * 3
            # The pin's transactions also carry the hit hints (a crash can lose only hints
            # newer than the last write).
            stub.Pin(cache_pb2.PinRequest(digest=pinned.digest, fetch=True), timeout=TIMEOUT)
            assert stats(stub).policy == DEFAULT_POLICY
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    # The executor's reader (this process; the writer was another one) sees every commit.
    reader = NodeCacheReader(cache_dir)
    assert reader.path == layout.env_path(cache_dir)
    for r in (cold, warm, hot, pinned):
        assert bytes(reader.read(r.digest)) == _fetch(store_stub, r.digest)
    assert not reader.contains("0" * 64)

    other = next(p for p in sorted(POLICIES) if p != DEFAULT_POLICY)
    keep = (warm, hot, pinned)
    budget = sum(r.size_bytes for r in keep) + 100  # one of the four must go at startup
    proc, addr = _start_sidecar(
        cache_dir, store[0].address, log, "--policy", other, capacity=budget
    )
    try:
        with grpc.insecure_channel(addr) as ch:
            stub = cache_pb2_grpc.AdapterCacheStub(ch)
            s = stats(stub)
            assert s.policy == other and s.capacity_bytes == budget
            assert list(s.digests) == sorted(r.digest for r in keep)
            assert s.bytes == sum(r.size_bytes for r in keep) and s.evictions == 1
            assert (s.pinned_entries, s.pinned_bytes) == (1, pinned.size_bytes)
            assert [ensure(stub, r.digest).hit for r in keep] == [True] * 3
            new = revs["a0"]
            assert not ensure(stub, new.digest).hit  # and it still fetches after a restart
            s = stats(stub)
            assert s.bytes <= budget and pinned.digest in s.digests
        assert reader.read(new.digest) is not None, "the open reader sees later commits"
        assert reader.read(cold.digest) is None
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.e2e
def test_executor_reads_hits_from_the_file_and_reports_them(store, store_stub, tmp_path):
    """The executor's SidecarSource: a miss goes through EnsureAdapter (the sidecar fetches and
    commits), a hit is read straight from the node cache file with no RPC; the hits are then
    reported in a batch (RecordHits), so the sidecar's Stats and eviction policy see them."""
    from mintmesh.services.executor.sources import SidecarSource

    rev = store[2]["a1"]
    cache_dir, log = tmp_path / "node", tmp_path / "cache.log"
    proc, addr = _start_sidecar(cache_dir, store[0].address, log)
    # A long report interval: the test flushes by hand.
    src = SidecarSource(addr, cache_dir, timeout_s=TIMEOUT, hit_report_interval_s=3600)
    try:
        with grpc.insecure_channel(addr) as ch:
            stub = cache_pb2_grpc.AdapterCacheStub(ch)
            want = _fetch(store_stub, rev.digest)
            assert bytes(src.fetch(rev.digest)) == want
            s0 = stats(stub)
            assert (s0.misses, s0.hits, s0.entries) == (1, 0, 1)
            for _ in range(3):
                assert bytes(src.fetch(rev.digest)) == want
            assert (src.reads_ensured, src.reads_hit) == (1, 3)
            assert stats(stub).hits == 0  # not reported yet
            assert src.flush_hits() == 3
            s1 = stats(stub)
            assert (s1.hits, s1.misses) == (3, 1)
            # Digests no longer (or never) cached are not counted; malformed ones are refused.
            resp = stub.RecordHits(
                cache_pb2.RecordHitsRequest(digests=["0" * 64, rev.digest]), timeout=TIMEOUT
            )
            assert resp.recorded == 1 and stats(stub).misses == 1
            err = _rpc_error(
                stub.RecordHits, cache_pb2.RecordHitsRequest(digests=["nope"]), timeout=TIMEOUT
            )
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "nope" in err.details()
    finally:
        src.close()
        proc.terminate()
        proc.wait(20)
