"""The executor: engine (plain torch) and gRPC service, with real peft adapters and peft as the
oracle for every logit and every greedy token."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent import futures

import grpc
import lmdb
import pytest
import torch
from peft_util import make_peft_adapter, peft_model_with

from mintmesh.cache import layout
from mintmesh.errors import AdapterNotFound, FailedPrecondition, InvalidArgument
from mintmesh.kernels import AdapterPool
from mintmesh.peft_io import read_peft_dir, validate_and_pack
from mintmesh.services.common.server import build_server, mesh_channel
from mintmesh.services.executor.config import ExecutorConfig
from mintmesh.services.executor.engine import (
    GenerationRequest,
    IncrementalText,
    SamplingOptions,
)
from mintmesh.services.executor.residency import AdapterResidency
from mintmesh.services.executor.runner import AdapterDevice
from mintmesh.services.executor.server import create_server
from mintmesh.services.executor.sources import PackedBytesSource, SidecarSource
from mintmesh.v1 import cache_pb2, cache_pb2_grpc, common_pb2, executor_pb2, executor_pb2_grpc

ADAPTERS = {
    # name: (rank, targets)
    "a": (4, ("q_proj", "v_proj")),
    "b": (8, ("q_proj", "k_proj", "v_proj", "o_proj")),
    "c": (16, ("gate_proj", "up_proj", "down_proj")),
}
UNKNOWN = "0" * 64
MAX_NEW = 12


@dataclasses.dataclass
class Packed:
    dir: object
    data: bytes
    digest: str


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, base_info, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for seed, (name, (rank, targets)) in enumerate(ADAPTERS.items()):
        d = make_peft_adapter(tiny_model_dir, root / name, rank=rank, targets=targets, seed=seed)
        pa = validate_and_pack(*read_peft_dir(d), base_info, max_rank=64)
        out[name] = Packed(d, pa.data, pa.digest)
    # The same weights packed for another base model.
    other = dataclasses.replace(base_info, fingerprint="f" * 64)
    pa = validate_and_pack(*read_peft_dir(out["a"].dir), other, max_rank=64)
    out["wrong_base"] = Packed(out["a"].dir, pa.data, pa.digest)
    return out


@pytest.fixture(scope="module")
def oracle(tiny_model_dir, adapters):
    return peft_model_with(tiny_model_dir, {n: adapters[n].dir for n in ADAPTERS})


def _source(adapters) -> PackedBytesSource:
    return PackedBytesSource({p.digest: p.data for p in adapters.values()})


@pytest.fixture(scope="module")
def served(tiny_model_dir, adapters):
    cfg = ExecutorConfig(model_dir=tiny_model_dir, executor_id="exec-test", max_batch_size=8)
    server, engine = create_server(cfg, source=_source(adapters))
    yield server, engine
    server.stop(grace=1.0)


@pytest.fixture(scope="module")
def engine(served):
    return served[1]


@pytest.fixture(scope="module")
def stub(served):
    ch = mesh_channel(served[0].address, traced=False)
    yield executor_pb2_grpc.ExecutorStub(ch)
    ch.close()


def _peft_logits(oracle, name, ids):
    x = torch.tensor([ids])
    with torch.no_grad():
        if name is None:
            with oracle.disable_adapter():
                return oracle(input_ids=x).logits[0]
        oracle.set_adapter(name)
        return oracle(input_ids=x).logits[0]


def _peft_greedy(oracle, name, ids, n):
    x = torch.tensor([ids])
    kw = dict(attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n)
    with torch.no_grad():
        if name is None:
            with oracle.disable_adapter():
                out = oracle.generate(input_ids=x, **kw)
        else:
            oracle.set_adapter(name)
            out = oracle.generate(input_ids=x, **kw)
    return out[0, len(ids) :].tolist()


# ---- forward ---------------------------------------------------------------------------------

FORWARD_ROWS = [
    ("a", [1, 2, 3, 4, 5]),
    (None, [9, 8, 7]),
    ("b", list(range(100, 111))),
    ("c", [42]),
    ("a", [7, 7]),
    ("c", [65, 66, 67, 68]),
]


def test_forward_mixed_batch_matches_peft(engine, adapters, oracle):
    rows = [(adapters[n].digest if n else None, ids) for n, ids in FORWARD_ROWS]
    got = engine.forward(rows)
    for (name, ids), lg in zip(FORWARD_ROWS, got, strict=True):
        assert lg.shape == (len(ids), engine.vocab_size)
        want = _peft_logits(oracle, name, ids)
        torch.testing.assert_close(lg, want, rtol=1e-4, atol=1e-5, msg=f"row {name}")
        if name is not None:  # the adapter matters
            assert (want - _peft_logits(oracle, None, ids)).abs().max() > 1e-2


def test_forward_over_grpc_logits_and_logprobs(stub, engine, adapters):
    rows = [(adapters[n].digest if n else None, ids) for n, ids in FORWARD_ROWS[:4]]
    want = engine.forward(rows)
    req_rows = [executor_pb2.ForwardRow(adapter_digest=d or "", token_ids=ids) for d, ids in rows]
    resp = stub.Forward(
        executor_pb2.ForwardRequest(rows=req_rows, output=executor_pb2.FORWARD_OUTPUT_LOGITS),
        timeout=30,
    )
    for r, w in zip(resp.rows, want, strict=True):
        assert (r.num_tokens, r.vocab_size) == tuple(w.shape)
        got = torch.tensor(r.logits).view(r.num_tokens, r.vocab_size)
        torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-5)
    resp = stub.Forward(
        executor_pb2.ForwardRequest(rows=req_rows, output=executor_pb2.FORWARD_OUTPUT_LOGPROBS),
        timeout=30,
    )
    for r, w, (_, ids) in zip(resp.rows, want, rows, strict=True):
        assert len(r.logprobs) == len(ids) - 1 and not r.logits
        lp = torch.log_softmax(w[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
        torch.testing.assert_close(torch.tensor(list(r.logprobs)), lp, rtol=1e-4, atol=1e-5)


# ---- generation ------------------------------------------------------------------------------

PROMPTS = {"a": [72, 101, 108, 108, 111], "b": list(range(30, 41)), "c": [50], None: [10, 20, 30]}


def _overlap(results) -> bool:
    """Whether the generations were all running at one step (shared a forward)."""
    return max(r.first_step for r in results) <= min(r.last_step for r in results)


def test_greedy_mixed_batch_matches_peft_and_shares_steps(engine, adapters, oracle):
    # Warm the adapters first (a cold load would start its request steps later, by design).
    engine.forward([(adapters[n].digest, [1]) for n in ADAPTERS])
    handles = {
        name: engine.submit(
            GenerationRequest(
                prompt_token_ids=ids,
                sampling=SamplingOptions(max_tokens=MAX_NEW, logprobs=True),
                adapter_digest=adapters[name].digest if name else None,
            )
        )
        for name, ids in PROMPTS.items()
    }
    results = {name: h.result() for name, h in handles.items()}
    assert _overlap(results.values()), "the requests never shared a step"
    for name, res in results.items():
        want = _peft_greedy(oracle, name, PROMPTS[name], MAX_NEW)
        assert res.token_ids == want, f"adapter {name}"
        assert res.finish_reason in ("length", "stop")
        assert res.prompt_tokens == len(PROMPTS[name])
        assert res.completion_tokens == len(res.token_ids)
        # Logprobs of the chosen tokens are the model's: check them against peft's logits.
        full = PROMPTS[name] + res.token_ids
        lg = _peft_logits(oracle, name, full[:-1])[len(PROMPTS[name]) - 1 :]
        lp = torch.log_softmax(lg, -1).gather(1, torch.tensor(res.token_ids)[:, None]).squeeze(1)
        torch.testing.assert_close(torch.tensor(res.logprobs), lp, rtol=1e-4, atol=1e-4)
    # The adapters matter: the same prompt continues differently under each adapter.
    same_prompt = {
        name: _peft_greedy(oracle, name, PROMPTS["a"], MAX_NEW) for name in [*ADAPTERS, None]
    }
    assert len({tuple(v) for v in same_prompt.values()}) == len(same_prompt)


def test_stop_token_ids_end_the_row(engine, adapters):
    req = dict(prompt_token_ids=PROMPTS["b"], adapter_digest=adapters["b"].digest)
    full = engine.generate(GenerationRequest(**req, sampling=SamplingOptions(max_tokens=MAX_NEW)))
    k = next(
        i for i in range(1, len(full.token_ids)) if full.token_ids[i] not in full.token_ids[:i]
    )
    stop = full.token_ids[k]
    res = engine.generate(
        GenerationRequest(
            **req, sampling=SamplingOptions(max_tokens=MAX_NEW, stop_token_ids=(stop,))
        )
    )
    assert res.token_ids == full.token_ids[: k + 1]
    assert res.finish_reason == "stop"


def test_seeded_sampling_is_reproducible(engine, adapters):
    engine.forward([(adapters["c"].digest, [1])])  # resident: the batched run below overlaps

    def run(seed, name="c"):
        sp = SamplingOptions(temperature=1.0, top_p=0.9, top_k=50, max_tokens=10, seed=seed)
        req = GenerationRequest(PROMPTS["a"], sp, adapters[name].digest)
        return engine.generate(req).token_ids

    first = run(7)
    assert run(7) == first
    assert run(8) != first
    # Seeded rows stay reproducible when they share a batch with other rows.
    hs = [
        engine.submit(
            GenerationRequest(
                PROMPTS["a"],
                SamplingOptions(temperature=1.0, top_p=0.9, top_k=50, max_tokens=10, seed=7),
                adapters["c"].digest,
            )
        ),
        engine.submit(GenerationRequest(PROMPTS["b"], SamplingOptions(max_tokens=10))),
    ]
    res = [h.result() for h in hs]
    assert _overlap(res)
    assert res[0].token_ids == first


def _gen_request(prompt_ids=(1, 2, 3), digest="", **sampling):
    sampling.setdefault("max_tokens", 4)
    return executor_pb2.ExecutorGenerateRequest(
        adapter=common_pb2.AdapterRevision(digest=digest, ref="t/n@1") if digest else None,
        prompt_token_ids=list(prompt_ids),
        sampling=common_pb2.SamplingParams(**sampling),
        request_id="rq-1",
    )


def test_generate_over_grpc_streams_chunks(stub, engine, adapters):
    d = adapters["a"].digest
    chunks = [
        r.chunk for r in stub.Generate(_gen_request(PROMPTS["a"], d, max_tokens=6), timeout=30)
    ]
    want = engine.generate(
        GenerationRequest(PROMPTS["a"], SamplingOptions(max_tokens=6), d)
    ).token_ids
    assert [t for c in chunks for t in c.token_ids] == want
    assert chunks[0].adapter.digest == d and chunks[0].adapter.ref == "t/n@1"
    assert chunks[0].executor == "exec-test"
    assert all(c.request_id == "rq-1" for c in chunks)
    assert all(not c.HasField("usage") for c in chunks[:-1])
    last = chunks[-1]
    assert last.finish_reason in (common_pb2.FINISH_REASON_LENGTH, common_pb2.FINISH_REASON_STOP)
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(PROMPTS["a"]), 6)
    # A text prompt is tokenized by the executor.
    req = executor_pb2.ExecutorGenerateRequest(
        prompt="hi", sampling=common_pb2.SamplingParams(max_tokens=2)
    )
    chunks = [r.chunk for r in stub.Generate(req, timeout=30)]
    assert chunks[-1].usage.prompt_tokens == 2 and not chunks[0].HasField("adapter")


BAD_REQUESTS = [
    # (request kwargs, status code, text the message must contain)
    (dict(max_tokens=0), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
    (dict(temperature=-1.0), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    (dict(top_p=1.5), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    (dict(prompt_ids=()), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    (dict(prompt_ids=[1] * 600), grpc.StatusCode.INVALID_ARGUMENT, "prompt has 600 tokens"),
    (dict(prompt_ids=[1, 9999]), grpc.StatusCode.INVALID_ARGUMENT, "9999"),
    (dict(digest="not-a-digest"), grpc.StatusCode.INVALID_ARGUMENT, "not-a-digest"),
    (dict(digest=UNKNOWN), grpc.StatusCode.NOT_FOUND, UNKNOWN),
    (dict(digest="wrong_base"), grpc.StatusCode.FAILED_PRECONDITION, "base model"),
]


@pytest.mark.parametrize("kw,code,needle", BAD_REQUESTS, ids=[c[2] for c in BAD_REQUESTS])
def test_bad_generate_requests_get_the_right_status(stub, adapters, kw, code, needle):
    if kw.get("digest") in adapters:
        kw = {**kw, "digest": adapters[kw["digest"]].digest}
    with pytest.raises(grpc.RpcError) as ei:
        list(stub.Generate(_gen_request(**kw), timeout=30))
    assert ei.value.code() == code, ei.value.details()
    assert needle in ei.value.details()


def test_revision_for_another_base_or_rank_is_refused_before_fetch(stub, adapters):
    rev = common_pb2.AdapterRevision(digest=adapters["a"].digest, base_fingerprint="e" * 64)
    req = executor_pb2.ExecutorGenerateRequest(
        adapter=rev, prompt="x", sampling=common_pb2.SamplingParams(max_tokens=1)
    )
    with pytest.raises(grpc.RpcError) as ei:
        list(stub.Generate(req, timeout=30))
    assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    rev = common_pb2.AdapterRevision(digest=adapters["a"].digest, rank=100000)
    req.adapter.CopyFrom(rev)
    with pytest.raises(grpc.RpcError) as ei:
        list(stub.Generate(req, timeout=30))
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "rank" in ei.value.details()


def test_forward_errors(stub, adapters):
    row = executor_pb2.ForwardRow(adapter_digest=UNKNOWN, token_ids=[1, 2])
    with pytest.raises(grpc.RpcError) as ei:
        stub.Forward(executor_pb2.ForwardRequest(rows=[row]), timeout=30)
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as ei:
        stub.Forward(executor_pb2.ForwardRequest(rows=[]), timeout=30)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "rows" in ei.value.details()


def test_status_lists_resident_adapters(stub, engine, adapters, base_info):
    engine.forward([(adapters[n].digest, [1, 2]) for n in ADAPTERS])
    # This test's own generation (steps and tokens are counted by generation, not forward).
    done = engine.generate(GenerationRequest([1, 2, 3], SamplingOptions(max_tokens=3)))
    assert done.completion_tokens >= 1
    st = stub.Status(executor_pb2.ExecutorStatusRequest(), timeout=10)
    assert st.executor_id == "exec-test"
    assert st.base_fingerprint == base_info.fingerprint
    assert {adapters[n].digest for n in ADAPTERS} <= set(st.resident_adapters)
    assert adapters["wrong_base"].digest not in st.resident_adapters
    assert (st.max_batch_size, st.max_adapters, st.device) == (8, 64, "cpu")
    assert st.kernel_backend and not st.draining
    assert st.dense_kernels == engine.dense_kernels in ("onednn", "torch")
    assert st.kv_blocks_total > 0 and st.kv_block_size == 16
    assert st.kv_blocks_used <= st.kv_blocks_total
    assert {adapters[n].digest for n in ADAPTERS} <= set(st.host_adapters)
    assert 0 < st.adapter_pool_bytes_used <= st.adapter_pool_bytes_total
    assert 0 < st.host_bytes_used <= st.host_bytes_total
    assert st.steps > 0 and st.tokens_generated > 0


# ---- a small executor: queue bound, cancellation, deadlines, eviction ------------------------


@pytest.fixture(scope="module")
def small(tiny_model_dir, adapters):
    cfg = ExecutorConfig(model_dir=tiny_model_dir, max_batch_size=1, max_queue=2, max_adapters=2)
    server, engine = create_server(cfg, source=_source(adapters))
    ch = mesh_channel(server.address, traced=False)
    yield executor_pb2_grpc.ExecutorStub(ch), engine
    ch.close()
    server.stop(grace=1.0)


def _wait(cond, timeout=10.0):
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("condition not reached")
        time.sleep(0.005)


def test_queue_overflow_and_cancelled_stream(small):
    stub, engine = small
    long = stub.Generate(_gen_request(max_tokens=500, ignore_eos=True), timeout=60)
    next(long)
    _wait(lambda: engine.running == 1)
    cancelled_before = engine.rows_cancelled
    # Hold the model so the running row cannot finish while the queue fills.
    with engine._model_lock:
        queued = [stub.Generate(_gen_request(max_tokens=2), timeout=60) for _ in range(2)]
        _wait(lambda: engine.queue_depth == 2)
        with pytest.raises(grpc.RpcError) as ei:
            list(stub.Generate(_gen_request(max_tokens=2), timeout=60))
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue" in ei.value.details()
        long.cancel()  # the client goes away: its row stops
    for call in queued:
        chunks = [r.chunk for r in call]
        assert chunks[-1].usage.completion_tokens == 2
    _wait(lambda: engine.rows_cancelled > cancelled_before)


def test_deadline_stops_the_row(small):
    stub, engine = small
    before = engine.rows_cancelled
    with pytest.raises(grpc.RpcError) as ei:
        list(stub.Generate(_gen_request(max_tokens=500, ignore_eos=True), timeout=0.3))
    assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _wait(lambda: engine.rows_cancelled > before and engine.running == 0)


def test_least_recently_used_adapter_is_evicted(small, adapters):
    _, engine = small
    a, b, c = (adapters[n].digest for n in ADAPTERS)
    engine.forward([(a, [1, 2])])
    engine.forward([(b, [1, 2])])
    engine.forward([(a, [3])])  # a is now more recent than b
    engine.forward([(c, [1])])
    assert set(engine.status().resident_adapters) == {a, c}
    with pytest.raises(InvalidArgument, match="max_adapters"):
        engine.forward([(a, [1]), (b, [1]), (c, [1])])


# ---- sources ---------------------------------------------------------------------------------


class _FakeSidecar(cache_pb2_grpc.AdapterCacheServicer):
    """Answers EnsureAdapter from a pre-written node cache, like the real sidecar on a hit."""

    def __init__(self, known: set[str]):
        self.known = known
        self.calls: list[str] = []
        self.hits: list[str] = []

    def RecordHits(self, request, context):
        self.hits.extend(request.digests)
        return cache_pb2.RecordHitsResponse(recorded=len(request.digests))

    def EnsureAdapter(self, request, context):
        self.calls.append(request.digest)
        if request.digest not in self.known:
            context.abort(grpc.StatusCode.NOT_FOUND, f"adapter {request.digest} not in the store")
        return cache_pb2.EnsureAdapterResponse(digest=request.digest, hit=True)


def test_sidecar_source_reads_the_node_cache(tmp_path, adapters):
    a = adapters["a"]
    path = layout.env_path(tmp_path)
    path.mkdir(parents=True)
    env = lmdb.open(str(path), max_dbs=layout.MAX_DBS, map_size=1 << 26, subdir=True)
    with env.begin(write=True, db=env.open_db(layout.DB_BLOBS)) as txn:
        txn.put(layout.key(a.digest), a.data)
    env.close()
    fake = _FakeSidecar({a.digest})

    def add(server):
        cache_pb2_grpc.add_AdapterCacheServicer_to_server(fake, server)
        return ["mintmesh.v1.AdapterCache"]

    server = build_server(add_servicers=add)
    src = SidecarSource(server.address, tmp_path, timeout_s=10)
    try:
        assert bytes(src.fetch(a.digest)) == a.data
        with pytest.raises(AdapterNotFound, match=UNKNOWN):
            src.fetch(UNKNOWN)
        # A hit is read from the file without an RPC and reported afterwards; only the miss
        # asked the sidecar.
        assert fake.calls == [UNKNOWN]
        assert (src.reads_hit, src.reads_ensured) == (1, 0)
        src.flush_hits()
        assert fake.hits == [a.digest]
        # Status's node-cache tier: the fake has no Stats, so the LMDB keys are listed.
        assert src.node_cache_digests() == [a.digest]
    finally:
        src.close()
        server.stop(grace=0.5)


def test_no_source_means_base_model_only(base_info, adapters):
    pool = AdapterPool(base_info.linear_shapes, max_adapters=2)
    shapes = base_info.linear_shapes
    res = AdapterResidency(
        AdapterDevice(pool),
        None,
        layer_shapes=shapes,
        base_fingerprint=base_info.fingerprint,
        max_rank=64,
    )
    with pytest.raises(FailedPrecondition, match="no adapter source"):
        res.prepare(adapters["a"].digest)
    res = AdapterResidency(
        AdapterDevice(pool),
        _source(adapters),
        layer_shapes=shapes,
        base_fingerprint=base_info.fingerprint,
        max_rank=8,
    )
    with pytest.raises(InvalidArgument, match="rank 16"):
        res.prepare(adapters["c"].digest)


# ---- text ------------------------------------------------------------------------------------

TEXT_CASES = [
    # (text, stop strings, expected text, stopped)
    ("hello world", (), "hello world", False),
    ("hello world", ("o w",), "hell", True),
    ("héllo €", (), "héllo €", False),
    ("abcabd", ("abd",), "abc", True),
    ("ab", ("abc",), "ab", False),
]


@pytest.mark.parametrize("text,stop,want,stopped", TEXT_CASES)
def test_incremental_text(engine, text, stop, want, stopped):
    inc = IncrementalText(engine.tokenizer, stop)
    pieces, hit = [], False
    for b in text.encode():
        piece, hit = inc.add(b)
        # Never emit half a UTF-8 sequence.
        assert "\ufffd" not in piece
        pieces.append(piece)
        if hit:
            break
    if not hit:
        pieces.append(inc.flush())
    assert "".join(pieces) == want and hit == stopped


# ---- the process -----------------------------------------------------------------------------


def test_cli_prints_ready_and_serves(tiny_model_dir, tmp_path):
    """The executor process: READY line, Status, Generate, a clean SIGTERM; and its thread
    counts as logged: torch on one thread for the tiny backbone, so the LoRA kernels and decode
    attention on one."""
    err = open(tmp_path / "executor.log", "w")  # noqa: SIM115 - closed in the finally
    env = {**os.environ, "MINT_EXECUTOR_MAX_QUEUE": "7", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mintmesh.services.executor",
            "--model-dir",
            str(tiny_model_dir),
            "--port",
            "0",
            "--executor-id",
            "cli-exec",
            "--max-batch-size",
            "3",
            "--insecure-mesh",  # plaintext, so that this test can call it without a certificate
        ],
        stdout=subprocess.PIPE,
        stderr=err,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline().split()
        assert line[:2] == ["READY", "executor"] and line[2].startswith("127.0.0.1:")
        log = (tmp_path / "executor.log").read_text()
        want = "executor: torch on 1 thread(s), the LoRA kernels on 1, decode attention on 1"
        assert want in log, log[-2000:]
        with grpc.insecure_channel(line[2]) as ch:
            stub = executor_pb2_grpc.ExecutorStub(ch)
            st = stub.Status(executor_pb2.ExecutorStatusRequest(), timeout=10)
            assert (st.executor_id, st.max_batch_size) == ("cli-exec", 3)
            chunks = [r.chunk for r in stub.Generate(_gen_request(max_tokens=3), timeout=30)]
            assert sum(len(c.token_ids) for c in chunks) == 3
            with pytest.raises(grpc.RpcError) as ei:
                list(stub.Generate(_gen_request(digest=UNKNOWN), timeout=30))
            assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        err.close()


def test_concurrent_grpc_generations_share_batches(stub, engine, adapters, oracle):
    names = [*ADAPTERS, None]
    before = engine.step_no

    def one(name):
        d = adapters[name].digest if name else ""
        req = _gen_request(PROMPTS[name], d, max_tokens=MAX_NEW)
        return [t for r in stub.Generate(req, timeout=60) for t in r.chunk.token_ids]

    with futures.ThreadPoolExecutor(len(names)) as pool:
        got = dict(zip(names, pool.map(one, names), strict=True))
    for name in names:
        assert got[name] == _peft_greedy(oracle, name, PROMPTS[name], MAX_NEW), name
    # Continuous batching: the streams shared steps (serially they would take 4 x 12 steps).
    assert engine.step_no - before < len(names) * MAX_NEW


def test_draining_finishes_running_requests(tiny_model_dir, adapters):
    cfg = ExecutorConfig(model_dir=tiny_model_dir)
    server, engine = create_server(cfg, source=_source(adapters))
    ch = mesh_channel(server.address, traced=False)
    stub = executor_pb2_grpc.ExecutorStub(ch)
    call = stub.Generate(_gen_request(max_tokens=60, ignore_eos=True), timeout=60)
    first = next(call)
    stopper = threading.Thread(target=server.stop, kwargs={"grace": 30.0})
    stopper.start()
    rest = [r.chunk for r in call]
    stopper.join()
    assert len(first.chunk.token_ids) + sum(len(c.token_ids) for c in rest) == 60
    assert engine.draining
    ch.close()


def test_compute_rpcs_leave_no_openmp_team_on_the_grpc_workers(tiny_model_dir, adapters):
    """The compute RPCs run on passing threads (servicer._compute, Engine.forward): the gRPC
    workers they came on keep no OpenMP team, which would throttle the step thread's for the
    rest of the process (passing.py). A worker a parallel region started on one of them would
    be a native thread named as the process, outliving the call. A server of its own: the
    module's has had RPCs on its workers before. The control, the model run on a long-lived
    thread, leaves such a worker: the check can see one."""
    from openmp_util import native_workers, openmp_on, settled_new_workers, workers_left_by

    from mintmesh.services.executor.runner import pack_rows

    if not openmp_on():
        pytest.skip("torch runs no OpenMP teams here")
    cfg = ExecutorConfig(model_dir=tiny_model_dir, executor_id="exec-omp", max_batch_size=4)
    server, eng = create_server(cfg, source=_source(adapters))
    ch = mesh_channel(server.address, traced=False)
    try:
        stub = executor_pb2_grpc.ExecutorStub(ch)
        ids = [(7 * i) % 200 + 1 for i in range(240)]

        def control():
            with eng._model_lock:  # between the step loop's steps, as Engine.forward
                eng.runner.run(pack_rows([(ids, -1)]))

        assert workers_left_by(control), "the control started no OpenMP team on its thread"
        before = native_workers()
        row = executor_pb2.ForwardRow(token_ids=ids)
        for _ in range(3):  # concurrently below: over more than one worker thread
            with futures.ThreadPoolExecutor(3) as pool:
                score = pool.submit(
                    stub.Score,
                    executor_pb2.ExecutorScoreRequest(prompt_token_ids=ids, top_logprobs=5),
                    timeout=60,
                )
                fwd = [
                    pool.submit(
                        stub.Forward,
                        executor_pb2.ForwardRequest(rows=[row], output=out),
                        timeout=60,
                    )
                    for out in (
                        executor_pb2.FORWARD_OUTPUT_LOGPROBS,
                        executor_pb2.FORWARD_OUTPUT_LOGITS,
                    )
                ]
                res = score.result().result
                assert len(res.logprobs) == len(ids) - 1 == len(res.top_logprobs)
                assert len(fwd[0].result().rows[0].logprobs) == len(ids) - 1
                assert len(fwd[1].result().rows[0].logits) == len(ids) * eng.vocab_size
        assert not settled_new_workers(before)
    finally:
        ch.close()
        server.stop(grace=1.0)
