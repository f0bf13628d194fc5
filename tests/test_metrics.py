"""Prometheus metrics of every service, scraped over HTTP as Prometheus does: a real mesh (the
store, the executor and the router in-process, the cache sidecar as its own process, since LMDB
opens a file once per process and the executor reads the sidecar's; the router in front of the
executor through two fault-injecting proxies, plus one dead executor address), each server with
its own registry on its own ephemeral --metrics-port. Each test scrapes, makes N requests,
scrapes again and checks that the counters moved by exactly N: RPCs by method and status code
(errors included), tokens generated, cache hits and misses, store pushes, router placements and
retries. Flags, MINT_* variables and `mint serve ... --metrics-port 0` (its METRICS line) are
checked on a real process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
from faults import Fault, FaultProxy
from prometheus_client.parser import text_string_to_metric_families
from promscrape import Samples, rpc_latency_count, rpcs, scrape, val

from mintmesh.cache.config import CacheConfig
from mintmesh.client import MintClient, sampling_params
from mintmesh.services.common.config import load_config
from mintmesh.services.common.metrics import OneWriterHistogram
from mintmesh.services.common.server import mesh_channel
from mintmesh.services.executor.config import ExecutorConfig
from mintmesh.services.executor.server import create_server as create_executor
from mintmesh.services.router.config import RouterConfig
from mintmesh.services.router.core import BASE_KEY
from mintmesh.services.router.placement import rendezvous_order
from mintmesh.services.router.server import create_server as create_router
from mintmesh.services.store.config import StoreConfig
from mintmesh.services.store.server import create_server as create_store
from mintmesh.synth import synth_peft_bytes
from mintmesh.v1 import (
    cache_pb2,
    cache_pb2_grpc,
    common_pb2,
    executor_pb2,
    executor_pb2_grpc,
    training_pb2,
)

STORE, CACHE = "mintmesh.v1.AdapterStore", "mintmesh.v1.AdapterCache"
EXECUTOR, ROUTER = "mintmesh.v1.Executor", "mintmesh.v1.Router"
DEAD = "127.0.0.1:1"  # an executor address nothing listens on
PROMPT = [5, 9, 13, 17]
UNKNOWN_DIGEST = "0" * 64
MAX_RANK = 16


def names(samples: Samples) -> set[str]:
    return {n for n, _ in samples}


def _announced(proc: subprocess.Popen, service: str, timeout: float = 60.0) -> tuple[str, str]:
    """(address, metrics address) from a child's "METRICS <service> ..." and "READY ..." lines."""
    lines: list[str] = []
    t = threading.Thread(
        target=lambda: lines.extend([proc.stdout.readline(), proc.stdout.readline()]),
        daemon=True,
    )
    t.start()
    t.join(timeout)
    assert len(lines) == 2, f"{service}: {lines}"
    metrics, ready = (ln.split() for ln in lines)
    assert metrics[:2] == ["METRICS", service] and metrics[2].startswith("127.0.0.1:"), metrics
    assert ready[:2] == ["READY", service] and ready[2] != metrics[2], ready
    return ready[2], metrics[2]


def _stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def _wait(cond, timeout: float = 30.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"{what} not reached in {timeout:.0f}s")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def mesh(tiny_model_dir, base_info, tmp_path_factory):
    store = create_store(
        StoreConfig(
            data_dir=tmp_path_factory.mktemp("store"),
            model_dir=tiny_model_dir,
            max_rank=MAX_RANK,
            metrics_port=0,
        )
    )
    node_dir = tmp_path_factory.mktemp("node")
    cache = subprocess.Popen(
        [sys.executable, "-m", "mintmesh.cache", "--cache-dir", str(node_dir)]
        + ["--store", store.address, "--port", "0", "--metrics-port", "0"]
        + ["--capacity-bytes", str(64 << 20), "--insecure-mesh"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("MINT_CACHE_")},
    )
    try:
        cache_address, cache_metrics = _announced(cache, "cache")
    except BaseException:
        _stop(cache)
        store.stop(0)
        raise
    executor, engine = create_executor(
        ExecutorConfig(
            model_dir=tiny_model_dir,
            cache_dir=node_dir,
            cache_address=cache_address,
            executor_id="exec-metrics",
            max_batch_size=4,
            host_cache_bytes=16 << 20,
            metrics_port=0,
        )
    )
    proxies = [FaultProxy(executor.address), FaultProxy(executor.address)]
    router, core = create_router(
        RouterConfig(
            store_address=store.address,
            executors=(*(p.address for p in proxies), DEAD),
            port=0,
            health_interval_s=0.2,
            metrics_port=0,
        )
    )
    by_address = {p.address: p for p in proxies}
    home, other = rendezvous_order(list(by_address), BASE_KEY)  # where the base model goes
    store_client = MintClient(store.address, timeout=30, retries=0)
    router_client = MintClient(router.address, timeout=60, retries=0)
    exec_channel = mesh_channel(executor.address, traced=False)
    cache_channel = mesh_channel(cache_address, traced=False)
    _wait(
        lambda: sum(e.healthy for e in router_client.status().executors) == 2,
        what="both proxied executors healthy",
    )
    yield {
        "base": base_info,
        "store": store,
        "executor": executor,
        "engine": engine,
        "router": router,
        "home": (home, by_address[home]),
        "other": (other, by_address[other]),
        "store_client": store_client,
        "router_client": router_client,
        "exec": executor_pb2_grpc.ExecutorStub(exec_channel),
        "sidecar": cache_pb2_grpc.AdapterCacheStub(cache_channel),
        "urls": {
            "store": store.metrics_url,
            "cache": f"http://{cache_metrics}/metrics",
            "executor": executor.metrics_url,
            "router": router.metrics_url,
        },
        "cache_address": cache_address,
    }
    router_client.close()
    store_client.close()
    exec_channel.close()
    cache_channel.close()
    router.stop(0)
    for p in proxies:
        p.stop()
    executor.stop(grace=1.0)
    assert _stop(cache) == 0
    store.stop(0)


@pytest.fixture(autouse=True)
def _no_fault(mesh):
    for _, proxy in (mesh["home"], mesh["other"]):
        proxy.clear()
    yield
    for _, proxy in (mesh["home"], mesh["other"]):
        proxy.clear()


def _push(mesh, name: str, *, seed: int, rank: int = 4) -> common_pb2.AdapterRevision:
    cfg, w = synth_peft_bytes(mesh["base"], rank=rank, seed=seed)
    return mesh["store_client"].push_adapter_bytes(name, cfg, w)


def _generate(mesh, max_tokens: int, revision: common_pb2.AdapterRevision | None = None):
    req = executor_pb2.ExecutorGenerateRequest(
        adapter=revision,
        prompt_token_ids=PROMPT,
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True),
    )
    return [r.chunk for r in mesh["exec"].Generate(req, timeout=60)]


def _code_of(fn) -> str:
    with pytest.raises(grpc.RpcError) as ei:
        fn()
    return ei.value.code().name


# -- each server its own registry and port -------------------------------------------------------


def test_every_server_serves_its_own_registry(mesh):
    servers = {k: mesh[k] for k in ("store", "executor", "router")}
    ports = {k: s.metrics_port for k, s in servers.items()}
    assert all(isinstance(p, int) and p > 0 for p in ports.values()), ports
    assert all(
        s.metrics_url == f"http://127.0.0.1:{s.metrics_port}/metrics" for s in servers.values()
    )
    grpc_ports = {s.port for s in servers.values()} | {int(mesh["cache_address"].split(":")[1])}
    ports["cache"] = int(mesh["urls"]["cache"].split(":")[2].split("/")[0])
    assert len(set(ports.values())) == 4, ports
    assert not set(ports.values()) & grpc_ports
    own = {
        "store": ("mint_store_pushes_total", STORE),
        "cache": ("mint_cache_hits_total", CACHE),
        "executor": ("mint_executor_tokens_generated_total", EXECUTOR),
        "router": ("mint_router_executor_healthy", ROUTER),
    }
    scraped = {k: scrape(url) for k, url in mesh["urls"].items()}
    for kind, samples in scraped.items():
        mine, _ = own[kind]
        assert mine in names(samples), f"{kind} does not export {mine}"
        for other, (theirs, _) in own.items():
            if other != kind:
                assert theirs not in names(samples), f"{kind} exports {other}'s {theirs}"
    # RPCs are counted by the server that served them, and only there.
    assert any(
        dict(lbl).get("service") == "grpc.health.v1.Health"
        for n, lbl in scraped["executor"]
        if n == "mint_rpc_requests_total"
    ), "the router's health checks of the executor are not counted on the executor"
    assert not any(
        dict(lbl).get("service") == EXECUTOR for n, lbl in scraped["store"] if n.startswith("mint_")
    )


def test_a_server_without_metrics_port_counts_but_serves_no_http(tiny_model_dir, tmp_path):
    from mintmesh.services.common.metrics import render

    srv = create_store(StoreConfig(data_dir=tmp_path / "s", model_dir=tiny_model_dir))
    try:
        assert srv.metrics_port is None and srv.metrics_url is None
        with MintClient(srv.address, timeout=10, retries=0) as cl:
            for _ in range(2):
                assert _code_of(lambda: cl.resolve("nobody/nothing")) == "NOT_FOUND"
        fams = {f.name: f for f in text_string_to_metric_families(render(srv.registry).decode())}
        got = {
            s.labels["code"]: s.value
            for s in fams["mint_rpc_requests"].samples
            if s.name == "mint_rpc_requests_total" and s.labels["method"] == "ResolveAdapter"
        }
        assert got == {"NOT_FOUND": 2.0}
    finally:
        srv.stop(0)


def test_http_metrics_for_a_front_end_on_its_own_port():
    """What an HTTP server (the gateway) uses: one (requests, latency) pair per registry, served
    by start_metrics_server or rendered for a /metrics route of its own."""
    from mintmesh.services.common import metrics

    reg = metrics.new_registry()
    requests, latency = metrics.http_metrics(reg)
    assert metrics.http_metrics(reg) == (requests, latency)
    assert metrics.http_metrics(metrics.new_registry())[0] is not requests
    for status in ("200", "200", "404"):
        requests.labels("/v1/completions", "POST", status).inc()
        latency.labels("/v1/completions", "POST").observe(0.02)
    srv = metrics.start_metrics_server(reg, 0, "127.0.0.1")
    try:
        got = scrape(f"http://127.0.0.1:{srv.port}/metrics")
    finally:
        srv.close()
    route = {"route": "/v1/completions", "method": "POST"}
    assert val(got, "mint_http_requests_total", status="200", **route) == 2
    assert val(got, "mint_http_requests_total", status="404", **route) == 1
    assert val(got, "mint_http_latency_seconds_count", **route) == 3
    assert val(got, "mint_http_latency_seconds_bucket", le="0.025", **route) == 3
    assert val(got, "mint_http_latency_seconds_bucket", le="0.01", **route) == 0
    text = metrics.render(reg).decode()
    assert (
        'mint_http_requests_total{method="POST",route="/v1/completions",status="404"} 1.0' in text
    )
    assert metrics.CONTENT_TYPE.startswith("text/plain")
    with pytest.raises(ValueError, match="70000"):
        metrics.start_metrics_server(reg, 70000, "127.0.0.1")


# -- RPCs by method and code ---------------------------------------------------------------------


@pytest.mark.parametrize("n_ok,n_missing", [(1, 3), (4, 0), (0, 2)])
def test_rpc_counts_by_method_and_code(mesh, n_ok, n_missing):
    url, cl = mesh["store"].metrics_url, mesh["store_client"]
    rev = _push(mesh, f"rpc/m{n_ok}x{n_missing}", seed=10 + n_ok)
    before = scrape(url)
    for _ in range(n_ok):
        assert cl.resolve(rev.ref).digest == rev.digest
    for i in range(n_missing):
        assert _code_of(lambda i=i: cl.resolve(f"rpc/none{i}")) == "NOT_FOUND"
    after = scrape(url)
    d = lambda f, *a: f(after, *a) - f(before, *a)  # noqa: E731
    assert d(rpcs, STORE, "ResolveAdapter", "OK") == n_ok
    assert d(rpcs, STORE, "ResolveAdapter", "NOT_FOUND") == n_missing
    assert d(rpc_latency_count, STORE, "ResolveAdapter") == n_ok + n_missing
    assert d(rpcs, STORE, "PushAdapter", "OK") == 0


def test_server_stream_counted_once_with_its_final_code(mesh):
    from mintmesh.v1 import store_pb2, store_pb2_grpc

    url = mesh["store"].metrics_url
    rev = _push(mesh, "rpc/stream", seed=21)
    before = scrape(url)
    with grpc.insecure_channel(mesh["store"].address) as ch:
        stub = store_pb2_grpc.AdapterStoreStub(ch)
        for _ in range(2):
            got = b"".join(
                m.chunk for m in stub.FetchAdapter(store_pb2.FetchAdapterRequest(digest=rev.digest))
            )
            assert len(got) == rev.size_bytes
        req = store_pb2.FetchAdapterRequest(digest=UNKNOWN_DIGEST)
        assert _code_of(lambda: list(stub.FetchAdapter(req, timeout=10))) == "NOT_FOUND"
    after = scrape(url)
    assert rpcs(after, STORE, "FetchAdapter", "OK") - rpcs(before, STORE, "FetchAdapter", "OK") == 2
    assert (
        rpcs(after, STORE, "FetchAdapter", "NOT_FOUND")
        - rpcs(before, STORE, "FetchAdapter", "NOT_FOUND")
        == 1
    )
    assert (
        rpc_latency_count(after, STORE, "FetchAdapter")
        - rpc_latency_count(before, STORE, "FetchAdapter")
        == 3
    )


def test_a_stream_the_client_cancels_is_counted_cancelled(mesh):
    url = mesh["executor"].metrics_url
    before = scrape(url)
    req = executor_pb2.ExecutorGenerateRequest(
        prompt_token_ids=PROMPT,
        sampling=common_pb2.SamplingParams(max_tokens=200, ignore_eos=True),
    )
    call = mesh["exec"].Generate(req, timeout=60)
    next(call)  # the first chunk: the generation runs
    call.cancel()

    def cancelled() -> float:
        return rpcs(scrape(url), EXECUTOR, "Generate", "CANCELLED") - rpcs(
            before, EXECUTOR, "Generate", "CANCELLED"
        )

    _wait(lambda: cancelled() >= 1, what="the cancelled Generate counted")
    _wait(lambda: mesh["engine"].running == 0, what="the cancelled sequence gone")
    after = scrape(url)
    assert cancelled() == 1
    assert rpcs(after, EXECUTOR, "Generate", "OK") == rpcs(before, EXECUTOR, "Generate", "OK")


# -- store ---------------------------------------------------------------------------------------


def test_store_pushes_and_catalog_size_exact(mesh):
    url, cl = mesh["store"].metrics_url, mesh["store_client"]
    before = scrape(url)
    n = 3
    for i in range(n):
        _push(mesh, f"pushes/a{i}", seed=100 + i)
    _push(mesh, "pushes/a0", seed=200)  # a second revision of the same adapter
    cfg, w = synth_peft_bytes(mesh["base"], rank=MAX_RANK * 2, seed=1)
    refused = _code_of(lambda: cl.push_adapter_bytes("pushes/too-big", cfg, w))
    assert refused == "INVALID_ARGUMENT"
    after = scrape(url)
    d = lambda name: val(after, name) - val(before, name)  # noqa: E731
    assert d("mint_store_pushes_total") == n + 1
    assert d("mint_store_push_failures_total") == 1
    assert d("mint_store_adapters") == n
    assert d("mint_store_revisions") == n + 1
    assert rpcs(after, STORE, "PushAdapter", "OK") - rpcs(before, STORE, "PushAdapter", "OK") == (
        n + 1
    )
    assert (
        rpcs(after, STORE, "PushAdapter", refused) - rpcs(before, STORE, "PushAdapter", refused)
        == 1
    )
    assert val(after, "mint_store_catalog_bytes") > 0


# -- cache sidecar -------------------------------------------------------------------------------


def test_cache_hits_misses_and_pins_exact(mesh):
    url, sidecar = mesh["urls"]["cache"], mesh["sidecar"]
    rev = _push(mesh, "cache/fresh", seed=300)  # never asked for before: a miss, then hits
    mesh["engine"].residency.source.flush_hits()  # no executor-reported hit arrives meanwhile
    before = scrape(url)
    ensure = lambda d: sidecar.EnsureAdapter(cache_pb2.EnsureAdapterRequest(digest=d), timeout=30)  # noqa: E731
    assert ensure(rev.digest).hit is False
    hits = 3
    assert [ensure(rev.digest).hit for _ in range(hits)] == [True] * hits
    assert _code_of(lambda: ensure(UNKNOWN_DIGEST)) == "NOT_FOUND"  # a miss the store refuses
    sidecar.Pin(cache_pb2.PinRequest(digest=rev.digest), timeout=30)
    pinned = scrape(url)
    sidecar.Unpin(cache_pb2.UnpinRequest(digest=rev.digest), timeout=30)
    after = scrape(url)
    d = lambda name, s=after: val(s, name) - val(before, name)  # noqa: E731
    assert d("mint_cache_hits_total") == hits
    assert d("mint_cache_misses_total") == 2
    assert d("mint_cache_store_fetches_total") == 2
    assert d("mint_cache_entries") == 1
    assert d("mint_cache_bytes_used") == rev.size_bytes
    assert d("mint_cache_pinned_entries", pinned) == 1
    assert d("mint_cache_pinned_bytes", pinned) == rev.size_bytes
    assert d("mint_cache_pinned_entries") == 0
    assert d("mint_cache_evictions_total") == 0
    assert rpcs(after, CACHE, "EnsureAdapter", "OK") - rpcs(
        before, CACHE, "EnsureAdapter", "OK"
    ) == (1 + hits)
    assert (
        rpcs(after, CACHE, "EnsureAdapter", "NOT_FOUND")
        - rpcs(before, CACHE, "EnsureAdapter", "NOT_FOUND")
        == 1
    )
    assert val(after, "mint_cache_capacity_bytes") == 64 << 20


# -- executor ------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,k", [(1, 1), (3, 5), (2, 9)])
def test_executor_tokens_and_token_latencies_exact(mesh, n, k):
    url = mesh["executor"].metrics_url
    before = scrape(url)
    for _ in range(n):
        chunks = _generate(mesh, k)
        assert sum(len(c.token_ids) for c in chunks) == k
    after = scrape(url)
    d = lambda name, **lbl: val(after, name, **lbl) - val(before, name, **lbl)  # noqa: E731
    assert d("mint_executor_tokens_generated_total") == n * k
    assert val(after, "mint_executor_tokens_generated_total") == mesh["engine"].tokens_generated
    assert d("mint_executor_time_to_first_token_seconds_count") == n
    assert d("mint_executor_inter_token_latency_seconds_count") == n * (k - 1)
    assert d("mint_executor_time_to_first_token_seconds_bucket", le="+Inf") == n
    assert d("mint_executor_time_to_first_token_seconds_sum") > 0
    assert (d("mint_executor_inter_token_latency_seconds_sum") > 0) == (k > 1)
    assert rpcs(after, EXECUTOR, "Generate", "OK") - rpcs(before, EXECUTOR, "Generate", "OK") == n
    assert d("mint_executor_steps_total") >= k
    assert val(after, "mint_executor_running_sequences") == 0
    assert val(after, "mint_executor_queue_depth") == 0
    assert val(after, "mint_executor_tokens_per_second") > 0
    assert val(after, "mint_executor_kv_blocks_total") == mesh["engine"].kv.num_blocks


def test_one_writer_histogram_by_label():
    h = OneWriterHistogram("x_seconds", "doc", (0.1, 1.0), label="kind", values=("a", "b"))
    for x, kind in ((0.05, "a"), (0.5, "a"), (5.0, "b")):
        h.observe(x, kind)
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in h.family().samples}

    def at(name, kind, **more):
        return got[(name, tuple(sorted({"kind": kind, **more}.items())))]

    assert [at("x_seconds_bucket", "a", le=le) for le in ("0.1", "1.0", "+Inf")] == [1, 2, 2]
    assert [at("x_seconds_bucket", "b", le=le) for le in ("0.1", "1.0", "+Inf")] == [0, 0, 1]
    assert (at("x_seconds_count", "a"), at("x_seconds_count", "b")) == (2, 1)
    assert at("x_seconds_sum", "a") == pytest.approx(0.55)
    assert at("x_seconds_sum", "b") == 5.0
    with pytest.raises(ValueError, match="a label needs its values"):
        OneWriterHistogram("y", "doc", (1.0,), label="kind")
    with pytest.raises(ValueError, match="a label needs its values"):
        OneWriterHistogram("y", "doc", (1.0,), values=("a",))


def test_executor_step_seconds_by_kind(mesh):
    url = mesh["executor"].metrics_url
    n, k = 2, 6
    before = scrape(url)
    for _ in range(n):
        assert sum(len(c.token_ids) for c in _generate(mesh, k)) == k
    kinds = ("prefill", "decode", "empty")

    def d(after, name, **lbl):
        return val(after, name, **lbl) - val(before, name, **lbl)

    # The step that streamed a generation's last token is observed when it returns, after the
    # client may have read that token: wait until every step counted is observed.
    deadline = time.monotonic() + 10
    while True:
        after = scrape(url)
        steps = d(after, "mint_executor_steps_total")
        observed = sum(d(after, "mint_executor_step_seconds_count", kind=x) for x in kinds)
        if observed == steps or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert observed == steps
    # Each generation: one step computing its prompt, then k - 1 decoding alone.
    assert d(after, "mint_executor_step_seconds_count", kind="prefill") >= n
    assert d(after, "mint_executor_step_seconds_count", kind="decode") >= n * (k - 1)
    for kind in ("prefill", "decode"):
        count = d(after, "mint_executor_step_seconds_count", kind=kind)
        assert d(after, "mint_executor_step_seconds_bucket", kind=kind, le="+Inf") == count
        assert d(after, "mint_executor_step_seconds_sum", kind=kind) > 0
        # Cumulative buckets: each bound holds at most what the next does.
        cum = [
            val(after, "mint_executor_step_seconds_bucket", kind=kind, le=le)
            for le in ("0.001", "0.01", "0.1", "1.0", "+Inf")
        ]
        assert cum == sorted(cum) and cum[-1] > 0
    # What the steps computed, by kind: each generation's prompt (positions 0 .. P - 1, one
    # token sampled) in a prefill step, then k - 1 decodes (positions P .. P + k - 2).
    p = len(PROMPT)
    work = {
        "prefill": (p, 1, p * (p + 1) // 2),
        "decode": (k - 1, k - 1, sum(range(p + 1, p + k))),
    }
    for kind, (tokens, sampled, keys) in work.items():
        assert d(after, "mint_executor_step_tokens_total", kind=kind) == n * tokens
        assert d(after, "mint_executor_step_sampled_total", kind=kind) == n * sampled
        assert d(after, "mint_executor_step_attention_keys_total", kind=kind) == n * keys


def test_executor_training_runs_bytes_and_tokens_exact(mesh):
    """Training on the executor: runs held and their bytes (gauges), tokens trained and runs
    dropped idle (counters), the same as its Status says."""
    url, stub = mesh["executor"].metrics_url, mesh["exec"]
    before = scrape(url)
    ids = [5, 6, 7, 8, 9]
    stub.CreateTrainingRun(
        training_pb2.CreateTrainingRunRequest(
            run_id="metered",
            tenant="m",
            lora=training_pb2.LoraConfig(rank=2, alpha=4.0, target_modules=["q_proj"]),
        ),
        timeout=60,
    )
    datum = training_pb2.TrainingDatum(
        input_ids=ids[:-1], target_tokens=ids[1:], weights=[1.0] * (len(ids) - 1)
    )
    for _ in range(3):
        stub.ForwardBackward(
            training_pb2.ForwardBackwardRequest(run_id="metered", data=[datum, datum]), timeout=60
        )
    during = scrape(url)
    st = stub.Status(executor_pb2.ExecutorStatusRequest(), timeout=10)
    assert val(during, "mint_executor_training_runs") == st.training_runs >= 1
    assert val(during, "mint_executor_training_bytes") == st.training_bytes > 0
    d = lambda name: val(during, name) - val(before, name)  # noqa: E731
    assert d("mint_executor_training_tokens_total") == 3 * 2 * (len(ids) - 1)
    assert val(during, "mint_executor_training_tokens_total") == st.training_tokens
    expired = val(during, "mint_executor_training_runs_expired_total")
    assert expired == st.training_runs_expired == 0  # 6 hours by default
    stub.DropTrainingRun(training_pb2.DropTrainingRunRequest(run_id="metered"), timeout=10)
    after = scrape(url)
    assert (
        val(after, "mint_executor_training_runs") == val(during, "mint_executor_training_runs") - 1
    )
    assert val(after, "mint_executor_training_bytes") < val(during, "mint_executor_training_bytes")


def test_executor_adapter_loads_by_tier_and_errors(mesh):
    url, engine = mesh["executor"].metrics_url, mesh["engine"]
    rev = _push(mesh, "exec/adapter", seed=400)
    before = scrape(url)
    assert sum(len(c.token_ids) for c in _generate(mesh, 3, rev)) == 3  # loaded: miss, then host
    assert sum(len(c.token_ids) for c in _generate(mesh, 2, rev)) == 2  # resident: no load
    assert engine.residency.evict(rev.digest)  # off the device, still on the host
    assert sum(len(c.token_ids) for c in _generate(mesh, 1, rev)) == 1  # from the host tier
    missing = common_pb2.AdapterRevision(digest=UNKNOWN_DIGEST, ref="exec/none@1")
    code = _code_of(lambda: _generate(mesh, 2, missing))
    assert code == "NOT_FOUND"
    after = scrape(url)
    d = lambda name, **lbl: val(after, name, **lbl) - val(before, name, **lbl)  # noqa: E731
    assert d("mint_executor_tokens_generated_total") == 6
    for tier, loads in (("host", 1), ("device", 2)):
        assert d("mint_executor_adapter_loads_total", tier=tier) == loads, tier
        assert d("mint_executor_adapter_load_seconds_count", tier=tier) == loads, tier
    assert d("mint_executor_adapter_evictions_total", tier="device") == 1
    assert d("mint_executor_adapter_evictions_total", tier="host") == 0
    res = engine.residency
    assert val(after, "mint_executor_adapter_loads_total", tier="host") == res.fetches
    assert val(after, "mint_executor_adapter_loads_total", tier="device") == res.loads
    assert val(after, "mint_executor_adapters", tier="host") == len(res.host)
    assert d("mint_executor_node_cache_reads_total", result="miss") == 1
    assert d("mint_executor_node_cache_reads_total", result="hit") == 0
    assert d("mint_executor_adapters", tier="device") == 1
    assert val(after, "mint_executor_adapters", tier="device") == len(engine.residency.resident())
    states = list(res.states().values())
    for st in ("fetching", "host", "loading", "device", "draining"):
        assert val(after, "mint_executor_adapter_states", state=st) == sum(
            s.value == st for s in states
        ), st
    assert val(after, "mint_executor_adapter_states", state="device") >= 1
    # The node cache's count comes from the sidecar's Stats (listed at most once a second).
    entries = val(scrape(mesh["urls"]["cache"]), "mint_cache_entries")
    assert entries >= 1
    _wait(
        lambda: val(scrape(url), "mint_executor_adapters", tier="node_cache") == entries,
        timeout=10,
        what=f"{entries:.0f} adapters in the node cache seen by the executor",
    )
    assert rpcs(after, EXECUTOR, "Generate", "OK") - rpcs(before, EXECUTOR, "Generate", "OK") == 3
    assert rpcs(after, EXECUTOR, "Generate", code) - rpcs(before, EXECUTOR, "Generate", code) == 1
    assert val(after, "mint_executor_prefix_query_tokens_total") >= val(
        after, "mint_executor_prefix_hit_tokens_total"
    )


# -- router --------------------------------------------------------------------------------------


def test_router_placements_retries_and_health_exact(mesh):
    url, cl = mesh["router"].metrics_url, mesh["router_client"]
    (home, home_proxy), (other, _) = mesh["home"], mesh["other"]
    before = scrape(url)
    exec_before = scrape(mesh["executor"].metrics_url)
    n_plain, n_refused = 3, 2
    gen = lambda: cl.generate(prompt_token_ids=PROMPT, sampling=sampling_params(max_tokens=2))  # noqa: E731
    for _ in range(n_plain):
        assert gen().executor == "exec-metrics"
    # The home executor refuses before its first chunk: each request is retried on the other.
    home_proxy.fault = Fault((grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full"), times=n_refused)
    for _ in range(n_refused):
        assert gen().executor == "exec-metrics"
    assert [s.code for s in home_proxy.generates()] == ["OK"] * n_plain + ["injected"] * n_refused
    n_missing = 2
    for _ in range(n_missing):
        code = _code_of(lambda: cl.generate("x", adapter="router/none"))
        assert code == "NOT_FOUND"
    after = scrape(url)
    exec_after = scrape(mesh["executor"].metrics_url)
    d = lambda name, **lbl: val(after, name, **lbl) - val(before, name, **lbl)  # noqa: E731
    assert d("mint_router_placements_total", executor=home) == n_plain + n_refused
    assert d("mint_router_placements_total", executor=other) == n_refused
    assert d("mint_router_placements_total", executor=DEAD) == 0
    assert d("mint_router_retries_total", executor=other) == n_refused
    assert d("mint_router_retries_total", executor=home) == 0
    assert rpcs(after, ROUTER, "Generate", "OK") - rpcs(before, ROUTER, "Generate", "OK") == (
        n_plain + n_refused
    )
    assert (
        rpcs(after, ROUTER, "Generate", "NOT_FOUND") - rpcs(before, ROUTER, "Generate", "NOT_FOUND")
        == n_missing
    )
    # The executor saw only what the proxies let through.
    assert (
        rpcs(exec_after, EXECUTOR, "Generate", "OK") - rpcs(exec_before, EXECUTOR, "Generate", "OK")
        == n_plain + n_refused
    )
    healthy = {e: val(after, "mint_router_executor_healthy", executor=e) for e in (home, other)}
    assert healthy == {home: 1.0, other: 1.0}
    assert ("mint_router_executor_healthy", (("executor", DEAD),)) in after
    assert val(after, "mint_router_executor_healthy", executor=DEAD) == 0.0


# -- flags, MINT_* variables, `mint serve` -------------------------------------------------------

CONFIGS = {
    # service: (config class, env prefix, required fields)
    "store": (StoreConfig, "STORE", {"data_dir": "d", "model_dir": "m"}),
    "cache": (CacheConfig, "CACHE", {"cache_dir": "c", "store_address": "s:1"}),
    "executor": (ExecutorConfig, "EXECUTOR", {"model_dir": "m"}),
    "router": (RouterConfig, "ROUTER", {}),
}


@pytest.mark.parametrize("service", sorted(CONFIGS))
def test_metrics_port_flag_and_environment(service):
    import importlib

    from mintmesh.cli import SERVICES

    cls, prefix, required = CONFIGS[service]
    parser = importlib.import_module(SERVICES[service]).build_parser()
    assert parser.parse_args(["--metrics-port", "9100"]).metrics_port == 9100
    assert parser.parse_args([]).metrics_port is None
    env = {f"MINT_{prefix}_METRICS_PORT": "0"}
    assert load_config(cls, prefix, required, environ=env).metrics_port == 0
    assert load_config(cls, prefix, {**required, "metrics_port": 9101}, env).metrics_port == 9101
    assert load_config(cls, prefix, required, environ={}).metrics_port is None
    with pytest.raises(ValueError, match="metrics_port 70000"):
        load_config(cls, prefix, {**required, "metrics_port": 70000}, environ={})


@pytest.mark.e2e
def test_mint_serve_announces_and_serves_metrics(tiny_model_dir, tmp_path):
    """`mint serve store --metrics-port 0`: METRICS then READY on stdout, /metrics on that port,
    and the RPCs made to it counted there; SIGTERM drains it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINT_STORE_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mintmesh.cli", "serve", "store", "--data-dir", str(tmp_path)]
        + ["--model-dir", str(tiny_model_dir), "--port", "0", "--metrics-port", "0"]
        + ["--insecure-mesh"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        address, metrics = _announced(proc, "store")
        url = f"http://{metrics}/metrics"
        before = scrape(url)
        with MintClient(address, timeout=10, retries=0) as cl:
            for _ in range(3):
                assert _code_of(lambda: cl.resolve("a/b")) == "NOT_FOUND"
        after = scrape(url)
        assert (
            rpcs(after, STORE, "ResolveAdapter", "NOT_FOUND")
            - rpcs(before, STORE, "ResolveAdapter", "NOT_FOUND")
            == 3
        )
        assert _stop(proc) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
