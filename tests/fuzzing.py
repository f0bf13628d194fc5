"""Helpers of the differential kernel tests: how many examples each property runs.

CI (the "ci" hypothesis profile, see conftest.py) runs `n` derandomized examples per kernel;
`make fuzz` (profile "fuzz") runs FUZZ_FACTOR times as many with fresh random seeds."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

FUZZ_FACTOR = int(os.environ.get("MINT_FUZZ_FACTOR", "25"))


def fuzz_examples(n: int):
    """A settings decorator: n examples in CI, n * FUZZ_FACTOR under `make fuzz`."""
    fuzz = os.environ.get("MINT_HYPOTHESIS_PROFILE") == "fuzz"
    return settings(max_examples=n * FUZZ_FACTOR if fuzz else n)


def values(g: torch.Generator, shape: tuple[int, ...], dist: str, mag: float) -> torch.Tensor:
    """Values of a drawn distribution scaled by mag: normal, uniform in [-1, 1], positive,
    outliers (activation-like: a few entries 100x the rest), else small integers."""
    if dist == "normal":
        t = torch.randn(shape, generator=g)
    elif dist == "uniform":
        t = torch.rand(shape, generator=g) * 2 - 1
    elif dist == "positive":
        t = torch.rand(shape, generator=g)
    elif dist == "outliers":
        t = torch.randn(shape, generator=g)
        t = torch.where(torch.rand(shape, generator=g) < 0.02, t * 100, t)
    else:
        t = torch.randint(-4, 5, shape, generator=g).float()
    return t * mag


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module's examples: they are small, and a parallel region stalls
    for a scheduler quantum whenever the cores are shared (see kernels/cpu.py). A module opts in
    with `pytestmark = pytest.mark.usefixtures("one_thread")` after importing it."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
