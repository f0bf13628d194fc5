"""The service fuzzers (issue 14, item 7): every RPC of every service (the router, the store, an
executor, a cache sidecar) gets structured messages with hostile field values and raw request
bytes, and every HTTP route of the gateway (the OpenAI and Tinker APIs, from its OpenAPI
document) gets hostile paths and bodies, against a real cluster of processes with auth on and
mutual TLS inside the mesh. No input may give INTERNAL or UNKNOWN, outlive its deadline, kill a
process, or give an HTTP 500; what was stored before the fuzzing is intact after it.

CI runs a fixed, derandomized number of cases per method and route; `make fuzz` runs
MINT_FUZZ_FACTOR (25) times as many with fresh seeds. MINT_FUZZ_REPORT=path writes the counts:
cases per service and the statuses seen."""

from __future__ import annotations

import collections
import hashlib
import json
import os
import urllib.parse

import grpc
import httpx
import pytest
from cluster_util import gateway_cluster_config
from fuzzing import fuzz_examples
from hypothesis import given
from hypothesis import strategies as st
from rpc_fuzz import (
    DEEP_JSON,
    HOSTILE_STRINGS,
    Plausible,
    http_bodies,
    messages,
    mutated,
    raw_requests,
)

from mintmesh.client import MintClient, push_header, push_requests
from mintmesh.cluster import LocalCluster
from mintmesh.services.common.auth import INTERNAL_TOKEN_HEADER
from mintmesh.synth import synth_peft_bytes
from mintmesh.v1 import cache_pb2, common_pb2, executor_pb2, router_pb2, store_pb2, training_pb2

pytestmark = [pytest.mark.e2e, pytest.mark.fuzz]
BAD = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
DEADLINE_S = 30.0
SERVICES = {
    "router": router_pb2.DESCRIPTOR.services_by_name["Router"],
    "store": store_pb2.DESCRIPTOR.services_by_name["AdapterStore"],
    "executor": executor_pb2.DESCRIPTOR.services_by_name["Executor"],
    "cache": cache_pb2.DESCRIPTOR.services_by_name["AdapterCache"],
}
METHODS = [(svc, m.name) for svc, d in SERVICES.items() for m in d.methods]
# A watch stream is meant to stay open: it is read for its first message, then cancelled.
WATCHES = {("store", "WatchKeys")}
COUNTS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


def _seeds(known: common_pb2.AdapterRevision, cfg: str, weights: bytes, key: str) -> dict:
    """A valid request of each method that has a field worth reaching (the mutated cases
    start from these). A client stream's seed is its list of messages."""
    sp = common_pb2.SamplingParams(max_tokens=4, temperature=0.0)
    lora = training_pb2.LoraConfig(rank=4, alpha=8.0, target_modules=["q_proj", "v_proj"])
    datum = training_pb2.TrainingDatum(
        input_ids=[1, 2, 3, 4], target_tokens=[2, 3, 4, 5], weights=[1.0] * 4
    )
    fb = training_pb2.ForwardBackwardRequest(
        run_id="fuzz-run", data=[datum], loss_fn="cross_entropy"
    )
    adam = training_pb2.AdamParams(learning_rate=1e-3, beta1=0.9, beta2=0.95, eps=1e-8)
    training = {
        "CreateTrainingRun": training_pb2.CreateTrainingRunRequest(lora=lora, tenant="fuzz"),
        "ForwardBackward": fb,
        "OptimStep": training_pb2.OptimStepRequest(run_id="fuzz-run", adam=adam),
        "SaveRunWeights": training_pb2.SaveRunWeightsRequest(run_id="fuzz-run", name="fuzz/t"),
        "DropTrainingRun": training_pb2.DropTrainingRunRequest(run_id="fuzz-gone"),
    }
    d = known.digest
    seeds = {("router", k): v for k, v in training.items()}
    seeds.update({("executor", k): v for k, v in training.items()})
    seeds.update(
        {
            ("router", "Generate"): router_pb2.GenerateRequest(
                adapter="fuzz/a", prompt="Hello", sampling=sp
            ),
            ("router", "Score"): router_pb2.ScoreRequest(adapter="fuzz/a@1", prompt="Hello"),
            ("router", "Prefetch"): router_pb2.RouterPrefetchRequest(adapters=["fuzz/a"]),
            ("executor", "Generate"): executor_pb2.ExecutorGenerateRequest(
                adapter=known, prompt="Hello", sampling=sp, tenant="fuzz"
            ),
            ("executor", "Score"): executor_pb2.ExecutorScoreRequest(
                adapter=known, prompt_token_ids=[1, 2, 3]
            ),
            ("executor", "Forward"): executor_pb2.ForwardRequest(
                rows=[executor_pb2.ForwardRow(adapter_digest=d, token_ids=[1, 2, 3])],
                output=executor_pb2.FORWARD_OUTPUT_LOGPROBS,
            ),
            ("executor", "PrefetchAdapters"): executor_pb2.PrefetchAdaptersRequest(digests=[d]),
            ("store", "PushAdapter"): list(
                push_requests(push_header("fuzz/p", cfg, weights, {"k": "v"}), weights)
            ),
            ("store", "ResolveAdapter"): store_pb2.ResolveAdapterRequest(ref="fuzz/a"),
            ("store", "FetchAdapter"): store_pb2.FetchAdapterRequest(digest=d),
            ("store", "ListAdapters"): store_pb2.ListAdaptersRequest(tenant="fuzz", page_size=5),
            ("store", "ListRevisions"): store_pb2.ListRevisionsRequest(name="fuzz/a"),
            ("store", "SetAlias"): store_pb2.SetAliasRequest(
                name="fuzz/a", alias="prod", revision=1
            ),
            ("store", "AddEvaluation"): store_pb2.AddEvaluationRequest(
                ref="fuzz/a@1", metric="acc", value=0.5, evaluator="fuzz"
            ),
            ("store", "SetAliasGate"): store_pb2.SetAliasGateRequest(
                name="fuzz/a", alias="prod", metric="acc", threshold=0.4
            ),
            ("store", "DeprecateRevision"): store_pb2.DeprecateRevisionRequest(
                ref="fuzz/a@1", undo=True
            ),
            ("store", "MergeAdapters"): store_pb2.MergeAdaptersRequest(
                name="fuzz/m",
                sources=[store_pb2.MergeSource(ref="fuzz/a@1", weight=0.5)] * 2,
            ),
            ("store", "Authenticate"): store_pb2.AuthenticateRequest(api_key=key),
            ("cache", "EnsureAdapter"): cache_pb2.EnsureAdapterRequest(digest=d),
            ("cache", "Pin"): cache_pb2.PinRequest(digest=d, fetch=True),
            ("cache", "Prefetch"): cache_pb2.PrefetchRequest(digests=[d]),
            ("cache", "RecordHits"): cache_pb2.RecordHitsRequest(digests=[d]),
        }
    )
    return seeds


class Fuzzed:
    def __init__(self, cluster: LocalCluster, tenant_key: str, plausible: Plausible, kept):
        self.cluster = cluster
        self.plausible = plausible
        self.seeds: dict = {}
        self.seed_statuses: dict = {}
        self.kept = kept  # (ref, sha256 of its weights) pushed before any fuzzing
        self.channels = {
            "router": grpc.insecure_channel(cluster.router_address),
            "store": cluster.mesh_channel(cluster.store_address),
            "executor": cluster.mesh_channel(cluster.executor_addresses[0]),
            "cache": cluster.mesh_channel(cluster.cache_addresses[0]),
        }
        self.keys = {"admin": cluster.admin_key, "tenant": tenant_key, "bogus": "mint_nope"}
        self.http = httpx.Client(base_url=f"http://{cluster.gateway_address}", timeout=DEADLINE_S)
        self.routes = _routes(self.http.get("/openapi.json").json())

    def metadata(self, who: str) -> list[tuple[str, str]]:
        md = [(INTERNAL_TOKEN_HEADER, self.cluster._internal_token)] if who == "admin" else []
        if who != "none":
            md.append(("authorization", f"Bearer {self.keys[who]}"))
        return md

    def close(self):
        for ch in self.channels.values():
            ch.close()
        self.http.close()


def _routes(openapi: dict) -> list[tuple[str, str]]:
    return sorted(
        (method.upper(), path)
        for path, item in openapi["paths"].items()
        for method in item
        if method in ("get", "post", "put", "delete", "patch")
    )


@pytest.fixture(scope="module")
def fuzzed(tiny_model_dir, base_info, tmp_path_factory):
    """A cluster of its own (the fuzzer deletes, evicts and revokes what it can name), with a
    tenant, a key, and two adapters: one the fuzzer knows (its ref and digest are among the
    plausible values), one it does not (checked intact at the end)."""
    # Every case comes from 127.0.0.1: past the limit of failed authentications (30 a
    # minute), the fuzzer's bogus keys would lock out its valid ones, as the limiter should
    # (tests/test_auth_mesh.py checks it), and hide the code behind.
    config = gateway_cluster_config(
        tiny_model_dir,
        tmp_path_factory.mktemp("fuzz-cluster"),
        MINT_ROUTER_AUTH_FAILURES_PER_MINUTE="1000000",
    )
    c = LocalCluster(config)
    c.start()
    try:
        with MintClient(c.router_address, timeout=60, api_key=c.admin_key) as cl:
            cl.create_tenant("fuzz")
            key = cl.create_api_key("fuzz").api_key
        with MintClient(c.router_address, timeout=60, api_key=key) as cl:
            cfg, weights = synth_peft_bytes(base_info, rank=4, seed=1)
            known = cl.push_adapter_bytes("fuzz/a", cfg, weights)
            cfg2, weights2 = synth_peft_bytes(base_info, rank=8, seed=2)
            kept = cl.push_adapter_bytes("fuzz/kept", cfg2, weights2)
            kept_sha = hashlib.sha256(cl.fetch(digest=kept.digest)).hexdigest()
        vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
        plausible = Plausible(
            strings=[
                "fuzz",
                "fuzz/a",
                "fuzz/a@1",
                "fuzz/a@2",
                "fuzz/b",
                known.digest,
                cfg,
                "fp32",
                "int8",
                "training",
                "cross_entropy",
                "Hello",
                base_info.fingerprint,
            ],
            blobs=[weights, bytes.fromhex(known.digest)[:16]],
            token_ids=[0, 1, 5, 17, 100, vocab - 1, vocab],
        )
        f = Fuzzed(c, key, plausible, (kept, kept_sha))
        f.seeds = _seeds(known, cfg, weights, key)
        with MintClient(c.router_address, timeout=60, api_key=key) as cl:
            cl.create_training_run(run_id="fuzz-run", rank=4)
        f.seed_statuses = _seed_statuses(f)
        yield f
        f.close()
        _write_report()
        _assert_survived(f)  # after every fuzzing test of the module
    finally:
        c.stop()


def _write_report():
    path = os.environ.get("MINT_FUZZ_REPORT")
    if path:
        report = {svc: {"cases": sum(c.values()), "statuses": dict(c)} for svc, c in COUNTS.items()}
        with open(path, "w") as fh:
            json.dump(report, fh, sort_keys=True)


def _call(f: Fuzzed, svc: str, method: str, payload, who: str) -> tuple[grpc.StatusCode, str]:
    """One call with request bytes (or a list of them for a client stream): its status and
    details."""
    m = SERVICES[svc].methods_by_name[method]
    path = f"/{SERVICES[svc].full_name}/{method}"
    ch = f.channels[svc]
    ident = lambda b: b  # noqa: E731
    md = f.metadata(who)
    kind = (m.client_streaming, m.server_streaming)
    try:
        if kind == (False, False):
            ch.unary_unary(path, ident, ident)(payload, timeout=DEADLINE_S, metadata=md)
        elif kind == (False, True):
            stream = ch.unary_stream(path, ident, ident)(payload, timeout=DEADLINE_S, metadata=md)
            if (svc, method) in WATCHES:
                next(stream, None)
                stream.cancel()
                return grpc.StatusCode.OK, ""
            for _ in stream:
                pass
        elif kind == (True, False):
            ch.stream_unary(path, ident, ident)(iter(payload), timeout=DEADLINE_S, metadata=md)
        else:
            for _ in ch.stream_stream(path, ident, ident)(
                iter(payload), timeout=DEADLINE_S, metadata=md
            ):
                pass
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


def _check(f: Fuzzed, svc: str, method: str, payload, who: str) -> None:
    code, details = _call(f, svc, method, payload, who)
    COUNTS[svc][code.name] += 1
    assert code not in BAD, f"{svc}.{method} as {who}: {code.name} {details}"
    # A watch is cancelled by us; anything else past its deadline is a hang.
    assert code != grpc.StatusCode.DEADLINE_EXCEEDED, f"{svc}.{method} hung past {DEADLINE_S} s"


WHO = st.sampled_from(["admin", "admin", "admin", "tenant", "tenant", "none", "bogus"])


@pytest.mark.parametrize("svc,method", METHODS, ids=[f"{s}.{m}" for s, m in METHODS])
def test_structured_hostile_messages(fuzzed, svc, method):
    m = SERVICES[svc].methods_by_name[method]
    msgs = messages(m.input_type, fuzzed.plausible)
    payloads = (
        st.lists(msgs, min_size=1, max_size=4).map(lambda ms: [x.SerializeToString() for x in ms])
        if m.client_streaming
        else msgs.map(lambda x: x.SerializeToString())
    )

    @fuzz_examples(12)
    @given(payload=payloads, who=WHO)
    def run(payload, who):
        _check(fuzzed, svc, method, payload, who)

    run()


@pytest.mark.parametrize("svc,method", METHODS, ids=[f"{s}.{m}" for s, m in METHODS])
def test_raw_request_bytes(fuzzed, svc, method):
    m = SERVICES[svc].methods_by_name[method]
    raw = raw_requests(m.input_type, fuzzed.plausible)
    payloads = st.lists(raw, min_size=1, max_size=3) if m.client_streaming else raw

    @fuzz_examples(4)
    @given(payload=payloads, who=WHO)
    def run(payload, who):
        _check(fuzzed, svc, method, payload, who)

    run()


SEEDED = [
    ("router", "Generate"),
    ("router", "Score"),
    ("router", "Prefetch"),
    ("router", "CreateTrainingRun"),
    ("router", "ForwardBackward"),
    ("router", "OptimStep"),
    ("router", "SaveRunWeights"),
    ("router", "DropTrainingRun"),
    ("executor", "Generate"),
    ("executor", "Score"),
    ("executor", "Forward"),
    ("executor", "PrefetchAdapters"),
    ("executor", "CreateTrainingRun"),
    ("executor", "ForwardBackward"),
    ("executor", "OptimStep"),
    ("executor", "SaveRunWeights"),
    ("executor", "DropTrainingRun"),
    ("store", "PushAdapter"),
    ("store", "ResolveAdapter"),
    ("store", "FetchAdapter"),
    ("store", "ListAdapters"),
    ("store", "ListRevisions"),
    ("store", "SetAlias"),
    ("store", "AddEvaluation"),
    ("store", "SetAliasGate"),
    ("store", "DeprecateRevision"),
    ("store", "MergeAdapters"),
    ("store", "Authenticate"),
    ("cache", "EnsureAdapter"),
    ("cache", "Pin"),
    ("cache", "Prefetch"),
    ("cache", "RecordHits"),
]


def _seed_statuses(fuzzed: Fuzzed) -> dict:
    """Each seed's status, asked once before any fuzzing (the fuzzer deletes what it names)."""
    out = {}
    for (svc, method), seed in fuzzed.seeds.items():
        if (svc, method) in {("store", "MergeAdapters"), ("store", "PushAdapter")}:
            out[(svc, method)] = ("skipped: stores a revision", "")
            continue
        payload = (
            [m.SerializeToString() for m in seed]
            if isinstance(seed, list)
            else seed.SerializeToString()
        )
        who = "admin" if svc != "router" else "tenant"
        if method == "DropTrainingRun":  # the run it drops
            with MintClient(fuzzed.cluster.router_address, api_key=fuzzed.keys["tenant"]) as cl:
                cl.create_training_run(run_id="fuzz-gone", rank=2)
        code, details = _call(fuzzed, svc, method, payload, who)
        out[(svc, method)] = (code.name, details)
    return out


def test_every_seed_is_a_valid_request(fuzzed):
    """The mutated cases start from requests that succeed (so a mutation is what fails)."""
    assert set(fuzzed.seeds) == set(SEEDED)
    bad = {
        k: v
        for k, v in fuzzed.seed_statuses.items()
        if v[0] not in ("OK", "skipped: stores a revision")
    }
    assert not bad, bad


@pytest.mark.parametrize("svc,method", SEEDED, ids=[f"{s}.{m}" for s, m in SEEDED])
def test_valid_requests_with_hostile_fields(fuzzed, svc, method):
    seed = fuzzed.seeds[(svc, method)]
    if isinstance(seed, list):  # a client stream: one of its messages mutated
        payloads = st.integers(0, len(seed) - 1).flatmap(
            lambda i: mutated(seed[i], fuzzed.plausible).map(
                lambda m: [x.SerializeToString() for x in seed[:i] + [m] + seed[i + 1 :]]
            )
        )
    else:
        payloads = mutated(seed, fuzzed.plausible).map(lambda m: m.SerializeToString())

    @fuzz_examples(16)
    @given(payload=payloads, who=st.sampled_from(["admin", "tenant", "tenant"]))
    def run(payload, who):
        _check(fuzzed, svc, method, payload, who)

    run()


# Keys each route reads, with plausible values (the rest of a body is hostile or random JSON).
_MODEL = ["fuzz/a", "fuzz/a@1", "base", "fuzz/b", ""]
HTTP_FIELDS = {
    "model": _MODEL,
    "base_model": _MODEL,
    "prompt": ["Hello", ["Hello", "Hi"], [1, 2, 3], [[1, 2]]],
    "messages": [[{"role": "user", "content": "Hi"}], [{"role": "tool"}]],
    "max_tokens": [1, 4, 0, -1, 2**31],
    "temperature": [0, 1.0, -1, 1e308],
    "top_p": [1.0, 0.0, 2.0],
    "n": [1, 2, 0, 10**6],
    "stream": [True, False],
    "logprobs": [True, 5, -1],
    "stop": ["\n", [], ["a"] * 100],
    "seed": [0, -1, 2**64],
    "session_id": ["s", ""],
    "model_id": ["m", ""],
    "sampling_session_id": ["s"],
    "path": ["tinker://x/y", "mint://fuzz/a@1", "../../etc"],
    "request_id": ["r", "0"],
    "lora_config": [{"rank": 4}, {"rank": 2**31}, {"rank": -1}],
    "forward_backward_input": [{"data": [], "loss_fn": "cross_entropy"}],
    "adam_params": [{"learning_rate": 1e-3}, {"learning_rate": float("1e308")}],
    "num_samples": [1, 0, 10**6],
    "sampling_params": [{"max_tokens": 2}, {"max_tokens": -1}],
    "prompt_tokens": [[1, 2, 3]],
}
WHO_HTTP = st.sampled_from(["admin", "tenant", "tenant", "none", "bogus"])


def _headers(f: Fuzzed, who: str, ctype: str) -> dict[str, str]:
    h = {"content-type": ctype}
    if who != "none":
        key = f.keys[who]
        h["authorization"] = f"Bearer {key}"
        h["x-api-key"] = f"tml-{key}"
    return h


def test_every_http_route_is_fuzzed(fuzzed):
    routes = fuzzed.routes
    paths = {p for _, p in routes}
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models"} <= paths, paths
    assert sum(p.startswith("/api/v1/") for p in paths) >= 20, paths  # the Tinker API


@pytest.mark.parametrize("n", range(4), ids=lambda n: f"part{n}")
def test_http_routes_hostile_requests(fuzzed, n):
    routes = [r for i, r in enumerate(fuzzed.routes) if i % 4 == n]
    path_values = st.one_of(st.sampled_from(HOSTILE_STRINGS[:-1]), st.text(max_size=20))

    @fuzz_examples(4 * len(routes))
    @given(
        route=st.sampled_from(routes),
        params=st.lists(path_values, min_size=4, max_size=4),
        body=http_bodies(HTTP_FIELDS),
        who=WHO_HTTP,
        ctype=st.sampled_from(["application/json", "application/json", "text/plain", ""]),
        query=st.dictionaries(st.sampled_from(["limit", "after", "x"]), path_values, max_size=2),
    )
    def run(route, params, body, who, ctype, query):
        method, template = route
        path = template
        for p in params:
            if "{" not in path:
                break
            start, end = path.index("{"), path.index("}")
            path = path[:start] + urllib.parse.quote(p, safe="") + path[end + 1 :]
        try:
            r = fuzzed.http.request(
                method,
                path,
                content=body if method != "GET" else None,
                params=query,
                headers=_headers(fuzzed, who, ctype),
            )
        except httpx.TimeoutException:
            raise AssertionError(f"{method} {path} hung past {DEADLINE_S} s") from None
        COUNTS["gateway"][str(r.status_code)] += 1
        assert r.status_code < 500 or r.status_code in (503, 504), (
            method,
            path,
            r.status_code,
            r.text[:500],
        )
        if r.status_code >= 400:
            assert r.headers.get("content-type", "").startswith("application/json"), r.text[:200]
            assert "error" in r.json() or "detail" in r.json(), r.text[:200]

    run()


def test_the_cluster_survives_the_fuzzing_with_its_data_intact(fuzzed):
    """After whatever ran before it (random order; the fixture checks again after all of them):
    no process died or was restarted, what the fuzzer could not name is intact, and the cluster
    still generates with it."""
    _assert_survived(fuzzed)


def _assert_survived(fuzzed: Fuzzed) -> None:
    c = fuzzed.cluster
    for name, child in c.children.items():
        assert child.proc is not None and child.proc.poll() is None, f"{name} is dead"
        assert child.restarts == 0, f"{name} was restarted: {c.events}"
    kept, sha = fuzzed.kept
    with MintClient(c.router_address, timeout=60, api_key=fuzzed.keys["tenant"]) as cl:
        assert cl.resolve("fuzz/kept").digest == kept.digest
        assert hashlib.sha256(cl.fetch(digest=kept.digest)).hexdigest() == sha
        assert cl.generate("Hello", adapter="fuzz/kept", sampling=None).token_ids


def test_what_the_fuzzer_found_stays_fixed(fuzzed):
    """Cases `make fuzz` found, kept as fixed examples: a non-ASCII name_prefix in ListAdapters
    was INTERNAL (UnicodeEncodeError); a Tinker route's JSON body nested 50,000 deep was a 500
    (RecursionError), and so was a list where an id goes (TypeError: unhashable); an AdamW
    learning rate finite in double but past fp32 was INTERNAL (overflow inside the step)."""
    for lr in (1e308, 1e39):
        req = training_pb2.OptimStepRequest(
            run_id="fuzz-run", adam=training_pb2.AdamParams(learning_rate=lr, eps=1e-8)
        )
        code, details = _call(fuzzed, "router", "OptimStep", req.SerializeToString(), "tenant")
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "fp32" in details, details
    for body in ({"sampling_session_id": []}, {"model_id": {"a": 1}}, {"seq_id": "1"}):
        r = fuzzed.http.post(
            "/api/v1/asample", json=body, headers=_headers(fuzzed, "tenant", "application/json")
        )
        assert r.status_code == 400, (body, r.status_code, r.text[:200])
        assert "must be" in r.json()["detail"], r.text[:200]
    code, details = _call(
        fuzzed, "store", "ListAdapters", b'\n\x04fuzz\x10\x05"\x02\xc2\x80', "admin"
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "name_prefix" in details, details
    for route in ("/api/v1/create_session", "/api/v1/forward_backward", "/api/v1/cancel_future"):
        r = fuzzed.http.post(route, content=DEEP_JSON, headers=_headers(fuzzed, "tenant", ""))
        assert r.status_code == 400, (route, r.status_code, r.text[:200])
        assert "nests too deep" in r.json()["detail"], r.text[:200]
