"""The OpenAI-compatible gateway, driven by the real openai SDK against a real cluster (store,
two executor+sidecar pairs, router, gateway as processes): completions and chat, streaming and
not, n > 1, echo + logprobs, /v1/models per tenant, every error status, cancel on disconnect,
one trace from the HTTP span down to the store. Greedy tokens through HTTP equal Generate
through gRPC and peft's greedy output for that adapter alone."""

from __future__ import annotations

import asyncio
import json
import time

import httpx2 as httpx
import openai
import pytest
import torch
from peft_util import make_strong_adapter, peft_greedy, peft_model_with

from mintmesh.client import MintClient, sampling_params
from mintmesh.cluster import ClusterConfig, LocalCluster
from mintmesh.model import load_model
from mintmesh.v1 import executor_pb2, executor_pb2_grpc

pytestmark = pytest.mark.e2e
PROMPT = "The personal model of"


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, tmp_path_factory, otlp):
    c = LocalCluster(
        ClusterConfig(
            model_dir=tiny_model_dir,
            data_dir=tmp_path_factory.mktemp("gw-cluster"),
            executors=2,
            port=0,
            http_port=0,
            otlp_endpoint=otlp.address,
            max_batch_size=4,
            # Small queues, so that "queue full" is reachable from a test.
            env={"MINT_EXECUTOR_MAX_QUEUE": "4"},
        )
    )
    c.start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def admin(cluster):
    with MintClient(cluster.router_address, timeout=60, api_key=cluster.admin_key) as cl:
        yield cl


@pytest.fixture(scope="module")
def tenants(admin):
    return {t: admin.create_tenant(t).api_key for t in ("alice", "bob")}


@pytest.fixture(scope="module")
def strong(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("gw-adapters")
    return {
        "alice/chat": make_strong_adapter(tiny_model_dir, root / "a", seed=101),
        "bob/notes": make_strong_adapter(tiny_model_dir, root / "b", seed=202),
    }


@pytest.fixture(scope="module")
def pushed(admin, strong):
    revs = {name: admin.push_adapter(path, name) for name, path in strong.items()}
    admin.set_alias("alice/chat", "prod", revs["alice/chat"].revision)
    return revs


@pytest.fixture(scope="module")
def peft_oracle(tiny_model_dir, strong):
    pm = peft_model_with(tiny_model_dir, {n.replace("/", "__"): p for n, p in strong.items()})
    _, tok = load_model(tiny_model_dir)
    return pm, tok


def _oai(cluster, key, **kw):
    return openai.OpenAI(base_url=cluster.openai_base_url, api_key=key, max_retries=0, **kw)


@pytest.fixture(scope="module")
def alice(cluster, tenants, pushed):
    with _oai(cluster, tenants["alice"]) as c:
        yield c


@pytest.fixture(scope="module")
def base_id(admin):
    return admin.base_model().name


def _greedy_ids(pm, tok, adapter, ids, n):
    return peft_greedy(pm, adapter.replace("/", "__") if adapter else None, ids, n)[0]


def _text(tok, ids):
    return tok.decode(ids, skip_special_tokens=True)


# -- generation ---------------------------------------------------------------------------------


def test_completion_greedy_equals_grpc_and_peft(cluster, alice, tenants, peft_oracle):
    pm, tok = peft_oracle
    want = _greedy_ids(pm, tok, "alice/chat", tok(PROMPT)["input_ids"], 24)
    r = alice.completions.create(model="alice/chat", prompt=PROMPT, max_tokens=24, temperature=0)
    (choice,) = r.choices
    assert r.object == "text_completion" and r.model == "alice/chat"
    assert choice.text == _text(tok, want) and choice.finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens == len(tok(PROMPT)["input_ids"])
    assert r.usage.completion_tokens == len(want)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    with MintClient(cluster.router_address, timeout=60, api_key=tenants["alice"]) as cl:
        g = cl.generate(PROMPT, adapter="alice/chat", sampling=sampling_params(max_tokens=24))
    assert g.token_ids == want and g.text == choice.text
    # The strong adapter really changes the output (the check above could not pass by luck).
    base = _greedy_ids(pm, tok, None, tok(PROMPT)["input_ids"], 24)
    assert sum(a != b for a, b in zip(base, want, strict=False)) >= 12


def test_completion_tokens_through_logprobs_are_peft_tokens(alice, peft_oracle):
    pm, tok = peft_oracle
    ids = tok(PROMPT)["input_ids"]
    want, want_lp = peft_greedy(pm, "alice__chat", ids, 16)
    r = alice.completions.create(
        model="alice/chat", prompt=PROMPT, max_tokens=16, temperature=0, logprobs=3
    )
    lp = r.choices[0].logprobs
    got_ids = [tok.convert_tokens_to_ids(tok.convert_ids_to_tokens(t)) for t in want]
    assert len(lp.tokens) == len(want) == len(got_ids)
    assert all(abs(a - b) <= 1e-4 for a, b in zip(lp.token_logprobs, want_lp, strict=True))
    for alts, chosen in zip(lp.top_logprobs, lp.tokens, strict=True):
        assert chosen in alts and 3 <= len(alts) <= 4
        assert alts[chosen] == max(alts.values())  # greedy: the chosen is the likeliest
    assert lp.text_offset == sorted(lp.text_offset)


def test_chat_greedy_equals_peft_on_the_chat_template(alice, peft_oracle):
    pm, tok = peft_oracle
    msgs = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say something personal."},
    ]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    ids = tok(ids, add_special_tokens=False)["input_ids"]
    want = _greedy_ids(pm, tok, "alice/chat", ids, 20)
    r = alice.chat.completions.create(
        model="alice/chat", messages=msgs, max_completion_tokens=20, temperature=0
    )
    (c,) = r.choices
    assert r.object == "chat.completion" and c.message.role == "assistant"
    assert c.message.content == _text(tok, want)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(want)
    # max_tokens (the older name) means the same.
    r2 = alice.chat.completions.create(
        model="alice/chat", messages=msgs, max_tokens=20, temperature=0
    )
    assert r2.choices[0].message.content == c.message.content


def test_chat_logprobs_and_top_logprobs(alice, peft_oracle):
    pm, tok = peft_oracle
    msgs = [{"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    want, want_lp = peft_greedy(pm, "alice__chat", ids, 8)
    r = alice.chat.completions.create(
        model="alice/chat", messages=msgs, max_tokens=8, temperature=0, logprobs=True,
        top_logprobs=5,
    )  # fmt: skip
    content = r.choices[0].logprobs.content
    assert len(content) == len(want)
    for entry, lp in zip(content, want_lp, strict=True):
        assert abs(entry.logprob - lp) <= 1e-4
        assert len(entry.top_logprobs) == 5
        assert entry.top_logprobs[0].token == entry.token  # greedy
        assert bytes(entry.bytes).decode("utf-8", "replace") or entry.bytes == []


def test_streaming_equals_non_streaming_with_usage(alice):
    kw = dict(model="alice/chat", prompt=PROMPT, max_tokens=20, temperature=0)
    full = alice.completions.create(**kw)
    chunks = list(
        alice.completions.create(stream=True, stream_options={"include_usage": True}, **kw)
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == full.choices[0].finish_reason and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20

    msgs = [{"role": "user", "content": "stream me"}]
    full = alice.chat.completions.create(model="alice/chat", messages=msgs, max_tokens=12,
                                         temperature=0)  # fmt: skip
    parts = list(
        alice.chat.completions.create(
            model="alice/chat", messages=msgs, max_tokens=12, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert parts[0].choices[0].delta.role == "assistant"
    got = "".join(p.choices[0].delta.content or "" for p in parts if p.choices)
    assert got == full.choices[0].message.content
    assert parts[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_raw_sse_ends_with_done(cluster, tenants, pushed):
    with httpx.stream(
        "POST",
        f"{cluster.openai_base_url}/completions",
        headers={"Authorization": f"Bearer {tenants['alice']}"},
        json={"model": "alice/chat", "prompt": "x", "max_tokens": 3, "stream": True,
              "temperature": 0},
        timeout=60,
    ) as r:  # fmt: skip
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    assert all(ln.startswith("data: ") for ln in lines)
    objs = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert sum(len(o["choices"][0]["text"]) > 0 for o in objs) >= 1


def test_n_choices_and_seeds(alice):
    greedy = alice.completions.create(
        model="alice/chat", prompt=PROMPT, max_tokens=10, temperature=0, n=3
    )
    assert [c.index for c in greedy.choices] == [0, 1, 2]
    assert len({c.text for c in greedy.choices}) == 1
    assert greedy.usage.completion_tokens == sum(10 for _ in greedy.choices)
    kw = dict(model="alice/chat", prompt=PROMPT, max_tokens=10, temperature=1.0, n=3, seed=7)
    a = alice.completions.create(**kw)
    b = alice.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1  # each choice its own seed
    two = alice.completions.create(
        model="alice/chat", prompt=["one", "two"], max_tokens=4, temperature=0, n=2
    )
    assert [c.index for c in two.choices] == [0, 1, 2, 3]
    assert two.choices[0].text == two.choices[1].text
    # Streaming n > 1: every choice's deltas, by index, add up to its non-streamed text.
    texts: dict[int, str] = {}
    for ch in alice.chat.completions.create(
        model="alice/chat", messages=[{"role": "user", "content": "n"}], max_tokens=6,
        temperature=0, n=2, stream=True,
    ):  # fmt: skip
        for c in ch.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
    assert set(texts) == {0, 1} and texts[0] == texts[1]


def test_echo_logprobs_equal_the_executors_forward(cluster, alice, admin, pushed, peft_oracle):
    pm, tok = peft_oracle
    prompt = "Evaluation harnesses score every token of this prompt."
    r = alice.completions.create(
        model="alice/chat", prompt=prompt, echo=True, logprobs=1, max_tokens=1, temperature=0
    )
    (c,) = r.choices
    ids = tok(prompt)["input_ids"]
    lp = c.logprobs
    assert c.text.startswith(prompt)
    assert lp.token_logprobs[0] is None and len(lp.tokens) == len(ids) + 1
    digest = admin.resolve("alice/chat").digest
    fwd = []
    for addr in cluster.executor_addresses:
        ch = cluster.mesh_channel(addr)
        resp = executor_pb2_grpc.ExecutorStub(ch).Forward(
            executor_pb2.ForwardRequest(
                rows=[executor_pb2.ForwardRow(adapter_digest=digest, token_ids=ids)],
                output=executor_pb2.FORWARD_OUTPUT_LOGPROBS,
            ),
            timeout=60,
        )
        ch.close()
        fwd.append(list(resp.rows[0].logprobs))
    got = lp.token_logprobs[1 : len(ids)]
    for want in fwd:  # both executors, the one that served and the other
        assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= 1e-4
    # And peft's (float64 log-softmax of its fp32 logits).
    x = torch.tensor([ids])
    pm.set_adapter("alice__chat")
    with torch.no_grad():
        logits = pm(input_ids=x).logits[0].double()
    ref = torch.log_softmax(logits[:-1], -1).gather(1, x[0, 1:, None]).squeeze(1).tolist()
    assert max(abs(a - b) for a, b in zip(got, ref, strict=True)) <= 1e-4
    # max_tokens 0: the prompt alone, scored.
    r0 = alice.completions.create(
        model="alice/chat", prompt=prompt, echo=True, logprobs=0, max_tokens=0
    )
    assert r0.choices[0].text == prompt and r0.usage.completion_tokens == 0
    assert r0.choices[0].logprobs.token_logprobs[1:] == pytest.approx(got, abs=1e-6)


# -- models ---------------------------------------------------------------------------------------


def test_models_list_the_callers_adapters(cluster, admin, tenants, pushed, base_id):
    with _oai(cluster, tenants["alice"]) as c:
        ids = {m.id: m for m in c.models.list()}
    # Exactly alice's adapters (other tests may have pushed more of hers), and her alias.
    hers = {f"alice/{a.name}" for a in admin.list_adapters("alice")}
    assert "alice/chat" in hers
    assert set(ids) == {base_id, "alice/chat@prod", *hers}
    m = ids["alice/chat"]
    assert m.owned_by == "alice" and m.model_extra["parent"] == base_id
    assert ids[base_id].model_extra["parent"] is None
    with _oai(cluster, tenants["bob"]) as c:
        bobs = {f"bob/{a.name}" for a in admin.list_adapters("bob")}
        assert {m.id for m in c.models.list()} == {base_id, *bobs} and "bob/notes" in bobs
        assert c.models.retrieve("bob/notes").owned_by == "bob"
        assert c.models.retrieve(base_id).id == base_id
    with _oai(cluster, cluster.admin_key) as c:
        assert {"alice/chat", "bob/notes"} <= {m.id for m in c.models.list()}


def test_the_base_model_and_an_alias_serve(alice, base_id, peft_oracle):
    pm, tok = peft_oracle
    ids = tok(PROMPT)["input_ids"]
    r = alice.completions.create(model=base_id, prompt=PROMPT, max_tokens=12, temperature=0)
    assert r.choices[0].text == _text(tok, _greedy_ids(pm, tok, None, ids, 12))
    p = alice.completions.create(model="alice/chat@prod", prompt=PROMPT, max_tokens=12,
                                 temperature=0)  # fmt: skip
    assert p.choices[0].text == _text(tok, _greedy_ids(pm, tok, "alice/chat", ids, 12))


# -- errors ---------------------------------------------------------------------------------------


def _error(exc) -> dict:
    body = exc.value.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_unknown_model_is_404(alice):
    with pytest.raises(openai.NotFoundError) as ei:
        alice.completions.create(model="alice/nope", prompt="x", max_tokens=2)
    e = _error(ei)
    assert e["code"] == "model_not_found" and e["param"] == "model" and "alice/nope" in e["message"]
    with pytest.raises(openai.NotFoundError):
        alice.models.retrieve("alice/nope")


def test_another_tenants_adapter_is_403(alice):
    with pytest.raises(openai.PermissionDeniedError) as ei:
        alice.chat.completions.create(
            model="bob/notes", messages=[{"role": "user", "content": "x"}], max_tokens=2
        )
    assert _error(ei)["type"] == "permission_error"


def test_missing_or_wrong_key_is_401(cluster, pushed):
    with (
        _oai(cluster, "mint_wrong_key_0123456789") as c,
        pytest.raises(openai.AuthenticationError) as ei,
    ):
        c.completions.create(model="alice/chat", prompt="x", max_tokens=2)
    assert _error(ei)["type"] == "authentication_error"
    r = httpx.post(
        f"{cluster.openai_base_url}/completions",
        json={"model": "alice/chat", "prompt": "x", "max_tokens": 2},
        timeout=30,
    )
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    "kw, param",
    [
        ({"temperature": 5}, "temperature"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"logprobs": 50}, "logprobs"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"extra_body": {"bogus_field": 1}}, "bogus_field"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ],
)
def test_bad_parameters_are_400_naming_the_field(alice, kw, param):
    with pytest.raises(openai.BadRequestError) as ei:
        alice.completions.create(model="alice/chat", prompt="x", **{"max_tokens": 2, **kw})
    e = _error(ei)
    assert e["param"] == param and e["type"] == "invalid_request_error", e
    assert param in e["message"]


def test_malformed_json_and_bad_refs_are_400(cluster, tenants):
    h = {"Authorization": f"Bearer {tenants['alice']}", "Content-Type": "application/json"}
    r = httpx.post(f"{cluster.openai_base_url}/completions", content=b"{not json", headers=h)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{cluster.openai_base_url}/completions", content=b"[1, 2]", headers=h)
    assert r.status_code == 400
    r = httpx.post(
        f"{cluster.openai_base_url}/chat/completions",
        json={"model": "alice/chat", "messages": [{"role": "wizard", "content": "x"}]},
        headers=h,
    )
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages.0.role")
    r = httpx.post(
        f"{cluster.openai_base_url}/completions",
        json={"model": "not a ref!", "prompt": "x", "max_tokens": 2},
        headers=h,
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_full_queues_are_429_with_retry_after(cluster, tenants, pushed):
    async def run():
        async with openai.AsyncOpenAI(
            base_url=cluster.openai_base_url, api_key=tenants["alice"], max_retries=0
        ) as c:

            async def one():
                try:
                    s = await c.completions.create(
                        model="alice/chat", prompt="fill", max_tokens=300, temperature=0,
                        stream=True, extra_body={"ignore_eos": True},
                    )  # fmt: skip
                    return s
                except openai.RateLimitError as e:
                    return e

            # 2 executors x (4 running + 4 queued) = 16 places; 24 asks.
            results = await asyncio.gather(*(one() for _ in range(24)))
            refused = [r for r in results if isinstance(r, openai.RateLimitError)]
            for r in results:
                if not isinstance(r, openai.RateLimitError):
                    await r.close()
            return refused

    refused = asyncio.run(run())
    assert len(refused) >= 8
    e = refused[0]
    assert e.status_code == 429 and int(e.response.headers["retry-after"]) >= 1
    body = e.response.json()["error"]
    assert body["type"] == "rate_limit_error" and "queue" in body["message"]


def test_a_client_that_disconnects_mid_stream_frees_its_sequence(cluster, alice):
    stubs = []
    for addr in cluster.executor_addresses:
        stubs.append(executor_pb2_grpc.ExecutorStub(cluster.mesh_channel(addr)))

    def status():
        return [s.Status(executor_pb2.ExecutorStatusRequest(), timeout=10) for s in stubs]

    def wait(cond, what, timeout=30.0):
        end = time.monotonic() + timeout
        while True:
            st = status()
            if cond(st):
                return st
            assert time.monotonic() < end, f"{what}: {st}"
            time.sleep(0.05)

    wait(lambda st: all(s.running == 0 and s.queue_depth == 0 for s in st), "idle")
    before = status()
    used0 = [s.kv_blocks_used for s in before]
    generated0 = sum(s.tokens_generated for s in before)
    stream = alice.completions.create(
        model="alice/chat", prompt="a long one " * 10, max_tokens=400, temperature=0,
        stream=True, extra_body={"ignore_eos": True},
    )  # fmt: skip
    it = iter(stream)
    next(it), next(it)
    st = wait(lambda st: sum(s.running for s in st) == 1, "running")
    assert sum(s.kv_blocks_used for s in st) > sum(used0)
    stream.close()  # the HTTP connection goes away
    st = wait(lambda st: sum(s.running for s in st) == 0, "sequence freed after disconnect")
    assert [s.kv_blocks_used for s in st] == used0
    # Cancelled, not run to its end: far fewer than the 400 tokens it asked for.
    assert 2 <= sum(s.tokens_generated for s in st) - generated0 < 300


# -- tracing and process ----------------------------------------------------------------------


def test_one_http_request_is_one_trace_down_to_the_store(cluster, alice, otlp, admin, tmp_path,
                                                        tiny_model_dir):  # fmt: skip
    from peft_util import make_peft_adapter

    # A fresh adapter: the executor's sidecar must fetch it from the store, in this trace.
    path = make_peft_adapter(tiny_model_dir, tmp_path / "t", rank=2, seed=5)
    admin.push_adapter(path, "alice/traced")
    alice.completions.create(model="alice/traced", prompt="trace", max_tokens=2, temperature=0)
    want = {"mint-gateway", "mint-router", "mint-executor", "mint-cache", "mint-store"}

    def orphans(spans, root):
        """The spans of root's trace whose parent is not among them (root alone when whole)."""
        in_trace = [s for s in spans if s["trace_id"] == root["trace_id"]]
        ids = {s["span_id"] for s in in_trace}
        return [s for s in in_trace if s["parent_span_id"] not in ids]

    # Each process exports its spans in batches of its own, a parent after its children (a
    # server span ends after the calls it made): wait until one trace is whole, not only until
    # every service has sent some of it.
    deadline = time.monotonic() + 20
    while True:
        spans = otlp.snapshot()
        roots = [
            s for s in spans
            if s["service"] == "mint-gateway" and s["name"] == "POST /v1/completions"
        ]  # fmt: skip
        full = []
        for r in roots:
            svcs = {s["service"] for s in spans if s["trace_id"] == r["trace_id"]}
            if want <= svcs:
                full.append(r)
        if (full and orphans(spans, full[-1]) == [full[-1]]) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert full, "no trace runs from the gateway's HTTP span to the store"
    assert orphans(spans, full[-1]) == [full[-1]]


def test_the_gateway_process_loads_no_torch(cluster):
    pid = cluster.children["gateway"].proc.pid
    with open(f"/proc/{pid}/maps") as f:
        maps = f.read()
    assert "libtorch" not in maps and "python" in maps


def test_readme_openai_lines_run_against_the_gateway(cluster, tenants, pushed, tmp_path):
    """The README's three lines (with its export), run as written by a fresh interpreter."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    marker = "<!-- readme-openai -->"
    assert readme.count(marker) == 1
    block = re.search(re.escape(marker) + r"\s*```python\n(.*?)^```", readme, re.S | re.M)[1]
    assert len([ln for ln in block.splitlines() if ln.strip()]) == 3
    export = re.search(r"^export (OPENAI_BASE_URL=\S+) (OPENAI_API_KEY=\S+)$", readme, re.M)
    assert export and export[1] == "OPENAI_BASE_URL=http://127.0.0.1:8000/v1"
    (tmp_path / "snippet.py").write_text(block)
    env = {
        **os.environ,
        # What the export says, with this cluster's port and alice's key as MINT_API_KEY.
        "OPENAI_BASE_URL": cluster.openai_base_url,
        "OPENAI_API_KEY": tenants["alice"],
    }
    r = subprocess.run(
        [sys.executable, str(tmp_path / "snippet.py")], capture_output=True, text=True,
        timeout=120, env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip(), "the snippet printed no answer"
    assert 'model="alice/chat"' in block  # the adapter this cluster serves for alice


def test_gateway_metrics_count_each_request_by_route_and_status(cluster, alice):
    from promscrape import scrape, val

    url = cluster.metrics_urls["gateway"]

    def n(route, status, method="POST"):
        return val(s, "mint_http_requests_total", route=route, method=method, status=status)

    # A stream an earlier test read to its end is counted when the server side finishes it,
    # a moment later: start from counters that have settled.
    s, prev = scrape(url), None
    while s != prev:
        prev = s
        time.sleep(0.3)
        s = scrape(url)
    before = {
        k: n(*k)
        for k in [("/v1/completions", "200"), ("/v1/completions", "404"),
                  ("/v1/chat/completions", "200"), ("/v1/models", "200", "GET")]
    }  # fmt: skip
    for _ in range(3):
        alice.completions.create(model="alice/chat", prompt="m", max_tokens=2, temperature=0)
    list(alice.completions.create(model="alice/chat", prompt="m", max_tokens=2, stream=True))
    with pytest.raises(openai.NotFoundError):
        alice.completions.create(model="alice/none", prompt="m", max_tokens=2)
    alice.chat.completions.create(
        model="alice/chat", messages=[{"role": "user", "content": "m"}], max_tokens=2
    )
    alice.models.list()
    want = {
        ("/v1/completions", "200"): 4,
        ("/v1/completions", "404"): 1,
        ("/v1/chat/completions", "200"): 1,
        ("/v1/models", "200", "GET"): 1,
    }
    # A request is counted when the server has sent all of its response, a moment after the
    # client has it: wait (bounded) for the counts, then check they do not move past them.
    deadline = time.monotonic() + 10
    while True:
        s = scrape(url)
        moved = {k: n(*k) - v for k, v in before.items()}
        if moved == want or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    time.sleep(0.3)
    s = scrape(url)
    assert {k: n(*k) - v for k, v in before.items()} == want
    assert val(s, "mint_http_latency_seconds_count", route="/v1/completions", method="POST") >= 5
