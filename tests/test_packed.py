"""The packed format: a real peft adapter -> packed bytes -> the same tensors, digest = sha256."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from peft_util import make_peft_adapter
from safetensors.torch import load_file

from mintmesh import packed, peft_io
from mintmesh.errors import InvalidAdapter

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize(
    "rank,targets,alpha",
    [(1, ("q_proj",), None), (8, ("q_proj", "v_proj"), 4.0), (5, ALL, None)],
)
def test_peft_to_packed_round_trip_is_exact(
    tiny_model_dir, base_info, tmp_path, rank, targets, alpha
):
    d = make_peft_adapter(
        tiny_model_dir, tmp_path / "peft", rank=rank, targets=targets, alpha=alpha, seed=rank
    )
    cfg_text, weights = peft_io.read_peft_dir(d)
    p = peft_io.validate_and_pack(cfg_text, weights, base_info, max_rank=128)

    assert p.digest == hashlib.sha256(p.data).hexdigest() == packed.digest(p.data)
    assert p.max_rank == rank and sorted(p.target_modules) == sorted(targets)

    header, modules = packed.unpack(p.data)
    assert header.base_fingerprint == base_info.fingerprint
    want = load_file(str(d / peft_io.WEIGHTS_NAME))
    assert len(modules) * 2 == len(want)
    a_alpha = alpha if alpha is not None else 2 * rank
    for name, mw in modules.items():
        a = want[f"base_model.model.{name}.lora_A.weight"]
        b = want[f"base_model.model.{name}.lora_B.weight"]
        assert torch.equal(mw.A, a), name
        assert torch.equal(mw.B, b), name
        assert bool(b.abs().sum() > 0), "peft adapter must have non-zero B"
        assert mw.alpha == a_alpha and mw.scale == pytest.approx(a_alpha / rank)
        assert header.data_offset % packed.ALIGN == 0

    # Back to PEFT and in again: the same tensors, scales and layout.
    out = peft_io.export_peft_dir(p.data, tmp_path / "exported")
    again = peft_io.validate_and_pack(*peft_io.read_peft_dir(out), base_info, max_rank=128)
    h2, m2 = packed.unpack(again.data)
    assert [m.name for m in h2.modules] == [m.name for m in header.modules]
    for name, mw in modules.items():
        assert torch.equal(m2[name].A, mw.A) and torch.equal(m2[name].B, mw.B), name
        assert m2[name].scale == mw.scale
    assert json.loads((out / peft_io.CONFIG_NAME).read_text())["peft_type"] == "LORA"


def test_packing_is_deterministic(tiny_model_dir, base_info, tmp_path):
    d = make_peft_adapter(tiny_model_dir, tmp_path / "a", rank=4, seed=11)
    one = peft_io.validate_and_pack(*peft_io.read_peft_dir(d), base_info, max_rank=8)
    two = peft_io.validate_and_pack(*peft_io.read_peft_dir(d), base_info, max_rank=8)
    assert one.digest == two.digest


@pytest.mark.parametrize(
    "mangle,message",
    [
        (lambda b: b[:10], "shorter than its prefix"),
        (lambda b: b"NOTMAGIC" + b[8:], "magic"),
        (lambda b: b[: len(b) - 100], "truncated"),
    ],
)
def test_read_header_names_the_problem(tiny_model_dir, base_info, tmp_path, mangle, message):
    d = make_peft_adapter(tiny_model_dir, tmp_path / "a", rank=2, seed=3)
    p = peft_io.validate_and_pack(*peft_io.read_peft_dir(d), base_info, max_rank=8)
    with pytest.raises(InvalidAdapter, match=message):
        packed.read_header(mangle(p.data))
