"""Mutation check: put a known wrong-token bug back into the tree, run the suite, count the tests
that fail, put the tree back. Each mutation is one the suite must catch from several sides:

  attention  the issue 11 bug: the accumulator is not rescaled when the factor underflows
  lora_scale one module's LoRA scale silently dropped (v_proj served with scale 1)
  adapter    the adapter ignored for every sequence after the first in a decode/prefill step

Run it in a checkout you are not editing (it rewrites source files while the suite runs):

  python tools/mutants.py [--only NAME ...] [--pytest-args "..."] [--json]

The last line with --json is one JSON object: per mutation, the failed/passed counts and the
failing tests' ids. Exits 1 when any mutation fails fewer than --min-failures tests.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# name -> (file, exact text, replacement): the text must occur exactly once.
MUTATIONS: dict[str, tuple[str, str, str]] = {
    "attention": (
        "kernels/attn_cpu.cpp",
        "            scale_row(acc + i * D, alpha, D);\n",
        "            if (l[i] != 0.f || alpha != 0.f) scale_row(acc + i * D, alpha, D);\n",
    ),
    "lora_scale": (
        "kernels/pool.py",
        "                scale = float(mw.scale)\n",
        '                scale = 1.0 if name.endswith("v_proj") else float(mw.scale)\n',
    ),
    "adapter": (
        "services/executor/engine.py",
        "            token_slots += [seq.slot] * n\n",
        "            token_slots += [seq.slot if not token_slots else -1] * n\n",
    ),
}


def _summary(out: str) -> dict[str, int]:
    counts = {}
    last = [ln for ln in out.splitlines() if re.search(r"\b(passed|failed|error)", ln)]
    for n, what in re.findall(r"(\d+) (failed|passed|skipped|errors?|deselected)", last[-1]):
        counts[what.rstrip("s") if what.startswith("error") else what] = int(n)
    return counts


def run_suite(pytest_args: list[str]) -> tuple[dict[str, int], list[str], float]:
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "--tb=no", "-rfE", "-p", "no:randomly",
         "-p", "no:cacheprovider", *pytest_args],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    failing = re.findall(r"^(?:FAILED|ERROR) (\S+)", r.stdout, flags=re.M)
    return _summary(r.stdout), failing, time.monotonic() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", choices=sorted(MUTATIONS), default=sorted(MUTATIONS))
    ap.add_argument("--pytest-args", default="", help="passed to pytest (e.g. a test subset)")
    ap.add_argument("--min-failures", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    results, ok = {}, True
    for name in args.only:
        rel, old, new = MUTATIONS[name]
        path = ROOT / rel
        src = path.read_text()
        if src.count(old) != 1:
            raise SystemExit(f"mutation {name}: its anchor occurs {src.count(old)}x in {rel}")
        path.write_text(src.replace(old, new))
        try:
            counts, failing, secs = run_suite(shlex.split(args.pytest_args))
        finally:
            path.write_text(src)
        results[name] = {"file": rel, **counts, "seconds": round(secs), "failing": failing}
        caught = counts.get("failed", 0) + counts.get("error", 0)
        ok &= caught >= args.min_failures
        print(f"{name}: {caught} tests fail ({counts}) in {secs:.0f}s", flush=True)
        for t in failing:
            print(f"  {t}", flush=True)
    if args.json:
        print(json.dumps({"mutants": results}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
