"""The adapter store over real gRPC: push, resolve, list, delete, fetch; every bad upload is
refused with the right status, a message naming the problem, and the catalog unchanged; a store
killed mid-push loses nothing it committed."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from peft_util import make_peft_adapter
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from mintmesh import peft_io
from mintmesh.services.common.server import CHUNK_BYTES
from mintmesh.services.store.config import StoreConfig
from mintmesh.services.store.core import StoreCore
from mintmesh.services.store.server import create_server
from mintmesh.v1 import store_pb2, store_pb2_grpc

MAX_RANK = 16
MAX_UPLOAD = 1 << 20
TIMEOUT = 20.0
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# -- helpers ----------------------------------------------------------------------------------


def header_msg(name: str, cfg: str, weights: bytes, **over) -> store_pb2.PushAdapterRequest:
    fields = dict(
        name=name,
        adapter_config_json=cfg,
        sha256=hashlib.sha256(weights).hexdigest(),
        size_bytes=len(weights),
    )
    fields.update(over)
    return store_pb2.PushAdapterRequest(header=store_pb2.PushHeader(**fields))


def chunk_msgs(data: bytes, size: int = CHUNK_BYTES) -> list[store_pb2.PushAdapterRequest]:
    return [
        store_pb2.PushAdapterRequest(chunk=data[i : i + size]) for i in range(0, len(data), size)
    ]


def push(stub, name: str, cfg: str, weights: bytes, **over) -> store_pb2.PushAdapterResponse:
    msgs = [header_msg(name, cfg, weights, **over), *chunk_msgs(weights)]
    return stub.PushAdapter(iter(msgs), timeout=TIMEOUT)


def fetch(stub, **req) -> tuple[store_pb2.FetchHeader, bytes]:
    header, parts = None, []
    for m in stub.FetchAdapter(store_pb2.FetchAdapterRequest(**req), timeout=TIMEOUT):
        if m.WhichOneof("payload") == "header":
            assert header is None and not parts, "header must come first, once"
            header = m.header
        else:
            assert header is not None
            assert 0 < len(m.chunk) <= CHUNK_BYTES
            parts.append(m.chunk)
    return header, b"".join(parts)


def list_all(stub, tenant: str = "", page_size: int = 0) -> list[tuple]:
    out, token = [], ""
    while True:
        r = stub.ListAdapters(
            store_pb2.ListAdaptersRequest(tenant=tenant, page_size=page_size, page_token=token),
            timeout=TIMEOUT,
        )
        out += [
            (a.tenant, a.name, a.revision_count, a.latest.ref, a.latest.digest) for a in r.adapters
        ]
        token = r.next_page_token
        if not token:
            return out


def rpc_error(fn, *a, **kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as ei:
        fn(*a, **kw)
    return ei.value


def peft_bytes(path: Path) -> tuple[str, bytes]:
    return peft_io.read_peft_dir(path)


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    specs = {
        "a": dict(rank=8, seed=1),
        "b": dict(rank=4, seed=2, targets=("q_proj", "k_proj", "v_proj", "o_proj")),
        "c": dict(rank=2, seed=3),
        "corrupt": dict(rank=2, seed=4),
        "big": dict(rank=MAX_RANK, seed=5, targets=ALL_TARGETS),
        "too_big_rank": dict(rank=MAX_RANK * 2, seed=6),
        "d": dict(rank=3, seed=7),
    }
    return {k: make_peft_adapter(tiny_model_dir, root / k, **kw) for k, kw in specs.items()}


@pytest.fixture(scope="module")
def store(tiny_model_dir, base_info, tmp_path_factory):
    cfg = StoreConfig(
        data_dir=tmp_path_factory.mktemp("store"),
        model_dir=tiny_model_dir,
        max_rank=MAX_RANK,
        max_upload_bytes=MAX_UPLOAD,
    )
    core = StoreCore(cfg, base=base_info)
    srv = create_server(cfg, core=core)
    yield srv, core
    srv.stop(0)


@pytest.fixture(scope="module")
def stub(store):
    srv, _ = store
    ch = grpc.insecure_channel(srv.address)
    yield store_pb2_grpc.AdapterStoreStub(ch)
    ch.close()


@pytest.fixture()
def core(store) -> StoreCore:
    return store[1]


# -- happy paths ------------------------------------------------------------------------------


def test_push_resolve_fetch(stub, core, adapters, base_info):
    cfg, w = peft_bytes(adapters["a"])
    r = push(stub, "t1/alpha", cfg, w, labels={"team": "x"}).revision
    expected = peft_io.validate_and_pack(cfg, w, base_info, max_rank=MAX_RANK)
    assert (r.tenant, r.name, r.revision, r.ref) == ("t1", "alpha", 1, "t1/alpha@1")
    assert r.digest == expected.digest and r.size_bytes == len(expected.data)
    assert r.base_fingerprint == base_info.fingerprint
    assert (r.rank, r.alpha, list(r.target_modules)) == (8, 16.0, ["q_proj", "v_proj"])
    assert dict(r.labels) == {"team": "x"} and r.created_at_unix_ms > 0

    for ref in ("t1/alpha", "t1/alpha@1", "t1/alpha@latest"):
        got = stub.ResolveAdapter(store_pb2.ResolveAdapterRequest(ref=ref), timeout=TIMEOUT)
        assert got.revision == r

    for req in ({"ref": "t1/alpha@1"}, {"digest": r.digest}):
        h, data = fetch(stub, **req)
        assert (h.digest, h.size_bytes) == (r.digest, len(data))
        assert data == expected.data and hashlib.sha256(data).hexdigest() == r.digest


def test_big_adapter_streams_in_chunks(stub, adapters):
    cfg, w = peft_bytes(adapters["big"])
    r = push(stub, "t1/big", cfg, w).revision
    assert r.rank == MAX_RANK and r.size_bytes > 2 * CHUNK_BYTES
    _, data = fetch(stub, ref="t1/big")
    assert hashlib.sha256(data).hexdigest() == r.digest


def test_revisions_count_up_never_reused(stub, adapters):
    ca, wa = peft_bytes(adapters["a"])
    cb, wb = peft_bytes(adapters["b"])
    r1 = push(stub, "t1/beta", ca, wa).revision
    r2 = push(stub, "t1/beta", cb, wb).revision
    assert (r1.revision, r2.revision) == (1, 2)
    resolve = stub.ResolveAdapter
    assert resolve(store_pb2.ResolveAdapterRequest(ref="t1/beta@1")).revision.digest == r1.digest
    assert resolve(store_pb2.ResolveAdapterRequest(ref="t1/beta@latest")).revision == r2
    assert resolve(store_pb2.ResolveAdapterRequest(ref="t1/beta")).revision == r2

    deleted = stub.DeleteAdapter(store_pb2.DeleteAdapterRequest(ref="t1/beta@2")).deleted
    assert [d.ref for d in deleted] == ["t1/beta@2"]
    assert resolve(store_pb2.ResolveAdapterRequest(ref="t1/beta")).revision == r1
    err = rpc_error(resolve, store_pb2.ResolveAdapterRequest(ref="t1/beta@2"))
    assert err.code() == grpc.StatusCode.NOT_FOUND and "revision 2" in err.details()

    r3 = push(stub, "t1/beta", cb, wb).revision
    assert r3.revision == 3, "a deleted revision number must never be reused"
    assert ("t1", "beta", 2, "t1/beta@3", r3.digest) in list_all(stub, tenant="t1")


def test_concurrent_pushes_get_distinct_consecutive_revisions(stub, adapters):
    cfg, w = peft_bytes(adapters["c"])
    n = 8
    barrier = threading.Barrier(n)

    def one(_):
        barrier.wait()
        return push(stub, "t3/conc", cfg, w).revision.revision

    with ThreadPoolExecutor(n) as pool:
        revs = list(pool.map(one, range(n)))
    assert sorted(revs) == list(range(1, n + 1))
    assert list_all(stub, tenant="t3")[0][2] == n


def test_list_pages_and_tenant_filter(stub, adapters):
    cfg, w = peft_bytes(adapters["c"])
    names = [f"n{i:02d}" for i in range(7)]
    for n in names:
        push(stub, f"pg/{n}", cfg, w)
    push(stub, "pg-other/x", cfg, w)  # a tenant whose name shares the prefix "pg"

    first = stub.ListAdapters(store_pb2.ListAdaptersRequest(tenant="pg", page_size=3))
    assert len(first.adapters) == 3 and first.next_page_token
    paged = list_all(stub, tenant="pg", page_size=3)
    assert [x[1] for x in paged] == names
    assert all(x[0] == "pg" and x[2] == 1 and x[3] == f"pg/{x[1]}@1" for x in paged)
    everyone = list_all(stub, page_size=2)
    assert len(everyone) == len(set(everyone)) and set(paged) < set(everyone)
    assert ("pg-other", "x") in {(x[0], x[1]) for x in everyone}

    err = rpc_error(stub.ListAdapters, store_pb2.ListAdaptersRequest(page_token="@@garbage"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in err.details()
    err = rpc_error(stub.ListAdapters, store_pb2.ListAdaptersRequest(tenant="bad/tenant"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "bad/tenant" in err.details()


def test_delete_drops_blob_when_last_reference_goes(stub, core, adapters):
    cfg, w = peft_bytes(adapters["d"])
    x = push(stub, "t2/x", cfg, w).revision
    y = push(stub, "t2/y", cfg, w).revision
    assert x.digest == y.digest and core.blobs.exists(x.digest)

    resp = stub.DeleteAdapter(store_pb2.DeleteAdapterRequest(ref="t2/x"))
    assert [g.ref for g in resp.deleted] == ["t2/x@1"]
    assert list(resp.deleted_digests) == [], "t2/y still references the blob"
    assert core.blobs.exists(x.digest), "t2/y still references the blob"
    assert fetch(stub, digest=x.digest)[1]

    push(stub, "t2/y", cfg, w)
    resp = stub.DeleteAdapter(store_pb2.DeleteAdapterRequest(ref="t2/y"))
    assert sorted(g.ref for g in resp.deleted) == ["t2/y@1", "t2/y@2"]
    assert list(resp.deleted_digests) == [x.digest]
    assert not core.blobs.exists(x.digest)
    err = rpc_error(fetch, stub, digest=x.digest)
    assert err.code() == grpc.StatusCode.NOT_FOUND and x.digest in err.details()
    assert not [a for a in list_all(stub, tenant="t2")]
    err = rpc_error(stub.DeleteAdapter, store_pb2.DeleteAdapterRequest(ref="t2/x"))
    assert err.code() == grpc.StatusCode.NOT_FOUND and "t2/x" in err.details()


def test_get_base_model(stub, base_info):
    r = stub.GetBaseModel(store_pb2.GetBaseModelRequest(), timeout=TIMEOUT)
    assert r.fingerprint == base_info.fingerprint and r.model_type == "llama"
    assert list(r.target_modules) == base_info.targetable() and r.max_rank == MAX_RANK


def test_health_is_serving(store):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    srv, _ = store
    with grpc.insecure_channel(srv.address) as ch:
        h = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert h.status == health_pb2.HealthCheckResponse.SERVING


# -- refusals ---------------------------------------------------------------------------------


def _tensors(path: Path) -> tuple[str, dict[str, torch.Tensor]]:
    cfg, w = peft_bytes(path)
    return cfg, dict(st_load(w))


def _first_key(tensors: dict, part: str) -> str:
    return sorted(k for k in tensors if part in k)[0]


def case_garbage(ad):
    cfg, _ = peft_bytes(ad["a"])
    junk = b"this is not a safetensors file " * 40
    return [header_msg("bad/garbage", cfg, junk), *chunk_msgs(junk)]


def case_truncated(ad):
    cfg, w = peft_bytes(ad["a"])
    return [header_msg("bad/trunc", cfg, w), *chunk_msgs(w[: len(w) // 2])]


def case_too_long(ad):
    cfg, w = peft_bytes(ad["a"])
    return [header_msg("bad/long", cfg, w, size_bytes=len(w) - 5), *chunk_msgs(w)]


def case_wrong_shape(ad):
    cfg, t = _tensors(ad["a"])
    k = _first_key(t, "lora_B")
    t[k] = torch.randn(t[k].shape[0] + 3, t[k].shape[1])
    w = st_save(t)
    return [header_msg("bad/shape", cfg, w), *chunk_msgs(w)]


def case_nan(ad):
    cfg, t = _tensors(ad["a"])
    k = _first_key(t, "lora_A")
    t[k] = t[k].clone()
    t[k][0, 0] = float("nan")
    w = st_save(t)
    return [header_msg("bad/nan", cfg, w), *chunk_msgs(w)]


def case_missing_module(ad):
    cfg, t = _tensors(ad["a"])
    t = {k.replace("q_proj", "qkv_fused"): v for k, v in t.items()}
    c = json.loads(cfg)
    c["target_modules"] = ["qkv_fused", "v_proj"]
    w = st_save(t)
    return [header_msg("bad/target", json.dumps(c), w), *chunk_msgs(w)]


def case_not_lora(ad):
    cfg, w = peft_bytes(ad["ia3"])
    return [header_msg("bad/ia3", cfg, w), *chunk_msgs(w)]


def case_other_base(ad):
    cfg, w = peft_bytes(ad["other_base"])
    return [header_msg("bad/otherbase", cfg, w), *chunk_msgs(w)]


def case_claimed_base(ad):
    cfg, w = peft_bytes(ad["a"])
    return [header_msg("bad/claimed", cfg, w, base_fingerprint="0" * 64), *chunk_msgs(w)]


def case_rank(ad):
    cfg, w = peft_bytes(ad["too_big_rank"])
    return [header_msg("bad/rank", cfg, w), *chunk_msgs(w)]


def case_sha(ad):
    cfg, w = peft_bytes(ad["a"])
    return [header_msg("bad/sha", cfg, w, sha256="ab" * 32), *chunk_msgs(w)]


def case_oversize(ad):
    cfg, w = peft_bytes(ad["a"])
    return [header_msg("bad/huge", cfg, w, size_bytes=MAX_UPLOAD + 1), *chunk_msgs(w)]


def case_chunk_first(ad):
    cfg, w = peft_bytes(ad["a"])
    return [*chunk_msgs(w)[:1], header_msg("bad/order", cfg, w), *chunk_msgs(w)]


def case_no_header(ad):
    return []


def case_two_headers(ad):
    cfg, w = peft_bytes(ad["a"])
    return [header_msg("bad/two", cfg, w), header_msg("bad/two", cfg, w), *chunk_msgs(w)]


def case_big_chunk(ad):
    cfg, w = peft_bytes(ad["big"])
    return [header_msg("bad/chunk", cfg, w), *chunk_msgs(w, size=CHUNK_BYTES + 1)]


def case_bad_name(ad):
    cfg, w = peft_bytes(ad["a"])
    return [header_msg("no-slash-name", cfg, w), *chunk_msgs(w)]


def case_bad_json(ad):
    _, w = peft_bytes(ad["a"])
    return [header_msg("bad/json", "{not json", w), *chunk_msgs(w)]


INVALID = grpc.StatusCode.INVALID_ARGUMENT
BAD_UPLOADS = [
    ("garbage", case_garbage, INVALID, "not a valid safetensors"),
    ("truncated", case_truncated, INVALID, "truncated: received"),
    ("more-than-declared", case_too_long, INVALID, "more than the"),
    ("wrong-shape", case_wrong_shape, INVALID, "wrong tensor shape"),
    ("nan", case_nan, INVALID, "NaN"),
    ("missing-module", case_missing_module, INVALID, "'qkv_fused'"),
    ("not-lora", case_not_lora, INVALID, "peft_type 'IA3'"),
    ("other-base", case_other_base, grpc.StatusCode.FAILED_PRECONDITION, "another base model"),
    ("claimed-base", case_claimed_base, grpc.StatusCode.FAILED_PRECONDITION, "000000000000"),
    ("rank", case_rank, INVALID, f"rank {MAX_RANK * 2} exceeds max_rank {MAX_RANK}"),
    ("sha-mismatch", case_sha, grpc.StatusCode.DATA_LOSS, "abababab"),
    ("oversize", case_oversize, INVALID, f"exceeds max_upload_bytes {MAX_UPLOAD}"),
    ("chunk-before-header", case_chunk_first, INVALID, "must start with a header"),
    ("no-header", case_no_header, INVALID, "no header"),
    ("two-headers", case_two_headers, INVALID, "only chunks may follow"),
    ("chunk-too-big", case_big_chunk, INVALID, f"at most {CHUNK_BYTES}"),
    ("bad-name", case_bad_name, INVALID, "'no-slash-name'"),
    ("bad-config-json", case_bad_json, INVALID, "not valid JSON"),
]


@pytest.fixture(scope="module")
def bad_adapters(adapters, tiny_model_dir, other_model_dir, tmp_path_factory):
    from peft import IA3Config, get_peft_model

    from mintmesh.model import load_model

    root = tmp_path_factory.mktemp("bad-adapters")
    ia3 = get_peft_model(
        load_model(tiny_model_dir)[0],
        IA3Config(
            target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]
        ),
    )
    ia3.save_pretrained(root / "ia3")
    from transformers import AutoModelForCausalLM

    other_base = AutoModelForCausalLM.from_pretrained(str(other_model_dir), local_files_only=True)
    other = make_peft_adapter(
        other_model_dir, root / "other", rank=4, seed=9, base_model=other_base
    )
    return {**adapters, "ia3": root / "ia3", "other_base": other}


@pytest.mark.parametrize(
    "make,code,message", [c[1:] for c in BAD_UPLOADS], ids=[c[0] for c in BAD_UPLOADS]
)
def test_bad_upload_is_refused_and_changes_nothing(stub, core, bad_adapters, make, code, message):
    msgs = make(bad_adapters)
    before = (list_all(stub), sorted(core.blobs.digests()))
    err = rpc_error(stub.PushAdapter, iter(msgs), timeout=TIMEOUT)
    assert err.code() == code, err.details()
    assert message in err.details()
    assert (list_all(stub), sorted(core.blobs.digests())) == before
    assert not list(core.blobs.tmp_dir.iterdir())


@pytest.fixture(scope="module")
def known(stub, adapters) -> store_pb2.PushAdapterResponse:
    return push(stub, "t6/known", *peft_bytes(adapters["c"]))


@pytest.mark.parametrize(
    "call,req,code,words",
    [
        ("ResolveAdapter", {"ref": "nobody/nothing"}, "NOT_FOUND", "'nobody/nothing'"),
        ("ResolveAdapter", {"ref": "t6/known@99"}, "NOT_FOUND", "revision 99"),
        ("ResolveAdapter", {"ref": "t6/known@prod"}, "NOT_FOUND", "alias 'prod'"),
        ("ResolveAdapter", {"ref": "not a ref"}, "INVALID_ARGUMENT", "'not a ref'"),
        ("FetchAdapter", {"ref": "nobody/nothing@3"}, "NOT_FOUND", "'nobody/nothing'"),
        ("FetchAdapter", {"digest": "f" * 64}, "NOT_FOUND", "f" * 64),
        ("FetchAdapter", {"digest": "XYZ"}, "INVALID_ARGUMENT", "'XYZ'"),
        ("FetchAdapter", {}, "INVALID_ARGUMENT", "exactly one of digest or ref"),
        ("DeleteAdapter", {"ref": "nobody/nothing"}, "NOT_FOUND", "'nobody/nothing'"),
    ],
)
def test_unknown_or_malformed_refs(stub, known, call, req, code, words):
    msg_cls = getattr(store_pb2, call.replace("Adapter", "AdapterRequest"))
    fn = getattr(stub, call)
    if call == "FetchAdapter":
        err = rpc_error(lambda: list(fn(msg_cls(**req), timeout=TIMEOUT)))
    else:
        err = rpc_error(fn, msg_cls(**req), timeout=TIMEOUT)
    assert err.code() == getattr(grpc.StatusCode, code)
    assert words in err.details()


def test_corrupt_blob_is_data_loss_and_nothing_is_sent(stub, core, adapters):
    cfg, w = peft_bytes(adapters["corrupt"])
    r = push(stub, "t4/corrupt", cfg, w).revision
    path = core.blobs.path(r.digest)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    received = []
    with pytest.raises(grpc.RpcError) as ei:
        for m in stub.FetchAdapter(store_pb2.FetchAdapterRequest(ref="t4/corrupt")):
            received.append(m)
    assert ei.value.code() == grpc.StatusCode.DATA_LOSS
    assert r.digest in ei.value.details() and "corrupt" in ei.value.details()
    assert received == [], "no byte of a corrupt blob may be sent"


def test_client_cancel_mid_push_leaves_nothing(stub, core, adapters):
    cfg, w = peft_bytes(adapters["big"])
    chunks = chunk_msgs(w, size=4096)
    sent, release = threading.Event(), threading.Event()

    def slow():
        yield header_msg("t5/cancelled", cfg, w)
        for i, m in enumerate(chunks):
            if i == 3:
                sent.set()
                release.wait(10)
            yield m

    before = (list_all(stub), sorted(core.blobs.digests()), core.stats().push_failures)
    fut = stub.PushAdapter.future(slow(), timeout=TIMEOUT)
    assert sent.wait(10)
    fut.cancel()
    release.set()
    deadline = time.monotonic() + 10
    while core.stats().push_failures == before[2] and time.monotonic() < deadline:
        time.sleep(0.02)
    # On a loaded machine the cancel can reach the server before its handler ever ran, so the
    # failure count may not move; what must hold either way is that nothing became visible.
    assert core.stats().push_failures in (before[2], before[2] + 1)
    assert (list_all(stub), sorted(core.blobs.digests())) == before[:2]
    assert not list(core.blobs.tmp_dir.iterdir())


def test_startup_removes_orphans(tiny_model_dir, base_info, adapters, tmp_path):
    cfg = StoreConfig(data_dir=tmp_path / "s", model_dir=tiny_model_dir)
    core = StoreCore(cfg, base=base_info)
    c, w = peft_bytes(adapters["a"])
    chunks = [w[i : i + CHUNK_BYTES] for i in range(0, len(w), CHUNK_BYTES)]
    from mintmesh.services.store.core import PushHeader

    rec = core.push(PushHeader("o/kept", c, hashlib.sha256(w).hexdigest(), len(w)), chunks)
    orphan = os.urandom(100)
    core.blobs.write(hashlib.sha256(orphan).hexdigest(), orphan)  # as if killed before commit
    core.blobs.stage(b"half an upload")
    with pytest.raises(RuntimeError, match="in use by another store"):
        StoreCore(cfg, base=base_info)
    core.close()

    again = StoreCore(cfg, base=base_info)
    try:
        assert list(again.blobs.digests()) == [rec.digest]
        assert not list(again.blobs.tmp_dir.iterdir())
        assert again.fetch(ref="o/kept@1").data == core.blobs.path(rec.digest).read_bytes()
    finally:
        again.close()


# -- a real store process killed mid-push ------------------------------------------------------


def _start_store(data_dir: Path, model_dir: Path, log: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "mintmesh.services.store", "--data-dir", str(data_dir)]
        + ["--model-dir", str(model_dir), "--port", "0", "--max-rank", str(MAX_RANK)]
        + ["--insecure-mesh"],
        stdout=subprocess.PIPE,
        stderr=open(log, "ab"),  # noqa: SIM115 - the child owns it
        text=True,
    )
    line: list[str] = []
    t = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    t.start()
    t.join(60)
    if not line or not line[0].startswith("READY store "):
        proc.kill()
        raise AssertionError(f"store did not start: {line!r}\n{log.read_text()[-3000:]}")
    return proc, line[0].split()[2]


@pytest.mark.e2e
def test_store_killed_mid_push_keeps_committed_revisions(tiny_model_dir, adapters, tmp_path):
    data, log = tmp_path / "data", tmp_path / "store.log"
    proc, addr = _start_store(data, tiny_model_dir, log)
    try:
        with grpc.insecure_channel(addr) as ch:
            st = store_pb2_grpc.AdapterStoreStub(ch)
            kept = {}
            for key in ("a", "b"):
                cfg, w = peft_bytes(adapters[key])
                r = push(st, "k/model", cfg, w).revision
                kept[r.ref] = fetch(st, ref=r.ref)[1]
            assert list(kept) == ["k/model@1", "k/model@2"]

            cfg, w = peft_bytes(adapters["big"])
            some_sent = threading.Event()

            def slow():
                yield header_msg("k/model", cfg, w)
                for i, m in enumerate(chunk_msgs(w, size=2048)):
                    if i == 5:
                        some_sent.set()
                    time.sleep(0.05)
                    yield m

            fut = st.PushAdapter.future(slow(), timeout=TIMEOUT)
            assert some_sent.wait(10)
            time.sleep(0.2)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
            assert fut.exception(10) is not None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    proc, addr = _start_store(data, tiny_model_dir, log)
    try:
        with grpc.insecure_channel(addr) as ch:
            st = store_pb2_grpc.AdapterStoreStub(ch)
            for ref, data_bytes in kept.items():
                assert fetch(st, ref=ref)[1] == data_bytes
            assert list_all(st) == [("k", "model", 2, "k/model@2", ch_digest(kept["k/model@2"]))]
            err = rpc_error(st.ResolveAdapter, store_pb2.ResolveAdapterRequest(ref="k/model@3"))
            assert err.code() == grpc.StatusCode.NOT_FOUND
            # The next push gets the next number: nothing of the cut push was recorded.
            cfg, w = peft_bytes(adapters["c"])
            assert push(st, "k/model", cfg, w).revision.revision == 3
        assert not list((data / "tmp").iterdir())
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def ch_digest(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


# -- training states ------------------------------------------------------------------------------


def _state(steps: int = 3) -> bytes:
    meta = {"format": peft_io.TRAINING_STATE_FORMAT, "steps": str(steps)}
    return st_save({"weight/x.A": torch.randn(2, 4)}, metadata=meta)


def test_a_training_state_is_kept_beside_its_revision_and_goes_with_it(stub, core, adapters):
    cfg, w = peft_bytes(adapters["c"])
    state = _state()
    msgs = [
        header_msg("ts/run", cfg, w, state_sha256=hashlib.sha256(state).hexdigest(),
                   state_size_bytes=len(state)),
        *chunk_msgs(w + state, size=4096),  # the stream crosses from one to the other
    ]  # fmt: skip
    rev = stub.PushAdapter(iter(msgs), timeout=TIMEOUT).revision
    assert rev.state_digest == hashlib.sha256(state).hexdigest()
    assert rev.state_size_bytes == len(state)
    h, got = fetch(stub, ref=rev.ref, state=True)
    assert got == state and h.digest == rev.state_digest
    _, packed = fetch(stub, ref=rev.ref)  # the adapter itself is as without a state
    assert hashlib.sha256(packed).hexdigest() == rev.digest
    plain = push(stub, "ts/plain", cfg, w).revision
    assert plain.digest == rev.digest and not plain.state_digest
    e = rpc_error(fetch, stub, ref=plain.ref, state=True)
    assert e.code() == grpc.StatusCode.NOT_FOUND and "holds no training state" in e.details()
    e = rpc_error(fetch, stub, digest=rev.digest, state=True)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "by ref" in e.details()
    # Deleted with its revision: the state's blob is gone, the shared adapter blob stays.
    assert core.blobs.read(rev.state_digest) == state
    stub.DeleteAdapter(store_pb2.DeleteAdapterRequest(ref=rev.ref), timeout=TIMEOUT)
    assert core.blobs.read(rev.state_digest) is None
    assert core.blobs.read(rev.digest) is not None  # ts/plain still references it


@pytest.mark.parametrize(
    "over, data, code, needle",
    [
        ({"state_size_bytes": 10}, b"", "INVALID_ARGUMENT", "both state_sha256 and"),
        ({"state_sha256": "0" * 64, "state_size_bytes": 20}, b"x" * 20, "DATA_LOSS",
         "state bytes is"),
        ("truncated", None, "INVALID_ARGUMENT", "truncated"),
        ("not-a-state", None, "INVALID_ARGUMENT", "not 'mint.training_state.v1'|not a safetensors"),
        ("too-big", None, "INVALID_ARGUMENT", "exceeds 4 x max_upload_bytes"),
    ],
    ids=["size-without-sha", "sha-mismatch", "truncated", "not-a-state", "too-big"],
)  # fmt: skip
def test_bad_training_states_are_refused_and_nothing_is_stored(stub, adapters, over, data, code,
                                                               needle):  # fmt: skip
    cfg, w = peft_bytes(adapters["c"])
    state = _state()
    sha = hashlib.sha256(state).hexdigest()
    if over == "truncated":
        over, data = {"state_sha256": sha, "state_size_bytes": len(state)}, state[:-5]
    elif over == "not-a-state":
        bad = st_save({"w": torch.zeros(2)}, metadata={"format": "other"})
        over, data = {"state_sha256": hashlib.sha256(bad).hexdigest(),
                      "state_size_bytes": len(bad)}, bad  # fmt: skip
    elif over == "too-big":
        over, data = {"state_sha256": sha, "state_size_bytes": 4 * MAX_UPLOAD + 1}, state
    before = list_all(stub, tenant="tsbad")
    msgs = [header_msg("tsbad/x", cfg, w, **over), *chunk_msgs(w + data)]
    e = rpc_error(stub.PushAdapter, iter(msgs), timeout=TIMEOUT)
    assert e.code().name in code.split("|"), (e.code(), e.details())
    assert any(n in e.details() for n in needle.split("|")), e.details()
    assert list_all(stub, tenant="tsbad") == before == []


# -- hostile inputs (issue: hardening, item 5) ----------------------------------------------------


@pytest.mark.parametrize(
    "alpha_text",
    ["NaN", "1e309", "-Infinity"],
)
def test_a_non_finite_lora_alpha_is_refused_and_nothing_stored(stub, adapters, alpha_text):
    cfg, w = peft_bytes(adapters["c"])
    bad = json.loads(cfg)
    text = json.dumps(bad).replace(f'"lora_alpha": {json.dumps(bad["lora_alpha"])}',
                                   f'"lora_alpha": {alpha_text}')  # fmt: skip
    assert alpha_text in text
    e = rpc_error(push, stub, "hostile-alpha/a", text, w)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
    assert "'lora_alpha'" in e.details() and "finite number > 0" in e.details()
    assert list_all(stub, tenant="hostile-alpha") == []


def test_a_merge_that_overflows_is_refused(stub, adapters):
    cfg, w = peft_bytes(adapters["c"])
    push(stub, "hostile/m1", cfg, w)
    req = store_pb2.MergeAdaptersRequest(
        name="hostile/merged",
        sources=[store_pb2.MergeSource(ref="hostile/m1", weight=1e308),
                 store_pb2.MergeSource(ref="hostile/m1", weight=1e308)],
    )  # fmt: skip
    e = rpc_error(stub.MergeAdapters, req, timeout=TIMEOUT)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "not finite" in e.details()
    e = rpc_error(stub.ResolveAdapter, store_pb2.ResolveAdapterRequest(ref="hostile/merged"),
                  timeout=TIMEOUT)  # fmt: skip
    assert e.code() == grpc.StatusCode.NOT_FOUND


def test_a_revision_past_uint32_is_invalid_in_every_ref(stub, adapters):
    cfg, w = peft_bytes(adapters["c"])
    push(stub, "hostile/big", cfg, w)
    ref = "hostile/big@4294967296"
    calls = [
        (stub.ResolveAdapter, store_pb2.ResolveAdapterRequest(ref=ref)),
        (stub.DeleteAdapter, store_pb2.DeleteAdapterRequest(ref=ref)),
        (stub.AddEvaluation, store_pb2.AddEvaluationRequest(ref=ref, metric="m", value=1.0)),
        (stub.DeprecateRevision, store_pb2.DeprecateRevisionRequest(ref=ref)),
        (stub.MergeAdapters, store_pb2.MergeAdaptersRequest(
            name="hostile/x", sources=[store_pb2.MergeSource(ref=ref, weight=1.0)])),
    ]  # fmt: skip
    for fn, req in calls:
        e = rpc_error(fn, req, timeout=TIMEOUT)
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (fn, e)
        assert "must be in [1, 4294967295]" in e.details()
    e = rpc_error(fetch, stub, ref=ref)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    # The largest revision is a fine reference (to a revision that does not exist).
    top = store_pb2.ResolveAdapterRequest(ref="hostile/big@4294967295")
    e = rpc_error(stub.ResolveAdapter, top, timeout=TIMEOUT)
    assert e.code() == grpc.StatusCode.NOT_FOUND


def test_a_deeply_nested_config_and_a_huge_name_get_short_clean_errors(stub, adapters):
    _, w = peft_bytes(adapters["c"])
    deep = "[" * 100_000 + "]" * 100_000
    e = rpc_error(push, stub, "hostile/deep", deep, w)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "nested too deeply" in e.details()
    huge = "hostile/" + "x" * 10_000
    e = rpc_error(stub.ResolveAdapter, store_pb2.ResolveAdapterRequest(ref=huge), timeout=TIMEOUT)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e  # not RESOURCE_EXHAUSTED
    assert len(e.details()) < 500 and "characters" in e.details()
