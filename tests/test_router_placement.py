"""Rendezvous placement with bounded loads: stable, spreading, minimal movement."""

from __future__ import annotations

import collections

import pytest

from mintmesh.services.router.placement import Placement, rendezvous_order

EXECS = [f"10.0.0.{i}:50071" for i in range(5)]


def test_order_is_deterministic_and_a_permutation():
    for key in ("a" * 64, "b" * 64, "__base__"):
        o1, o2 = rendezvous_order(EXECS, key), rendezvous_order(list(reversed(EXECS)), key)
        assert o1 == o2
        assert sorted(o1) == sorted(EXECS)


def test_keys_spread_over_executors():
    homes = collections.Counter(rendezvous_order(EXECS, f"{i:064x}")[0] for i in range(5000))
    assert set(homes) == set(EXECS)
    assert min(homes.values()) > 5000 / len(EXECS) * 0.8


def test_removing_an_executor_moves_only_its_keys():
    keys = [f"{i:064x}" for i in range(2000)]
    before = {k: rendezvous_order(EXECS, k)[0] for k in keys}
    gone = EXECS[2]
    after = {k: rendezvous_order([e for e in EXECS if e != gone], k)[0] for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert moved and all(before[k] == gone for k in moved)


@pytest.mark.parametrize("eps", [0.0, 0.25, 1.0])
def test_bounded_load_passes_over_a_loaded_home(eps):
    p = Placement(epsilon=eps)
    key = "f" * 64
    home = rendezvous_order(EXECS, key)[0]
    for _ in range(10):
        p.acquire(home)
    first = p.order(EXECS, key)[0]
    assert first != home
    for _ in range(10):
        p.release(home)
    assert p.order(EXECS, key)[0] == home
