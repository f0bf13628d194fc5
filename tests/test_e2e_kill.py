"""End to end, destructive: SIGKILL of one executor of a cluster of its own (the other E2E
tests keep theirs whole, in any order). The fixtures are test_e2e's, instantiated afresh for
this module: store, router, two executors each with its cache sidecar, real processes."""

from __future__ import annotations

import pytest
from test_e2e import (  # noqa: F401 - fixtures, instantiated for this module
    ADAPTERS,
    MAX_TOKENS,
    PROMPTS,
    adapter_dirs,
    client,
    cluster,
    oracle,
    pushed,
)

from mintmesh.client import sampling_params

pytestmark = pytest.mark.e2e


def test_router_fails_over_when_an_executor_dies(cluster, client, pushed, oracle):  # noqa: F811
    """Kills one executor. Every request still succeeds, on the survivor."""
    victim = cluster.children["executor-0"]
    victim.signal(9)
    victim.wait(10)
    assert not victim.alive
    sp = sampling_params(max_tokens=MAX_TOKENS)
    for name in ADAPTERS:
        res = client.generate(PROMPTS[0], adapter=name, sampling=sp)
        assert res.token_ids == oracle[(name, PROMPTS[0])]
        assert res.executor == "executor-1"
