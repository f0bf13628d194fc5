"""AdapterResidency.state(digest) and states(): adapters walked through every state of their
residency (absent, fetching, host, loading, device, draining) with a real source and a real
pool, the failure paths back, and the device side going through the runner's
load_adapter/evict_adapter."""

from __future__ import annotations

import threading
import time

import pytest
from peft_util import make_peft_adapter

from mintmesh.errors import DigestMismatch, InvalidAdapter, ResourceExhausted
from mintmesh.kernels import AdapterPool
from mintmesh.peft_io import read_peft_dir, validate_and_pack
from mintmesh.services.executor.residency import AdapterResidency, AdapterState
from mintmesh.services.executor.runner import AdapterDevice
from mintmesh.services.executor.sources import PackedBytesSource


class _GatedSource(PackedBytesSource):
    """Fetches wait for gate (entered is set once one has started)."""

    def __init__(self, adapters):
        super().__init__(adapters)
        self.entered = threading.Event()
        self.gate = threading.Event()

    def fetch(self, digest, timeout=None, into=None):
        self.entered.set()
        assert self.gate.wait(30), "gate never opened"
        return super().fetch(digest, timeout, into)


def _until(cond, timeout=10.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.005)


def test_an_adapter_walks_through_every_residency_state(tiny_model_dir, base_info, tmp_path):
    d = make_peft_adapter(tiny_model_dir, tmp_path / "a", rank=4, targets=("q_proj",), seed=0)
    pa = validate_and_pack(*read_peft_dir(d), base_info, max_rank=64)
    a = pa.digest
    shapes = base_info.linear_shapes
    pool = AdapterPool(shapes, max_adapters=2)
    src = _GatedSource({a: pa.data})
    res = AdapterResidency(
        AdapterDevice(pool),
        src,
        layer_shapes=shapes,
        base_fingerprint=base_info.fingerprint,
        max_rank=64,
    )
    assert res.state(a) is AdapterState.ABSENT and res.states() == {}

    # Fetching (the source is still delivering), then on the host.
    got = {}
    t = threading.Thread(target=lambda: got.update(p=res.prepare(a)))
    t.start()
    assert src.entered.wait(10)
    assert res.state(a) is AdapterState.FETCHING and res.states() == {a: AdapterState.FETCHING}
    src.gate.set()
    t.join(10)
    assert res.state(a) is AdapterState.HOST and a in res.host
    assert res.states() == {a: AdapterState.HOST}

    # Loading (seen from inside the pool's copy), then on the device.
    seen = []
    real_load = pool.load

    def load(digest, modules):
        seen.append(res.state(digest))
        return real_load(digest, modules)

    pool.load = load
    res.load(got["p"])
    assert seen == [AdapterState.LOADING]
    assert res.state(a) is AdapterState.DEVICE and res.refs(a) == 1
    assert res.states() == {a: AdapterState.DEVICE}

    # Evicted from the device once idle: back on the host; loaded again without a fetch.
    res.release(a)
    assert res.evict(a)
    assert res.state(a) is AdapterState.HOST
    fetches = src.fetches
    res.ensure(a)
    assert res.state(a) is AdapterState.DEVICE and src.fetches == fetches

    # Deleted while referenced: draining until the last reference goes, then in no tier.
    done = {}
    t = threading.Thread(target=lambda: done.update(r=res.purge(a, timeout=10)))
    t.start()
    _until(lambda: res.state(a) is AdapterState.DRAINING)
    assert res.states() == {a: AdapterState.DRAINING}
    assert a in pool  # still serving its reference
    res.release(a)
    t.join(10)
    assert done["r"] == (True, False)
    assert res.state(a) is AdapterState.ABSENT and a not in pool and a not in res.host
    assert res.states() == {} and res._transit == {}


class _RecordingDevice(AdapterDevice):
    """A runner's device side that records what the residency asks of it (and may refuse a
    load, as a backend whose pool cannot take an adapter does)."""

    def __init__(self, pool, refuse=()):
        super().__init__(pool)
        self.calls: list[tuple[str, str]] = []
        self.refuse = set(refuse)

    def load_adapter(self, digest, modules):
        self.calls.append(("load", digest))
        if digest in self.refuse:
            raise ValueError("this backend cannot take it")
        return super().load_adapter(digest, modules)

    def evict_adapter(self, digest):
        self.calls.append(("evict", digest))
        return super().evict_adapter(digest)


def _packs(tiny_model_dir, base_info, tmp_path, n):
    out = []
    for i in range(n):
        d = make_peft_adapter(
            tiny_model_dir, tmp_path / f"p{i}", rank=4, targets=("q_proj",), seed=i
        )
        out.append(validate_and_pack(*read_peft_dir(d), base_info, max_rank=64))
    return out


def _residency(device, src, base_info):
    shapes = base_info.linear_shapes
    return AdapterResidency(
        device, src, layer_shapes=shapes, base_fingerprint=base_info.fingerprint, max_rank=64
    )


def test_a_load_waiting_for_room_is_loading_and_eviction_goes_back_to_host(
    tiny_model_dir, base_info, tmp_path
):
    """One slot, held by b: a's load waits for room in LOADING; b's release lets it in (b is
    evicted back to the host tier). Every load and eviction goes through the runner's device
    side."""
    pa, pb = _packs(tiny_model_dir, base_info, tmp_path, 2)
    a, b = pa.digest, pb.digest
    dev = _RecordingDevice(AdapterPool(base_info.linear_shapes, max_adapters=1))
    res = _residency(dev, PackedBytesSource({a: pa.data, b: pb.data}), base_info)
    res.ensure(b)
    prepared = res.prepare(a)
    assert res.states() == {a: AdapterState.HOST, b: AdapterState.DEVICE}
    got = {}
    t = threading.Thread(target=lambda: got.update(slot=res.load(prepared, timeout=10)))
    t.start()
    _until(lambda: res.state(a) is AdapterState.LOADING)
    assert res.states() == {a: AdapterState.LOADING, b: AdapterState.DEVICE}
    res.release(b)
    t.join(10)
    assert got["slot"] is not None and res.refs(a) == 1
    assert res.states() == {a: AdapterState.DEVICE, b: AdapterState.HOST}
    # b's load; a's tries while the pool was full (again on each wake-up); b out, a in.
    assert dev.calls[0] == ("load", b) and dev.calls[-2:] == [("evict", b), ("load", a)]
    assert set(dev.calls[1:-2]) == {("load", a)}
    # With every slot referenced and no wait allowed: refused, and a stays where it was.
    prepared = res.prepare(b)
    with pytest.raises(ResourceExhausted, match="in use"):
        res.load(prepared, timeout=0.0)
    assert res.states() == {a: AdapterState.DEVICE, b: AdapterState.HOST}
    assert res._transit == {} and res.host._busy == {}


def test_failed_transitions_leave_no_state_behind(tiny_model_dir, base_info, tmp_path):
    """A fetch whose bytes do not hash to their digest is ABSENT again; a load the runner
    refuses (InvalidAdapter) leaves the adapter on the host; neither leaves a transition or a
    host reference behind."""
    pa, pb = _packs(tiny_model_dir, base_info, tmp_path, 2)
    a, b = pa.digest, pb.digest
    dev = _RecordingDevice(AdapterPool(base_info.linear_shapes, max_adapters=2), refuse={b})
    res = _residency(dev, PackedBytesSource({a: pb.data, b: pb.data}), base_info)
    with pytest.raises(DigestMismatch):
        res.ensure(a)
    assert res.state(a) is AdapterState.ABSENT and res.states() == {}
    with pytest.raises(InvalidAdapter, match="cannot take it"):
        res.ensure(b)
    assert res.states() == {b: AdapterState.HOST} and dev.calls == [("load", b)]
    assert res._transit == {} and res.host._busy == {} and res.refs(b) == 0
