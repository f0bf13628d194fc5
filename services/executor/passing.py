"""Model compute off the step thread runs on a thread that ends with it (on_a_passing_thread).

Why: libgomp (torch's OpenMP runtime) gives every thread that starts a parallel region a team of
its own for the thread's life, and counts the threads of all teams; once they outnumber the
CPUs, every team's workers stop spinning between regions (100 iterations instead of 300,000) and
each region then pays a futex wake-up. So a forward, a training batch, an optimizer step or an
adapter's copy into the pool run on a long-lived thread (a gRPC worker, the training queue's,
an adapter loader's) would leave its team beside the step thread's for good, and the serving
steps would run throttled from then on:
- loading the backbone on the caller's thread: small backbone, 24 requests at capacity in
  process, 150-174 tokens/s against 174-182 with the load on a thread that ended;
- 48 decoding rows, in process, with a second team alive: 135-150 ms a step against 112-121
  ms (its workers sleep: 6-9 ms of system time a step against 1-2);
- through a local cluster after 16 Score calls: 164-170 ms against 154-159 ms a decode step,
  the step thread's worker running 0.63-0.65 of the time against 0.86-0.87 (1,400-1,800
  voluntary context switches a second against ~150).
A thread that ends takes its team along (libgomp frees it and uncounts its workers), so the
count is back to the step thread's team as soon as the work returns. The thread costs ~0.1-0.3
ms to start, against forwards and training batches of milliseconds or more."""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

__all__ = ["on_a_passing_thread"]

logger = logging.getLogger(__name__)

_here = threading.local()


def on_a_passing_thread(fn: Callable[[], T], *, name: str) -> T:
    """fn() on a thread of its own that ends when fn returns (in a copy of the caller's
    contextvars: its trace context among them): its result, or its exception raised here.
    Called on such a thread already, fn runs there (one thread, not one per level); where no
    thread can be started (a pids limit, say), on the caller's: the work is done all the same,
    only its OpenMP team may stay."""
    if getattr(_here, "passing", False):
        return fn()
    box: dict = {}
    ctx = contextvars.copy_context()

    def run() -> None:
        _here.passing = True  # nested calls run in place
        try:
            box["result"] = ctx.run(fn)
        except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
            box["error"] = e
        finally:
            _here.passing = False  # (for the caller's thread, where run() ran there)

    t: threading.Thread | None = threading.Thread(target=run, name=name, daemon=True)
    try:
        t.start()
    except RuntimeError as e:  # "can't start new thread"
        logger.warning("%s runs on the calling thread: no thread could be started (%s)", name, e)
        t = None
    if t is None:
        run()  # outside the except: fn's own errors are not chained to the refusal
    else:
        t.join()
    err = box.pop("error", None)
    if err is not None:
        try:
            raise err
        finally:
            del err  # no cycle (box, traceback, frame) keeps fn's tensors alive
    return box["result"]
