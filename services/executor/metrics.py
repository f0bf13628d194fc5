"""The executor's Prometheus metrics: the engine's own counters read at scrape time, and the
latency histograms its hooks observe (Engine.on_token and on_step on the step thread, lock-free;
AdapterResidency.on_load in the loader threads)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.metrics_core import Metric

from mintmesh.services.common.metrics import (
    OneWriterHistogram,
    ReadAtScrape,
    counter,
    gauge,
)
from mintmesh.services.executor.engine import Engine
from mintmesh.services.executor.requests import StepStats
from mintmesh.services.executor.residency import AdapterState

TTFT_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# A step's kind for mint_executor_step_seconds: prefill (it computed prompt tokens, maybe beside
# decodes), decode (only decodes), empty (nothing scheduled: adapters loading, all paused).
STEP_KINDS = ("prefill", "decode", "empty")
LOAD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0)


class ExecutorMetrics:
    def __init__(self, engine: Engine, registry: CollectorRegistry) -> None:
        self.engine = engine
        self.ttft = OneWriterHistogram(
            "mint_executor_time_to_first_token_seconds",
            "Seconds from a generation's submit to its first token.",
            TTFT_BUCKETS,
        )
        self.itl = OneWriterHistogram(
            "mint_executor_inter_token_latency_seconds",
            "Seconds between a generation's consecutive tokens.",
            ITL_BUCKETS,
        )
        self.step_seconds = OneWriterHistogram(
            "mint_executor_step_seconds",
            "Seconds of one iteration of the step loop (the model lock's wait included), by "
            "kind: prefill (it computed prompt tokens), decode (only decodes), empty (nothing "
            "was scheduled).",
            STEP_BUCKETS,
            label="kind",
            values=STEP_KINDS,
        )
        # What the steps of each kind computed (with the seconds above: model FLOPs/s by kind).
        self.step_work = {
            w: dict.fromkeys(STEP_KINDS, 0) for w in ("tokens", "sampled", "attention_keys")
        }
        self.load_seconds = Histogram(
            "mint_executor_adapter_load_seconds",
            "Seconds to move an adapter into a tier: host (read from the node cache or "
            "fetched through the sidecar, checked, unpacked) or device (copied into the pool).",
            ["tier"],
            buckets=LOAD_BUCKETS,
            registry=registry,
        )
        engine.on_token = self._on_token
        engine.on_step = self._on_step
        engine.residency.on_load = lambda tier, s: self.load_seconds.labels(tier).observe(s)
        registry.register(ReadAtScrape(self.collect))

    def _on_token(self, seconds: float, first: bool) -> None:
        (self.ttft if first else self.itl).observe(seconds)

    def _on_step(self, st: StepStats, seconds: float) -> None:
        kind = "prefill" if st.prefill_tokens else "decode" if st.num_tokens else "empty"
        self.step_seconds.observe(seconds, kind)
        w = self.step_work
        w["tokens"][kind] += st.num_tokens
        w["sampled"][kind] += st.sampled
        w["attention_keys"][kind] += st.attention_keys

    def _training(self) -> Iterator[Metric]:
        """Training on this executor (zeros until its first run: nothing is set up before)."""
        q = self.engine.timeshare.queue
        t = q.trainer if q is not None else None
        yield gauge("mint_executor_training_runs", "Training runs held.", len(t.runs) if t else 0)
        yield gauge(
            "mint_executor_training_bytes",
            "Bytes the training runs hold (weights, gradients, AdamW state).",
            t.bytes_used() if t else 0,
        )
        yield counter(
            "mint_executor_training_runs_expired_total",
            "Training runs dropped for idleness (--training-run-idle-s).",
            t.expired_runs if t else 0,
        )
        yield counter(
            "mint_executor_training_tokens_total",
            "Tokens trained (forward_backward).",
            t.tokens_trained if t else 0,
        )

    def collect(self) -> Iterator[Metric]:
        e = self.engine
        res = e.residency
        yield counter("mint_executor_tokens_generated_total", "Tokens sampled.", e.tokens_generated)
        yield gauge(
            "mint_executor_tokens_per_second",
            "Tokens sampled per second over the last 10 s.",
            e.tokens_per_s(),
        )
        yield self.ttft.family()
        yield self.itl.family()
        yield self.step_seconds.family()
        w = self.step_work
        yield counter(
            "mint_executor_step_tokens_total",
            "Tokens through the model (prompt chunks and decodes), by step kind.",
            w["tokens"],
            label="kind",
        )
        yield counter(
            "mint_executor_step_sampled_total",
            "Tokens sampled, by step kind.",
            w["sampled"],
            label="kind",
        )
        yield counter(
            "mint_executor_step_attention_keys_total",
            "Keys attended to (a token at position p attends to p + 1), by step kind.",
            w["attention_keys"],
            label="kind",
        )
        yield gauge(
            "mint_executor_queue_depth",
            "Requests waiting for a sequence slot or for their adapter.",
            e.queue_depth,
        )
        yield gauge("mint_executor_running_sequences", "Sequences in the batch.", e.running)
        yield gauge(
            "mint_executor_max_batch_size", "Sequences the batch holds at most.", e.max_batch_size
        )
        alloc = e.kv.allocator
        yield gauge("mint_executor_kv_blocks_used", "KV blocks in use.", alloc.num_used)
        yield gauge(
            "mint_executor_kv_blocks_cached",
            "KV blocks kept only for their prefix (counted free).",
            alloc.num_cached,
        )
        yield gauge("mint_executor_kv_blocks_total", "KV blocks of the cache.", e.kv.num_blocks)
        yield counter(
            "mint_executor_prefix_query_tokens_total",
            "Prompt tokens looked up in the prefix cache.",
            e.prefix_query_tokens,
        )
        yield counter(
            "mint_executor_prefix_hit_tokens_total",
            "Prompt tokens whose KV was reused from cached blocks.",
            e.prefix_hit_tokens,
        )
        yield counter("mint_executor_preemptions_total", "Sequences preempted.", e.preemptions)
        yield counter("mint_executor_steps_total", "Steps of the batch loop.", e.step_no)
        yield gauge(
            "mint_executor_adapters",
            "Adapters in each tier: device (the pool), host (staging arena), node_cache (the "
            "sidecar's file).",
            {
                "device": len(res.resident()),
                "host": len(res.host),
                "node_cache": len(res.node_cache_digests()),
            },
            "tier",
        )
        by_state = {s.value: 0 for s in AdapterState if s is not AdapterState.ABSENT}
        for s in res.states().values():
            by_state[s.value] += 1
        yield gauge(
            "mint_executor_adapter_states",
            "Adapters of this executor by residency state: fetching (from the node cache into "
            "the host tier), host, loading (into the device pool, or waiting for room), device, "
            "draining (deleted, waiting for its last request).",
            by_state,
            "state",
        )
        yield counter(
            "mint_executor_adapter_loads_total",
            "Adapters moved into a tier: host (fetched from the node cache or through the "
            "sidecar) or device (copied into the pool).",
            {"host": res.fetches, "device": res.loads},
            "tier",
        )
        yield counter(
            "mint_executor_adapter_evictions_total",
            "Adapters dropped from a tier to make room.",
            {"host": res.host.evictions, "device": res.evictions},
            "tier",
        )
        reads = res.source.node_cache_reads()
        if reads is not None:  # a source with a node cache (the SidecarSource)
            yield counter(
                "mint_executor_node_cache_reads_total",
                "Adapter reads from the node cache: hit (read from the file, no RPC) or miss "
                "(EnsureAdapter asked the sidecar to fetch it first).",
                {"hit": reads[0], "miss": reads[1]},
                "result",
            )
        yield from self._training()
        yield gauge(
            "mint_executor_adapter_pool_bytes_used",
            "Bytes of the device adapter pool in use.",
            e.pool.nbytes(),
        )
        yield gauge(
            "mint_executor_host_tier_bytes_used",
            "Bytes of the host staging arena in use.",
            res.host.nbytes,
        )
