"""Shared fixtures: the tiny backbone is built once per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
