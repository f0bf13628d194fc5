"""The executor's tiers of the adapter memory hierarchy, all keyed by digest:

    node cache (sidecar LMDB, via an AdapterSource) -> host -> device

- host (HostTier): packed adapters fetched, verified against their digest and this executor
  (base-model fingerprint, modules, ranks) and unpacked, as zero-copy views of their region of
  one preallocated staging arena (HostArena: page-locked on CUDA, so the host-to-device copy
  is a DMA; touched once at start on the CPU, so a load never page-faults fresh memory, which
  cost ~4 ms per 4 MiB adapter); the source copies the bytes straight into the region; bounded
  in bytes by the arena, the least recently used idle entry is dropped first;
- device (AdapterResidency over the model runner's AdapterPool, loading and evicting through
  the runner's load_adapter/evict_adapter, runner.AdapterDevice): bounded in bytes and slots;
  every user of a resident adapter holds a reference (acquire/release) and an adapter is evicted
  only when nothing references it (no running or admitted sequence, no Forward call), least
  recently used first;
- one vocabulary for references in every tier: acquire takes one, release drops it (the host
  tier's entries, HostTier.acquire/release; the device pool's adapters,
  AdapterResidency.acquire/release; KV blocks, kv.BlockAllocator.acquire/release and
  kv_manager.KVManager.acquire_blocks/release_blocks); nothing referenced is dropped;
- AdapterState: where a digest is now, AdapterResidency.state(digest) (and states(), every
  digest not ABSENT, which Status and the metrics report): ABSENT (in no tier of this
  executor), FETCHING (coming from the source into the host tier), HOST (on the host tier),
  LOADING (being copied into the device pool, or waiting for room there), DEVICE (resident in
  the pool), DRAINING (deleted: waiting for its last reference to go, then dropped from every
  tier). The transitions (FETCHING, LOADING, DRAINING) are tracked per digest as they run; the
  pool and the host tier say the rest;
- AdapterLoader: background worker threads that move a digest node cache -> host -> device (on
  CUDA on their own stream) while the step loop keeps running, inside the OpenTelemetry context
  of the request that asked for it, and report the result (slot or the domain error) back.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

import torch

from mintmesh.errors import (
    BaseModelMismatch,
    DigestMismatch,
    InvalidAdapter,
    MintError,
    ResourceExhausted,
)
from mintmesh.identity import check_digest
from mintmesh.packed import ModuleWeights, PackedHeader, unpack
from mintmesh.services.executor.passing import on_a_passing_thread
from mintmesh.services.executor.runner import AdapterDevice
from mintmesh.services.executor.sources import AdapterSource, NoSource

logger = logging.getLogger(__name__)

# Longest a load waits for room in a device pool full of referenced adapters, when the request
# has no deadline of its own.
DEFAULT_ROOM_WAIT_S = 300.0


class AdapterState(Enum):
    """Where one digest is in this executor's tiers (AdapterResidency.state)."""

    ABSENT = "absent"
    FETCHING = "fetching"
    HOST = "host"
    LOADING = "loading"
    DEVICE = "device"
    DRAINING = "draining"


@dataclass(frozen=True)
class PreparedAdapter:
    """A checked adapter on the host, ready for AdapterPool.load."""

    digest: str
    header: PackedHeader
    modules: dict[str, ModuleWeights]
    nbytes: int


class HostArena:
    """One preallocated byte buffer carved into adapter-sized regions: first fit from the lowest
    offset (so the same warm memory is reused), 64-byte aligned, frees coalesce. Not
    thread-safe: HostTier locks around it."""

    ALIGN = 64

    def __init__(self, nbytes: int, *, pin: bool = False, prefault: bool = True) -> None:
        self.nbytes = int(nbytes)
        if pin and self.nbytes:
            t = torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=True)
        else:
            t = torch.empty(self.nbytes, dtype=torch.uint8)
            if prefault:
                t.zero_()  # fault every page in now, not during a load
        self._t = t
        self._mv = memoryview(t.numpy()) if self.nbytes else memoryview(bytearray())
        self._free: list[tuple[int, int]] = [(0, self.nbytes)] if self.nbytes else []

    @classmethod
    def span(cls, n: int) -> int:
        return (int(n) + cls.ALIGN - 1) // cls.ALIGN * cls.ALIGN

    def alloc(self, n: int) -> int | None:
        """Offset of a free region of n bytes, or None when no free run is large enough."""
        need = self.span(n)
        for i, (start, end) in enumerate(self._free):
            if end - start >= need:
                if end - start == need:
                    del self._free[i]
                else:
                    self._free[i] = (start + need, end)
                return start
        return None

    def free(self, offset: int, n: int) -> None:
        start, end = offset, offset + self.span(n)
        runs = self._free
        i = 0
        while i < len(runs) and runs[i][0] < start:
            i += 1
        if (i > 0 and runs[i - 1][1] > start) or (i < len(runs) and runs[i][0] < end):
            raise RuntimeError(f"host arena: region [{start}, {end}) freed twice")
        if i > 0 and runs[i - 1][1] == start:
            i -= 1
            start = runs[i][0]
            del runs[i]
        if i < len(runs) and runs[i][0] == end:
            end = runs[i][1]
            del runs[i]
        runs.insert(i, (start, end))

    def view(self, offset: int, n: int) -> memoryview:
        return self._mv[offset : offset + n]

    @property
    def free_bytes(self) -> int:
        return sum(e - s for s, e in self._free)


class HostTier:
    """digest -> PreparedAdapter whose bytes live in a region of the HostArena, bounded by the
    arena's bytes; the least recently used idle entry is dropped first to make room (an entry is
    busy while referenced, acquire/release: between prepare() and the end of its device
    load)."""

    def __init__(self, max_bytes: int, *, pin: bool = False, prefault: bool = True) -> None:
        if max_bytes < 0:
            raise ValueError(f"host tier max_bytes {max_bytes} must be >= 0")
        self.max_bytes = int(max_bytes)
        self.arena = HostArena(self.max_bytes, pin=pin, prefault=prefault)
        self._items: OrderedDict[str, PreparedAdapter] = OrderedDict()
        self._regions: dict[str, tuple[int, int]] = {}
        self._busy: dict[str, int] = {}
        # Regions of entries dropped while referenced: freed when the last reference goes.
        self._doomed: dict[str, list[tuple[int, int]]] = {}
        self._lock = threading.Lock()
        self.nbytes = 0  # bytes of the arena in use (entries and regions being filled)
        self.evictions = 0

    def __contains__(self, digest: object) -> bool:
        return digest in self._items

    def __len__(self) -> int:
        return len(self._items)

    def digests(self) -> list[str]:
        with self._lock:
            return list(self._items)

    def get(self, digest: str, *, acquire: bool = False) -> PreparedAdapter | None:
        """The entry of digest (taking a reference on it when acquire=True), None when
        absent."""
        with self._lock:
            p = self._items.get(digest)
            if p is None:
                return None
            self._items.move_to_end(digest)
            if acquire:
                self._busy[digest] = self._busy.get(digest, 0) + 1
            return p

    def reserve(self, nbytes: int) -> tuple[int, memoryview] | None:
        """A region of nbytes to fill (offset, writable view), dropping idle entries, least
        recently used first, until one fits; None when it cannot fit at all."""
        if HostArena.span(nbytes) > self.arena.nbytes:
            return None  # larger than the whole tier: evicting would not help
        with self._lock:
            while True:
                off = self.arena.alloc(nbytes)
                if off is not None:
                    self.nbytes += HostArena.span(nbytes)
                    return off, self.arena.view(off, nbytes)
                victim = next((d for d in self._items if not self._busy.get(d)), None)
                if victim is None:
                    return None
                self._drop(victim)
                self.evictions += 1

    def unreserve(self, offset: int, nbytes: int) -> None:
        """Give back a reserved region that will not become an entry (its fetch failed)."""
        with self._lock:
            self.arena.free(offset, nbytes)
            self.nbytes -= HostArena.span(nbytes)

    def commit(
        self, prepared: PreparedAdapter, offset: int, *, acquire: bool = False
    ) -> PreparedAdapter:
        """Make a filled region (from reserve) the entry of prepared.digest and return the entry
        to use: when another fetch of the digest committed first, that one (this region is
        freed at once, so nothing may keep using `prepared`)."""
        with self._lock:
            d = prepared.digest
            entry = self._items.get(d)
            if entry is not None:
                self.arena.free(offset, prepared.nbytes)
                self.nbytes -= HostArena.span(prepared.nbytes)
                self._items.move_to_end(d)
            else:
                entry = prepared
                self._items[d] = prepared
                self._regions[d] = (offset, prepared.nbytes)
            if acquire:
                self._busy[d] = self._busy.get(d, 0) + 1
            return entry

    def discard(self, digest: str) -> bool:
        """Drop digest from the host tier (a deleted adapter); False when it was not there. A
        referenced entry's region is freed when its last reference is released."""
        with self._lock:
            if digest not in self._items:
                return False
            self._drop(digest)
            return True

    def _drop(self, digest: str) -> None:
        self._items.pop(digest)
        region = self._regions.pop(digest)
        if self._busy.get(digest):
            self._doomed.setdefault(digest, []).append(region)
        else:
            self.arena.free(*region)
            self.nbytes -= HostArena.span(region[1])

    def acquire(self, digest: str) -> None:
        """A reference on digest's entry (or on the digest alone: a prepared adapter not kept on
        the host), so the entry is not dropped to make room until release()."""
        with self._lock:
            self._busy[digest] = self._busy.get(digest, 0) + 1

    def release(self, digest: str) -> None:
        with self._lock:
            n = self._busy.get(digest, 0) - 1
            if n > 0:
                self._busy[digest] = n
                return
            self._busy.pop(digest, None)
            for region in self._doomed.pop(digest, ()):
                self.arena.free(*region)
                self.nbytes -= HostArena.span(region[1])


class AdapterResidency:
    """Host tier + device pool with references. Thread-safe: the step loop, the loader workers
    and Forward calls all use it. Adapters go into and out of the pool through `runner` (the
    engine's ModelRunner, or a bare AdapterDevice)."""

    def __init__(
        self,
        runner: AdapterDevice,
        source: AdapterSource | None,
        *,
        layer_shapes: Mapping[str, tuple[int, int]],
        base_fingerprint: str,
        max_rank: int,
        fetch_timeout_s: float = 30.0,
        host_bytes: int = 512 << 20,
        host_prefault: bool = True,
    ) -> None:
        self.runner = runner
        self.pool = pool = runner.pool
        self.layer_shapes = dict(layer_shapes)
        self.source: AdapterSource = source if source is not None else NoSource()
        self.base_fingerprint = base_fingerprint
        self.max_rank = int(max_rank)
        self.fetch_timeout_s = float(fetch_timeout_s)
        self._pin_host = pool.device.type == "cuda"
        self.host = HostTier(host_bytes, pin=self._pin_host, prefault=host_prefault)
        self._stream = torch.cuda.Stream(pool.device) if pool.device.type == "cuda" else None
        self._cv = threading.Condition()
        self._refs: dict[str, int] = {}
        # Resident digests, least recently used first.
        self._lru: OrderedDict[str, None] = OrderedDict()
        # digest -> [lock, users]: one fetch at a time per digest; dropped with its last user.
        self._fetch_locks: dict[str, list] = {}
        self._fetch_locks_lock = threading.Lock()
        self.loads = 0
        self.evictions = 0
        self.fetches = 0
        # Called with (tier, seconds) after each fetch into the host tier ("host": node cache
        # read or sidecar fetch, checked and unpacked) and each copy into the device pool
        # ("device"), in the thread that did it (the executor's metrics).
        self.on_load: Callable[[str, float], None] | None = None
        self._closed = False
        # Digests in a transition: digest -> {FETCHING/LOADING/DRAINING: threads doing it}.
        self._state_lock = threading.Lock()
        self._transit: dict[str, dict[AdapterState, int]] = {}

    @classmethod
    def of(
        cls, runner: AdapterDevice, source: AdapterSource | None, config, base_fingerprint: str
    ) -> AdapterResidency:
        """The residency an executor's ExecutorConfig asks for, over runner's pool."""
        return cls(
            runner,
            source,
            layer_shapes=runner.pool.layer_shapes,
            base_fingerprint=base_fingerprint,
            max_rank=int(config.max_rank),
            fetch_timeout_s=float(config.fetch_timeout_s),
            host_bytes=int(config.host_cache_bytes),
            host_prefault=bool(config.host_prefault),
        )

    def state(self, digest: str) -> AdapterState:
        """Where digest is now (a snapshot: it may move on at once). A digest in several at
        once (a Forward call loading what a loader thread fetches again after an eviction)
        is in the first of DRAINING, DEVICE, LOADING, FETCHING, HOST."""
        with self._state_lock:
            transit = set(self._transit.get(digest, ()))
        if AdapterState.DRAINING in transit:
            return AdapterState.DRAINING
        if digest in self.pool:
            return AdapterState.DEVICE
        for st in (AdapterState.LOADING, AdapterState.FETCHING):
            if st in transit:
                return st
        if digest in self.host:
            return AdapterState.HOST
        return AdapterState.ABSENT

    def states(self) -> dict[str, AdapterState]:
        """The state of every digest in some tier or transition (none is ABSENT)."""
        with self._state_lock:
            known = set(self._transit)
        known.update(self.pool.resident(), self.host.digests())
        out = {d: self.state(d) for d in sorted(known)}
        return {d: st for d, st in out.items() if st is not AdapterState.ABSENT}

    @contextlib.contextmanager
    def _transition(self, digest: str, state: AdapterState) -> Iterator[None]:
        """digest is in `state` (FETCHING, LOADING, DRAINING) while the block runs."""
        with self._state_lock:
            marks = self._transit.setdefault(digest, {})
            marks[state] = marks.get(state, 0) + 1
        try:
            yield
        finally:
            with self._state_lock:
                marks = self._transit[digest]
                marks[state] -= 1
                if not marks[state]:
                    del marks[state]
                if not marks:
                    del self._transit[digest]

    def close(self) -> None:
        """Loads waiting for room give up (the engine is stopping)."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    # -- host side ------------------------------------------------------------------------

    def check(
        self, digest: str, data: bytes | bytearray | memoryview, *, verified: bool = False
    ) -> PreparedAdapter:
        """Verify bytes against their digest (unless the source already did: verified=True) and
        against this executor; unpack them (host tier layout: one buffer per adapter,
        page-locked on CUDA)."""
        if not verified:
            got = hashlib.sha256(data).hexdigest()
            if got != digest:
                raise DigestMismatch(f"adapter bytes for digest {digest} hash to {got}")
        header, modules = unpack(data)  # views of data (a copy first if it is read-only)
        if header.base_fingerprint != self.base_fingerprint:
            raise BaseModelMismatch(
                f"adapter {digest[:12]}… was made for base model "
                f"{header.base_fingerprint[:12]}…, this executor serves "
                f"{self.base_fingerprint[:12]}…",
                metadata={"adapter_base": header.base_fingerprint, "base": self.base_fingerprint},
            )
        shapes = self.layer_shapes
        for m in header.modules:
            if m.name not in shapes:
                raise InvalidAdapter(
                    f"adapter {digest[:12]}… targets module {m.name}, which is not a LoRA layer "
                    f"of this executor (layers end in "
                    f"{sorted({n.rsplit('.', 1)[-1] for n in shapes})})"
                )
            if (m.out_features, m.in_features) != tuple(shapes[m.name]):
                raise InvalidAdapter(
                    f"adapter {digest[:12]}… module {m.name} is {m.out_features}x"
                    f"{m.in_features}, the layer is {shapes[m.name][0]}x{shapes[m.name][1]}"
                )
            if m.rank > self.max_rank:
                raise InvalidAdapter(
                    f"adapter {digest[:12]}… module {m.name} has rank {m.rank}, above "
                    f"max_rank {self.max_rank} of this executor"
                )
        return PreparedAdapter(digest=digest, header=header, modules=modules, nbytes=len(data))

    def prepare(self, digest: str, timeout: float | None = None) -> PreparedAdapter:
        """The checked adapter on the host, referenced (its host entry is not dropped) until
        load() or release_prepared(): from the host tier, else fetched from the source (node
        cache) straight into a host-arena region, at most once at a time per digest. When the
        arena has no room (every entry busy, or the adapter larger than the tier) it goes
        through a private buffer and is not kept."""
        check_digest(digest)
        hit = self.host.get(digest, acquire=True)
        if hit is not None:
            return hit
        with self._fetch_locks_lock:
            entry = self._fetch_locks.setdefault(digest, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                hit = self.host.get(digest, acquire=True)
                if hit is not None:
                    return hit
                with self._transition(digest, AdapterState.FETCHING):
                    return self._fetch(digest, timeout)
        finally:
            with self._fetch_locks_lock:
                entry[1] -= 1
                if entry[1] == 0:
                    del self._fetch_locks[digest]

    def _fetch(self, digest: str, timeout: float | None) -> PreparedAdapter:
        t0 = time.monotonic()
        reserved: list[tuple[int, int]] = []

        def into(n: int) -> memoryview:
            region = self.host.reserve(n)
            if region is None:
                return memoryview(bytearray(n))
            reserved.append((region[0], n))
            return region[1]

        t = self.fetch_timeout_s if timeout is None else min(timeout, self.fetch_timeout_s)
        try:
            # A source raises the domain's errors (grpc_source.py maps gRPC's).
            data = self.source.fetch(digest, timeout=max(0.001, t), into=into)
            self.fetches += 1
            verified = bool(self.source.verified)
            prepared = self.check(digest, data, verified=verified)
        except BaseException:
            for off, n in reserved:
                self.host.unreserve(off, n)
            raise
        self._loaded("host", t0)
        if reserved and not prepared.header.quantized:
            return self.host.commit(prepared, reserved[0][0], acquire=True)
        # Not kept on the host: no room in the arena (a private buffer), or an int8 pack (its
        # weights were dequantized into fresh tensors; the region of its bytes is dead). The
        # reference keeps the host references balanced with load()'s release.
        for off, n in reserved:
            self.host.unreserve(off, n)
        self.host.acquire(digest)
        return prepared

    def offer_layout(self, layout, check: Callable[[memoryview], None]) -> tuple[str, bool]:
        """A pack this process plans (packed.PackLayout: a training run's save) written straight
        into a host-tier region and hashed there, no intermediate bytes; check(buf) vets what
        was written (non-finite weights) before it is kept. Returns (digest, kept on the host);
        without room it is written to a private buffer just to know its digest."""
        region = self.host.reserve(layout.size)
        if region is None:
            buf = bytearray(layout.size)
            layout.write_into(buf)
            check(memoryview(buf))
            return hashlib.sha256(buf).hexdigest(), False
        off, view = region
        try:
            layout.write_into(view)
            check(view)
            digest = hashlib.sha256(view).hexdigest()
            if digest in self.host:
                self.host.unreserve(off, layout.size)
                return digest, True
            prepared = self.check(digest, view, verified=True)
        except BaseException:
            self.host.unreserve(off, layout.size)
            raise
        self.host.commit(prepared, off)
        return digest, True

    def release_prepared(self, prepared: PreparedAdapter) -> None:
        """Release a prepared adapter's host reference without loading it."""
        self.host.release(prepared.digest)

    def install_layout(self, layout, check: Callable[[memoryview], None]) -> tuple[str, bool]:
        """A pack this executor plans itself (packed.PackLayout: a training run's save) made
        ready to serve at once: written straight into the host tier (offer_layout; check(buf)
        vets it), then loaded into free device room (no other adapter is evicted for it;
        without room it waits on the host). (its digest, resident)."""
        digest, kept = self.offer_layout(layout, check)
        if digest in self.pool:
            return digest, True
        return digest, kept and self.load_free(digest)

    def load_free(self, digest: str) -> bool:
        """digest (on the host tier) into free device room, no eviction; True when resident."""
        prepared = self.prepare(digest)
        try:
            self.load(prepared, timeout=0.0, evict=False)
        except ResourceExhausted:
            return False
        self.release(digest)
        return True

    # -- device side ------------------------------------------------------------------------

    def __contains__(self, digest: object) -> bool:
        return digest in self.pool

    def resident(self) -> list[str]:
        with self._cv:
            return list(self.pool.resident())

    def slot(self, digest: str) -> int | None:
        """digest's slot in the device pool, None when it is not resident (no reference
        taken: the caller holds one)."""
        return self.pool.slot(digest)

    def refs(self, digest: str) -> int:
        with self._cv:
            return self._refs.get(digest, 0)

    def acquire(self, digest: str) -> int | None:
        """A reference on a resident adapter (its slot), None when it is not resident."""
        with self._cv:
            slot = self.pool.slot(digest)
            if slot is None:
                return None
            self._refs[digest] = self._refs.get(digest, 0) + 1
            self._lru[digest] = None
            self._lru.move_to_end(digest)
            return slot

    def release(self, digest: str) -> None:
        with self._cv:
            n = self._refs.get(digest, 0) - 1
            if n < 0:
                raise RuntimeError(f"adapter {digest[:12]}… released more often than acquired")
            if n:
                self._refs[digest] = n
            else:
                del self._refs[digest]
                self._cv.notify_all()

    def load(
        self, prepared: PreparedAdapter, *, timeout: float | None = None, evict: bool = True
    ) -> int:
        """Make prepared (held by prepare()) resident and take a reference on it; return its
        slot. Evicts least recently used adapters that nothing references (unless evict=False:
        free room only); waits (up to timeout) while every resident adapter is referenced;
        ResourceExhausted after that. Releases prepare()'s host reference in any case."""
        digest = prepared.digest
        wait = DEFAULT_ROOM_WAIT_S if timeout is None else max(0.0, timeout)
        end = time.monotonic() + wait
        try:
            with self._transition(digest, AdapterState.LOADING), self._cv:
                while True:
                    slot = self.pool.slot(digest)
                    if slot is not None:
                        break
                    try:
                        slot = self._pool_load(prepared)
                        break
                    except ResourceExhausted as e:
                        if evict and self._evict_idle():
                            continue
                        left = end - time.monotonic()
                        if left <= 0 or len(self.pool) == 0 or self._closed:
                            why = "all" if evict else "no free room (evict=False);"
                            raise ResourceExhausted(
                                f"adapter {digest[:12]}… cannot be loaded: {e.message}; {why} "
                                f"{len(self.pool)} resident adapters are in use"
                            ) from None
                        self._cv.wait(min(left, 0.5))
                self._refs[digest] = self._refs.get(digest, 0) + 1
                self._lru[digest] = None
                self._lru.move_to_end(digest)
                return slot
        finally:
            self.host.release(digest)

    def ensure(self, digest: str, timeout: float | None = None) -> int:
        """prepare + load, in the calling thread: a reference on digest's slot."""
        slot = self.acquire(digest)
        if slot is not None:
            return slot
        end = None if timeout is None else time.monotonic() + timeout
        prepared = self.prepare(digest, timeout=timeout)
        left = None if end is None else end - time.monotonic()
        return self.load(prepared, timeout=left)  # releases prepare's host reference

    @contextlib.contextmanager
    def acquired(
        self, digests: Sequence[str], timeout: float | None = None
    ) -> Iterator[dict[str, int]]:
        """References on every one of digests for the block ({digest: slot}), each loaded in
        this thread when it is not resident (ensure; all within timeout); released after."""
        end = None if timeout is None else time.monotonic() + timeout
        slots: dict[str, int] = {}
        try:
            for d in digests:
                left = None if end is None else max(0.001, end - time.monotonic())
                slots[d] = self.ensure(d, timeout=left)
            yield slots
        finally:
            for d in slots:
                self.release(d)

    def evict(self, digest: str) -> bool:
        """Drop digest from the device unless something references it."""
        with self._cv:
            if self._refs.get(digest):
                return False
            return self._evict(digest)

    def purge(self, digest: str, timeout: float = 30.0) -> tuple[bool, bool]:
        """A deleted adapter: wait (up to timeout) until no running request references it, then
        drop it from the device pool and the host tier. Returns (was present, still busy)."""
        end = time.monotonic() + timeout
        with self._transition(digest, AdapterState.DRAINING):
            with self._cv:
                while self._refs.get(digest) and time.monotonic() < end:
                    self._cv.wait(min(0.2, max(0.0, end - time.monotonic())))
                if self._refs.get(digest):
                    return True, True
                on_device = self._evict(digest)
            on_host = self.host.discard(digest)
            return on_device or on_host, False

    def delete(self, digest: str, timeout: float = 30.0) -> tuple[bool, bool]:
        """A deleted adapter out of every tier: purge() (device and host, once nothing
        references it), then the node cache (the source's evict) unless it is still busy.
        Returns (was present in any tier, still busy)."""
        present, busy = self.purge(digest, timeout)
        if busy:
            return present, True
        in_cache = bool(self.source.evict(digest))
        return present or in_cache, False

    def delete_all(
        self, digests: Sequence[str], timeout: float, forget: Callable[[str], None]
    ) -> tuple[list[str], list[str]]:
        """delete() each of digests (checked; each waits up to timeout for its references);
        forget(digest) after each one that is gone (the engine drops the prefixes computed
        with it), after the node-cache eviction, so a request that slipped in before it is
        forgotten too. Returns (purged: present and now gone, still busy)."""
        purged, busy = [], []
        for d in digests:
            check_digest(d)
            present, still = self.delete(d, timeout)
            if still:
                busy.append(d)
                continue
            forget(d)
            if present:
                purged.append(d)
        logger.info("purged %d adapters (%d busy)", len(purged), len(busy))
        return purged, busy

    def _evict(self, digest: str) -> bool:
        self._lru.pop(digest, None)
        if self.runner.evict_adapter(digest):
            self.evictions += 1
            logger.info("evicted adapter %s from the device", digest[:12])
            return True
        return False

    def _evict_idle(self) -> bool:
        for d in list(self._lru):
            if not self._refs.get(d):
                return self._evict(d)
        # Resident but never acquired (should not happen): evict it too.
        for d in self.pool.resident():
            if d not in self._lru and not self._refs.get(d):
                return self._evict(d)
        return False

    def _pool_load(self, prepared: PreparedAdapter) -> int:
        t0 = time.monotonic()
        try:
            if self._stream is not None:
                with torch.cuda.stream(self._stream):
                    slot = self.runner.load_adapter(prepared.digest, prepared.modules)
                self._stream.synchronize()
            else:
                slot = self.runner.load_adapter(prepared.digest, prepared.modules)
        except ValueError as e:
            raise InvalidAdapter(f"adapter {prepared.digest[:12]}…: {e}") from e
        self.loads += 1
        self._loaded("device", t0)
        logger.info(
            "loaded adapter %s (rank %d, %d modules) into slot %d",
            prepared.digest[:12],
            prepared.header.max_rank,
            len(prepared.modules),
            slot,
        )
        return slot

    def _loaded(self, tier: str, t0: float) -> None:
        if self.on_load is not None:
            self.on_load(tier, time.monotonic() - t0)

    def node_cache_digests(self) -> list[str]:
        return list(self.source.node_cache_digests())


# Called by a loader worker when a digest landed (error None; the adapter then holds one
# reference the callee must release) or failed (the domain error to give its requests).
LoadCallback = Callable[[str, BaseException | None], None]


@dataclass
class _Job:
    digest: str
    otel_context: object
    deadline: float | None
    hint: bool = False  # a prefetch hint: behind requested loads, never waits for room


class AdapterLoader:
    """Background workers moving digests node cache -> host -> device.

    Loads that requests wait for run on `threads` workers. Prefetch hints (at most max_hints
    pending) have a worker of their own, so a hint never holds up a requested load; a hint
    fetches with a short deadline (hint_timeout_s), fills free device room only (it never
    evicts: a burst of hints must not push warm adapters out; without room it stops at the host
    tier), and its failure is only logged: requests that later want the adapter get a load of
    their own. A hint overtaken by a request (or by close) is skipped when its turn comes."""

    def __init__(
        self,
        residency: AdapterResidency,
        on_done: LoadCallback,
        *,
        threads: int = 2,
        max_hints: int = 64,
        hint_timeout_s: float = 10.0,
    ) -> None:
        self.residency = residency
        self.on_done = on_done
        self.max_hints = int(max_hints)
        self.hint_timeout_s = float(hint_timeout_s)
        self._q: queue.Queue[_Job | None] = queue.Queue()
        self._hq: queue.Queue[_Job | None] = queue.Queue()
        # digest -> True while only a hint is pending for it, False once a request wants it.
        self._pending: dict[str, bool] = {}
        self._lock = threading.Lock()
        self._closing = False
        self._threads = [
            threading.Thread(target=self._run, args=(self._q,), name=f"adapter-loader-{i}",
                             daemon=True)
            for i in range(max(1, threads))
        ]  # fmt: skip
        self._threads.append(
            threading.Thread(target=self._run, args=(self._hq,), name="adapter-prefetch",
                             daemon=True)
        )  # fmt: skip
        self.hints_loaded = 0
        self.hints_failed = 0
        for t in self._threads:
            t.start()

    def pending(self) -> list[str]:
        with self._lock:
            return sorted(self._pending)

    def request(
        self, digest: str, *, otel_context: object = None, deadline: float | None = None
    ) -> bool:
        """Queue a load of digest that requests wait for; False when one is already queued or
        running (a pending hint is overtaken by a load of its own)."""
        with self._lock:
            if self._pending.get(digest) is False:
                return False
            self._pending[digest] = False
        self._q.put(_Job(digest, otel_context, deadline))
        return True

    def hint(self, digest: str) -> bool | None:
        """Queue a prefetch of digest: True when queued, False when a load of it is already
        pending, None when too many hints are pending (dropped)."""
        with self._lock:
            if digest in self._pending:
                return False
            if self._closing or sum(self._pending.values()) >= self.max_hints:
                return None
            self._pending[digest] = True
        self._hq.put(_Job(digest, None, time.monotonic() + self.hint_timeout_s, hint=True))
        return True

    def prefetch(self, digests: list[str]) -> tuple[list[str], list[str], list[str]]:
        """Prefetch hints for digests (checked, duplicates once): (already resident, queued or
        already loading, dropped: too many hints pending)."""
        wanted = list(dict.fromkeys(check_digest(d) for d in digests))
        resident, queued, dropped = [], [], []
        for d in wanted:
            if d in self.residency:
                resident.append(d)
            elif self.hint(d) is None:
                dropped.append(d)
            else:
                queued.append(d)
        if queued or dropped:
            logger.info("prefetch: %d queued, %d dropped", len(queued), len(dropped))
        return resident, queued, dropped

    def close(self, timeout: float = 5.0) -> None:
        with self._lock:
            self._closing = True  # queued hints are skipped from now on
        for _ in self._threads[:-1]:
            self._q.put(None)
        self._hq.put(None)
        for t in self._threads:
            t.join(timeout)

    def _run(self, q: queue.Queue) -> None:
        while True:
            job = q.get()
            if job is None:
                return
            if job.hint:
                with self._lock:
                    stale = self._closing or self._pending.get(job.digest) is not True
                if stale:
                    continue
            # Not on this long-lived thread: copying an adapter into the pool runs OpenMP
            # regions once its matrices are wide (rank 64 at hidden 1024 does), and their team
            # would stay beside the step thread's and throttle it from then on (passing.py).
            on_a_passing_thread(functools.partial(self._load, job), name="adapter-load")

    def _load(self, job: _Job) -> None:
        from opentelemetry import context as otel_context
        from opentelemetry import trace

        token = otel_context.attach(job.otel_context) if job.otel_context is not None else None
        err: BaseException | None = None
        try:
            tracer = trace.get_tracer(__name__)
            name = "executor.prefetch_adapter" if job.hint else "executor.load_adapter"
            with tracer.start_as_current_span(name) as span:
                span.set_attribute("mint.adapter.digest", job.digest)
                t = None if job.deadline is None else job.deadline - time.monotonic()
                if t is not None and t <= 0:
                    raise ResourceExhausted(
                        f"adapter {job.digest[:12]}… was not loaded before the request's deadline"
                    )  # (a hint's deadline is only its fetch's)
                prepared = self.residency.prepare(job.digest, timeout=t)
                if job.hint:  # free room only, no waiting for it
                    self.residency.load(prepared, timeout=0.0, evict=False)
                else:
                    t = None if job.deadline is None else job.deadline - time.monotonic()
                    self.residency.load(prepared, timeout=t)  # releases prepare's host reference
        except MintError as e:
            err = e
        except Exception as e:  # a bug: INTERNAL for the requests that wait on it
            logger.exception("loading adapter %s failed", job.digest[:12])
            err = MintError(f"loading adapter {job.digest[:12]}… failed: {e!r}")
        finally:
            if token is not None:
                otel_context.detach(token)
            with self._lock:
                if self._pending.get(job.digest) == job.hint:
                    del self._pending[job.digest]
        if job.hint:
            if err is not None:
                self.hints_failed += 1
                logger.info("prefetch of adapter %s failed: %s", job.digest[:12], err)
                return
            self.hints_loaded += 1
        try:
            self.on_done(job.digest, err)
        except Exception:
            logger.exception("load callback for %s failed", job.digest[:12])
            if err is None:
                self.residency.release(job.digest)
