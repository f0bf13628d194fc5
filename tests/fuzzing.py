"""Helpers of the differential kernel tests: how many examples each property runs.

CI (the "ci" hypothesis profile, see conftest.py) runs `n` derandomized examples per kernel;
`make fuzz` (profile "fuzz") runs FUZZ_FACTOR times as many with fresh random seeds."""

from __future__ import annotations

import os

from hypothesis import settings

FUZZ_FACTOR = int(os.environ.get("MINT_FUZZ_FACTOR", "25"))


def fuzz_examples(n: int):
    """A settings decorator: n examples in CI, n * FUZZ_FACTOR under `make fuzz`."""
    fuzz = os.environ.get("MINT_HYPOTHESIS_PROFILE") == "fuzz"
    return settings(max_examples=n * FUZZ_FACTOR if fuzz else n)
