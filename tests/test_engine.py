"""The step loop, driven by hand (autostart=False): requests join and leave at every step, and
every claim is counted in steps, not seconds. Real peft adapters on the tiny backbone; peft
greedy generation with each adapter alone is the oracle for every token."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest
import torch
from backends import BACKENDS, needs_ort
from opentelemetry import context as otel_context
from opentelemetry import trace
from peft_util import make_peft_adapter, peft_greedy, peft_model_with

from mintmesh.errors import (
    AdapterNotFound,
    BaseModelMismatch,
    DigestMismatch,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from mintmesh.kernels import AdapterPool
from mintmesh.kernels.dense import select_dense
from mintmesh.peft_io import read_peft_dir, validate_and_pack
from mintmesh.services.executor.config import ExecutorConfig
from mintmesh.services.executor.engine import (
    FINISH_CANCELLED,
    Engine,
    GenerationOutput,
    GenerationRequest,
    SamplingOptions,
)
from mintmesh.services.executor.kv import BlockAllocator, PagedKVCache
from mintmesh.services.executor.residency import AdapterResidency, HostTier, PreparedAdapter
from mintmesh.services.executor.runner import AdapterDevice
from mintmesh.services.executor.sequence import FairQueue, Sequence
from mintmesh.services.executor.sources import PackedBytesSource

ADAPTERS = {
    # name: (rank, targets, seed)
    "a": (4, ("q_proj", "v_proj"), 0),
    "b": (8, ("q_proj", "k_proj", "v_proj", "o_proj"), 1),
    "c": (16, ("gate_proj", "up_proj", "down_proj"), 2),
    "d": (2, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), 3),
    # "a" pushed again under the same name: a new revision, other weights.
    "a_v2": (4, ("q_proj", "v_proj"), 10),
}
UNKNOWN = "0" * 64


@dataclasses.dataclass
class Packed:
    dir: object
    data: bytes
    digest: str


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, base_info, tmp_path_factory):
    root = tmp_path_factory.mktemp("engine-adapters")
    out = {}
    for name, (rank, targets, seed) in ADAPTERS.items():
        d = make_peft_adapter(tiny_model_dir, root / name, rank=rank, targets=targets, seed=seed)
        pa = validate_and_pack(*read_peft_dir(d), base_info, max_rank=64)
        out[name] = Packed(d, pa.data, pa.digest)
    other = dataclasses.replace(base_info, fingerprint="f" * 64)
    pa = validate_and_pack(*read_peft_dir(out["a"].dir), other, max_rank=64)
    out["wrong_base"] = Packed(out["a"].dir, pa.data, pa.digest)
    return out


@pytest.fixture(scope="module")
def oracle(tiny_model_dir, adapters):
    """peft's greedy tokens of ids with adapter name (None: the base), n tokens; ignore_eos:
    EOS is an ordinary token (the engine's ignore_eos), else generation stops at it."""
    pm = peft_model_with(tiny_model_dir, {n: adapters[n].dir for n in ADAPTERS})
    cache: dict = {}

    def greedy(name, ids, n, *, ignore_eos=False):
        key = (name, tuple(ids), n, ignore_eos)
        if key not in cache:
            cache[key] = peft_greedy(pm, name, list(ids), n, stop_at_eos=not ignore_eos)[0]
        return cache[key]

    return greedy


class GatedSource(PackedBytesSource):
    """A source whose fetches of `gated` digests wait until open() (a slow cold load)."""

    def __init__(self, adapters, gated=()):
        super().__init__(adapters)
        self.gated = set(gated)
        self.gate = threading.Event()
        self.trace_ids: dict[str, int] = {}

    def fetch(self, digest, timeout=None, into=None):
        self.trace_ids[digest] = trace.get_current_span().get_span_context().trace_id
        if digest in self.gated:
            assert self.gate.wait(30), "gate never opened"
        return super().fetch(digest, timeout, into)


@pytest.fixture()
def make_engine(tiny_model_dir, adapters, backend):
    made: list[Engine] = []

    def make(source=None, **cfg) -> Engine:
        cfg.setdefault("backend", backend)
        if source is None:
            source = PackedBytesSource({p.digest: p.data for p in adapters.values()})
        eng = Engine.from_config(
            ExecutorConfig(model_dir=tiny_model_dir, **cfg), source=source, autostart=False
        )
        made.append(eng)
        return eng

    yield make
    for eng in made:
        if eng.loader.pending():
            src = eng.residency.source
            if isinstance(src, GatedSource):
                src.gate.set()
        eng.close(timeout=0)


def _req(adapters, name, ids, n, tenant="", **sampling):
    return GenerationRequest(
        prompt_token_ids=list(ids),
        sampling=SamplingOptions(max_tokens=n, **sampling),
        adapter_digest=adapters[name].digest if name else None,
        tenant=tenant,
    )


def _drain(handle) -> list[GenerationOutput | BaseException]:
    out = []
    while not handle._q.empty():
        out.append(handle._q.get_nowait())
    return out


# ---- mixed continuous batching vs peft ----------------------------------------------------------

# (arrival step, adapter, prompt, max_tokens): adapters and ranks mixed, the base model too,
# prompts from 1 to 41 tokens (several chunks at 16 tokens a step), arrivals at different steps.
ARRIVALS = [
    (0, "a", [72, 101, 108, 108, 111], 10),
    (0, None, [10, 20, 30], 6),
    (1, "b", list(range(30, 71)), 8),
    (2, "c", [50], 12),
    (3, "d", list(range(100, 120)), 5),
    (5, "a", [200, 201, 202], 9),
    (8, "b", [1, 2], 7),
    (9, "c", list(range(5, 40)), 4),
    (9, None, list(range(60, 64)), 11),
]


@pytest.mark.parametrize(
    "dense,backend",
    [("auto", "torch"), ("torch", "torch"), pytest.param("auto", "onnxruntime", marks=needs_ort)],
)
def test_arrivals_at_different_steps_match_peft(make_engine, adapters, oracle, dense, backend):
    # Both implementations of the base Linears: oneDNN-packed (auto, on CPU float32) and
    # torch's nn.Linear; and the onnxruntime runner.
    eng = make_engine(max_batch_size=4, max_step_tokens=16, kv_block_size=4, dense_kernels=dense)
    if backend == "torch":
        assert eng.dense_kernels == select_dense("cpu", torch.float32, dense)
    else:
        assert eng.status().runner == "onnxruntime:CPUExecutionProvider"
    handles = {}
    stats = []
    step = 0
    while step < 400 and not (
        len(handles) == len(ARRIVALS) and all(h.done for h in handles.values())
    ):
        for i, (at, name, ids, n) in enumerate(ARRIVALS):
            if at == step:
                handles[i] = eng.submit(_req(adapters, name, ids, n))
        eng.wait_loads()
        stats.append(eng.step())
        step += 1
    for i, (_, name, ids, n) in enumerate(ARRIVALS):
        res = handles[i].result()
        assert res.token_ids == oracle(name, ids, n), f"request {i} ({name})"
        assert res.completion_tokens == len(res.token_ids)
    # Steps really mixed things: prefill chunks with decodes, several adapters in one forward,
    # a 41-token prompt split over steps; every block came back.
    assert any(s.prefill_tokens and s.decode_tokens for s in stats)
    assert max(s.adapters for s in stats) >= 3
    assert max(s.num_tokens for s in stats) <= 16
    assert eng.kv_blocks_used() == 0 and eng.running == 0 and eng.queue_depth == 0


def test_only_layers_an_adapter_of_the_forward_targets_run_the_lora_op(
    make_engine, adapters, oracle, monkeypatch
):
    from mintmesh.services.executor import lora

    eng = make_engine()
    called: set[str] = set()
    real = lora.apply_lora

    def spy(y, x, layer, pool, meta):
        called.add(layer)
        real(y, x, layer, pool, meta)

    monkeypatch.setattr(lora, "apply_lora", spy)
    # "a" targets q_proj/v_proj, "c" the MLP: k_proj and o_proj are nobody's.
    jobs = [("a", [5, 6, 7], 4), ("c", [8, 9], 4), (None, [10, 11], 4)]
    hs = [eng.submit(_req(adapters, n, ids, k)) for n, ids, k in jobs]
    eng.run_until_done(hs)
    assert called and {name.rsplit(".", 1)[-1] for name in called} == {
        "q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"
    }  # fmt: skip
    for (name, ids, k), h in zip(jobs, hs, strict=True):
        assert h.result().token_ids == oracle(name, ids, k), name
    assert eng.ctx.targeted is None and eng.ctx.meta is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_kv_exhaustion_preempts_and_every_request_finishes_right(
    make_engine, adapters, oracle, backend
):
    per_block = PagedKVCache.block_nbytes(_tiny_cfg(), 4, torch.float32)
    eng = make_engine(kv_block_size=4, kv_cache_bytes=12 * per_block, max_batch_size=8)
    assert eng.kv.num_blocks == 12
    jobs = [("a", list(range(40, 48)), 14), ("b", list(range(50, 59)), 14),
            ("c", list(range(60, 66)), 14), (None, list(range(70, 78)), 14)]  # fmt: skip
    hs = [eng.submit(_req(adapters, n, ids, k, ignore_eos=True)) for n, ids, k in jobs]
    eng.run_until_done(hs)
    assert eng.preemptions > 0
    for (name, ids, k), h in zip(jobs, hs, strict=True):
        res = h.result()
        assert res.finish_reason == "length" and len(res.token_ids) == k
        assert res.token_ids == oracle(name, ids, k, ignore_eos=True), name
    assert sum(h.result().preemptions for h in hs) == eng.preemptions
    assert eng.kv_blocks_used() == 0


def test_a_sequence_larger_than_the_kv_cache_ends_with_length(make_engine, adapters):
    per_block = PagedKVCache.block_nbytes(_tiny_cfg(), 4, torch.float32)
    eng = make_engine(kv_block_size=4, kv_cache_bytes=6 * per_block)
    with pytest.raises(InvalidArgument, match="KV cache"):
        eng.submit(_req(adapters, None, list(range(1, 25)), 2))
    h = eng.submit(_req(adapters, "a", list(range(1, 21)), 10, ignore_eos=True))
    other = eng.submit(_req(adapters, None, [7, 8], 3, ignore_eos=True))
    eng.run_until_done([h, other])
    res = h.result()
    assert res.finish_reason == "length" and 1 <= res.completion_tokens < 10
    assert other.result().completion_tokens == 3
    assert eng.kv_blocks_used() == 0


def _tiny_cfg():
    from transformers import LlamaConfig

    from mintmesh.model import PRESETS

    return LlamaConfig(**PRESETS["tiny"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_preempted_greedy_equals_peft(make_engine, adapters, oracle, backend):
    """Tight KV: sequences are preempted and recomputed, outputs still equal peft's."""
    per_block = PagedKVCache.block_nbytes(_tiny_cfg(), 2, torch.float32)
    eng = make_engine(kv_block_size=2, kv_cache_bytes=14 * per_block, max_batch_size=4)
    jobs = [("a", [72, 101, 108, 108, 111], 8), ("b", list(range(30, 37)), 8),
            ("d", [5, 6, 7], 8)]  # fmt: skip
    hs = [eng.submit(_req(adapters, n, ids, k)) for n, ids, k in jobs]
    eng.run_until_done(hs)
    assert eng.preemptions > 0
    for (name, ids, k), h in zip(jobs, hs, strict=True):
        assert h.result().token_ids == oracle(name, ids, k), name


def test_adapter_budget_bounds_distinct_adapters_per_step(make_engine, adapters, oracle):
    eng = make_engine(max_step_adapters=2)
    jobs = [("a", [1, 2, 3], 5), ("b", [4, 5], 5), ("c", [6], 5), (None, [7, 8], 5),
            ("a", [9, 10], 4), ("d", [11], 3)]  # fmt: skip
    hs = [eng.submit(_req(adapters, n, ids, k)) for n, ids, k in jobs]
    eng.wait_loads()
    most = 0
    while not all(h.done for h in hs):
        most = max(most, eng.step().adapters)
    assert most == 2
    for (name, ids, k), h in zip(jobs, hs, strict=True):
        assert h.result().token_ids == oracle(name, ids, k), name


# Sampling (top-k, top-p, temperature, seeds) and stop tokens / strings are checked against
# peft's logits and greedy tokens in test_engine_oracles.py.


# ---- cancellation, deadlines, queue bound -------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_cancelling_frees_the_kv_blocks_at_the_next_step(make_engine, adapters, backend):
    eng = make_engine(kv_block_size=4)
    keep = eng.submit(_req(adapters, "a", list(range(10, 30)), 50, ignore_eos=True))
    gone = eng.submit(_req(adapters, "b", list(range(40, 70)), 50, ignore_eos=True))
    eng.wait_loads()
    for _ in range(4):
        eng.step()
    used = eng.kv_blocks_used()
    assert used == eng.kv.blocks_for(20 + 3) + eng.kv.blocks_for(30 + 3)
    gone.cancel()
    st = eng.step()
    assert st.num_seqs == 1
    assert eng.kv_blocks_used() == eng.kv.blocks_for(20 + 4)
    last = _drain(gone)[-1]
    assert isinstance(last, GenerationOutput) and last.finish_reason == FINISH_CANCELLED
    assert eng.rows_cancelled == 1
    keep.cancel()
    eng.step()
    assert eng.kv_blocks_used() == 0 and eng.running == 0
    # The adapters are no longer referenced: evictable.
    assert eng.residency.refs(adapters["a"].digest) == 0


def test_deadline_ends_waiting_and_running_requests(make_engine, adapters):
    eng = make_engine(max_batch_size=1)
    running = eng.submit(_req(adapters, None, [1, 2], 50, ignore_eos=True))
    eng.step()
    waiting = eng.submit(_req(adapters, None, [3, 4], 5))
    waiting.request.deadline = 0.0  # already past
    running.request.deadline = 0.0
    eng.step()
    for h in (running, waiting):
        assert h.done and _drain(h)[-1].finish_reason == FINISH_CANCELLED
    assert eng.queue_depth == 0 and eng.running == 0 and eng.kv_blocks_used() == 0


def test_queue_overflow_is_resource_exhausted_with_retry_info(make_engine, adapters):
    eng = make_engine(max_queue=3, max_queue_per_tenant=2)
    eng.submit(_req(adapters, "a", [1], 2, tenant="alice"))
    eng.submit(_req(adapters, "a", [2], 2, tenant="alice"))
    with pytest.raises(ResourceExhausted, match="tenant 'alice'") as ei:
        eng.submit(_req(adapters, "a", [3], 2, tenant="alice"))
    assert ei.value.retry_after_s > 0
    eng.submit(_req(adapters, None, [4], 2))
    with pytest.raises(ResourceExhausted, match="queue") as ei:
        eng.submit(_req(adapters, "b", [5], 2, tenant="bob"))
    assert ei.value.retry_after_s > 0
    assert eng.queue_depth == 3
    eng.wait_loads()
    eng.step()  # all three admitted: the queue has room again
    assert eng.queue_depth == 0
    eng.submit(_req(adapters, "b", [5], 2, tenant="bob"))


def test_bad_requests_are_refused_at_submit(make_engine, adapters):
    eng = make_engine()
    with pytest.raises(InvalidArgument, match="max_tokens"):
        eng.submit(_req(adapters, None, [1], 0))
    with pytest.raises(InvalidArgument, match="9999"):
        eng.submit(_req(adapters, None, [1, 9999], 2))
    with pytest.raises(InvalidArgument, match="not-a-digest"):
        eng.submit(GenerationRequest([1], adapter_digest="not-a-digest"))
    assert eng.queue_depth == 0


# ---- fairness -----------------------------------------------------------------------------------


def test_flooding_tenant_does_not_starve_another_tenants_request(make_engine, adapters):
    eng = make_engine(max_batch_size=2, max_queue=200)
    flood = [
        eng.submit(_req(adapters, "a", [i % 200, 7], 6, tenant="flood", ignore_eos=True))
        for i in range(60)
    ]
    eng.wait_loads()
    for _ in range(3):
        eng.step()
    solo = eng.submit(_req(adapters, "b", [42, 43], 3, tenant="solo", ignore_eos=True))
    eng.wait_loads()
    eng.run_until_done([solo])
    res = solo.result()
    # Waited at most for one running sequence to finish (6 tokens), not for 58 queued ones.
    assert res.first_step - res.submit_step <= 6 + 2, res
    assert sum(h.done for h in flood) < 10
    # Base-model requests are a tenant of their own, too.
    base = eng.submit(_req(adapters, None, [5, 6], 2, ignore_eos=True))
    eng.run_until_done([base])
    assert base.result().first_step - base.result().submit_step <= 6 + 2
    for h in flood:
        h.cancel()
    eng.step()
    assert eng.queue_depth == 0 and eng.kv_blocks_used() == 0


def test_fair_queue_virtual_token_counters():
    q = FairQueue()

    def seq(i, tenant):
        return Sequence(seq_id=i, tenant=tenant, digest=None, prompt_len=1, tokens=[1])

    for i in range(5):
        q.push(seq(i, "big"))
    q.charge("big", prompt_tokens=100, output_tokens=50)
    q.push(seq(10, "small"))  # lifted to big's counter: no banked credit, no starvation
    assert q.counters["small"] == q.counters["big"]
    first = q.peek()
    q.remove(first)
    q.charge(first.tenant, prompt_tokens=1)
    assert q.peek().tenant != first.tenant
    assert len(q) == 5


# ---- adapters: revisions, residency, cold loads -------------------------------------------------


def test_repushed_adapter_never_changes_a_running_request(make_engine, adapters, oracle):
    """alice/chat@1 runs; alice/chat@2 (same name, new digest) arrives mid-stream. With one
    device slot, @2 waits until @1's request ends: a referenced adapter is never evicted."""
    eng = make_engine(max_adapters=1)
    v1, v2 = adapters["a"].digest, adapters["a_v2"].digest
    ids = [72, 101, 108, 108, 111]
    r1 = eng.submit(_req(adapters, "a", ids, 12, tenant="alice", ignore_eos=True))
    eng.wait_loads()
    eng.step()
    slot = eng.pool.slot(v1)
    steps = 0
    r2 = None
    while not r1.done:
        if steps == 3:
            r2 = eng.submit(_req(adapters, "a_v2", ids, 12, tenant="alice"))
        eng.step()
        steps += 1
        if not r1.done:
            assert eng.pool.slot(v1) == slot and v2 not in eng.pool
    eng.run_until_done([r2])
    assert r1.result().token_ids == oracle("a", ids, 12)
    assert r2.result().token_ids == oracle("a_v2", ids, 12)
    assert r1.result().token_ids != r2.result().token_ids
    assert eng.pool.resident() == [v2]


def test_cold_adapter_does_not_delay_running_sequences(make_engine, adapters, oracle):
    src = GatedSource({p.digest: p.data for p in adapters.values()}, gated={adapters["c"].digest})
    eng = make_engine(source=src)
    warm = eng.submit(_req(adapters, "a", [72, 101], 30, ignore_eos=True))
    eng.wait_loads()
    eng.step()
    assert eng.running == 1
    cold = eng.submit(_req(adapters, "c", [50], 6))
    for _ in range(6):  # the cold load is in flight; the running batch keeps going
        before = len(_peek(warm))
        st = eng.step()
        assert st.sampled == 1 and len(_peek(warm)) == before + 1
        assert eng.status().loading == 1 and not _peek(cold)
    src.gate.set()
    eng.wait_loads()
    st = eng.step()  # the adapter landed: the request joins at this step
    assert st.sampled == 2 and st.admitted == 1
    assert cold.first_step == eng.step_no
    eng.run_until_done([warm, cold])
    assert cold.result().token_ids == oracle("c", [50], 6)
    assert warm.result().first_step + 29 == warm.result().last_step  # a token every step


def test_prefetch_hints_load_in_the_background_and_never_evict_adapters_in_use(
    make_engine, adapters
):
    a, b, c = (adapters[k].digest for k in "abc")
    src = GatedSource({p.digest: p.data for p in adapters.values()}, gated={a})
    eng = make_engine(source=src, max_adapters=2)
    with pytest.raises(InvalidArgument, match="digest"):
        eng.prefetch(["nope"])
    assert eng.prefetch([b, b]) == ([], [b], [])  # duplicates count once
    eng.wait_loads()
    eng.step()  # the step loop takes the landed load (and lets go of the loader's reference)
    assert b in eng.pool and eng.residency.refs(b) == 0  # resident, held by nothing
    assert eng.prefetch([b]) == ([b], [], [])
    # A hint never takes the room of an adapter in use: with a and b referenced by running
    # requests (pool of 2), c's hint leaves c on the host only.
    ra = eng.submit(_req(adapters, "a", [72, 101], 20, ignore_eos=True))
    rb = eng.submit(_req(adapters, "b", [50], 20, ignore_eos=True))
    src.gate.set()
    eng.wait_loads()
    eng.step()
    assert eng.running == 2
    assert eng.prefetch([c]) == ([], [c], [])
    eng.wait_loads()
    assert set(eng.pool.resident()) == {a, b} and c in eng.residency.host
    assert eng.loader.hints_failed == 1
    eng.run_until_done([ra, rb])
    assert ra.result().completion_tokens == rb.result().completion_tokens == 20
    # Idle now, but warm: a hint fills free room only, it never evicts (c stays on the host).
    assert eng.prefetch([c]) == ([], [c], [])
    eng.wait_loads()
    assert set(eng.pool.resident()) == {a, b} and c in eng.residency.host
    assert (eng.loader.hints_loaded, eng.loader.hints_failed) == (1, 2)
    # A request for c evicts the least recently used idle adapter, as always.
    rc = eng.submit(_req(adapters, "c", [50], 2))
    eng.run_until_done([rc])
    assert c in eng.pool and rc.result().completion_tokens == 2


def test_prefetch_hints_never_hold_up_requested_loads(make_engine, adapters):
    a, b, c = (adapters[k].digest for k in "abc")
    src = GatedSource({p.digest: p.data for p in adapters.values()}, gated={a})
    eng = make_engine(source=src, loader_threads=1)
    eng.loader.max_hints = 2
    # a's hint is stuck in its fetch (on the prefetch worker), b's waits behind it, c's is
    # dropped: at most two hints pending.
    assert eng.prefetch([a, b, c]) == ([], [a, b], [c])
    rb = eng.submit(_req(adapters, "b", [50], 3))  # overtakes b's hint
    rc = eng.submit(_req(adapters, "c", [50], 3))
    end = time.monotonic() + 30
    while not (b in eng.pool and c in eng.pool) and time.monotonic() < end:
        time.sleep(0.01)
    assert b in eng.pool and c in eng.pool, "requested loads waited for a stuck hint"
    assert eng.loader.pending() == [a]
    src.gate.set()
    eng.run_until_done([rb, rc])
    assert rb.result().completion_tokens == rc.result().completion_tokens == 3
    # a's hint landed; b's was skipped when its turn came (its request had loaded b).
    assert a in eng.pool and (eng.loader.hints_loaded, eng.loader.hints_failed) == (1, 0)


def _peek(handle) -> list:
    return list(handle._q.queue)


LOAD_ERRORS = [
    # (what the source holds for the digest, error class, text of the message)
    ("missing", AdapterNotFound, UNKNOWN),
    ("corrupt", DigestMismatch, "hash to"),
    ("wrong_base", BaseModelMismatch, "base model"),
]


@pytest.mark.parametrize("kind,cls,needle", LOAD_ERRORS, ids=[c[0] for c in LOAD_ERRORS])
def test_load_errors_reach_the_requests_stream(make_engine, adapters, kind, cls, needle):
    data = {p.digest: p.data for p in adapters.values()}
    digest = {"missing": UNKNOWN, "corrupt": adapters["b"].digest,
              "wrong_base": adapters["wrong_base"].digest}[kind]  # fmt: skip
    if kind == "corrupt":
        data[digest] = data[digest][:-8] + b"\x00" * 8
    eng = make_engine(source=PackedBytesSource(data))
    ok = eng.submit(_req(adapters, None, [1, 2], 4, ignore_eos=True))
    bad = eng.submit(GenerationRequest([1, 2], SamplingOptions(max_tokens=4), digest))
    eng.run_until_done([ok, bad])
    err = _drain(bad)[-1]
    assert isinstance(err, cls) and needle in str(err)
    assert ok.result().completion_tokens == 4
    assert eng.queue_depth == 0


def test_loader_keeps_the_requests_trace_context(make_engine, adapters):
    src = GatedSource({p.digest: p.data for p in adapters.values()})
    eng = make_engine(source=src)
    span_ctx = trace.SpanContext(
        trace_id=0xABC123, span_id=0x42, is_remote=False, trace_flags=trace.TraceFlags(1)
    )
    token = otel_context.attach(trace.set_span_in_context(trace.NonRecordingSpan(span_ctx)))
    try:
        h = eng.submit(_req(adapters, "d", [1], 2))
    finally:
        otel_context.detach(token)
    eng.run_until_done([h])
    assert src.trace_ids[adapters["d"].digest] == 0xABC123


def _host_put(host: HostTier, name: str, n: int) -> bool:
    region = host.reserve(n)
    if region is None:
        return False
    off, view = region
    view[:] = bytes([ord(name[0])]) * n
    host.commit(PreparedAdapter(digest=name, header=None, modules={}, nbytes=n), off)
    return True


def test_host_tier_is_bounded_lru_of_idle():
    host = HostTier(max_bytes=256)  # regions are 64-byte aligned: two of 100 bytes fit
    assert _host_put(host, "x", 100) and _host_put(host, "y", 100)
    host.get("x")  # y is now least recently used
    host.acquire("y")  # ...but busy: x goes instead
    assert _host_put(host, "z", 100)
    assert host.digests() == ["y", "z"] and host.nbytes == 256
    host.release("y")
    assert _host_put(host, "w", 100) and host.digests() == ["z", "w"]
    assert host.reserve(257) is None and host.digests() == ["z", "w"]  # never fits: no eviction
    # Freed neighbours coalesce: one region of the whole arena fits once both are dropped.
    assert _host_put(host, "big", 256) and host.digests() == ["big"] and host.evictions == 4


def test_host_tier_frees_a_held_entry_only_when_let_go():
    host = HostTier(max_bytes=128)
    assert _host_put(host, "a", 128)
    p = host.get("a", acquire=True)
    assert p is not None and host.discard("a") and "a" not in host
    assert host.reserve(64) is None  # a's region is still being read by its holder
    host.release("a")
    assert host.nbytes == 0 and _host_put(host, "b", 128)


def test_host_tier_second_commit_of_a_digest_yields_the_first_entry():
    """Two fetches of one digest raced (a fetch lock handed over): the later commit frees its
    own region and returns the committed entry, so no caller keeps a freed region."""
    host = HostTier(max_bytes=256)
    (o1, v1), (o2, _) = host.reserve(100), host.reserve(100)
    v1[:] = b"1" * 100
    first = PreparedAdapter(digest="d", header=None, modules={}, nbytes=100)
    second = PreparedAdapter(digest="d", header=None, modules={}, nbytes=100)
    assert host.commit(first, o1, acquire=True) is first
    assert host.commit(second, o2, acquire=True) is first
    assert host.nbytes == 128 and host.arena.free_bytes == 128
    host.release("d")
    host.release("d")
    assert host.discard("d") and host.nbytes == 0 and host.arena.free_bytes == 256
    with pytest.raises(RuntimeError, match="freed twice"):
        host.arena.free(o1, 100)


def test_host_tier_frees_every_region_dropped_while_held():
    host = HostTier(max_bytes=512)
    assert _host_put(host, "d", 100)
    host.acquire("d")
    assert host.discard("d")  # region 1 doomed
    assert _host_put(host, "d", 100)  # re-fetched meanwhile: region 2
    host.acquire("d")
    assert host.discard("d")  # region 2 doomed too
    host.release("d")
    assert host.nbytes == 256
    host.release("d")
    assert host.nbytes == 0 and host.arena.free_bytes == 512


def test_adapters_that_do_not_fit_the_host_tier_still_load(base_info, adapters):
    """A host tier smaller than an adapter (or an int8 pack, dequantized into fresh tensors):
    the adapter goes through a private buffer, is not kept on the host, and the holds balance."""
    from mintmesh import packed

    shapes = base_info.linear_shapes
    a = adapters["a"]
    header, mods = packed.unpack(a.data, copy=True)
    int8 = packed.pack(mods, base_fingerprint=header.base_fingerprint, storage="int8",
                       peft_config=header.peft_config)  # fmt: skip
    src = PackedBytesSource({a.digest: a.data})
    d8 = src.add(int8)
    for host_bytes, digest in ((len(a.data) // 2, a.digest), (64 << 20, d8)):
        pool = AdapterPool(shapes, max_adapters=2)
        res = AdapterResidency(AdapterDevice(pool), src, layer_shapes=shapes, host_bytes=host_bytes,
                               base_fingerprint=base_info.fingerprint, max_rank=64)  # fmt: skip
        res.ensure(digest)
        assert digest in pool and digest not in res.host and res.host.nbytes == 0
        assert res.host._busy == {}
        res.release(digest)


def test_device_pool_evicts_only_unreferenced_adapters(base_info, adapters):
    shapes = base_info.linear_shapes
    pool = AdapterPool(shapes, max_adapters=2, max_bytes=None)
    src = PackedBytesSource({p.digest: p.data for p in adapters.values()})
    res = AdapterResidency(
        AdapterDevice(pool),
        src,
        layer_shapes=shapes,
        base_fingerprint=base_info.fingerprint,
        max_rank=64,
    )
    a, b, c = adapters["a"].digest, adapters["b"].digest, adapters["c"].digest
    res.ensure(a)
    res.ensure(b)
    with pytest.raises(ResourceExhausted, match="in use"):
        res.ensure(c, timeout=0.05)
    assert not res.evict(a)
    res.release(b)
    res.ensure(c)  # b was idle: evicted
    assert set(pool.resident()) == {a, c}
    assert b in res.host  # still on the host: a reload needs no fetch
    fetches = res.fetches
    res.release(c)
    res.ensure(b)
    assert res.fetches == fetches and set(pool.resident()) == {a, b}


def test_device_pool_is_bounded_in_bytes(base_info, adapters):
    """A pool with the bytes of one rank-16 adapter: many slots, yet a second adapter waits
    until the first is no longer referenced, then replaces it."""
    shapes = base_info.linear_shapes
    probe = AdapterPool(shapes, max_adapters=1)
    budget = probe.page_nbytes * probe.pages_for_rank(16)
    pool = AdapterPool(shapes, max_adapters=8, max_bytes=budget)
    src = PackedBytesSource({p.digest: p.data for p in adapters.values()})
    res = AdapterResidency(
        AdapterDevice(pool),
        src,
        layer_shapes=shapes,
        base_fingerprint=base_info.fingerprint,
        max_rank=64,
    )
    b, c = adapters["b"].digest, adapters["c"].digest
    res.ensure(c)
    assert pool.capacity_bytes == budget and pool.nbytes() == budget
    with pytest.raises(ResourceExhausted):
        res.ensure(b, timeout=0.05)
    res.release(c)
    res.ensure(b)
    assert pool.resident() == [b] and pool.nbytes() <= budget


def test_block_allocator():
    al = BlockAllocator(4)
    x = al.alloc(3)
    assert al.alloc(2) is None and al.num_free == 1
    al.release(x)
    assert al.num_free == 4
    with pytest.raises(RuntimeError, match="twice"):
        al.release([x[0]])


def test_status_reports_the_engine(make_engine, adapters):
    eng = make_engine(kv_block_size=4)
    h = eng.submit(_req(adapters, "b", list(range(10, 19)), 20, ignore_eos=True))
    eng.wait_loads()
    eng.step()
    eng.step()
    st = eng.status()
    assert (st.running, st.queue_depth) == (1, 0)
    assert st.kv_blocks_used == eng.kv.blocks_for(11) and st.kv_blocks_total == eng.kv.num_blocks
    assert st.resident_adapters == [adapters["b"].digest] == st.host_adapters
    assert st.tokens_per_s > 0 and st.steps == 2 and st.tokens_generated == 2
    assert st.dense_kernels == select_dense("cpu", torch.float32) == eng.dense_kernels
    assert st.runner == "torch"
    assert st.adapter_states == {adapters["b"].digest: "device"}
    assert eng.residency.evict(adapters["b"].digest) is False  # referenced by the running one
    h.cancel()
    eng.step()
    assert eng.residency.evict(adapters["b"].digest)
    assert eng.status().adapter_states == {adapters["b"].digest: "host"}
    eng.step()


@pytest.mark.parametrize("layout", ["runs", "scattered"])
def test_paged_attention_matches_the_models_own(tiny_model_dir, layout):
    """One packed forward: a fresh prefill, a decode token and a later prefill chunk, with
    each sequence's blocks in one run (zero-copy views) or scattered (gathered)."""
    from mintmesh.model import load_model
    from mintmesh.services.executor.kv import AttentionPlan, SeqSpan, use_paged_attention

    ref, _ = load_model(tiny_model_dir)
    model, _ = load_model(tiny_model_dir)
    use_paged_attention(model)
    kv = PagedKVCache.for_model(
        model.config, max_bytes=64 * PagedKVCache.block_nbytes(model.config, 4, torch.float32),
        block_size=4, device="cpu", dtype=torch.float32,
    )  # fmt: skip
    seqs = [list(range(5, 16)), [7, 9, 11, 13, 15, 17], list(range(40, 50))]
    if layout == "runs":
        blocks = [list(range(0, 4)), list(range(8, 12)), list(range(20, 24))]
    else:
        blocks = [[30, 3, 17, 9], [50, 1, 2, 3], [44, 12, 60, 5]]
    first = {0: 11, 1: 5, 2: 6}  # tokens of each sequence in the first forward

    def run(spans_tokens):
        ids, pos, spans = [], [], []
        for i, (c, n) in spans_tokens.items():
            spans.append(SeqSpan(len(ids), n, c + n, blocks[i]))
            ids += seqs[i][c : c + n]
            pos += range(c, c + n)
        plan = AttentionPlan(spans, kv)
        with torch.inference_mode():
            return model(
                input_ids=torch.tensor([ids]), position_ids=torch.tensor([pos]),
                use_cache=False, mint_plan=plan,
            ).logits[0]  # fmt: skip

    run({i: (0, n) for i, n in first.items()})
    # Step 2: seq 0 has no more tokens; seq 1 decodes its 6th token; seq 2 prefills 4 more.
    got = run({1: (5, 1), 2: (6, 4)})
    with torch.inference_mode():
        want1 = ref(input_ids=torch.tensor([seqs[1]])).logits[0, -1]
        want2 = ref(input_ids=torch.tensor([seqs[2]])).logits[0, 6:]
    torch.testing.assert_close(got[0], want1, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[1:], want2, rtol=1e-4, atol=1e-5)
    plan = AttentionPlan([SeqSpan(0, 1, 6, blocks[1]), SeqSpan(1, 4, 10, blocks[2])], kv)
    assert (len(plan.runs) == 2) == (layout == "runs")


def test_block_allocator_keeps_a_sequence_contiguous():
    al = BlockAllocator(32)
    a = al.alloc(2, key="a", expect=8)
    b = al.alloc(2, key="b", expect=8)
    assert a == [0, 1] and b == [8, 9]  # b starts after a's claim
    a += al.alloc(1, after=a[-1])
    assert a == [0, 1, 2]
    al.release(a, key="a")
    c = al.alloc(3, key="c", expect=3)
    assert c == [0, 1, 2]
    # Nothing unclaimed left of that size: claimed blocks are taken, then scattered ones.
    rest = al.alloc(al.num_free)
    assert len(rest) == 32 - 5 and al.num_free == 0 and al.alloc(1) is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_purge_waits_for_the_running_request_then_drops_every_copy(make_engine, adapters, backend):
    """A deleted adapter: the request running on it finishes untouched; only then is the
    adapter gone from the device pool and the host tier."""
    eng = make_engine()
    d = adapters["b"].digest
    h = eng.submit(_req(adapters, "b", [5, 6, 7], 12, ignore_eos=True))
    eng.wait_loads()
    eng.step()
    eng.step()
    assert d in eng.residency.resident() and eng.residency.refs(d) > 0
    done: dict = {}
    t = threading.Thread(target=lambda: done.update(r=eng.purge([d], timeout=30)))
    t.start()
    t.join(0.3)
    assert t.is_alive(), "purge must wait while a running request uses the adapter"
    eng.run_until_done([h])
    t.join(10)
    assert done["r"] == ([d], [])
    assert len(h.result().token_ids) == 12
    assert d not in eng.residency.resident()
    assert d not in eng.residency.host


# ---- automatic prefix caching -------------------------------------------------------------------


def _computed(eng, h_or_hs) -> int:
    """Run the handles to the end; the prompt tokens that went through the model meanwhile."""
    before = eng.prefill_tokens_computed
    eng.run_until_done(h_or_hs if isinstance(h_or_hs, list) else [h_or_hs])
    return eng.prefill_tokens_computed - before


def _no_refs_left(eng) -> None:
    al = eng.kv.allocator
    assert eng.kv_blocks_used() == 0
    assert all(al.refs(b) == 0 for b in range(al.num_blocks))
    assert al.num_cached == al.num_hashed  # every registered block is cached, none referenced
    assert al.num_free == al.num_blocks and not eng.kvm._block_hashes and not eng.kvm._after_hit


def test_prefix_block_hash_keys_adapter_digest_and_whole_prefix():
    from mintmesh.services.executor.kv import prefix_block_hash as h

    a, b = "a" * 64, "b" * 64
    first = h(None, a, [1, 2, 3, 4])
    assert first == h(None, a, [1, 2, 3, 4])
    assert len({first, h(None, b, [1, 2, 3, 4]), h(None, None, [1, 2, 3, 4])}) == 3
    assert h(None, None, [1, 2]) == h(None, "", [1, 2])  # both mean the base model
    # The same block tokens after another prefix are another block.
    assert h(first, a, [5, 6, 7, 8]) != h(h(None, a, [1, 2, 3, 9]), a, [5, 6, 7, 8])
    assert h(None, a, [1, 2]) != h(None, a, [1, 2, 0])


def test_block_allocator_refcounts_caches_and_evicts_registered_blocks():
    al = BlockAllocator(6)
    x = al.alloc(4, key="x", expect=4)
    assert al.register(x[0], b"h0") and al.register(x[1], b"h1")
    assert not al.register(x[2], b"h0")  # that prefix already has a block
    al.acquire(al.lookup([b"h0", b"h1", b"h2"]))  # a second sequence shares 2 blocks
    assert [al.refs(b) for b in x] == [2, 2, 1, 1]
    al.release(x, key="x")
    assert al.num_used == 2 and al.num_cached == 0
    al.release(x[:2])
    # Unreferenced: registered blocks are cached (free, still findable), the others plain free.
    assert al.num_free == 6 and al.num_cached == 2 and al.lookup([b"h0", b"h1"]) == x[:2]
    with pytest.raises(RuntimeError, match="twice"):
        al.release([x[0]])
    # Plainly free blocks go first; a shortfall evicts cached ones, tail of the prefix first.
    y = al.alloc(4)
    assert set(y).isdisjoint(x[:2]) and al.num_cached == 2 and al.evictions == 0
    z = al.alloc(1)
    assert z == [x[1]] and al.evictions == 1 and al.lookup([b"h0", b"h1"]) == [x[0]]
    assert al.alloc(2) is None
    al.acquire([x[0]])  # a cached block taken back is referenced again, not free
    assert al.num_free == 0 and al.alloc(1) is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefix_cache_hit_equals_peft_and_skips_the_cached_prompt(
    make_engine, adapters, oracle, backend
):
    """Multi-turn: the second turn re-sends the first (prompt and reply) and reuses its KV."""
    eng = make_engine(kv_block_size=4)
    p1 = list(range(20, 43))  # 23 tokens
    h1 = eng.submit(_req(adapters, "a", p1, 6))
    assert _computed(eng, h1) == len(p1)
    out1 = h1.result().token_ids
    assert out1 == oracle("a", p1, 6)
    assert (eng.prefix_query_tokens, eng.prefix_hit_tokens) == (len(p1), 0)
    p2 = p1 + out1 + [7, 8, 9, 10, 11]
    assert len(p2) == 34
    h2 = eng.submit(_req(adapters, "a", p2, 6))
    computed = _computed(eng, h2)
    assert h2.result().token_ids == oracle("a", p2, 6)
    # Every full block turn 1 computed (its last sampled token never went through the model).
    hit = (len(p1) + len(out1) - 1) // 4 * 4
    assert hit >= 20 and eng.prefix_hit_tokens == hit
    assert computed == len(p2) - hit
    st = eng.status()
    assert st.prefix_caching and st.prefix_hit_tokens == hit
    assert st.prefix_query_tokens == len(p1) + len(p2) and st.kv_blocks_cached > 0
    # The same prompt again: its full blocks are cached (34 tokens: 32), and a prompt of 33
    # tokens leaves just its last token to compute (a one-token prefill).
    h3 = eng.submit(_req(adapters, "a", p2, 6))
    assert _computed(eng, h3) == len(p2) - 32
    assert h3.result().token_ids == oracle("a", p2, 6)
    h4 = eng.submit(_req(adapters, "a", p2[:33], 6))
    assert _computed(eng, h4) == 1
    assert h4.result().token_ids == oracle("a", p2[:33], 6)
    assert eng.prefix_hit_tokens == hit + 32 + 32
    _no_refs_left(eng)


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefix_cache_never_crosses_adapters_or_revisions(make_engine, adapters, oracle, backend):
    """The same tokens under adapter a, adapter b, the base model and a re-pushed a (a_v2, same
    name, new digest): no K/V is reused across them, each output is its own adapter's."""
    eng = make_engine(kv_block_size=4)
    p = list(range(100, 121))  # 21 tokens: 5 full blocks
    for name in ("a", "b", None, "a_v2"):
        h = eng.submit(_req(adapters, name, p, 5))
        assert _computed(eng, h) == len(p), name
        assert h.result().token_ids == oracle(name, p, 5), name
        assert eng.prefix_hit_tokens == 0, name
    assert eng.kv.allocator.num_cached >= 4 * 5
    # Each one reuses only its own.
    for i, name in enumerate(("a_v2", None, "b", "a"), start=1):
        h = eng.submit(_req(adapters, name, p + [3, 4], 5))
        assert _computed(eng, h) == len(p) + 2 - 20, name
        assert h.result().token_ids == oracle(name, p + [3, 4], 5), name
        assert eng.prefix_hit_tokens == 20 * i
    # Another tenant with the same digest: the same adapter revision, so the same K/V.
    h = eng.submit(_req(adapters, "b", p + [9], 5, tenant="someone-else"))
    assert _computed(eng, h) == 2
    assert h.result().token_ids == oracle("b", p + [9], 5)
    _no_refs_left(eng)


@pytest.mark.parametrize("backend", BACKENDS)
def test_running_requests_share_cached_prefix_blocks(make_engine, adapters, oracle, backend):
    """A running request's prompt blocks are shared by requests admitted while it decodes;
    shared blocks are never written, every reference comes back."""
    eng = make_engine(kv_block_size=4, max_batch_size=4)
    p = list(range(30, 47))  # 17 tokens: 4 full blocks
    first = eng.submit(_req(adapters, "b", p, 12, ignore_eos=True))
    eng.wait_loads()
    eng.step()
    eng.step()  # prefilled and decoding
    more = [eng.submit(_req(adapters, "b", p + [5, 6], 4, ignore_eos=True)),
            eng.submit(_req(adapters, "b", p + [9], 9, ignore_eos=True)),
            eng.submit(_req(adapters, "d", p, 6, ignore_eos=True))]  # fmt: skip
    eng.wait_loads()
    eng.step()
    al = eng.kv.allocator
    seqs = {s.handle: s for s in eng.batch.running}
    shared = seqs[first].blocks[:4]
    assert [seqs[h].blocks[:4] for h in more[:2]] == [shared, shared]
    assert set(seqs[more[2]].blocks).isdisjoint(shared)  # other adapter, own blocks
    assert [al.refs(b) for b in shared] == [3, 3, 3, 3]
    assert eng.prefix_hit_tokens == 32
    eng.run_until_done([first, *more])
    want = [("b", p, 12), ("b", p + [5, 6], 4), ("b", p + [9], 9), ("d", p, 6)]
    for (name, ids, k), h in zip(want, [first, *more], strict=True):
        assert h.result().token_ids == oracle(name, ids, k, ignore_eos=True), name
    _no_refs_left(eng)


def test_cached_blocks_are_evicted_to_admit_new_work(make_engine, adapters, oracle):
    """A small KV cache: cached prefixes are evicted for new requests (least recently freed,
    tail first); running sequences still preempt rather than fail; outputs stay right."""
    per_block = PagedKVCache.block_nbytes(_tiny_cfg(), 4, torch.float32)
    eng = make_engine(kv_block_size=4, kv_cache_bytes=12 * per_block, max_batch_size=4)
    prompts = [list(range(10 * i + 1, 10 * i + 19)) for i in range(1, 5)]  # 18 tokens each
    for i, ids in enumerate(prompts):
        h = eng.submit(_req(adapters, "c", ids, 6, ignore_eos=True))
        eng.run_until_done([h])
        assert h.result().token_ids == oracle("c", ids, 6, ignore_eos=True), i
    al = eng.kv.allocator
    assert al.evictions > 0 and eng.prefix_hit_tokens == 0
    # The last prompt's prefix is still cached (its 4 full blocks), the first one's is not
    # (evicted tail first: at most its head block is left).
    h = eng.submit(_req(adapters, "c", prompts[-1] + [1], 3, ignore_eos=True))
    eng.run_until_done([h])
    assert eng.prefix_hit_tokens == 16
    h = eng.submit(_req(adapters, "c", prompts[0] + [1], 3, ignore_eos=True))
    eng.run_until_done([h])
    assert eng.prefix_hit_tokens - 16 in (0, 4)
    assert h.result().token_ids == oracle("c", prompts[0] + [1], 3, ignore_eos=True)
    # Now everything at once, with preemption, over a cache that is full of cached prefixes.
    jobs = [("c", prompts[1], 10), ("c", prompts[1] + [2, 3], 10), ("a", prompts[2], 10),
            (None, prompts[3], 10)]  # fmt: skip
    hs = [eng.submit(_req(adapters, n, ids, k, ignore_eos=True)) for n, ids, k in jobs]
    eng.run_until_done(hs)
    assert eng.preemptions > 0
    for (name, ids, k), h in zip(jobs, hs, strict=True):
        assert h.result().token_ids == oracle(name, ids, k, ignore_eos=True), name
    _no_refs_left(eng)


def test_preempted_sequences_take_their_cached_blocks_back(make_engine, adapters, oracle):
    per_block = PagedKVCache.block_nbytes(_tiny_cfg(), 2, torch.float32)
    eng = make_engine(kv_block_size=2, kv_cache_bytes=14 * per_block, max_batch_size=4)
    jobs = [("a", [72, 101, 108, 108, 111], 8), ("b", list(range(30, 37)), 8),
            ("d", [5, 6, 7], 8)]  # fmt: skip
    hs = [eng.submit(_req(adapters, n, ids, k)) for n, ids, k in jobs]
    eng.run_until_done(hs)
    assert eng.preemptions > 0 and eng.prefix_hit_tokens > 0
    for (name, ids, k), h in zip(jobs, hs, strict=True):
        assert h.result().token_ids == oracle(name, ids, k), name
    _no_refs_left(eng)


def test_prefix_caching_off_reuses_nothing(make_engine, adapters, oracle):
    eng = make_engine(kv_block_size=4, prefix_caching=False)
    p = list(range(20, 43))
    for _ in range(2):
        h = eng.submit(_req(adapters, "a", p, 6))
        assert _computed(eng, h) == len(p)
        assert h.result().token_ids == oracle("a", p, 6)
    al = eng.kv.allocator
    assert (eng.prefix_query_tokens, eng.prefix_hit_tokens) == (0, 0)
    assert al.num_hashed == 0 and al.num_cached == 0 and eng.kv_blocks_used() == 0
    assert not eng.status().prefix_caching


def test_prefix_caching_flag_and_environment():
    from mintmesh.services.common.config import load_config
    from mintmesh.services.executor.__main__ import build_parser

    def cfg(argv, env=None):
        over = {k: v for k, v in vars(build_parser().parse_args(argv)).items() if k != "log_level"}
        return load_config(ExecutorConfig, "EXECUTOR", over, environ=env or {})

    assert cfg(["--model-dir", "m"]).prefix_caching is True
    assert cfg(["--model-dir", "m", "--no-prefix-caching"]).prefix_caching is False
    off = {"MINT_EXECUTOR_PREFIX_CACHING": "0"}
    assert cfg(["--model-dir", "m"], off).prefix_caching is False
    assert cfg(["--model-dir", "m", "--prefix-caching"], off).prefix_caching is True


@pytest.mark.parametrize("backend", BACKENDS)
def test_purging_an_adapter_drops_the_prefixes_computed_with_it(
    make_engine, adapters, oracle, backend
):
    eng = make_engine(kv_block_size=4)
    p = list(range(20, 43))
    for name in ("a", "b"):
        h = eng.submit(_req(adapters, name, p, 4))
        assert _computed(eng, h) == len(p)
        h.result()
    al = eng.kv.allocator
    cached = al.num_cached
    assert cached > 0
    purged, busy = eng.purge([adapters["a"].digest])
    assert adapters["a"].digest in purged and not busy
    assert 0 < al.num_cached < cached  # a's blocks are plainly free now; b's stay cached
    again = eng.submit(_req(adapters, "b", p, 4))
    assert _computed(eng, again) < len(p)  # b still hits
    assert again.result().token_ids == oracle("b", p, 4)
    # Were a's bytes served again (this source still has them), nothing of its old KV is used.
    back = eng.submit(_req(adapters, "a", p, 4))
    assert _computed(eng, back) == len(p)
    assert back.result().token_ids == oracle("a", p, 4)
    _no_refs_left(eng)


def test_prefix_bench_runs_on_the_tiny_backbone(tiny_model_dir, capsys):
    """`mint bench prefix` end to end at a small scale: caching saves prompt tokens on a
    multi-turn workload and changes no output."""
    import json

    from mintmesh.bench import prefix

    argv = ["--preset", "tiny", "--model-dir", str(tiny_model_dir), "--conversations", "3",
            "--turns", "3", "--json"]  # fmt: skip
    assert prefix.main(argv) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    m = res["metrics"]
    assert res["bench"] == "prefix" and m["identical_outputs"] == "9/9"
    assert m["prompt_tokens_computed_on"] < m["prompt_tokens_computed_off"]
    assert 0 < m["prefill_saving"] < 1 and 0 < m["hit_ratio"] < 1


def test_close_ends_running_requests_and_frees_their_kv(make_engine, adapters):
    from mintmesh.errors import Unavailable

    eng = make_engine(kv_block_size=4)
    h = eng.submit(_req(adapters, "a", list(range(20, 43)), 50, ignore_eos=True))
    eng.wait_loads()
    for _ in range(3):
        eng.step()
    assert eng.running == 1 and eng.kv_blocks_used() > 0
    eng.close(timeout=0)
    assert isinstance(_drain(h)[-1], Unavailable)
    assert eng.kv_blocks_used() == 0


def test_dense_kernels_flag_environment_and_refusals(tiny_model_dir):
    from mintmesh.services.common.config import load_config
    from mintmesh.services.executor.__main__ import build_parser

    def cfg(argv, env=None):
        over = {k: v for k, v in vars(build_parser().parse_args(argv)).items() if k != "log_level"}
        return load_config(ExecutorConfig, "EXECUTOR", over, environ=env or {})

    assert cfg(["--model-dir", "m"]).dense_kernels == "auto"
    assert cfg(["--model-dir", "m", "--dense-kernels", "torch"]).dense_kernels == "torch"
    assert cfg(["--model-dir", "m"], {"MINT_EXECUTOR_DENSE_KERNELS": "onednn"}).dense_kernels == (
        "onednn"
    )
    with pytest.raises(ValueError, match="dense_kernels 'mkl' is not supported"):
        cfg(["--model-dir", "m"], {"MINT_EXECUTOR_DENSE_KERNELS": "mkl"})
    # oneDNN required where it cannot serve: the engine does not start, and says why.
    with pytest.raises(ValueError, match="float32"):
        Engine.from_config(
            ExecutorConfig(model_dir=tiny_model_dir, dtype="bfloat16", dense_kernels="onednn"),
            autostart=False,
        )


def _read_ids(h) -> list[int]:
    """Every output the handle holds now (a reader catching up), as token ids."""
    import queue as _queue

    ids: list[int] = []
    while True:
        try:
            item = h.get(timeout=0)
        except _queue.Empty:
            return ids
        if isinstance(item, BaseException):
            raise item
        ids += item.token_ids


def test_a_tenant_over_its_share_of_a_full_batch_yields_a_slot_within_a_step(make_engine, adapters):
    """Tenant A's long streams fill the batch (no slot frees for 60 steps); tenant B's lone
    request is admitted at the next step (A's newest is preempted and recomputed later, its
    tokens unchanged); without fair-share preemption B waits for A's streams to end."""
    solo_ref = make_engine(max_batch_size=4)
    refs = []
    for i in range(4):
        h = solo_ref.submit(_req(adapters, "a", [i + 3, 9, 4], 60, tenant="A", ignore_eos=True))
        solo_ref.run_until_done([h])
        refs.append(h.result().token_ids)
    waits = {}
    for fair in (True, False):
        eng = make_engine(max_batch_size=4, fair_share_preemption=fair)
        flood = [
            eng.submit(_req(adapters, "a", [i + 3, 9, 4], 60, tenant="A", ignore_eos=True))
            for i in range(4)
        ]
        eng.wait_loads()
        for _ in range(3):
            eng.step()
        assert eng.running == 4
        solo = eng.submit(_req(adapters, "b", [42, 43], 3, tenant="B", ignore_eos=True))
        eng.run_until_done([solo])
        r = solo.result()
        waits[fair] = r.first_step - r.submit_step
        eng.run_until_done(flood)
        assert [h.result().token_ids for h in flood] == refs  # preempted or not: same tokens
        if fair:
            assert eng.fair_preemptions == 1
            assert sum(h.result().preemptions for h in flood) == 1
    assert waits[True] <= 2, waits
    assert waits[False] >= 50, waits  # the bound comes from the preemption, nothing else


def test_a_lone_tenant_first_token_runs_in_a_step_of_its_own(make_engine, adapters):
    """While tenant A runs FIRST_TOKEN_MIN_RUNNING or more sequences and the batch has a slot,
    tenant B's lone prefill runs in a step of its own (A's decodes wait that one step), and the
    next step is a step as usual again; off, B's prefill shares the step with A's decodes.
    Every token is the same either way. A full batch with no slot to give makes no such step
    (and no empty one); with fair-share preemption the slot it frees goes to B's step."""
    from mintmesh.services.executor.scheduler import FIRST_TOKEN_MIN_RUNNING

    n_a = FIRST_TOKEN_MIN_RUNNING + 2
    outs = {}
    for on in (True, False):
        eng = make_engine(max_batch_size=16, first_token_steps=on)
        flood = [
            eng.submit(_req(adapters, "a", [i + 3, 9, 4], 30, tenant="A", ignore_eos=True))
            for i in range(n_a)
        ]
        eng.wait_loads()
        for _ in range(3):
            eng.step()
        assert eng.running == n_a
        solo = eng.submit(_req(adapters, "b", [42, 43], 5, tenant="B", ignore_eos=True))
        eng.wait_loads()
        st = eng.step()
        assert st.prefill_tokens == 2 and st.admitted == 1
        if on:
            assert (st.num_seqs, st.decode_tokens) == (1, 0)  # B's prefill alone
        else:
            assert (st.num_seqs, st.decode_tokens) == (n_a + 1, n_a)
        first = _read_ids(solo)
        assert len(first) == 1  # B's first token, in this step (read: not in result() then)
        st2 = eng.step()  # never two in a row: everyone decodes
        assert (st2.num_seqs, st2.decode_tokens) == (n_a + 1, n_a + 1)
        eng.run_until_done([solo, *flood])
        assert eng.first_token_steps == (1 if on else 0)
        outs[on] = [first + solo.result().token_ids] + [h.result().token_ids for h in flood]
    assert outs[True] == outs[False]

    # A full batch: without preemption there is no slot, so every step stays A's whole batch;
    # with it, A's newest gives its slot, and B's prefill runs alone in it.
    for fair in (False, True):
        eng = make_engine(max_batch_size=n_a, first_token_steps=True, fair_share_preemption=fair)
        flood = [
            eng.submit(_req(adapters, "a", [i + 3, 9, 4], 30, tenant="A", ignore_eos=True))
            for i in range(n_a)
        ]
        eng.wait_loads()
        eng.step()
        solo = eng.submit(_req(adapters, "b", [42, 43], 5, tenant="B", ignore_eos=True))
        eng.wait_loads()
        if fair:
            st = eng.step()
            assert (st.num_seqs, st.preempted, st.admitted) == (1, 1, 1)
            assert eng.fair_preemptions == 1 and eng.first_token_steps == 1
        else:
            assert [eng.step().num_seqs for _ in range(4)] == [n_a] * 4
            assert eng.first_token_steps == 0
        eng.run_until_done([solo, *flood])
        assert [h.result().token_ids for h in (solo, *flood)] == outs[True]


def test_a_stream_its_client_does_not_read_is_paused_then_resumed_with_the_same_tokens(
    make_engine, adapters
):
    ref_eng = make_engine(stream_buffer_outputs=0)
    ref = ref_eng.submit(_req(adapters, "a", [5, 6, 7], 40, ignore_eos=True))
    ref_eng.run_until_done([ref])
    want = ref.result().token_ids

    eng = make_engine(stream_buffer_outputs=4)
    slow = eng.submit(_req(adapters, "a", [5, 6, 7], 40, ignore_eos=True))
    other = eng.submit(_req(adapters, "b", [8, 9], 30, tenant="B", ignore_eos=True))
    eng.wait_loads()
    eng.step()
    got = _read_ids(slow)  # its client read once, then stopped
    for _ in range(12):
        eng.step()
        _read_ids(other)  # the other client reads as it goes
    assert slow.paused and slow.unread == 4 and eng.streams_paused == 1
    assert eng.running == 1  # only the reader's stream is in the batch; slow's KV is freed
    for _ in range(5):  # paused: it takes no compute, whatever the steps
        eng.step()
        _read_ids(other)
    assert slow.unread == 4
    [(paused, _since)] = eng.output.paused.values()
    assert paused.handle is slow and paused.blocks == []  # it holds no KV while paused
    got += _read_ids(slow)  # the client reads again: it resumes
    while not (slow.done and other.done):
        eng.step()
        got += _read_ids(slow)
        _read_ids(other)
    got += _read_ids(slow)
    assert got == want
    assert eng.kv_blocks_used() == 0 and not eng.output.paused


def test_a_stream_not_read_past_the_stall_timeout_fails_and_frees_its_kv(make_engine, adapters):
    eng = make_engine(stream_buffer_outputs=3, stream_stall_timeout_s=0.2)
    h = eng.submit(_req(adapters, "a", [5, 6, 7], 40, ignore_eos=True))
    eng.wait_loads()
    eng.step()
    _read_ids(h)  # read once, then never again
    for _ in range(6):
        eng.step()
    assert h.paused and eng.kv_blocks_used() == 0
    time.sleep(0.3)
    eng.step()
    assert h.done and eng.streams_stalled == 1 and eng.queue_depth == 0
    with pytest.raises(ResourceExhausted, match="was not read for"):
        _read_ids(h)


def test_a_reader_that_fell_behind_gets_the_waiting_outputs_as_one_chunk(make_engine, adapters):
    """GenerationHandle.chunks (what the executor streams): outputs queued while the reader was
    away are merged, in order, with the last one's finish and usage; a reader that keeps up
    gets one output per step; nothing is lost or reordered against result()."""
    eng = make_engine(stream_messages_per_s=0)  # no pacing: merges come from the lag alone
    kw = dict(ignore_eos=True, logprobs=True)
    ref = eng.submit(_req(adapters, "a", [5, 6, 7], 9, **kw))
    eng.run_until_done([ref])
    want = ref.result()
    lagging = eng.submit(_req(adapters, "a", [5, 6, 7], 9, **kw))
    for _ in range(4):  # the reader is away for 4 steps
        eng.step()
    it = lagging.chunks(max_merge=64)
    first = next(it)
    assert len(first.token_ids) == 4 and first.finish_reason is None
    rest = []
    while not lagging.done or lagging.unread:
        eng.step()
        rest.append(next(it))  # one step, one output: the reader keeps up
    assert [len(c.token_ids) for c in rest] == [1] * 5
    chunks = [first, *rest]
    assert [t for c in chunks for t in c.token_ids] == want.token_ids
    assert [x for c in chunks for x in c.logprobs] == want.logprobs
    assert "".join(c.text for c in chunks) == want.text
    assert chunks[-1].finish_reason == want.finish_reason
    assert chunks[-1].completion_tokens == 9
    # Bounded merges, and an error that ends the stream comes after the outputs before it.
    h = eng.submit(_req(adapters, "a", [5, 6, 7], 20, **kw))
    for _ in range(6):
        eng.step()
    h._put(RuntimeError("the stream's error"))
    it = h.chunks(max_merge=4)
    assert [len(next(it).token_ids), len(next(it).token_ids)] == [4, 2]
    with pytest.raises(RuntimeError, match="the stream's error"):
        next(it)
    h.cancel()
    eng.step()


def test_stream_messages_are_paced_by_the_message_budget(make_engine, adapters):
    """stream_messages_per_s: a reader that keeps up still gets the first token alone, at
    once, then one message per stream_interval() (here the 0.1 s default cap: one stream over a
    budget of 10 per second) carrying every output of the steps in between, in order, the finish and
    usage on the last; unpaced (0), the same reader gets one message per step."""
    kw = dict(ignore_eos=True, logprobs=True)
    for budget in (10.0, 0.0):
        eng = make_engine(stream_messages_per_s=budget)
        ref = eng.submit(_req(adapters, "a", [5, 6, 7], 16, **kw))
        eng.run_until_done([ref])
        want = ref.result()
        h = eng.submit(_req(adapters, "a", [5, 6, 7], 16, **kw))
        got: list = []
        reader = threading.Thread(target=lambda h=h, got=got: got.extend(h.chunks()), daemon=True)
        reader.start()
        t0 = time.monotonic()
        while not h.done:
            eng.step()
            time.sleep(0.01)  # the reader keeps up: it waits on the stream between steps
        reader.join(10)
        took = time.monotonic() - t0
        assert not reader.is_alive()
        assert [t for c in got for t in c.token_ids] == want.token_ids
        assert [x for c in got for x in c.logprobs] == want.logprobs
        assert "".join(c.text for c in got) == want.text
        assert got[-1].finish_reason == want.finish_reason and got[-1].completion_tokens == 16
        if budget:
            assert len(got[0].token_ids) == 1, [len(c.token_ids) for c in got]
            # One message per 0.1 s after the first (and the last, sent as it came).
            assert 2 <= len(got) <= 2 + took / 0.1, (len(got), took)
        else:
            assert [len(c.token_ids) for c in got] == [1] * 16


def test_a_pacing_reader_sleeps_through_the_steps_and_is_no_slow_reader(make_engine, adapters):
    """Between two paced messages the reader sleeps (chunks() holds) instead of waking for
    each step's output: the outputs of the steps in between stay queued for it and are not
    unread (a hold longer than stream_buffer_outputs steps does not pause the stream); a full
    message's worth (max_merge) ends the hold; the last output, an error and a cancel end it
    at once; nothing is lost or reordered."""
    kw = dict(ignore_eos=True, logprobs=True)
    # One stream over a budget of 1e-3 a second, capped at 30 s: its messages 30 s apart.
    eng = make_engine(
        stream_messages_per_s=1e-3, stream_max_interval_s=30.0, stream_buffer_outputs=2
    )
    ref = eng.submit(_req(adapters, "a", [5, 6, 7], 8, **kw))
    eng.run_until_done([ref])
    want = ref.result()

    def until(what, cond) -> None:
        deadline = time.monotonic() + 10  # far below the 30 s interval
        while not cond() and time.monotonic() < deadline:
            time.sleep(0.005)
        assert cond(), what

    def reading(h, got, errs):
        def read():
            try:
                got.extend(h.chunks(max_merge=4))
            except Exception as e:  # noqa: BLE001 - the test looks at it
                errs.append(e)

        t = threading.Thread(target=read, daemon=True)
        t.start()
        eng.step()  # the first token, sent at once; then the reader holds
        until("the first token went out and the reader held", lambda: got and h._reading)
        return t

    h, got, errs = eng.submit(_req(adapters, "a", [5, 6, 7], 8, **kw)), [], []
    reader = reading(h, got, errs)
    for _ in range(3):
        eng.step()
    assert h.queued == 3 and h.unread == 0 and not h.paused  # 3 > stream_buffer_outputs
    assert len(got) == 1
    eng.step()  # the fourth: a full message ends the hold
    until("a full message ended the hold", lambda: len(got) == 2)
    eng.step()
    time.sleep(0.05)
    assert len(got) == 2 and h.queued == 1  # held again: one message per interval
    t0 = time.monotonic()
    while not h.done:
        eng.step()
    reader.join(10)
    assert not reader.is_alive() and time.monotonic() - t0 < 10  # the last ended the hold
    assert [len(c.token_ids) for c in got] == [1, 4, 3] and not errs
    assert [t for c in got for t in c.token_ids] == want.token_ids
    assert [x for c in got for x in c.logprobs] == want.logprobs
    assert "".join(c.text for c in got) == want.text
    assert got[-1].finish_reason == want.finish_reason and got[-1].completion_tokens == 8

    # An error ends a hold, after the outputs held before it.
    h, got, errs = eng.submit(_req(adapters, "a", [5, 6, 7], 8, **kw)), [], []
    reader = reading(h, got, errs)
    eng.step()
    h._put(RuntimeError("the stream's error"))
    reader.join(10)
    assert not reader.is_alive() and [len(c.token_ids) for c in got] == [1, 1]
    assert [str(e) for e in errs] == ["the stream's error"]
    h.cancel()
    eng.step()
    # A cancel ends a hold: the engine's last message (cancelled) goes out at once.
    h, got, errs = eng.submit(_req(adapters, "a", [5, 6, 7], 8, **kw)), [], []
    reader = reading(h, got, errs)
    h.cancel()
    eng.step()
    reader.join(10)
    assert not reader.is_alive() and not errs
    assert got[-1].finish_reason == "cancelled" and len(got) == 2


def test_a_reader_of_a_stopped_engine_gets_unavailable(make_engine, adapters):
    """Engine.close ends every stream still waiting with UNAVAILABLE at once; a reader of an
    engine whose step loop is gone without that finds out within a poll (STOPPED_POLL_S)."""
    from mintmesh.services.executor.requests import STOPPED_POLL_S

    eng = make_engine()
    h = eng.submit(_req(adapters, "a", [5, 6, 7], 4))
    eng.close(timeout=0)
    with pytest.raises(Unavailable, match="stopped before the request ended"):
        list(h.chunks())
    eng = make_engine()
    h = eng.submit(_req(adapters, "a", [5, 6, 7], 4))
    eng.batch.stopping = True  # no step thread (autostart=False), and no close
    t0 = time.monotonic()
    with pytest.raises(Unavailable, match="engine has stopped"):
        list(h.chunks())
    assert time.monotonic() - t0 < STOPPED_POLL_S + 5


# ---- the load's thread -------------------------------------------------------------------------


def test_the_load_runs_on_a_thread_that_ends_and_takes_its_openmp_team_along():
    """Engine.from_config loads on on_a_passing_thread: fn's result comes back, its exception is
    raised on the caller's thread, and the thread (with the OpenMP team a GEMM started on it,
    where torch runs on OpenMP with two threads or more) is gone once it returns, so libgomp
    counts no second team beside the step thread's."""
    from openmp_util import native_workers, openmp_on, settled_new_workers

    from mintmesh.services.executor.passing import on_a_passing_thread

    before = native_workers()
    ran_on: list[int] = []

    def work():
        ran_on.append(threading.get_native_id())
        a = torch.randn(768, 768)
        for _ in range(3):
            a = (a @ a) / 768  # an OpenMP region started on this thread: its own team
        return native_workers() - before

    grown = on_a_passing_thread(work, name="load-test")
    assert ran_on and ran_on[0] != threading.get_native_id()
    if openmp_on():
        assert grown, "the GEMM started no OpenMP worker on the loading thread"
    left = settled_new_workers(before, wait_s=5.0)
    assert not grown & left, "the loading thread's OpenMP team outlived it"
    with pytest.raises(ValueError, match="no such backbone"):
        on_a_passing_thread(lambda: (_ for _ in ()).throw(ValueError("no such backbone")), name="x")


def test_a_forward_leaves_no_openmp_team_on_the_callers_thread(make_engine):
    """Engine.forward runs the model on a thread that ends with it: the caller's thread (a gRPC
    worker's, long-lived) keeps no OpenMP team, which would throttle the step thread's for the
    rest of the process (passing.py). The control, the runner called on the caller's thread,
    leaves one: the check can fail."""
    from openmp_util import openmp_on, workers_left_by

    from mintmesh.services.executor.runner import pack_rows

    if not openmp_on():
        pytest.skip("torch runs no OpenMP teams here")
    eng = make_engine(backend="torch")
    rows = [(None, list(range(1, 200))), (None, list(range(3, 150)))]
    want = eng.forward(rows)  # warm: kernels built, on a passing thread as well
    assert workers_left_by(lambda: eng.runner.run(pack_rows([(ids, -1) for _, ids in rows]))), (
        "the control started no OpenMP team on its thread"
    )
    got: list = []
    assert not workers_left_by(lambda: got.extend(eng.forward(rows)))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_adapter_loads_leave_no_openmp_team_on_long_lived_threads(tiny_model_dir, tmp_path):
    """A wide adapter's copy into the pool runs OpenMP regions (rank 64 at hidden 1024): the
    loader's workers and a Forward's cold loads run it on threads that end, so no team stays
    beside the step thread's (passing.py). The control, the same load on a long-lived thread,
    leaves one: the check can fail."""
    import shutil

    from openmp_util import native_workers, openmp_on, settled_new_workers, workers_left_by
    from transformers import LlamaConfig, LlamaForCausalLM

    from mintmesh.model import base_model_info

    if not openmp_on():
        pytest.skip("torch runs no OpenMP teams here")
    wide = tmp_path / "wide"
    shutil.copytree(tiny_model_dir, wide)  # the tokenizer; config and weights replaced
    tiny = LlamaConfig.from_pretrained(tiny_model_dir)
    cfg = LlamaConfig(**{**tiny.to_dict(), "hidden_size": 1024, "num_hidden_layers": 1})
    torch.manual_seed(3)
    LlamaForCausalLM(cfg).save_pretrained(wide)
    info = base_model_info(wide)
    packs = {}
    for i in range(3):
        d = make_peft_adapter(wide, tmp_path / f"a{i}", rank=64, targets=["q_proj"], seed=i)
        pa = validate_and_pack(*read_peft_dir(d), info, max_rank=64)
        packs[pa.digest] = pa.data
    ctl, loaded, cold = packs
    eng = Engine.from_config(
        ExecutorConfig(model_dir=wide, backend="torch"),
        source=PackedBytesSource(packs),
        autostart=False,
    )
    try:

        def control() -> None:
            eng.residency.ensure(ctl)
            eng.residency.release(ctl)

        assert workers_left_by(control), "the control's load started no OpenMP team on its thread"
        before = native_workers()
        assert eng.loader.request(loaded)
        eng.wait_loads()
        assert loaded in eng.residency
        assert not settled_new_workers(before), "a loader thread kept an OpenMP team"
        assert cold not in eng.residency
        ids = list(range(1, 40))
        got: list = []
        assert not workers_left_by(lambda: got.extend(eng.forward([(cold, ids)])))
        assert cold in eng.residency and got[0].shape == (len(ids), cfg.vocab_size)
    finally:
        eng.close(timeout=0)


def test_a_passing_thread_carries_the_callers_context_and_runs_nested_calls_in_place():
    import contextvars

    from mintmesh.services.executor.passing import on_a_passing_thread

    var = contextvars.ContextVar("var", default="unset")
    var.set("caller's")

    def outer():
        inner_thread = on_a_passing_thread(threading.get_native_id, name="inner")
        return var.get(), threading.get_native_id(), inner_thread

    seen, outer_thread, inner_thread = on_a_passing_thread(outer, name="outer")
    assert seen == "caller's"
    assert outer_thread != threading.get_native_id()
    assert inner_thread == outer_thread  # one thread, not one per level


def test_a_passing_thread_that_cannot_start_leaves_the_work_to_the_caller(monkeypatch, caplog):
    """No thread to be had (a pids limit): the work runs on the caller's thread, not lost (an
    adapter loader's worker would otherwise die of it, and every later load wait in vain)."""
    from mintmesh.services.executor.passing import on_a_passing_thread

    start = threading.Thread.start

    def refuse(self):
        if self.name == "no-room":
            raise RuntimeError("can't start new thread")
        start(self)

    monkeypatch.setattr(threading.Thread, "start", refuse)
    with caplog.at_level("WARNING", logger="mintmesh.services.executor.passing"):
        assert on_a_passing_thread(threading.get_native_id, name="no-room") == (
            threading.get_native_id()
        )
    assert "no-room runs on the calling thread" in caplog.text
    with pytest.raises(KeyError) as info:
        on_a_passing_thread(lambda: {}["missing"], name="no-room")
    assert info.value.__context__ is None  # not chained to the refused start
    inner: list = []

    def outer():  # a nested call does not try again: it runs in place
        inner.append(on_a_passing_thread(threading.get_native_id, name="room"))
        return threading.get_native_id()

    assert on_a_passing_thread(outer, name="no-room") == inner[0] == threading.get_native_id()
    assert on_a_passing_thread(threading.get_native_id, name="room") != threading.get_native_id()
