"""Where adapters come from, by digest, and how they become resident in the device pool.

A source returns the packed bytes of a digest: `SidecarSource` asks the node's cache sidecar to
make the adapter present (EnsureAdapter, with a deadline) and then copies it out of the node
cache LMDB file (read-only, NodeCacheReader); `PackedBytesSource` is an in-process dict for
tests and embedding. `AdapterResidency` turns bytes into a checked adapter (digest, base-model
fingerprint, modules, ranks) and loads it into the AdapterPool, evicting the least recently used
adapter that no running batch needs when the pool is full.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc

from mintmesh.errors import (
    AdapterNotFound,
    BaseModelMismatch,
    DigestMismatch,
    FailedPrecondition,
    InvalidAdapter,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from mintmesh.kernels import AdapterPool
from mintmesh.packed import ModuleWeights, PackedHeader, unpack

logger = logging.getLogger(__name__)

_DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")


def check_digest(digest: str) -> str:
    if not _DIGEST_RE.match(digest or ""):
        raise InvalidArgument(
            f"adapter digest {digest!r} is not a sha256 hex digest (64 lowercase hex chars)"
        )
    return digest


class AdapterSource(Protocol):
    def fetch(self, digest: str, timeout: float | None = None) -> bytes | bytearray:
        """The packed bytes of digest; AdapterNotFound when no tier has it."""
        ...


class NoSource:
    """An executor started without a cache sidecar: it serves the base model only."""

    def fetch(self, digest: str, timeout: float | None = None) -> bytes:
        raise FailedPrecondition(
            f"adapter {digest[:12]}… cannot be loaded: this executor has no adapter source "
            "(start it with --cache HOST:PORT and --cache-dir DIR); it serves the base model only"
        )


class PackedBytesSource:
    """An in-process source: digest -> packed bytes."""

    def __init__(self, adapters: Mapping[str, bytes] | None = None) -> None:
        self._data: dict[str, bytes] = dict(adapters or {})
        self._lock = threading.Lock()
        self.fetches = 0

    def add(self, data: bytes, digest: str | None = None) -> str:
        digest = digest or hashlib.sha256(data).hexdigest()
        with self._lock:
            self._data[digest] = bytes(data)
        return digest

    def fetch(self, digest: str, timeout: float | None = None) -> bytes:
        with self._lock:
            self.fetches += 1
            data = self._data.get(digest)
        if data is None:
            raise AdapterNotFound(f"adapter digest {digest} is not known to this source")
        return data


class SidecarSource:
    """The production source: EnsureAdapter on the node's cache sidecar (which fetches from the
    store on a miss and commits to the node LMDB), then a read of that LMDB file."""

    def __init__(
        self, cache_address: str, cache_dir: Path | str, *, timeout_s: float = 30.0
    ) -> None:
        from mintmesh.cache.reader import NodeCacheReader
        from mintmesh.services.common.server import insecure_channel
        from mintmesh.v1 import cache_pb2_grpc

        if not cache_address:
            raise ValueError("SidecarSource needs the cache sidecar's address (host:port)")
        self.cache_address = cache_address
        self.cache_dir = Path(cache_dir)
        self.timeout_s = float(timeout_s)
        self._channel = insecure_channel(cache_address)
        self._stub = cache_pb2_grpc.AdapterCacheStub(self._channel)
        self._reader = NodeCacheReader(self.cache_dir)

    def fetch(self, digest: str, timeout: float | None = None) -> bytearray:
        from mintmesh.services.common.errors import reraise_downstream
        from mintmesh.v1 import cache_pb2

        t = self.timeout_s if timeout is None else max(0.001, min(timeout, self.timeout_s))
        try:
            resp = self._stub.EnsureAdapter(
                cache_pb2.EnsureAdapterRequest(digest=digest), timeout=t
            )
        except grpc.RpcError as e:
            what = f"EnsureAdapter({digest[:12]}…) on {self.cache_address}"
            raise reraise_downstream(e, what) from e
        data = self._reader.read(digest)
        if data is None:
            raise Unavailable(
                f"cache sidecar {self.cache_address} ensured adapter {digest[:12]}… "
                f"(hit={resp.hit}) but it is not in the node cache at {self._reader.path}; "
                "is --cache-dir the sidecar's directory?"
            )
        return data

    def close(self) -> None:
        self._channel.close()


@dataclass(frozen=True)
class PreparedAdapter:
    """A checked adapter on the host, ready for AdapterPool.load."""

    digest: str
    header: PackedHeader
    modules: dict[str, ModuleWeights]
    nbytes: int


class AdapterResidency:
    """Fetch + check on the host (any thread); pool loads and evictions (under the engine's
    model lock, by the thread that runs forwards)."""

    def __init__(
        self,
        pool: AdapterPool,
        source: AdapterSource | None,
        *,
        layer_shapes: Mapping[str, tuple[int, int]],
        base_fingerprint: str,
        max_rank: int,
        fetch_timeout_s: float = 30.0,
        max_staged: int = 64,
    ) -> None:
        self.pool = pool
        self.layer_shapes = dict(layer_shapes)
        self.source: AdapterSource = source if source is not None else NoSource()
        self.base_fingerprint = base_fingerprint
        self.max_rank = int(max_rank)
        self.fetch_timeout_s = float(fetch_timeout_s)
        self.max_staged = int(max_staged)
        # Adapters fetched and checked but not yet loaded (the host tier), oldest first.
        self._staged: OrderedDict[str, PreparedAdapter] = OrderedDict()
        # Resident digests, least recently used first.
        self._lru: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        self._fetch_locks: dict[str, threading.Lock] = {}
        self.loads = 0
        self.evictions = 0

    # -- host side ------------------------------------------------------------------------

    def check(self, digest: str, data: bytes | bytearray | memoryview) -> PreparedAdapter:
        """Verify bytes against their digest and this executor; unpack them."""
        got = hashlib.sha256(data).hexdigest()
        if got != digest:
            raise DigestMismatch(f"adapter bytes for digest {digest} hash to {got}")
        header, modules = unpack(data)
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

    def prepare(self, digest: str, timeout: float | None = None) -> PreparedAdapter | None:
        """Make digest loadable: None when it is resident already, else the checked adapter
        (fetched from the source at most once at a time per digest)."""
        check_digest(digest)
        if digest in self.pool:
            return None
        with self._lock:
            staged = self._staged.get(digest)
            if staged is not None:
                return staged
            flock = self._fetch_locks.setdefault(digest, threading.Lock())
        try:
            with flock:
                with self._lock:
                    staged = self._staged.get(digest)
                if staged is not None:
                    return staged
                if digest in self.pool:
                    return None
                t = self.fetch_timeout_s if timeout is None else min(timeout, self.fetch_timeout_s)
                try:
                    data = self.source.fetch(digest, timeout=t)
                except grpc.RpcError as e:  # a source that lets gRPC errors through
                    from mintmesh.services.common.errors import reraise_downstream

                    raise reraise_downstream(e, f"fetching adapter {digest[:12]}…") from e
                prepared = self.check(digest, data)
                with self._lock:
                    self._staged[digest] = prepared
                    while len(self._staged) > self.max_staged:
                        self._staged.popitem(last=False)
                return prepared
        finally:
            with self._lock:
                if self._fetch_locks.get(digest) is flock:
                    del self._fetch_locks[digest]

    # -- device side (call under the engine's model lock) --------------------------------

    def ensure_loaded(
        self,
        wanted: Mapping[str, PreparedAdapter | None],
        *,
        keep: Iterable[str] = (),
    ) -> dict[str, int]:
        """Load every wanted digest into the pool; return digest -> slot. Evicts least recently
        used adapters not in wanted or keep (those a running batch uses)."""
        protected = set(wanted) | set(keep)
        slots: dict[str, int] = {}
        for digest, prepared in wanted.items():
            slot = self.pool.slot(digest)
            if slot is None:
                if prepared is None:
                    with self._lock:
                        prepared = self._staged.get(digest)
                if prepared is None:
                    # Evicted since it was prepared: fetch again (rare).
                    prepared = self.prepare(digest)
                    if prepared is None:
                        slot = self.pool.slot(digest)
                if slot is None:
                    slot = self._load(prepared, protected)
            self._lru[digest] = None
            self._lru.move_to_end(digest)
            slots[digest] = slot
        return slots

    def _load(self, prepared: PreparedAdapter, protected: set[str]) -> int:
        while True:
            try:
                slot = self.pool.load(prepared.digest, prepared.modules)
                break
            except ResourceExhausted:
                victim = next((d for d in self._lru if d not in protected), None)
                if victim is None:
                    raise ResourceExhausted(
                        f"adapter pool is full: all {len(self._lru)} resident adapters are in "
                        "use by running batches"
                    ) from None
                self.evict(victim)
            except ValueError as e:
                raise InvalidAdapter(f"adapter {prepared.digest[:12]}…: {e}") from e
        self.loads += 1
        with self._lock:
            self._staged.pop(prepared.digest, None)
        logger.info(
            "loaded adapter %s (rank %d, %d modules) into slot %d",
            prepared.digest[:12],
            prepared.header.max_rank,
            len(prepared.modules),
            slot,
        )
        return slot

    def evict(self, digest: str) -> bool:
        self._lru.pop(digest, None)
        if self.pool.evict(digest):
            self.evictions += 1
            logger.info("evicted adapter %s", digest[:12])
            return True
        return False

    def resident(self) -> list[str]:
        return list(self.pool.resident())
