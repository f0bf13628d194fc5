"""The native CPU kernels in tests: a test that needs one skips only where it cannot be built at
all (no C++ compiler, or --no-native-kernels); where a compiler exists, a library that failed to
build or was refused by its start-up self-check fails the test instead of hiding as a skip."""

from __future__ import annotations

from pathlib import Path

import pytest

from mintmesh.kernels import native


def require(which: str = "lora"):
    """The loaded native library ("lora" or "attn"), or skip/fail as above."""
    lib = native.load(block=True) if which == "lora" else native.load_attn(block=True)
    if lib is not None:
        return lib
    why = native.unavailable_reason(which) or "unknown"
    if why == "no compiler" or why.startswith("disabled"):
        pytest.skip(f"the native CPU {which} kernels cannot be built here: {why}")
    pytest.fail(f"the native CPU {which} kernels did not load though a compiler exists: {why}")


def check_threading(lib, source: Path, cls, tmp_path: Path):
    """Where torch runs on OpenMP, `lib` is built against torch's own runtime (its team shares
    the work) and the process maps one libgomp; returns the same source built without it (its
    own helper threads, work_share.h), loaded as `cls`."""
    if native._OMP_FLAGS is not None:
        assert lib.threading == "openmp"
        maps = Path("/proc/self/maps").read_text().splitlines()
        libgomp = [ln.split()[-1] for ln in maps if "/libgomp" in ln]
        assert len(set(libgomp)) == 1, f"two OpenMP runtimes in one process: {set(libgomp)}"
    own = tmp_path / f"{source.stem}_helpers.so"
    native._compile(native._compiler(), source, own, (["-pthread"],))
    helpers = cls(own)
    assert helpers.threading == "helpers"
    return helpers
