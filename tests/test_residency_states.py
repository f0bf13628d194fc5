"""AdapterResidency.state(digest): one adapter walked through every state of its residency
(absent, fetching, host, loading, device, draining) with a real source and a real pool."""

from __future__ import annotations

import threading
import time

from peft_util import make_peft_adapter

from mintmesh.kernels import AdapterPool
from mintmesh.peft_io import read_peft_dir, validate_and_pack
from mintmesh.services.executor.residency import AdapterResidency, AdapterState
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
        pool, src, layer_shapes=shapes, base_fingerprint=base_info.fingerprint, max_rank=64
    )
    assert res.state(a) is AdapterState.ABSENT

    # Fetching (the source is still delivering), then on the host.
    got = {}
    t = threading.Thread(target=lambda: got.update(p=res.prepare(a)))
    t.start()
    assert src.entered.wait(10)
    assert res.state(a) is AdapterState.FETCHING
    src.gate.set()
    t.join(10)
    assert res.state(a) is AdapterState.HOST and a in res.host

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
    assert a in pool  # still serving its reference
    res.release(a)
    t.join(10)
    assert done["r"] == (True, False)
    assert res.state(a) is AdapterState.ABSENT and a not in pool and a not in res.host
