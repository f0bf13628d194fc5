"""`mint bench cold-load`: how fast an adapter becomes servable, on the real path.

Rank-16 adapters on q/k/v/o of the small backbone (~170M parameters). Three ways in:
  (a) hit:  node cache (LMDB, committed by a real sidecar) -> host tier -> device pool, through
            the executor's own AdapterResidency + SidecarSource: a read of the LMDB file (no
            RPC; the hit is reported to the sidecar afterwards, in a batch), no second sha256
            (the sidecar verified the bytes before committing them), unpack, paged pool load;
  (b) miss: the same, but not in the node cache: EnsureAdapter on the sidecar, which fetches
            the packed adapter from a real store, verifies and commits it, then the read;
  (c) peft: PeftModel.load_adapter from a PEFT directory, the way peft-based servers cold-load.
Each trial uses a distinct adapter (nothing is warm). Last stdout line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mint bench cold-load", description=__doc__)
    p.add_argument("--preset", default="small", choices=["tiny", "small"])
    p.add_argument("--model-dir", type=Path, help="default ~/.cache/mintmesh/PRESET")
    p.add_argument("--trials", type=int, default=40, help="adapters per way in")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--json", action="store_true", help="last line: one JSON object")
    args = p.parse_args(argv)

    import torch

    from mintmesh.bench.common import ensure_model, percentile, progress
    from mintmesh.client import MintClient
    from mintmesh.cluster import Child
    from mintmesh.kernels import AdapterPool
    from mintmesh.model import base_model_info, load_model
    from mintmesh.services.executor.residency import AdapterResidency
    from mintmesh.services.executor.runner import AdapterDevice
    from mintmesh.services.executor.sources import SidecarSource
    from mintmesh.services.store.config import StoreConfig
    from mintmesh.services.store.server import create_server as create_store
    from mintmesh.synth import synth_peft_bytes, write_synth_adapter

    torch.set_num_threads(max(1, torch.get_num_threads()))
    model_dir = ensure_model(args.preset, args.model_dir)
    base = base_model_info(model_dir)
    shapes = {n: s for n, s in base.linear_shapes.items() if n.rsplit(".", 1)[-1] in TARGETS}
    n = args.trials
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mint-cold-") as tmp:
        root = Path(tmp)
        store = create_store(
            StoreConfig(data_dir=root / "store", model_dir=model_dir, max_rank=max(128, args.rank))
        )
        # The sidecar is its own process, as in production: LMDB allows one Environment per
        # process per file, and the executor side (this process) opens it read-only.
        cache = Child(
            name="cache",
            argv=[
                sys.executable,
                "-m",
                "mintmesh.cache",
                "--cache-dir",
                str(root / "node"),
                "--store",
                store.address,
                "--port",
                "0",
                # Loopback, with the store in this process in plaintext: the paths measured are
                # the node cache's and the store's, not TLS handshakes.
                "--insecure-mesh",
            ],
            log_path=root / "cache.log",
            env=dict(os.environ),
        )
        cache.start()
        cache_address = cache.wait_ready(120)
        progress(f"pushing {2 * n} rank-{args.rank} adapters")
        with MintClient(store.address, timeout=120) as cl:
            digests = [
                cl.push_adapter_bytes(
                    f"bench/a{i}", *synth_peft_bytes(base, rank=args.rank, targets=TARGETS, seed=i)
                ).digest
                for i in range(2 * n)
            ]
        hit_set, miss_set = digests[:n], digests[n:]
        source = SidecarSource(cache_address, root / "node", timeout_s=120)
        for d in hit_set:  # warm the node cache only: these are node-cache hits
            source.fetch(d)
        ensured_before = source.reads_ensured
        pool = AdapterPool(shapes, max_adapters=2 * n + 1, max_rank=max(64, args.rank))
        residency = AdapterResidency(
            AdapterDevice(pool),
            source,
            layer_shapes=shapes,
            base_fingerprint=base.fingerprint,
            max_rank=args.rank,
        )

        def timed(ds: list[str]) -> list[float]:
            out = []
            for d in ds:
                t0 = time.perf_counter()
                residency.ensure(d)
                out.append((time.perf_counter() - t0) * 1e3)
                residency.release(d)
            return out

        progress("cold loads: node-cache hits")
        hit_ms = timed(hit_set)
        progress("cold loads: node-cache misses (fetched from the store)")
        miss_ms = timed(miss_set)
        source.flush_hits()
        hits_reported = source.hits_reported
        ensured = source.reads_ensured - ensured_before
        source.close()
        cache.signal(signal.SIGTERM)
        cache.wait(20)
        store.stop(0)

        progress("peft load_adapter from PEFT directories")
        from peft import PeftModel

        dirs = [
            write_synth_adapter(
                base, root / "peft" / f"a{i}", rank=args.rank, targets=TARGETS, seed=1000 + i
            )
            for i in range(n + 1)
        ]
        model, _tok = load_model(model_dir)
        pm = PeftModel.from_pretrained(model, str(dirs[0]), adapter_name="a0")
        peft_ms = []
        for i, d in enumerate(dirs[1:], start=1):
            t0 = time.perf_counter()
            pm.load_adapter(str(d), adapter_name=f"a{i}")
            peft_ms.append((time.perf_counter() - t0) * 1e3)
            pm.delete_adapter(f"a{i}")

    hit_p50 = statistics.median(hit_ms)
    metrics = {
        "hit_load_p50_ms": round(hit_p50, 3),
        "hit_load_p99_ms": round(percentile(hit_ms, 0.99), 3),
        "miss_load_p50_ms": round(statistics.median(miss_ms), 3),
        "miss_load_p99_ms": round(percentile(miss_ms, 0.99), 3),
        "peft_load_p50_ms": round(statistics.median(peft_ms), 3),
        "peft_load_p99_ms": round(percentile(peft_ms, 0.99), 3),
        "hit_vs_peft": round(statistics.median(peft_ms) / hit_p50, 2),
        "adapter_bytes": int(pool.nbytes(hit_set[0])) if hit_set[0] in pool else None,
        # The hit path made no EnsureAdapter RPC; the sidecar still counted every hit.
        "hit_rpcs": ensured - len(miss_set),
        "hits_reported_to_sidecar": hits_reported,
        "wall_s": round(time.perf_counter() - t_all, 1),
    }
    metrics["targets"] = {"hit_vs_peft>=20": metrics["hit_vs_peft"] >= 20}
    out = {
        "bench": "cold-load",
        "device": "cpu",
        "params": {"preset": args.preset, "rank": args.rank, "targets": list(TARGETS), "trials": n},
        "metrics": metrics,
    }
    if not args.json:
        for k, v in metrics.items():
            print(f"{k:>20}: {v}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
