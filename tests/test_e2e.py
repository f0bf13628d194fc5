"""End to end, with real processes: store, router, two executors each with its cache sidecar,
started by the same code as `mint up`. peft is the oracle for every generated token."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from peft_util import make_peft_adapter, make_strong_adapter, peft_greedy, peft_model_with

from mintmesh.client import MintClient, sampling_params
from mintmesh.cluster import ClusterConfig, LocalCluster
from mintmesh.model import PAD_ID, load_model

pytestmark = pytest.mark.e2e

ADAPTERS = {
    # name: (rank, targets)
    "alice/chat": (4, ("q_proj", "v_proj")),
    "bob/code": (8, ("q_proj", "k_proj", "v_proj", "o_proj")),
    "carol/mlp": (16, ("gate_proj", "up_proj", "down_proj")),
}
PROMPTS = ["Hello, world", "The mesh serves", "a", "LoRA for everyone!"]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, tmp_path_factory, otlp):
    c = LocalCluster(
        ClusterConfig(
            model_dir=tiny_model_dir,
            data_dir=tmp_path_factory.mktemp("cluster"),
            executors=2,
            port=0,
            otlp_endpoint=otlp.address,
        )
    )
    c.start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def client(cluster):
    with MintClient(cluster.router_address, timeout=60, api_key=cluster.admin_key) as cl:
        yield cl


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        name: make_peft_adapter(
            tiny_model_dir, root / name.replace("/", "_"), rank=r, targets=t, seed=i + 1
        )
        for i, (name, (r, t)) in enumerate(ADAPTERS.items())
    }


@pytest.fixture(scope="module")
def pushed(client, adapter_dirs):
    return {name: client.push_adapter(path, name) for name, path in adapter_dirs.items()}


@pytest.fixture(scope="module")
def oracle(tiny_model_dir, adapter_dirs):
    """Greedy continuations from peft, one adapter at a time (and the base model)."""
    pm = peft_model_with(tiny_model_dir, {n.replace("/", "_"): p for n, p in adapter_dirs.items()})
    _, tok = load_model(tiny_model_dir)
    out: dict[tuple[str, str], list[int]] = {}
    for prompt in PROMPTS:
        ids = torch.tensor([tok(prompt)["input_ids"]])
        kw = dict(
            do_sample=False,
            max_new_tokens=MAX_TOKENS,
            pad_token_id=PAD_ID,
            attention_mask=torch.ones_like(ids),
        )
        for name in ADAPTERS:
            pm.set_adapter(name.replace("/", "_"))
            with torch.no_grad():
                out[(name, prompt)] = pm.generate(input_ids=ids, **kw)[0, ids.shape[1] :].tolist()
        with torch.no_grad(), pm.disable_adapter():
            out[("", prompt)] = pm.generate(input_ids=ids, **kw)[0, ids.shape[1] :].tolist()
    return out


def test_cluster_is_healthy(client):
    st = client.status()
    assert st.store_healthy
    assert len(st.executors) == 2 and all(e.healthy for e in st.executors)


def test_push_resolves_and_lists(client, pushed):
    for name, rev in pushed.items():
        assert rev.ref == f"{name}@1"
        assert len(rev.digest) == 64
        assert rev.rank == ADAPTERS[name][0]
        assert sorted(rev.target_modules) == sorted(ADAPTERS[name][1])
        assert client.resolve(name).digest == rev.digest
        assert client.resolve(f"{name}@latest").digest == rev.digest
    listed = {f"{a.tenant}/{a.name}" for a in client.list_adapters()}
    assert set(ADAPTERS) <= listed


def test_mixed_greedy_generation_matches_peft(client, pushed, oracle):
    sp = sampling_params(max_tokens=MAX_TOKENS, temperature=0.0)
    jobs = [(name, p) for p in PROMPTS for name in [*ADAPTERS, ""]]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda j: client.generate(j[1], adapter=j[0], sampling=sp), jobs))
    executors = set()
    for (name, prompt), res in zip(jobs, results, strict=True):
        want = oracle[(name, prompt)]
        assert res.token_ids == want, f"{name or 'base'} on {prompt!r}: {res.token_ids} != {want}"
        assert res.finish_reason in ("length", "stop")
        if name:
            assert res.adapter == f"{name}@1" and res.digest == pushed[name].digest
        executors.add(res.executor)
    # The adapters matter: each one changes the base model's continuation of some prompt.
    for name in ADAPTERS:
        assert any(oracle[(name, p)] != oracle[("", p)] for p in PROMPTS), name
    assert executors, "no executor reported"


def test_repeated_prompt_reuses_its_cached_prefix_and_stays_exact(cluster, client, pushed, oracle):
    """Automatic prefix caching on a real executor: the same prompt under the same adapter
    revision reuses the KV of its full blocks (Status counts the hit tokens) and the tokens are
    still peft's."""
    from mintmesh.v1 import executor_pb2, executor_pb2_grpc

    name, prompt = "alice/chat", PROMPTS[3]
    sp = sampling_params(max_tokens=MAX_TOKENS, temperature=0.0)
    first = client.generate(prompt, adapter=name, sampling=sp)
    with cluster.mesh_channel(cluster.executor_addresses[int(first.executor[-1])]) as ch:
        ex = executor_pb2_grpc.ExecutorStub(ch)
        before = ex.Status(executor_pb2.ExecutorStatusRequest(), timeout=10)
        again = client.generate(prompt, adapter=name, sampling=sp)
        after = ex.Status(executor_pb2.ExecutorStatusRequest(), timeout=10)
    assert again.executor == first.executor
    assert first.token_ids == again.token_ids == oracle[(name, prompt)]
    assert after.prefix_caching and after.kv_blocks_cached > 0
    assert after.prefix_hit_tokens - before.prefix_hit_tokens >= after.kv_block_size
    assert after.prefix_query_tokens > before.prefix_query_tokens


def test_stop_strings_and_stop_ids_through_the_router(client, pushed, oracle, tiny_model_dir):
    """Stop strings end the text where peft's greedy continuation first contains them (the
    stop string itself is not emitted); a stop token id ends the tokens right after it."""
    _, tok = load_model(tiny_model_dir)
    name, prompt = "bob/code", "Hello, world"
    want = oracle[(name, prompt)]
    full = tok.decode(want)
    # A stop string of 2 characters from the middle of the continuation.
    k = next(i for i in range(2, len(full) - 2) if full[i : i + 2].isprintable())
    stop = full[k : k + 2]
    res = client.generate(
        prompt, adapter=name, sampling=sampling_params(max_tokens=MAX_TOKENS, stop=[stop])
    )
    assert res.finish_reason == "stop"
    assert res.text == full[: full.index(stop)]
    assert res.token_ids == want[: len(res.token_ids)] and len(res.token_ids) < len(want)
    # A stop token id: the first token not seen before in the continuation.
    j = next(i for i in range(1, len(want)) if want[i] not in want[:i])
    res = client.generate(
        prompt,
        adapter=name,
        sampling=sampling_params(max_tokens=MAX_TOKENS, stop_token_ids=[want[j]]),
    )
    assert res.token_ids == want[: j + 1] and res.finish_reason == "stop"


def test_bad_requests_get_the_right_status(client, pushed):
    cases = [
        (dict(adapter="nobody/nothing"), grpc.StatusCode.NOT_FOUND, "nobody/nothing"),
        (dict(adapter="alice/chat@99"), grpc.StatusCode.NOT_FOUND, "99"),
        (dict(adapter="not a ref"), grpc.StatusCode.INVALID_ARGUMENT, "not a ref"),
        (
            dict(sampling=sampling_params(max_tokens=0)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "max_tokens",
        ),
        (
            dict(sampling=sampling_params(max_tokens=4, temperature=-1.0)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "temperature",
        ),
    ]
    for kw, code, needle in cases:
        with pytest.raises(grpc.RpcError) as ei:
            client.generate("hi", **kw)
        assert ei.value.code() == code, (kw, ei.value.details())
        assert needle in ei.value.details(), (kw, ei.value.details())


def test_garbage_push_through_router_is_refused_and_catalog_unchanged(client, pushed):
    before = sorted((a.tenant, a.name, a.revision_count) for a in client.list_adapters())
    with pytest.raises(grpc.RpcError) as ei:
        client.push_adapter_bytes(
            "alice/junk", '{"peft_type": "LORA", "r": 4, "lora_alpha": 8}', b"\x00garbage" * 100
        )
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "safetensors" in ei.value.details()
    after = sorted((a.tenant, a.name, a.revision_count) for a in client.list_adapters())
    assert before == after


def test_batched_push_and_fetch_stream_through_the_router(client, base_info):
    """The router proxies the store's streaming RPCs both ways: a PushAdapters stream (one
    result per item, a bad item refused alone) and a FetchAdapter stream back."""
    from mintmesh.synth import synth_peft_bytes

    good = [synth_peft_bytes(base_info, rank=2, seed=s) for s in (31, 32)]
    items = [("gina/one", *good[0]), ("gina/bad", good[1][0], b"\x00junk"), ("gina/two", *good[1])]
    res = list(client.push_many(items))
    assert [r.HasField("error") for r in res] == [False, True, False]
    assert res[1].error.code == "INVALID_ARGUMENT"
    digest = res[2].revision.digest
    assert client.resolve("gina/two").digest == digest
    data = client.fetch(ref="gina/two")
    assert hashlib.sha256(data).hexdigest() == digest


def test_one_generate_is_one_trace_across_all_four_services(client, tiny_model_dir, otlp, tmp_path):
    # A fresh adapter: the executor must ask its sidecar, which must fetch from the store.
    path = make_peft_adapter(tiny_model_dir, tmp_path / "trace", rank=2, seed=99)
    client.push_adapter(path, "dave/traced")
    res = client.generate("trace me", adapter="dave/traced", sampling=sampling_params(max_tokens=3))
    _, tok = load_model(tiny_model_dir)
    pm = peft_model_with(tiny_model_dir, {"t": path})
    assert res.token_ids == peft_greedy(pm, "t", tok("trace me")["input_ids"], 3)[0]
    want = {"mint-router", "mint-executor", "mint-cache", "mint-store"}

    def roots_of(spans, tid):
        in_trace = [s for s in spans if s["trace_id"] == tid]
        ids = {s["span_id"] for s in in_trace}
        return [s for s in in_trace if s["parent_span_id"] not in ids]

    # Each service exports its spans in its own batches, so a trace arrives piece by piece:
    # wait (bounded) until one trace spans all four services and every span's parent is in.
    deadline = time.monotonic() + 20
    while True:
        spans = otlp.snapshot()
        gen = [s for s in spans if s["service"] == "mint-router" and "Generate" in s["name"]]
        traces = {}
        for s in spans:
            traces.setdefault(s["trace_id"], set()).add(s["service"])
        full = [
            t for t, svcs in traces.items() if want <= svcs and any(g["trace_id"] == t for g in gen)
        ]
        if (full and len(roots_of(spans, full[0])) == 1) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert full, f"no trace spans all of {want}; traces: {traces}"
    roots = roots_of(spans, full[0])
    assert len(roots) == 1, f"trace is not connected: {len(roots)} roots: {roots}"


def test_cli_generate_json_and_adapter_commands(cluster, pushed, oracle):
    env_router = ["--router", cluster.router_address]
    env = {**os.environ, "MINT_API_KEY": cluster.admin_key}
    run = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "mintmesh.cli", *a],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    r = run(
        "generate",
        "--adapter",
        "bob/code",
        "--max-tokens",
        "5",
        "--json",
        *env_router,
        "Hello, world",
    )
    assert r.returncode == 0, r.stderr
    obj = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("text", "token_ids", "finish_reason", "adapter", "digest"):
        assert key in obj
    assert obj["adapter"] == "bob/code@1" and obj["digest"] == pushed["bob/code"].digest
    # Greedy: the first 5 of peft's 12-token continuation (the oracle's own prefix).
    assert obj["token_ids"] == oracle[("bob/code", "Hello, world")][:5]
    assert obj["finish_reason"] == ("length" if len(obj["token_ids"]) == 5 else "stop")
    r = run("adapter", "show", "carol/mlp", *env_router)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["digest"] == pushed["carol/mlp"].digest
    r = run("adapter", "list", "alice", "--json", *env_router)
    assert r.returncode == 0, r.stderr
    assert [a["name"] for a in json.loads(r.stdout)][:1] == ["alice/chat"]
    r = run("adapter", "show", "nobody/none", *env_router)
    assert r.returncode != 0 and "NOT_FOUND" in r.stderr


# Issue 11: strongly trained adapters (peft's own init after torch.manual_seed, every lora_
# parameter x4) on all seven modules; s101 is the adapter of the report.
STRONG = {"dave/s101": (8, 101), "erin/s7": (16, 7), "frank/s3": (4, 3)}
ISSUE_11_TOKENS = [158, 139, 15, 37, 89, 42, 218, 222, 160, 15]


@pytest.fixture(scope="module")
def strong_dirs(tiny_model_dir, tmp_path_factory):
    from mintmesh.kernels import native

    native.load_attn(block=True)  # built before the executors attend: the native path serves
    root = tmp_path_factory.mktemp("strong")
    return {
        name: make_strong_adapter(tiny_model_dir, root / name.replace("/", "_"), rank=r, seed=s)
        for name, (r, s) in STRONG.items()
    }


@pytest.fixture(scope="module")
def strong_oracle(tiny_model_dir, strong_dirs):
    pm = peft_model_with(tiny_model_dir, {n.replace("/", "_"): p for n, p in strong_dirs.items()})

    def greedy(name, ids, n):
        return peft_greedy(pm, name.replace("/", "_") if name else None, ids, n)[0]

    return greedy


def test_issue_11_scenario_through_the_cli(cluster, tiny_model_dir, strong_dirs, strong_oracle):
    """The report, as a user ran it: push with `mint adapter push`, then `mint generate
    --temperature 0 --max-tokens 24 --json "The personal model of"`: peft's tokens, exactly."""
    env = {**os.environ, "MINT_API_KEY": cluster.admin_key, "MINT_ROUTER": cluster.router_address}

    def mint(*a):
        r = subprocess.run(
            [sys.executable, "-m", "mintmesh.cli", *a],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        assert r.returncode == 0, r.stderr
        return r.stdout

    mint("adapter", "push", str(strong_dirs["dave/s101"]), "--name", "dave/s101")
    prompt = "The personal model of"
    out = mint(
        "generate", "--adapter", "dave/s101", "--temperature", "0", "--max-tokens", "24",
        "--json", prompt,
    )  # fmt: skip
    obj = json.loads(out.strip().splitlines()[-1])
    _, tok = load_model(tiny_model_dir)
    want = strong_oracle("dave/s101", tok(prompt)["input_ids"], 24)
    assert want[:10] == ISSUE_11_TOKENS
    assert obj["token_ids"] == want
    # The revision this push made (the concurrent test may have pushed it first, in any order).
    assert obj["adapter"].startswith("dave/s101@") and len(obj["digest"]) == 64


def test_concurrent_strong_adapters_through_the_router(
    client, tiny_model_dir, strong_dirs, strong_oracle
):
    """Issue 11's second probe: 24 concurrent greedy generations over three strong adapters and
    the base model, prompts spanning several KV blocks, 32 tokens each: every token peft's."""
    for name, d in strong_dirs.items():
        if name != "dave/s101":
            client.push_adapter(d, name)
        else:
            try:
                client.resolve(name)
            except grpc.RpcError:
                client.push_adapter(d, name)
    prompts = ["Personal models for everyone, on one shared base. " * k for k in (1, 2)] + [
        "x",
        "The mesh serves many adapters at once; each row has its own.",
    ]
    names = [*STRONG, ""]
    jobs = [(n, p) for p in prompts for n in names][:24]
    jobs += jobs[: 24 - len(jobs)]
    sp = sampling_params(max_tokens=32, temperature=0.0)
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda j: client.generate(j[1], adapter=j[0], sampling=sp), jobs))
    _, tok = load_model(tiny_model_dir)
    wrong = []
    for (name, prompt), res in zip(jobs, results, strict=True):
        want = strong_oracle(name, tok(prompt)["input_ids"], 32)
        if res.token_ids != want:
            wrong.append((name, prompt[:20]))
    assert not wrong, f"{len(wrong)} of {len(jobs)} differ from peft: {wrong}"
    assert len(jobs) == 24


def test_cli_tenant_prefetch_and_status_against_the_cluster(cluster, tiny_model_dir, tmp_path):
    """The README's tenant, prefetch and status commands as a user runs them: the admin creates
    a tenant, the tenant's key sees only itself, pushes and prefetches its adapter (placed on the
    executor that then serves it), a second key works until it is revoked; status lists the
    executors."""
    base_env = {**os.environ, "MINT_ROUTER": cluster.router_address}

    def mint(*a, key, ok=True):
        r = subprocess.run(
            [sys.executable, "-m", "mintmesh.cli", *a],
            capture_output=True,
            text=True,
            timeout=120,
            env={**base_env, "MINT_API_KEY": key},
        )
        assert (r.returncode == 0) == ok, (a, r.returncode, r.stdout, r.stderr)
        return r

    admin = cluster.admin_key
    created = json.loads(mint("tenant", "create", "hana", "--json", key=admin).stdout)
    assert created["tenant"] == "hana" and created["api_key"].startswith("mint_")
    key = created["api_key"]
    assert mint("tenant", "whoami", key=key).stdout.strip() == "tenant hana"
    assert mint("tenant", "whoami", key=admin).stdout.strip() == "admin"
    mine = json.loads(mint("tenant", "list", "--json", key=key).stdout)
    assert [t["tenant"] for t in mine] == ["hana"] and mine[0]["key_count"] == 1
    mint("tenant", "create", "iris", key=admin)
    everyone = {t["tenant"] for t in json.loads(mint("tenant", "list", "--json", key=admin).stdout)}
    assert {"hana", "iris"} <= everyone
    assert [t["tenant"] for t in json.loads(mint("tenant", "list", "--json", key=key).stdout)] == [
        "hana"
    ]
    # A second key for the tenant; revoked, it no longer authenticates.
    second = mint("tenant", "key", "hana", key=admin).stdout.strip().splitlines()[-1]
    assert mint("tenant", "whoami", key=second).stdout.strip() == "tenant hana"
    key_id = second[len("mint_") :][:12]
    assert mint("tenant", "revoke", key_id, key=admin).stdout.strip() == f"revoked {key_id}"
    r = mint("tenant", "whoami", key=second, ok=False)
    assert "UNAUTHENTICATED" in r.stderr and "Traceback" not in r.stderr
    # Push, then prefetch: the placement names the executor, and generate lands there.
    d = make_peft_adapter(tiny_model_dir, tmp_path / "hana", rank=4, seed=77)
    mint("adapter", "push", str(d), "--name", "hana/notes", key=key)
    [p] = json.loads(mint("adapter", "prefetch", "hana/notes", "--json", key=key).stdout)
    assert p["adapter"] == "hana/notes" and p["executor"] in cluster.executor_addresses
    r = mint("adapter", "prefetch", "bob/code", key=key, ok=False)
    assert "PERMISSION_DENIED" in r.stderr
    out = mint(
        "generate", "--adapter", "hana/notes", "--max-tokens", "2", "--json", "hi", key=key
    ).stdout
    gen = json.loads(out.strip().splitlines()[-1])
    i = cluster.executor_addresses.index(p["executor"])
    assert gen["executor"] == f"executor-{i}" and gen["digest"] == p["digest"]
    st = json.loads(mint("status", "--json", key=admin).stdout)
    assert st["storeHealthy"] is True
    assert sorted(e["address"] for e in st["executors"]) == sorted(cluster.executor_addresses)
    assert all(e["healthy"] for e in st["executors"])
    assert mint("status", "--wait", "30", key=admin).returncode == 0


def test_delete_purges_every_tier(cluster, client, tiny_model_dir, tmp_path):
    """Read each tier back: executor device pool and host tier, node cache (sidecar Stats and the
    LMDB file itself), store catalog and blob directory."""
    from mintmesh.cache.reader import NodeCacheReader
    from mintmesh.v1 import cache_pb2, cache_pb2_grpc, executor_pb2, executor_pb2_grpc

    rev = client.push_adapter(
        make_peft_adapter(tiny_model_dir, tmp_path / "gone", rank=2, seed=77), "erin/gone"
    )
    d = rev.digest
    res = client.generate("bye", adapter="erin/gone", sampling=sampling_params(max_tokens=2))
    i = int(res.executor.rsplit("-", 1)[1])
    ex_ch = cluster.mesh_channel(cluster.executor_addresses[i])
    cache_ch = cluster.mesh_channel(cluster.cache_addresses[i])
    ex = executor_pb2_grpc.ExecutorStub(ex_ch)
    cache = cache_pb2_grpc.AdapterCacheStub(cache_ch)
    req = executor_pb2.ExecutorStatusRequest(include_node_cache=True)

    def tiers():
        st = ex.Status(req, timeout=10)
        stats = cache.Stats(cache_pb2.CacheStatsRequest(), timeout=10)
        return {
            "device": d in st.resident_adapters,
            "host": d in st.host_adapters,
            "node_cache": d in st.node_cache_adapters or d in stats.digests,
        }

    assert tiers() == {"device": True, "host": True, "node_cache": True}
    blobs = [p for p in (cluster.config.data_dir / "store").rglob(d) if p.is_file()]
    assert blobs, "the blob should be in the store's directory"
    deleted = client.delete("erin/gone")
    assert [r.digest for r in deleted] == [d]
    assert tiers() == {"device": False, "host": False, "node_cache": False}
    reader = NodeCacheReader(cluster.config.data_dir / f"node-{i}")
    assert reader.read(d) is None, "the bytes are still in the node's LMDB file"
    assert not any(p.exists() for p in blobs), "the blob is still in the store"
    for call in (
        lambda: client.fetch(digest=d),
        lambda: client.resolve("erin/gone"),
        lambda: client.generate("bye", adapter="erin/gone", sampling=sampling_params(max_tokens=2)),
    ):
        with pytest.raises(grpc.RpcError) as ei:
            call()
        assert ei.value.code() == grpc.StatusCode.NOT_FOUND
    ex_ch.close()
    cache_ch.close()


def test_router_prefetch_warms_the_executor_generate_goes_to(
    cluster, client, tiny_model_dir, tmp_path
):
    """Prefetch through the router: the hint goes to the executor the rendezvous order picks,
    which loads the adapter store -> node cache -> host -> device before any request; the
    Generate that follows lands on that executor and finds it resident."""
    from mintmesh.v1 import executor_pb2, executor_pb2_grpc

    rev = client.push_adapter(
        make_peft_adapter(tiny_model_dir, tmp_path / "warm", rank=4, seed=91), "frank/warm"
    )
    [p] = client.prefetch("frank/warm", "frank/warm")  # duplicates count once
    assert (p.adapter, p.digest, p.resident, p.dropped) == ("frank/warm", rev.digest, False, False)
    i = cluster.executor_addresses.index(p.executor)
    with cluster.mesh_channel(p.executor) as ch:
        ex = executor_pb2_grpc.ExecutorStub(ch)
        end = time.monotonic() + 60
        while time.monotonic() < end:
            st = ex.Status(executor_pb2.ExecutorStatusRequest(), timeout=10)
            if rev.digest in st.resident_adapters:
                break
            time.sleep(0.05)
        assert rev.digest in st.resident_adapters and rev.digest in st.host_adapters
    assert client.prefetch("frank/warm")[0].resident
    res = client.generate("hi", adapter="frank/warm", sampling=sampling_params(max_tokens=2))
    assert res.executor == f"executor-{i}" and res.digest == rev.digest
    for refs, code in (
        ([], grpc.StatusCode.INVALID_ARGUMENT),
        (["frank/never-pushed"], grpc.StatusCode.NOT_FOUND),
        (["not a ref"], grpc.StatusCode.INVALID_ARGUMENT),
        ([f"frank/a{i}" for i in range(65)], grpc.StatusCode.INVALID_ARGUMENT),
    ):
        with pytest.raises(grpc.RpcError) as ei:
            client.prefetch(*refs)
        assert ei.value.code() == code, (refs, ei.value.details())
    # The executor's own hint RPC names a malformed digest.
    with cluster.mesh_channel(p.executor) as ch:
        with pytest.raises(grpc.RpcError) as ei:
            executor_pb2_grpc.ExecutorStub(ch).PrefetchAdapters(
                executor_pb2.PrefetchAdaptersRequest(digests=["xyz"]), timeout=10
            )
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "xyz" in ei.value.details()


def test_every_process_serves_metrics_that_count_exactly(cluster, client, pushed):
    """Each process `mint up` starts serves Prometheus metrics on a port of its own (announced on
    its METRICS line, collected in cluster.metrics_urls): N generations through the router move
    the router's placements and Generate count, the executors' Generate count and generated
    tokens, and the store's resolves by exactly N (N x the tokens)."""
    from promscrape import rpcs, scrape, val

    urls = cluster.metrics_urls
    kinds = {"store", "router", "cache-0", "cache-1", "executor-0", "executor-1"}
    assert kinds <= set(urls), urls
    assert len({urls[k] for k in kinds}) == len(kinds)
    execs = [k for k in kinds if k.startswith("executor-")]

    def idle() -> bool:  # nothing left running from an earlier test
        return all(
            val(s, "mint_executor_running_sequences") == val(s, "mint_executor_queue_depth") == 0
            for s in (scrape(urls[k]) for k in execs)
        )

    deadline = time.monotonic() + 30
    while not idle():
        assert time.monotonic() < deadline, "executors still busy"
        time.sleep(0.1)
    before = {k: scrape(urls[k]) for k in kinds}
    n, k_tokens = 3, 5
    name = next(iter(pushed))
    for i in range(n):
        out = client.generate(
            PROMPTS[i],
            adapter=name,
            sampling=sampling_params(max_tokens=k_tokens, ignore_eos=True),
        )
        assert out.completion_tokens == k_tokens == len(out.token_ids)
    after = {k: scrape(urls[k]) for k in kinds}

    def delta(kind: str, fn, *args, **labels) -> float:
        return fn(after[kind], *args, **labels) - fn(before[kind], *args, **labels)

    placed = sum(
        v - val(before["router"], name_, **dict(labels))
        for (name_, labels), v in after["router"].items()
        if name_ == "mint_router_placements_total"
    )
    assert placed == n
    assert delta("router", rpcs, "mintmesh.v1.Router", "Generate", "OK") == n
    assert sum(delta(e, rpcs, "mintmesh.v1.Executor", "Generate", "OK") for e in execs) == n
    assert sum(delta(e, val, "mint_executor_tokens_generated_total") for e in execs) == n * k_tokens
    assert sum(delta(e, val, "mint_executor_time_to_first_token_seconds_count") for e in execs) == n
    assert delta("store", rpcs, "mintmesh.v1.AdapterStore", "ResolveAdapter", "OK") == n
    for e in cluster.executor_addresses:
        assert val(after["router"], "mint_router_executor_healthy", executor=e) == 1.0
