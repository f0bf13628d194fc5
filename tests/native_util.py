"""The native CPU kernels in tests: a test that needs one skips only where it cannot be built at
all (no C++ compiler, or --no-native-kernels); where a compiler exists, a library that failed to
build or was refused by its start-up self-check fails the test instead of hiding as a skip."""

from __future__ import annotations

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
