"""A LocalCluster's services die with the process that started them: kill -9 of that process
(`mint up`, a test run that timed out) leaves no service running or holding its ports. And a
service whose shutdown hangs (a hook or a thread that never returns) still exits, with every
thread's stack on stderr."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from mintmesh.cluster import ClusterConfig, LocalCluster

    c = LocalCluster(ClusterConfig(model_dir=Path(sys.argv[1]), data_dir=Path(sys.argv[2]),
                                   executors=1, port=0, http_port=None))
    c.start()
    print(json.dumps({n: ch.proc.pid for n, ch in c.children.items()}), flush=True)
    time.sleep(600)
    """
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie that nobody reaps (its parent is gone, init reaps it soon) is not running.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.e2e
@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_services_exit_when_the_process_that_started_them_is_killed(tiny_model_dir, tmp_path):
    env = dict(os.environ, PYTHONSAFEPATH="1")
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(tiny_model_dir), str(tmp_path / "data")],
        stdout=subprocess.PIPE,
        env=env,
        cwd=str(tmp_path),
    )
    try:
        line = proc.stdout.readline()
        assert line, "the cluster script printed nothing"
        pids = json.loads(line)
        assert {"store", "router"} <= set(pids) and len(pids) >= 4, pids
        assert all(_alive(p) for p in pids.values())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_alive(p) for p in pids.values()):
        time.sleep(0.2)
    left = {n: p for n, p in pids.items() if _alive(p)}
    for p in left.values():  # do not leak them into the rest of the run
        os.kill(p, signal.SIGKILL)
    assert not left, f"still running after their parent was killed: {left}"


STUCK_SERVICE = textwrap.dedent(
    """
    import ctypes, signal, sys, threading
    from mintmesh.services.common.server import announce_ready, build_server, serve_until_signal

    srv = build_server(add_servicers=lambda s: [])
    if sys.argv[1] == "hook":  # a shutdown hook that never returns
        srv.on_stop.append(lambda: threading.Event().wait())
    elif sys.argv[1] == "gil":  # one stuck in native code holding the GIL (PyDLL keeps it)
        srv.on_stop.append(lambda: ctypes.PyDLL(None).sleep(120))
    elif sys.argv[1] == "thread":  # a non-daemon thread the interpreter joins at exit
        threading.Thread(target=threading.Event().wait, name="never-ends").start()

    def ready():  # READY only once SIGTERM drains: the test signals as soon as it reads it
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN, None)
        announce_ready("stuck", srv.address)

    serve_until_signal(srv, grace=0.2, exit_slack=float(sys.argv[2]), ready=ready)
    """
)


@pytest.mark.e2e
@pytest.mark.parametrize("stuck", ["none", "hook", "thread", "gil"])
def test_a_service_whose_shutdown_hangs_still_exits(stuck, tmp_path):
    from mintmesh.services.common.server import EXIT_BACKSTOP_S, EXIT_STUCK

    slack = 20.0 if stuck == "none" else 1.5  # a clean exit does not wait for it
    proc = subprocess.Popen(
        [sys.executable, "-c", STUCK_SERVICE, stuck, str(slack)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(os.environ, PYTHONSAFEPATH="1"),
        cwd=str(tmp_path),
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("READY stuck 127.0.0.1:"), line
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if stuck == "none":
        assert proc.returncode == 0, err
        assert "still shutting down" not in err
        return
    if stuck == "gil":  # the Python timer cannot run: faulthandler's backstop ends it
        assert proc.returncode == 1, err
        assert took >= 0.2 + slack + EXIT_BACKSTOP_S, took
        assert "Timeout (" in err and "in <lambda>" in err and "in stop" in err, err
        return
    assert proc.returncode == EXIT_STUCK, err
    assert took >= 0.2 + slack, took  # not before its drain and slack were up
    assert "still shutting down 1.7 s after the signal" in err
    # The dump shows where it was stuck: in Server.stop's hook, or in the exit's thread join.
    assert "most recent call first" in err
    if stuck == "hook":
        assert "in <lambda>" in err and "in stop" in err, err
    else:
        assert "in _shutdown" in err, err
