"""The executor's tiers of the adapter memory hierarchy, all keyed by digest:

    node cache (sidecar LMDB, via an AdapterSource) -> host -> device

- host (HostTier): packed adapters fetched, verified against their digest and this executor
  (base-model fingerprint, modules, ranks) and unpacked, as zero-copy views of one buffer per
  adapter (page-locked on CUDA, so the host-to-device copy is a DMA); bounded in bytes, the
  least recently used idle entry is dropped first;
- device (AdapterResidency over the kernels' AdapterPool): bounded in bytes and slots; every
  user of a resident adapter holds a reference (acquire/release) and an adapter is evicted only
  when nothing references it (no running or admitted sequence, no Forward call), least recently
  used first;
- AdapterLoader: background worker threads that move a digest node cache -> host -> device (on
  CUDA on their own stream) while the step loop keeps running, inside the OpenTelemetry context
  of the request that asked for it, and report the result (slot or the domain error) back.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import grpc
import torch

from mintmesh.errors import (
    BaseModelMismatch,
    DigestMismatch,
    InvalidAdapter,
    MintError,
    ResourceExhausted,
)
from mintmesh.kernels import AdapterPool
from mintmesh.packed import ModuleWeights, PackedHeader, unpack
from mintmesh.services.executor.sources import AdapterSource, NoSource, check_digest

logger = logging.getLogger(__name__)

# Longest a load waits for room in a device pool full of referenced adapters, when the request
# has no deadline of its own.
DEFAULT_ROOM_WAIT_S = 300.0


@dataclass(frozen=True)
class PreparedAdapter:
    """A checked adapter on the host, ready for AdapterPool.load."""

    digest: str
    header: PackedHeader
    modules: dict[str, ModuleWeights]
    nbytes: int


class HostTier:
    """digest -> PreparedAdapter, bounded in bytes, least recently used idle entry dropped first
    (an entry is busy while a loader copies it to the device)."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"host tier max_bytes {max_bytes} must be >= 0")
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[str, PreparedAdapter] = OrderedDict()
        self._busy: dict[str, int] = {}
        self._lock = threading.Lock()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __contains__(self, digest: object) -> bool:
        return digest in self._items

    def __len__(self) -> int:
        return len(self._items)

    def digests(self) -> list[str]:
        with self._lock:
            return list(self._items)

    def get(self, digest: str) -> PreparedAdapter | None:
        with self._lock:
            p = self._items.get(digest)
            if p is None:
                self.misses += 1
                return None
            self._items.move_to_end(digest)
            self.hits += 1
            return p

    def put(self, prepared: PreparedAdapter) -> bool:
        """Keep prepared (dropping idle LRU entries to fit); False when it cannot fit at all."""
        with self._lock:
            if prepared.digest in self._items:
                self._items.move_to_end(prepared.digest)
                return True
            if prepared.nbytes > self.max_bytes:
                return False
            for d in list(self._items):
                if self.nbytes + prepared.nbytes <= self.max_bytes:
                    break
                if self._busy.get(d):
                    continue
                self.nbytes -= self._items.pop(d).nbytes
                self.evictions += 1
            if self.nbytes + prepared.nbytes > self.max_bytes:
                return False
            self._items[prepared.digest] = prepared
            self.nbytes += prepared.nbytes
            return True

    def discard(self, digest: str) -> bool:
        """Drop digest from the host tier (a deleted adapter); False when it was not there."""
        with self._lock:
            p = self._items.pop(digest, None)
            if p is None:
                return False
            self.nbytes -= p.nbytes
            return True

    def hold(self, digest: str) -> None:
        with self._lock:
            self._busy[digest] = self._busy.get(digest, 0) + 1

    def unhold(self, digest: str) -> None:
        with self._lock:
            n = self._busy.get(digest, 0) - 1
            if n > 0:
                self._busy[digest] = n
            else:
                self._busy.pop(digest, None)


class AdapterResidency:
    """Host tier + device pool with references. Thread-safe: the step loop, the loader workers
    and Forward calls all use it."""

    def __init__(
        self,
        pool: AdapterPool,
        source: AdapterSource | None,
        *,
        layer_shapes: Mapping[str, tuple[int, int]],
        base_fingerprint: str,
        max_rank: int,
        fetch_timeout_s: float = 30.0,
        host_bytes: int = 512 << 20,
    ) -> None:
        self.pool = pool
        self.layer_shapes = dict(layer_shapes)
        self.source: AdapterSource = source if source is not None else NoSource()
        self.base_fingerprint = base_fingerprint
        self.max_rank = int(max_rank)
        self.fetch_timeout_s = float(fetch_timeout_s)
        self.host = HostTier(host_bytes)
        self._pin_host = pool.device.type == "cuda"
        self._stream = torch.cuda.Stream(pool.device) if pool.device.type == "cuda" else None
        self._cv = threading.Condition()
        self._refs: dict[str, int] = {}
        # Resident digests, least recently used first.
        self._lru: OrderedDict[str, None] = OrderedDict()
        self._fetch_locks: dict[str, threading.Lock] = {}
        self._fetch_locks_lock = threading.Lock()
        self.loads = 0
        self.evictions = 0
        self.fetches = 0
        self._closed = False

    def close(self) -> None:
        """Loads waiting for room give up (the engine is stopping)."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    # -- host side ------------------------------------------------------------------------

    def check(self, digest: str, data: bytes | bytearray | memoryview) -> PreparedAdapter:
        """Verify bytes against their digest and this executor; unpack them (host tier layout:
        one buffer per adapter, page-locked on CUDA)."""
        got = hashlib.sha256(data).hexdigest()
        if got != digest:
            raise DigestMismatch(f"adapter bytes for digest {digest} hash to {got}")
        buf = data
        if self._pin_host:
            pinned = torch.empty(len(data), dtype=torch.uint8).pin_memory()
            pinned.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
            buf = memoryview(pinned.numpy())
        elif not isinstance(data, bytearray):
            buf = bytearray(data)
        header, modules = unpack(buf)
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
        """The checked adapter on the host: from the host tier, else fetched from the source
        (node cache) at most once at a time per digest."""
        check_digest(digest)
        hit = self.host.get(digest)
        if hit is not None:
            return hit
        with self._fetch_locks_lock:
            flock = self._fetch_locks.setdefault(digest, threading.Lock())
        try:
            with flock:
                hit = self.host.get(digest)
                if hit is not None:
                    return hit
                t = self.fetch_timeout_s if timeout is None else min(timeout, self.fetch_timeout_s)
                try:
                    data = self.source.fetch(digest, timeout=max(0.001, t))
                except grpc.RpcError as e:  # a source that lets gRPC errors through
                    from mintmesh.services.common.errors import reraise_downstream

                    raise reraise_downstream(e, f"fetching adapter {digest[:12]}…") from e
                self.fetches += 1
                prepared = self.check(digest, data)
                self.host.put(prepared)
                return prepared
        finally:
            with self._fetch_locks_lock:
                if self._fetch_locks.get(digest) is flock:
                    del self._fetch_locks[digest]

    # -- device side ------------------------------------------------------------------------

    def __contains__(self, digest: object) -> bool:
        return digest in self.pool

    def resident(self) -> list[str]:
        with self._cv:
            return list(self.pool.resident())

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

    def load(self, prepared: PreparedAdapter, *, timeout: float | None = None) -> int:
        """Make prepared resident and take a reference on it; return its slot. Evicts least
        recently used adapters that nothing references; waits (up to timeout) while every
        resident adapter is referenced; ResourceExhausted after that."""
        digest = prepared.digest
        wait = DEFAULT_ROOM_WAIT_S if timeout is None else max(0.0, timeout)
        end = time.monotonic() + wait
        self.host.hold(digest)
        try:
            with self._cv:
                while True:
                    slot = self.pool.slot(digest)
                    if slot is not None:
                        break
                    try:
                        slot = self._pool_load(prepared)
                        break
                    except ResourceExhausted as e:
                        if self._evict_idle():
                            continue
                        left = end - time.monotonic()
                        if left <= 0 or len(self.pool) == 0 or self._closed:
                            raise ResourceExhausted(
                                f"adapter {digest[:12]}… cannot be loaded: {e.message}; all "
                                f"{len(self.pool)} resident adapters are in use"
                            ) from None
                        self._cv.wait(min(left, 0.5))
                self._refs[digest] = self._refs.get(digest, 0) + 1
                self._lru[digest] = None
                self._lru.move_to_end(digest)
                return slot
        finally:
            self.host.unhold(digest)

    def ensure(self, digest: str, timeout: float | None = None) -> int:
        """prepare + load, in the calling thread: a reference on digest's slot."""
        slot = self.acquire(digest)
        if slot is not None:
            return slot
        end = None if timeout is None else time.monotonic() + timeout
        prepared = self.prepare(digest, timeout=timeout)
        left = None if end is None else end - time.monotonic()
        return self.load(prepared, timeout=left)

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
        with self._cv:
            while self._refs.get(digest) and time.monotonic() < end:
                self._cv.wait(min(0.2, max(0.0, end - time.monotonic())))
            if self._refs.get(digest):
                return True, True
            on_device = self._evict(digest)
        on_host = self.host.discard(digest)
        return on_device or on_host, False

    def _evict(self, digest: str) -> bool:
        self._lru.pop(digest, None)
        if self.pool.evict(digest):
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
        try:
            if self._stream is not None:
                with torch.cuda.stream(self._stream):
                    slot = self.pool.load(prepared.digest, prepared.modules)
                self._stream.synchronize()
            else:
                slot = self.pool.load(prepared.digest, prepared.modules)
        except ValueError as e:
            raise InvalidAdapter(f"adapter {prepared.digest[:12]}…: {e}") from e
        self.loads += 1
        logger.info(
            "loaded adapter %s (rank %d, %d modules) into slot %d",
            prepared.digest[:12],
            prepared.header.max_rank,
            len(prepared.modules),
            slot,
        )
        return slot

    def node_cache_digests(self) -> list[str]:
        fn = getattr(self.source, "node_cache_digests", None)
        return list(fn()) if callable(fn) else []


# Called by a loader worker when a digest landed (error None; the adapter then holds one
# reference the callee must release) or failed (the domain error to give its requests).
LoadCallback = Callable[[str, BaseException | None], None]


@dataclass
class _Job:
    digest: str
    otel_context: object
    deadline: float | None


class AdapterLoader:
    """Background workers moving digests node cache -> host -> device."""

    def __init__(
        self, residency: AdapterResidency, on_done: LoadCallback, *, threads: int = 2
    ) -> None:
        self.residency = residency
        self.on_done = on_done
        self._q: queue.Queue[_Job | None] = queue.Queue()
        self._pending: set[str] = set()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, name=f"adapter-loader-{i}", daemon=True)
            for i in range(max(1, threads))
        ]
        self.busy = 0
        for t in self._threads:
            t.start()

    def pending(self) -> list[str]:
        with self._lock:
            return sorted(self._pending)

    def request(
        self, digest: str, *, otel_context: object = None, deadline: float | None = None
    ) -> bool:
        """Queue a load of digest; False when one is already queued or running."""
        with self._lock:
            if digest in self._pending:
                return False
            self._pending.add(digest)
        self._q.put(_Job(digest, otel_context, deadline))
        return True

    def close(self, timeout: float = 5.0) -> None:
        for _ in self._threads:
            self._q.put(None)
        for t in self._threads:
            t.join(timeout)

    def _run(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                return
            with self._lock:
                self.busy += 1
            try:
                self._load(job)
            finally:
                with self._lock:
                    self.busy -= 1

    def _load(self, job: _Job) -> None:
        from opentelemetry import context as otel_context
        from opentelemetry import trace

        token = otel_context.attach(job.otel_context) if job.otel_context is not None else None
        err: BaseException | None = None
        try:
            tracer = trace.get_tracer(__name__)
            with tracer.start_as_current_span("executor.load_adapter") as span:
                span.set_attribute("mint.adapter.digest", job.digest)
                t = None if job.deadline is None else job.deadline - time.monotonic()
                if t is not None and t <= 0:
                    raise ResourceExhausted(
                        f"adapter {job.digest[:12]}… was not loaded before the request's deadline"
                    )
                prepared = self.residency.prepare(job.digest, timeout=t)
                t = None if job.deadline is None else job.deadline - time.monotonic()
                self.residency.load(prepared, timeout=t)
        except MintError as e:
            err = e
        except Exception as e:  # a bug: INTERNAL for the requests that wait on it
            logger.exception("loading adapter %s failed", job.digest[:12])
            err = MintError(f"loading adapter {job.digest[:12]}… failed: {e!r}")
        finally:
            if token is not None:
                otel_context.detach(token)
            with self._lock:
                self._pending.discard(job.digest)
        try:
            self.on_done(job.digest, err)
        except Exception:
            logger.exception("load callback for %s failed", job.digest[:12])
            if err is None:
                self.residency.release(job.digest)
