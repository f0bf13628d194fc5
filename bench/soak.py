"""`mint bench soak`: a bounded soak of a whole cluster under faults.

A local cluster (mintmesh.cluster.LocalCluster: store, two cache sidecar + executor pairs,
router; auth and mutual TLS on, supervision on) on the tiny backbone. Three tenants, each with
two adapters; every (adapter, prompt)'s greedy continuation is recorded at the start. Then, for
--minutes M:

- --clients threads generate greedily through the router, each with a random tenant's key and
  adapter, and compare the tokens with the reference (a mismatch is a wrong token, the one
  failure that must never happen);
- one thread pushes new revisions (tenant "soak") and another deletes some of them, keeping the
  acknowledged set;
- every --kill-every-s seconds one process gets SIGKILL, in turn an executor, a cache sidecar and
  the store (the router has no stand-in: killing it is a test of clients' retries, not of the
  mesh); the cluster's supervisor restarts it.

An error is expected when it is UNAVAILABLE on a stream that had already sent chunks (a cut
stream, which the router may not replay), or UNAVAILABLE/DEADLINE_EXCEEDED on a push in flight
when the store died (the client does not know whether it landed; it is not counted as
acknowledged). Anything else is `errors_unexpected`. At the end every acknowledged revision that
was not deleted must resolve to its digest and fetch bytes hashing to it (else
`lost_acknowledged_writes`), and every deleted one must be gone. RSS of each process is sampled
once warm (a quarter of the run after it was first seen: a restarted process gets a warm-up of
its own) and at the end; `rss_growth_max` is the largest relative growth over processes that
were not restarted in between.

Targets: errors_unexpected = 0, lost_acknowledged_writes = 0, wrong_tokens = 0,
rss_growth_max <= 0.05. The last stdout line is one JSON object
{"bench": "soak", "device", "params", "metrics", "targets"}.
    python -m mintmesh.bench.soak --minutes 5 --json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import signal
import tempfile
import threading
import time
from pathlib import Path

from mintmesh.bench.common import ensure_model, progress

PROMPTS = ["the quick brown fox", "once upon a time", "in a distant land", "hello there"]
TENANTS = ["ta", "tb", "tc"]
MAX_TOKENS = 8


def _rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class Soak:
    def __init__(self, cluster, keys: dict[str, str], reference, base_info, args):
        self.cluster = cluster
        self.keys = keys
        self.reference = reference
        self.base_info = base_info
        self.args = args
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.requests = 0
        self.wrong = 0
        self.expected: dict[str, int] = {}
        self.unexpected: list[str] = []
        self.acked: dict[str, str] = {}  # ref -> digest, acknowledged and not deleted
        self.deleted: dict[str, str] = {}
        self.kills: list[str] = []

    def _count(self, table: dict[str, int], what: str) -> None:
        with self.lock:
            table[what] = table.get(what, 0) + 1

    def generator(self, seed: int) -> None:
        import grpc

        from mintmesh.client import MintClient, sampling_params

        rng = random.Random(seed)
        sp = sampling_params(max_tokens=MAX_TOKENS)
        clients = {
            t: MintClient(self.cluster.router_address, timeout=60, retries=0, api_key=k)
            for t, k in self.keys.items()
        }
        try:
            while not self.stop.is_set():
                (tenant, adapter, prompt), want = rng.choice(list(self.reference.items()))
                ids: list[int] = []
                chunks = 0
                try:
                    for ch in clients[tenant].generate_stream(prompt, adapter=adapter, sampling=sp):
                        chunks += 1
                        ids.extend(ch.token_ids)
                    with self.lock:
                        self.requests += 1
                        if ids != want:
                            self.wrong += 1
                except grpc.RpcError as err:
                    with self.lock:
                        self.requests += 1
                        if ids != want[: len(ids)]:
                            self.wrong += 1
                    if err.code() == grpc.StatusCode.UNAVAILABLE and chunks > 0:
                        self._count(self.expected, "generate: stream cut (UNAVAILABLE)")
                    else:
                        with self.lock:
                            self.unexpected.append(
                                f"generate {adapter} after {chunks} chunks: "
                                f"{err.code().name}: {err.details()}"
                            )
        finally:
            for c in clients.values():
                c.close()

    def pusher(self) -> None:
        import grpc

        from mintmesh.client import MintClient
        from mintmesh.synth import synth_peft_bytes

        i = 0
        with MintClient(
            self.cluster.router_address, timeout=30, retries=0, api_key=self.cluster.admin_key
        ) as cl:
            while not self.stop.is_set():
                i += 1
                try:
                    rev = cl.push_adapter_bytes(
                        f"soak/p{i}", *synth_peft_bytes(self.base_info, rank=2, seed=1000 + i)
                    )
                    with self.lock:
                        self.acked[rev.ref] = rev.digest
                except grpc.RpcError as err:
                    if err.code() in (
                        grpc.StatusCode.UNAVAILABLE,
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                    ):
                        self._count(self.expected, f"push: {err.code().name} (store down)")
                    else:
                        with self.lock:
                            self.unexpected.append(f"push: {err.code().name}: {err.details()}")
                time.sleep(0.05)

    def deleter(self) -> None:
        import grpc

        from mintmesh.client import MintClient

        rng = random.Random(7)
        with MintClient(
            self.cluster.router_address, timeout=30, retries=0, api_key=self.cluster.admin_key
        ) as cl:
            while not self.stop.wait(0.5):
                with self.lock:
                    refs = sorted(self.acked)
                if len(refs) < 4:
                    continue
                ref = rng.choice(refs)
                with self.lock:
                    digest = self.acked.pop(ref)  # in doubt until the delete is answered
                try:
                    cl.delete(ref)
                    with self.lock:
                        self.deleted[ref] = digest
                except grpc.RpcError as err:
                    with self.lock:
                        self.acked[ref] = digest  # not deleted (or not known to be)
                    if err.code() in (
                        grpc.StatusCode.UNAVAILABLE,
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                    ):
                        self._count(self.expected, f"delete: {err.code().name} (store down)")
                        with self.lock:
                            self.acked.pop(ref, None)  # it may or may not have happened
                    else:
                        with self.lock:
                            self.unexpected.append(f"delete: {err.code().name}: {err.details()}")

    def killer(self) -> None:
        victims = ["executor-0", "cache-1", "store", "executor-1", "cache-0"]
        k = 0
        while not self.stop.wait(self.args.kill_every_s):
            name = victims[k % len(victims)]
            k += 1
            self.cluster.children[name].signal(signal.SIGKILL)
            with self.lock:
                self.kills.append(name)
            progress(f"soak: kill -9 {name}")


def _verify(soak: Soak) -> tuple[int, int]:
    """(acknowledged revisions lost or corrupt, deleted revisions still there)."""
    import grpc

    from mintmesh.client import MintClient

    lost = still = 0
    with MintClient(soak.cluster.router_address, timeout=60, api_key=soak.cluster.admin_key) as cl:
        for ref, digest in soak.acked.items():
            try:
                ok = cl.resolve(ref).digest == digest
                ok = ok and hashlib.sha256(cl.fetch(ref=ref)).hexdigest() == digest
            except grpc.RpcError:
                ok = False
            lost += not ok
        for ref in soak.deleted:
            try:
                cl.resolve(ref)
                still += 1
            except grpc.RpcError as err:
                still += err.code() != grpc.StatusCode.NOT_FOUND
    return lost, still


def _rss(cluster) -> dict[str, tuple[int, int]]:
    out = {}
    for name, ch in cluster.children.items():
        if ch.alive and ch.proc is not None:
            kb = _rss_kb(ch.proc.pid)
            if kb:
                out[name] = (ch.proc.pid, kb)
    return out


def _sample_warm_rss(
    cluster, t0: float, duration: float, *, warm_s: float, every_s: float = 2.0
) -> dict[str, tuple[int, int]]:
    """Until t0 + duration, each process's RSS once it is warm: the first sample taken warm_s or
    more after that process (that pid) was first seen. A process restarted during the run gets a
    warm-up of its own (sampled right after a restart, it has not loaded its model yet)."""
    first_seen: dict[int, float] = {}
    warm: dict[str, tuple[int, int]] = {}
    while True:
        now = time.monotonic()
        for name, (pid, kb) in _rss(cluster).items():
            seen = first_seen.setdefault(pid, now)
            if now - seen >= warm_s and (name not in warm or warm[name][0] != pid):
                warm[name] = (pid, kb)
        left = t0 + duration - time.monotonic()
        if left <= 0:
            return warm
        time.sleep(min(every_s, left))


def _wait_healthy(cluster, timeout: float) -> None:
    from mintmesh.client import MintClient

    deadline = time.monotonic() + timeout
    with MintClient(cluster.router_address, timeout=10, api_key=cluster.admin_key) as cl:
        while time.monotonic() < deadline:
            try:
                st = cl.status()
                if st.store_healthy and all(e.healthy for e in st.executors):
                    return
            except Exception:  # noqa: BLE001 - not up yet
                pass
            time.sleep(0.2)


def run(args) -> dict:
    from mintmesh.client import MintClient, sampling_params
    from mintmesh.cluster import ClusterConfig, LocalCluster
    from mintmesh.model import base_model_info
    from mintmesh.synth import synth_peft_bytes

    model_dir = ensure_model(args.preset, args.model_dir)
    base_info = base_model_info(model_dir)
    with tempfile.TemporaryDirectory(prefix="mint-soak-") as tmp:
        cluster = LocalCluster(
            ClusterConfig(
                model_dir=model_dir, data_dir=Path(tmp), executors=2, port=0, http_port=None
            )
        )
        progress("soak: starting the cluster")
        cluster.start()
        try:
            keys: dict[str, str] = {}
            reference: dict[tuple[str, str, str], list[int]] = {}
            sp = sampling_params(max_tokens=MAX_TOKENS)
            with MintClient(cluster.router_address, timeout=60, api_key=cluster.admin_key) as adm:
                adm.create_tenant("soak")
                for t in TENANTS:
                    keys[t] = adm.create_tenant(t).api_key
            for t_i, t in enumerate(TENANTS):
                with MintClient(cluster.router_address, timeout=60, api_key=keys[t]) as cl:
                    for a in range(2):
                        name = f"{t}/a{a}"
                        cl.push_adapter_bytes(
                            name, *synth_peft_bytes(base_info, rank=4, seed=10 * t_i + a)
                        )
                        for p in PROMPTS:
                            reference[(t, name, p)] = cl.generate(
                                p, adapter=name, sampling=sp
                            ).token_ids
            soak = Soak(cluster, keys, reference, base_info, args)
            threads = [
                threading.Thread(target=soak.generator, args=(i,), daemon=True)
                for i in range(args.clients)
            ]
            threads += [
                threading.Thread(target=soak.pusher, daemon=True),
                threading.Thread(target=soak.deleter, daemon=True),
                threading.Thread(target=soak.killer, daemon=True),
            ]
            t0 = time.monotonic()
            for th in threads:
                th.start()
            duration = args.minutes * 60.0
            progress(f"soak: {duration:.0f} s of load, a kill every {args.kill_every_s:.0f} s")
            warm = _sample_warm_rss(cluster, t0, duration, warm_s=duration / 4)
            soak.stop.set()
            for th in threads:
                th.join(120)
            _wait_healthy(cluster, 60)
            end = _rss(cluster)
            lost, still = _verify(soak)
            growth = {
                n: round((end[n][1] - kb) / kb, 4)
                for n, (pid, kb) in warm.items()
                if n in end and end[n][0] == pid  # the same process (not restarted since)
            }
            restarts = {n: ch.restarts for n, ch in cluster.children.items() if ch.restarts}
        finally:
            cluster.stop()
    metrics = {
        "seconds": round(time.monotonic() - t0, 1),
        "requests": soak.requests,
        "errors_expected": soak.expected,
        "errors_unexpected": len(soak.unexpected),
        "unexpected_examples": soak.unexpected[:5],
        "wrong_tokens": soak.wrong,
        "acknowledged_writes": len(soak.acked),
        "deleted": len(soak.deleted),
        "lost_acknowledged_writes": lost,
        "deleted_still_present": still,
        "kills": soak.kills,
        "restarts": restarts,
        "rss_growth_by_process": growth,
        "rss_growth_max": max(growth.values()) if growth else None,
    }
    targets = {
        "errors_unexpected": {"target": 0, "met": metrics["errors_unexpected"] == 0},
        "lost_acknowledged_writes": {"target": 0, "met": lost == 0 and still == 0},
        "wrong_tokens": {"target": 0, "met": soak.wrong == 0},
        "rss_growth_max": {
            "target": 0.05,
            "met": metrics["rss_growth_max"] is not None and metrics["rss_growth_max"] <= 0.05,
        },
    }
    return {
        "bench": "soak",
        "device": "cpu",
        "params": {
            "minutes": args.minutes,
            "kill_every_s": args.kill_every_s,
            "clients": args.clients,
            "preset": args.preset,
        },
        "metrics": metrics,
        "targets": targets,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mint bench soak", description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--kill-every-s", type=float, default=60.0)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--model-dir", type=Path, default=None)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.kill_every_s <= 0 or args.clients < 1:
        p.error("--minutes and --kill-every-s must be > 0, --clients >= 1")
    out = run(args)
    m = out["metrics"]
    progress(
        f"soak: {m['requests']} requests, {m['errors_unexpected']} unexpected errors, "
        f"{m['wrong_tokens']} wrong, {m['lost_acknowledged_writes']} lost, "
        f"rss growth max {m['rss_growth_max']}"
    )
    print(json.dumps(out) if args.json else json.dumps(out, indent=2))
    bad = m["errors_unexpected"] or m["wrong_tokens"] or m["lost_acknowledged_writes"]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
