"""`mint bench cache-sim`: replay synthetic adapter-request traces through the node cache's
eviction policies (the real objects of mintmesh.cache.policy, driven by policy.replay exactly as
the NodeCache drives them) and compare their hit ratios with LRU.

Traces are over a catalog of 1,000,000 adapter ids: Zipf popularity with alpha 0.8, 1.0 and
1.2, and Zipf 1.0 with scan bursts (jobs that touch many cold adapters once). Each trace is
replayed at capacities of 0.1%, 1% and 10% of the catalog, by count (every adapter the same
size) and by bytes (adapters of mixed ranks, size proportional to rank). The hit ratio counts
every request, cold misses included.

Metrics: the hit ratio of each policy in each case; `min_gain_pp`, the smallest gain of the
default policy (mintmesh.cache.policy.DEFAULT_POLICY) over LRU in percentage points over all
cases; `gain_pp_1pct_alpha1`, its gain at 1% capacity by count on Zipf 1.0; the same two per
policy, which is how the default was chosen.

    mint bench cache-sim --json [--requests 1000000] [--jobs 2] [--quick]
    python -m mintmesh.bench.cache_sim --json

72 replays of ~1M requests in pure Python (W-TinyLFU's sketch costs ~3.5 us a request, S3-FIFO
~1 us, LRU ~0.7 us) take about 3 minutes on 2 cores; --requests scales that linearly.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

from mintmesh.cache.policy import DEFAULT_POLICY, POLICIES, make_policy, replay

logger = logging.getLogger(__name__)

RANKS = (1, 4, 8, 16, 32, 64)
# Most personal adapters are small (rank 1-8); a few are large.
RANK_WEIGHTS = (0.30, 0.25, 0.20, 0.12, 0.08, 0.05)
CAPACITIES = (0.001, 0.01, 0.10)
MODES = ("count", "bytes")


@dataclass(frozen=True)
class Trace:
    name: str
    keys: np.ndarray  # adapter ids, int64


def zipf_ranks(rng: np.random.Generator, n: int, alpha: float, requests: int) -> np.ndarray:
    """`requests` popularity ranks in [0, n) drawn from Zipf(alpha) (rank 0 the most popular)."""
    w = np.arange(1, n + 1, dtype=np.float64) ** -alpha
    cdf = np.cumsum(w)
    cdf /= cdf[-1]
    return np.minimum(np.searchsorted(cdf, rng.random(requests)), n - 1)


def make_traces(
    catalog: int, requests: int, alphas: tuple[float, ...], scan_len: int, seed: int
) -> tuple[list[Trace], np.ndarray]:
    """The traces and the per-id sizes (in rank units). Ids are a random permutation of the
    popularity ranks, so neither ids nor sizes correlate with popularity."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(catalog)
    sizes = rng.choice(np.array(RANKS), size=catalog, p=np.array(RANK_WEIGHTS))
    traces = [Trace(f"zipf{a:g}", perm[zipf_ranks(rng, catalog, a, requests)]) for a in alphas]
    # Zipf 1.0 with two scan bursts: scan_len cold adapters (from the less popular half of the
    # catalog), each requested once, at 1/3 and 2/3 of the trace.
    base = perm[zipf_ranks(rng, catalog, 1.0, requests)]
    cold = perm[rng.choice(np.arange(catalog // 2, catalog), size=2 * scan_len, replace=False)]
    third = requests // 3
    keys = np.concatenate(
        [base[:third], cold[:scan_len], base[third : 2 * third], cold[scan_len:], base[2 * third :]]
    )
    traces.append(Trace("scan", keys))
    return traces, sizes


# Set in the parent before the workers fork (copy-on-write), so jobs carry names only.
_TRACES: dict[str, Trace] = {}
_SIZES: list[int] = []
_TOTAL_BYTES = 0


def _run_case(job: tuple[str, str, float, str]) -> tuple[tuple[str, str, float, str], float, float]:
    trace_name, mode, frac, policy_name = job
    trace = _TRACES[trace_name]
    catalog = len(_SIZES)
    if mode == "count":
        capacity, sizes = max(1, int(frac * catalog)), None
    else:
        capacity, sizes = max(1, int(frac * _TOTAL_BYTES)), _SIZES
    keys = trace.keys.tolist()
    expected = max(16, int(frac * catalog))
    kwargs = {"expected_entries": expected} if policy_name == "wtinylfu" else {}
    policy = make_policy(policy_name, capacity, **kwargs)
    t0 = time.perf_counter()
    hits = replay(policy, keys, capacity, sizes)
    return job, hits / len(keys), time.perf_counter() - t0


def case_name(trace: str, mode: str, frac: float) -> str:
    return f"{trace}/{mode}/{frac * 100:g}%"


def run(
    *,
    catalog: int,
    requests: int,
    alphas: tuple[float, ...],
    scan_len: int,
    policies: tuple[str, ...],
    jobs: int,
    seed: int,
) -> dict:
    global _TRACES, _SIZES, _TOTAL_BYTES
    t0 = time.perf_counter()
    traces, sizes = make_traces(catalog, requests, alphas, scan_len, seed)
    _TRACES = {t.name: t for t in traces}
    _SIZES = sizes.tolist()
    _TOTAL_BYTES = int(sizes.sum())
    logger.info(
        "%d traces of %s requests over %d ids generated in %.1fs",
        len(traces),
        "/".join(str(len(t.keys)) for t in traces),
        catalog,
        time.perf_counter() - t0,
    )
    work = [
        (t.name, mode, frac, p)
        for t in traces
        for mode in MODES
        for frac in CAPACITIES
        for p in policies
    ]
    # Slowest first (small caches miss more; the sketch costs most), for even load.
    cost = {"wtinylfu": 3, "s3fifo": 2, "lru": 1}
    work.sort(key=lambda j: (-cost.get(j[3], 2), j[2]))
    results: dict[str, dict[str, float]] = {}
    done = 0
    if jobs > 1:
        ctx = mp.get_context("fork")
        with ctx.Pool(jobs) as pool:
            it = pool.imap_unordered(_run_case, work)
            for job, ratio, secs in it:
                done += 1
                _record(results, job, ratio, secs, done, len(work))
    else:
        for j in work:
            job, ratio, secs = _run_case(j)
            done += 1
            _record(results, job, ratio, secs, done, len(work))
    return results


def _record(results, job, ratio: float, secs: float, done: int, total: int) -> None:
    trace, mode, frac, policy = job
    name = case_name(trace, mode, frac)
    results.setdefault(name, {})[policy] = round(ratio, 5)
    logger.info("[%d/%d] %-22s %-9s hit ratio %.4f (%.1fs)", done, total, name, policy, ratio, secs)


def summarize(results: dict[str, dict[str, float]], policies: tuple[str, ...]) -> dict:
    gains: dict[str, dict[str, float]] = {}
    for p in policies:
        if p == "lru":
            continue
        gains[p] = {c: round(100.0 * (r[p] - r["lru"]), 3) for c, r in results.items()}
    key_case = case_name("zipf1", "count", 0.01)
    by_policy = {
        p: {
            "min_gain_pp": min(g.values()),
            "worst_case": min(g, key=g.get),
            "gain_pp_1pct_alpha1": g.get(key_case),
        }
        for p, g in gains.items()
    }
    default = by_policy.get(DEFAULT_POLICY, {})
    return {
        "default_policy": DEFAULT_POLICY,
        "min_gain_pp": default.get("min_gain_pp"),
        "gain_pp_1pct_alpha1": default.get("gain_pp_1pct_alpha1"),
        "by_policy": by_policy,
        "hit_ratio": dict(sorted(results.items())),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mint bench cache-sim", description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="print one JSON line (always printed)")
    p.add_argument("--catalog", type=int, default=1_000_000, help="adapter ids")
    p.add_argument("--requests", type=int, default=1_000_000, help="requests per Zipf trace")
    p.add_argument("--scan", type=int, default=50_000, help="cold ids per scan burst")
    p.add_argument("--alphas", default="0.8,1.0,1.2", help="Zipf exponents")
    p.add_argument("--policies", default=",".join(POLICIES), help="policies to replay")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="processes")
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument("--quick", action="store_true", help="a small catalog and short traces")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    if args.quick:
        args.catalog, args.requests, args.scan = 100_000, 200_000, 10_000
    policies = tuple(x.strip() for x in args.policies.split(",") if x.strip())
    unknown = [x for x in policies if x not in POLICIES]
    if unknown:
        p.error(f"unknown policies {unknown}; choose from {sorted(POLICIES)}")
    if "lru" not in policies:
        policies = ("lru", *policies)
    alphas = tuple(float(a) for a in args.alphas.split(","))
    t0 = time.perf_counter()
    results = run(
        catalog=args.catalog,
        requests=args.requests,
        alphas=alphas,
        scan_len=args.scan,
        policies=policies,
        jobs=max(1, args.jobs),
        seed=args.seed,
    )
    metrics = summarize(results, policies)
    metrics["wall_s"] = round(time.perf_counter() - t0, 1)
    out = {
        "bench": "cache-sim",
        "device": "cpu",
        "params": {
            "catalog": args.catalog,
            "requests": args.requests,
            "scan_burst": args.scan,
            "alphas": list(alphas),
            "capacities": list(CAPACITIES),
            "modes": list(MODES),
            "ranks": list(RANKS),
            "rank_weights": list(RANK_WEIGHTS),
            "policies": list(policies),
            "seed": args.seed,
        },
        "metrics": metrics,
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
