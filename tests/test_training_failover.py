"""End to end, destructive (a cluster of its own: store, router, two executors with their
sidecars, real processes): a training run lives on one executor; when that executor is killed,
the run's next call fails at once with UNAVAILABLE saying how to go on, and the run resumes from
its last saved state on the other executor, exactly: its next steps equal those of the same
run trained there without the interruption. And a run that no call touches for the executors'
training_run_idle_s is dropped there (its memory freed; a client or gateway that died without
dropping it holds nothing for ever): its next call is NOT_FOUND saying why, and its id is free."""

from __future__ import annotations

import time

import grpc
import pytest
from promscrape import scrape, val

from mintmesh.client import MintClient
from mintmesh.cluster import ClusterConfig, LocalCluster
from mintmesh.v1 import executor_pb2, executor_pb2_grpc

pytestmark = pytest.mark.e2e
TARGETS = ("q_proj", "v_proj")
IDLE_S = 3.0  # the executors' training_run_idle_s here (they sweep every IDLE_S / 4)


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, tmp_path_factory):
    c = LocalCluster(
        ClusterConfig(
            model_dir=tiny_model_dir,
            data_dir=tmp_path_factory.mktemp("train-failover"),
            executors=2,
            port=0,
            http_port=None,
            env={"MINT_EXECUTOR_TRAINING_RUN_IDLE_S": str(IDLE_S)},
        )
    )
    c.start()
    yield c
    c.stop()


def _data(tok):
    out = []
    for t in ("Resume me exactly.", "After the crash, too."):
        s = tok.encode(t)
        out.append({"input_ids": s[:-1], "target_tokens": s[1:], "weights": [1.0] * (len(s) - 1)})
    return out


def _steps(cl, run_id, data, n):
    losses = []
    for _ in range(n):
        losses.append(cl.forward_backward(run_id, data).metrics["loss:sum"])
        cl.optim_step(run_id, learning_rate=2e-2)
    return losses


def test_a_run_resumes_from_its_saved_state_on_another_executor(cluster, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    data = _data(tok)
    with MintClient(cluster.router_address, timeout=60, api_key=cluster.admin_key) as admin:
        key = admin.create_tenant("erin").api_key
    with MintClient(cluster.router_address, timeout=60, retries=0, api_key=key) as cl:
        run = cl.create_training_run(rank=4, targets=TARGETS, seed=7, run_id="erin-run")
        _steps(cl, "erin-run", data, 2)
        saved = cl.save_run("erin-run", "erin/resumable", with_state=True)
        assert saved.ref == "erin/resumable@1"

        victim = cluster.children[run.executor]
        victim.signal(9)
        victim.wait(10)
        with pytest.raises(grpc.RpcError) as ei:
            _steps(cl, "erin-run", data, 1)
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "resume the run from its last saved state" in ei.value.details()

        # The same run id, reloaded from its state with its optimizer: placed on the survivor.
        back = cl.create_training_run(
            run_id="erin-run", from_ref=saved.ref, with_optimizer=True, replace=True
        )
        assert back.executor != run.executor and back.steps == 2
        assert back.lora.rank == 4 and sorted(back.lora.target_modules) == sorted(TARGETS)
        got = _steps(cl, "erin-run", data, 2)

        # The uninterrupted run, on the survivor too: same seed, same data, four steps.
        same = cl.create_training_run(rank=4, alpha=8.0, targets=TARGETS, seed=7, run_id="whole")
        assert same.executor == back.executor
        want = _steps(cl, "whole", data, 4)
        assert got == pytest.approx(want[2:], rel=1e-5), (got, want)
        # Dropped, the run is gone.
        cl.drop_run("erin-run")
        with pytest.raises(grpc.RpcError) as ei:
            cl.forward_backward("erin-run", data)
        assert ei.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_run_no_call_touches_is_dropped_and_its_id_freed(cluster, tiny_model_dir):
    from transformers import AutoTokenizer

    data = _data(AutoTokenizer.from_pretrained(str(tiny_model_dir)))
    with MintClient(cluster.router_address, timeout=60, api_key=cluster.admin_key) as admin:
        key = admin.create_tenant("ivy").api_key
    with MintClient(cluster.router_address, timeout=60, retries=0, api_key=key) as cl:
        idle = cl.create_training_run(rank=2, targets=TARGETS, seed=1, run_id="ivy-idle")
        cl.create_training_run(rank=2, targets=TARGETS, seed=1, run_id="ivy-busy")
        quiet = cl.create_training_run(rank=2, targets=TARGETS, seed=1, run_id="ivy-quiet")
        _steps(cl, "ivy-idle", data, 1)
        _steps(cl, "ivy-quiet", data, 1)
        # ivy-busy gets a call every 0.3 s; ivy-idle none, for longer than IDLE_S and a sweep.
        end = time.monotonic() + IDLE_S * 1.25 + 1.5
        while time.monotonic() < end:
            cl.forward_backward("ivy-busy", data)
            time.sleep(0.3)
        with pytest.raises(grpc.RpcError) as ei:
            cl.forward_backward("ivy-idle", data)
        assert ei.value.code() == grpc.StatusCode.NOT_FOUND, ei.value.details()
        assert "was dropped after" in ei.value.details()
        assert "training_run_idle_s" in ei.value.details()
        assert cl.optim_step("ivy-busy", learning_rate=1e-2).steps == 1  # still there
        # The router forgot where the dropped run lived: the id makes a fresh run.
        again = cl.create_training_run(rank=2, targets=TARGETS, seed=1, run_id="ivy-idle")
        assert again.steps == 0
        # ivy-quiet was dropped too, and no call told the router: its id is free all the same
        # (the executor it lived on answers), while a live run's id is not.
        again = cl.create_training_run(rank=2, targets=TARGETS, seed=1, run_id="ivy-quiet")
        assert again.steps == 0
        with pytest.raises(grpc.RpcError) as ei:
            cl.create_training_run(rank=2, targets=TARGETS, seed=1, run_id="ivy-busy")
        assert ei.value.code() == grpc.StatusCode.ALREADY_EXISTS, ei.value.details()
        cl.forward_backward("ivy-busy", data)
        assert cl.optim_step("ivy-busy", learning_rate=1e-2).steps == 2  # untouched
        for run in ("ivy-idle", "ivy-busy", "ivy-quiet"):
            cl.drop_run(run)
    # Counted where they were dropped: in the executor's Status and its metrics alike.
    urls = cluster.metrics_urls
    for name in {idle.executor, quiet.executor}:
        n = [idle.executor, quiet.executor].count(name)
        with cluster.mesh_channel(cluster.children[name].address) as ch:
            st = executor_pb2_grpc.ExecutorStub(ch).Status(
                executor_pb2.ExecutorStatusRequest(), timeout=10
            )
        assert st.training_runs_expired >= n, (name, st.training_runs_expired)
        got = val(scrape(urls[name]), "mint_executor_training_runs_expired_total")
        assert got >= st.training_runs_expired, (name, got)
