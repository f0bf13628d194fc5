"""Shared fixtures: the tiny backbone is built once per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Differential (property-based) kernel tests: a fixed, derandomized number of examples per
# kernel in CI ("ci", the default); `make fuzz` selects "fuzz" (many more, random seeds).
# A test sets its own max_examples through fuzz_examples(n) so the CI count is per kernel.
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "fuzz",
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("MINT_HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session", autouse=True)
def native_kernels_built():
    """The native CPU kernels, built (and self-checked) before any test runs: the engine loads
    them with block=False, which on a cold build cache would serve the first tests with the
    torch fallback while compiling in the background, so they would silently test another
    path. Executors started by E2E tests find the build cached. None where no compiler works."""
    from mintmesh.kernels import native

    return native.load(block=True), native.load_attn(block=True)


@pytest.fixture()
def backend() -> str:
    """The engine fixtures' model runner (ExecutorConfig.backend); tests parametrized over
    tests/backends.py's BACKENDS override it."""
    return "torch"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from mintmesh.model import init_model

    return init_model("tiny", tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def base_info(tiny_model_dir):
    from mintmesh.model import base_model_info

    return base_model_info(tiny_model_dir)


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory):
    """A different base (wider hidden size) for wrong-base tests."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("other-model")
    cfg = LlamaConfig(
        vocab_size=259,
        hidden_size=96,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    torch.manual_seed(7)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def otlp():
    """An in-test OTLP collector for one module's cluster (its services export traces to it)."""
    from otlp_receiver import OtlpReceiver

    rec = OtlpReceiver().start()
    yield rec
    rec.stop()


@pytest.fixture(scope="session")
def tinker_cluster(tiny_model_dir, tmp_path_factory):
    """One `mint up`-style cluster (processes, auth on, the gateway) for the Tinker API's tests
    (test_tinker_api, test_tinker_state), each module with tenants of its own."""
    from cluster_util import gateway_cluster_config

    from mintmesh.cluster import LocalCluster

    c = LocalCluster(gateway_cluster_config(tiny_model_dir, tmp_path_factory.mktemp("tinker")))
    c.start()
    yield c
    c.stop()
