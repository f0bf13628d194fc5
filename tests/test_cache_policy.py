"""The node cache's eviction policies as plain objects (no LMDB): the byte budget under random
workloads, pinned entries, scan resistance, S3-FIFO's ghost and frequency bits, W-TinyLFU's
sketch and admission, the rebuild after a restart, and that a replay (the simulator's loop)
drives a policy exactly like the NodeCache does."""

from __future__ import annotations

import hashlib
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mintmesh.cache.config import CacheConfig
from mintmesh.cache.node import NodeCache
from mintmesh.cache.policy import (
    DEFAULT_POLICY,
    POLICIES,
    FrequencySketch,
    LRUPolicy,
    S3FIFOPolicy,
    WTinyLFUPolicy,
    make_policy,
    replay,
)

ALL = sorted(POLICIES)
SCAN_RESISTANT = ["s3fifo", "wtinylfu"]


class Model:
    """A byte-budget cache over a policy, driven like the NodeCache (misses recorded, victims
    detached until the new entry fits, pinned entries passed over), that checks its invariants
    after every step."""

    def __init__(self, policy_name: str, capacity: int):
        self.capacity = capacity
        self.policy = make_policy(policy_name, capacity)
        self.resident: dict[int, int] = {}
        self.pinned: set[int] = set()
        self.used = 0

    def access(self, k: int, size: int) -> bool:
        if k in self.resident:
            self.policy.on_hit(k)
            return True
        self.policy.record_access(k)
        pinned_bytes = sum(self.resident[p] for p in self.pinned)
        if pinned_bytes + size > self.capacity:
            return False
        while self.used + size > self.capacity:
            v = self.policy.victim(self.pinned.__contains__)
            assert v is not None, "unpinned entries left but no victim"
            assert v not in self.pinned, f"pinned {v} named as a victim"
            assert v in self.resident, f"victim {v} is not resident"
            self.used -= self.resident.pop(v)
        self.resident[k] = size
        self.used += size
        self.policy.on_insert(k, size)
        return False

    def check(self) -> None:
        assert self.used <= self.capacity
        assert self.used == sum(self.resident.values())
        assert len(self.policy) == len(self.resident)
        assert all(k in self.policy for k in self.resident)


ops = st.lists(
    st.tuples(
        st.sampled_from(["get", "get", "get", "pin", "unpin", "remove"]),
        st.integers(0, 60),  # key
    ),
    min_size=1,
    max_size=300,
)


@pytest.mark.parametrize("name", ALL)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops, capacity=st.integers(1, 400), seed=st.integers(0, 2**16))
def test_byte_budget_and_pins_hold_under_random_workloads(name, ops, capacity, seed):
    rng = random.Random(seed)
    sizes = {k: rng.choice((1, 4, 8, 16, 32, 64)) for k in range(61)}  # mixed ranks
    m = Model(name, capacity)
    for op, k in ops:
        if op == "get":
            m.access(k, sizes[k])
        elif op == "pin" and k in m.resident:
            if sum(m.resident[p] for p in m.pinned | {k}) <= capacity:
                m.pinned.add(k)
        elif op == "unpin":
            m.pinned.discard(k)
        elif op == "remove" and k in m.resident and k not in m.pinned:
            m.policy.remove(k)
            m.used -= m.resident.pop(k)
        m.check()
        assert m.pinned <= set(m.resident), "a pinned entry was evicted"


@pytest.mark.parametrize("name", ALL)
def test_pinned_entries_are_never_victims(name):
    p = make_policy(name, 100)
    for k in range(10):
        p.record_access(k)
        p.on_insert(k, 10)
    pinned = {2, 5, 7}
    got = []
    while (v := p.victim(pinned.__contains__)) is not None:
        got.append(v)
    assert sorted(got) == [k for k in range(10) if k not in pinned]
    assert len(p) == 3 and all(k in p for k in pinned)
    assert p.victim(lambda k: True) is None  # everything pinned: no victim, no endless loop
    assert p.victim() in pinned  # unpinned again: evictable


@pytest.mark.parametrize("name", ALL)
def test_remove_and_unknown_keys_are_harmless(name):
    p = make_policy(name, 10)
    p.on_hit("never-inserted")
    p.remove("never-inserted")
    p.on_insert("a", 4)
    p.on_insert("b", 4)
    p.remove("a")
    assert len(p) == 1 and "a" not in p and p.victim() == "b" and p.victim() is None


def _hot_then_scan(name: str, capacity: int = 100, hot: int = 50, scan: int = 2000) -> int:
    """How many of a hot set, requested in several rounds, survive one scan of new ids."""
    m = Model(name, capacity)
    for _ in range(5):
        for k in range(hot):
            m.access(k, 1)
    for k in range(10_000, 10_000 + scan):
        m.access(k, 1)
        m.check()
    return sum(k in m.resident for k in range(hot))


@pytest.mark.parametrize("name", SCAN_RESISTANT)
def test_scan_does_not_flush_the_hot_set(name):
    assert _hot_then_scan("lru") == 0  # what a scan does to LRU
    assert _hot_then_scan(name) >= 48


@pytest.mark.parametrize("name", SCAN_RESISTANT)
def test_scan_resistance_by_bytes(name):
    """The same with mixed sizes: a scan of large one-time entries leaves the hot set."""
    m = Model(name, 1000)
    hot = {k: 4 * (1 + k % 4) for k in range(40)}  # 400 bytes
    for _ in range(5):
        for k, s in hot.items():
            m.access(k, s)
    for k in range(10_000, 11_000):
        m.access(k, 64)
        m.check()
    assert sum(k in m.resident for k in hot) >= 36


def test_s3fifo_ghost_hit_goes_to_main():
    p = S3FIFOPolicy(10)  # small queue: 1 entry
    m = Model("s3fifo", 10)
    m.policy = p
    for k in range(10):
        m.access(k, 1)
    m.access(100, 1)  # evicts the oldest of S (0, never hit) into the ghost
    assert 0 not in m.resident and p.segment(0) == "ghost"
    m.access(0, 1)  # a ghost hit: straight to main
    assert p.segment(0) == "main"


def test_s3fifo_hit_in_small_promotes_and_frequency_is_capped():
    p = S3FIFOPolicy(10)
    m = Model("s3fifo", 10)
    m.policy = p
    for k in range(10):
        m.access(k, 1)
    for _ in range(10):
        m.access(0, 1)
    assert p._freq[0] == 3  # two bits' worth, whatever the number of hits
    m.access(100, 1)  # 0 was hit: it moves to main; 1 (never hit) is evicted instead
    assert p.segment(0) == "main" and 1 not in m.resident and p.segment(1) == "ghost"


def test_s3fifo_main_reinserts_by_frequency():
    p = S3FIFOPolicy(100, small_ratio=0.5)  # S's share: 50 bytes
    p.on_load(0, 10, 1)  # main, freq 1
    for k in (1, 2, 3):
        p.on_load(k, 10, 0)  # S: 30 bytes, under its share, so main is evicted from
    p.on_load(9, 10, 2)  # main, freq 2
    # 0 is reinserted with freq 0, 9 with freq 1, then 0 comes round again and goes.
    assert p.victim() == 0 and p._freq[9] == 1 and p.segment(9) == "main"
    assert p.victim() == 9
    assert p.victim() == 1 and p.segment(1) == "ghost"  # main empty: S it is


def test_s3fifo_byte_aware_small_queue():
    """The small queue's share is in bytes: one large entry can fill it."""
    p = S3FIFOPolicy(1000)  # small share: 100 bytes
    p.on_insert("big", 100)
    p.on_insert("x", 1)
    assert p.victim() == "big"  # S is at its share: evict from S, oldest first


def test_sketch_counts_saturate_and_halve():
    s = FrequencySketch(64)
    for _ in range(40):
        s.increment("k")
    assert s.estimate("k") == 15  # 4-bit counters
    assert s.estimate("never") == 0
    s.reset()
    assert s.estimate("k") == 7 and s.resets == 1
    s2 = FrequencySketch(16, sample_factor=10)  # resets itself after 160 increments
    for _ in range(160):
        s2.increment(0)
    assert s2.resets == 1 and s2.estimate(0) == 7


def test_sketch_never_underestimates_between_resets():
    s = FrequencySketch(1024, sample_factor=1000)
    rng = random.Random(3)
    counts: dict[int, int] = {}
    for _ in range(3000):
        k = int(rng.paretovariate(1.0)) % 500
        counts[k] = counts.get(k, 0) + 1
        s.increment(k)
    assert s.resets == 0
    assert all(s.estimate(k) >= min(c, 15) for k, c in counts.items())


def test_sketch_doorkeeper_absorbs_first_access():
    s = FrequencySketch(64, doorkeeper=True)
    s.increment("once")
    assert s.estimate("once") == 1  # the doorkeeper bit, no counters
    s.increment("once")
    assert s.estimate("once") == 2


def test_wtinylfu_admits_only_more_frequent_candidates():
    p = WTinyLFUPolicy(100, window_ratio=0.02)  # window: 2 entries
    m = Model("wtinylfu", 100)
    m.policy = p
    for k in range(100):
        m.access(k, 1)
    for _ in range(3):
        for k in range(100):
            m.access(k, 1)  # every resident entry has a frequency of 4
    # New ids, once each: each is rejected at admission, the residents stay.
    for k in range(1000, 1050):
        m.access(k, 1)
    assert sum(k in m.resident for k in range(100)) >= 97
    # An id requested often enough while it waits gets admitted over a cold victim.
    for _ in range(8):
        p.record_access(5000)
    m.access(5000, 1)
    for k in range(2000, 2005):  # push 5000 out of the window
        m.access(k, 1)
    assert 5000 in m.resident and p.segment(5000) in ("probation", "protected")


def test_wtinylfu_probation_hit_moves_to_protected():
    p = WTinyLFUPolicy(100)
    p.on_load("a", 10, 0)
    assert p.segment("a") == "probation"
    p.on_hit("a")
    assert p.segment("a") == "protected"
    p.on_insert("b", 1)
    assert p.segment("b") == "window"


def test_wtinylfu_sketch_grows_with_the_entries():
    p = WTinyLFUPolicy(10**9, expected_entries=16)
    for k in range(1000):
        p.on_insert(k, 1)
    assert p.sketch.entries >= 1000


@pytest.mark.parametrize(
    "name,first_victim",
    [("lru", "cold"), ("s3fifo", "cold"), ("wtinylfu", "cold")],
)
def test_on_load_rebuilds_coldest_first(name, first_victim):
    """After a restart the entries are replayed coldest first with a hit-count hint: an entry
    that was never hit goes before the ones that were."""
    p = make_policy(name, 30)
    p.on_load("cold", 10, 0)
    p.on_load("warm", 10, 2)
    p.on_load("hot", 10, 9)
    assert p.victim() == first_victim
    assert {p.victim(), p.victim()} == {"warm", "hot"}


def test_lru_order():
    p = LRUPolicy()
    for k in "abc":
        p.on_insert(k, 1)
    p.on_hit("a")
    assert [p.victim(), p.victim(), p.victim(), p.victim()] == ["b", "c", "a", None]


@pytest.mark.parametrize(
    "bad",
    [
        lambda: make_policy("arc", 10),
        lambda: S3FIFOPolicy(0),
        lambda: S3FIFOPolicy(10, small_ratio=1.5),
        lambda: WTinyLFUPolicy(10, window_ratio=0),
        lambda: FrequencySketch(0),
    ],
)
def test_bad_parameters_are_named(bad):
    with pytest.raises(
        ValueError, match=r"arc|capacity_bytes 0|small_ratio 1.5|window_ratio 0|entries 0"
    ):
        bad()


def test_config_names_a_bad_policy(tmp_path):
    with pytest.raises(ValueError, match="'bogus'"):
        CacheConfig(cache_dir=tmp_path, store_address="x:1", policy="bogus")
    assert CacheConfig(cache_dir=tmp_path, store_address="x:1").policy == DEFAULT_POLICY


@pytest.mark.parametrize("name", ALL)
def test_replay_drives_a_policy_like_the_node_cache(name, tmp_path):
    """The simulator's numbers are the NodeCache's: the same trace through NodeCache (LMDB,
    real puts) and through replay gives the same hits."""
    rng = random.Random(11)
    blobs = []
    for _ in range(40):
        b = rng.randbytes(rng.choice((1, 4, 8, 16, 32)) * 64)
        blobs.append((hashlib.sha256(b).hexdigest(), b))
    sizes = {d: len(b) for d, b in blobs}
    data = dict(blobs)
    weights = [1.0 / (i + 1) for i in range(len(blobs))]
    trace = [d for d, _ in rng.choices(blobs, weights=weights, k=400)]
    capacity = 4000
    node = NodeCache(tmp_path / "n", capacity_bytes=capacity, policy=name, flush_interval_s=0)
    try:
        node_hits = 0
        for d in trace:
            if node.touch(d) is not None:
                node_hits += 1
            else:
                node.put(d, data[d])
            assert node.stats().bytes <= capacity
    finally:
        node.close()
    assert replay(make_policy(name, capacity), trace, capacity, sizes) == node_hits
    assert node_hits > 0


@pytest.mark.parametrize("name", ALL)
def test_replay_counts_hits_after_warmup(name):
    keys = [1, 2, 1, 2, 1, 2]
    assert replay(make_policy(name, 10), keys, 10) == 4
    assert replay(make_policy(name, 10), keys, 10, warmup=4) == 2
    assert replay(make_policy(name, 10), [1, 1], 10, {1: 11}) == 0  # larger than the cache


def test_wtinylfu_keeps_counts_when_the_sketch_grows():
    p = WTinyLFUPolicy(10**9, expected_entries=16)
    for _ in range(6):
        p.record_access("hot")
    p.on_insert("hot", 1)
    for k in range(100):  # outgrows the sketch a few times
        p.on_insert(k, 1)
    assert p.sketch.entries >= 100 and p.sketch.estimate("hot") >= 6
