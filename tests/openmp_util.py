"""Which OpenMP teams outlive the work that started them (services/executor/passing.py).

libgomp keeps a team for the life of the thread that started a parallel region; its workers
are native threads that Python does not know, named as the process (gRPC's own native threads
name themselves)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import torch


def openmp_on() -> bool:
    """torch runs parallel regions on OpenMP with two threads or more here."""
    return torch._C.has_openmp and torch.get_num_threads() > 1


def native_workers() -> set[int]:
    """Threads of this process that are not Python's and carry the process's name."""
    known = {t.native_id for t in threading.enumerate()}
    me = _comm(os.getpid())
    out = set()
    for t in os.listdir("/proc/self/task"):
        tid = int(t)
        if tid not in known and _comm(tid) == me:
            out.add(tid)
    return out


def _comm(tid: int) -> str:
    try:
        with open(f"/proc/self/task/{tid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def settled_new_workers(before: set[int], wait_s: float = 2.0) -> set[int]:
    """Workers beside `before`, once those of ended threads had wait_s to go."""
    end = time.monotonic() + wait_s
    while native_workers() - before and time.monotonic() < end:
        time.sleep(0.01)
    return native_workers() - before


def workers_left_by(fn: Callable[[], object]) -> set[int]:
    """The OpenMP workers left once fn() ran on a fresh thread that is still alive (a gRPC
    worker's or a queue's, say): none when fn's parallel regions ran on threads that ended."""
    before = native_workers()
    done, release = threading.Event(), threading.Event()
    box: dict = {}

    def body() -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - raised on the test's thread
            box["error"] = e
        done.set()
        release.wait(60)

    t = threading.Thread(target=body, daemon=True)
    t.start()
    try:
        assert done.wait(120), "fn did not return"
        if "error" in box:
            raise box["error"]
        return settled_new_workers(before)
    finally:
        release.set()
        t.join(10)
