"""mintmesh.v1.AdapterCache: proto <-> CacheCore translation only."""

from __future__ import annotations

import grpc

from mintmesh.cache.core import CacheCore
from mintmesh.services.common.server import remaining_timeout
from mintmesh.v1 import cache_pb2, cache_pb2_grpc


class AdapterCacheServicer(cache_pb2_grpc.AdapterCacheServicer):
    def __init__(self, core: CacheCore):
        self.core = core

    def EnsureAdapter(self, request, context):
        res = self.core.ensure(
            request.digest, timeout=remaining_timeout(context, self.core.fetch_timeout_s)
        )
        return cache_pb2.EnsureAdapterResponse(
            digest=res.digest, size_bytes=res.size_bytes, hit=res.hit, fetch_ms=res.fetch_ms
        )

    def Prefetch(self, request, context):
        res = self.core.prefetch(request.digests)
        return cache_pb2.PrefetchResponse(present=res.present, queued=res.queued)

    def Evict(self, request, context):
        return cache_pb2.EvictResponse(evicted=self.core.evict(request.digest))

    def Pin(self, request, context):
        size = self.core.pin(
            request.digest,
            fetch=request.fetch,
            timeout=remaining_timeout(context, self.core.fetch_timeout_s),
        )
        return cache_pb2.PinResponse(size_bytes=size)

    def Unpin(self, request, context):
        return cache_pb2.UnpinResponse(was_pinned=self.core.unpin(request.digest))

    def RecordHits(self, request, context):
        return cache_pb2.RecordHitsResponse(recorded=self.core.record_hits(request.digests))

    def Stats(self, request, context):
        s = self.core.node.stats()
        return cache_pb2.CacheStatsResponse(
            bytes=s.bytes,
            entries=s.entries,
            hits=s.hits,
            misses=s.misses,
            evictions=s.evictions,
            fetch_p50_ms=s.fetch_p50_ms,
            fetch_p99_ms=s.fetch_p99_ms,
            capacity_bytes=s.capacity_bytes,
            path=s.path,
            pinned_entries=s.pinned_entries,
            pinned_bytes=s.pinned_bytes,
            policy=s.policy,
            digests=s.digests,
        )


def add_to_server(core: CacheCore, server: grpc.Server) -> list[str]:
    cache_pb2_grpc.add_AdapterCacheServicer_to_server(AdapterCacheServicer(core), server)
    return [cache_pb2.DESCRIPTOR.services_by_name["AdapterCache"].full_name]
