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


# -- storage formats --------------------------------------------------------------------------


def _golden_modules(dtype: torch.dtype) -> dict[str, packed.ModuleWeights]:
    """Exactly representable values, so the bytes do not depend on a random generator."""
    out = {}
    shapes = [
        ("model.layers.0.self_attn.q_proj", 3, 64, 64),
        ("model.layers.1.mlp.down_proj", 2, 128, 64),
    ]
    for i, (name, r, fin, fout) in enumerate(shapes):
        a = ((torch.arange(r * fin, dtype=torch.float32) % 17) - 8).view(r, fin) / 8
        b = ((torch.arange(fout * r, dtype=torch.float32) % 13) - 6).view(fout, r) / 4
        alpha = 4.0 + i
        out[name] = packed.ModuleWeights(A=a.to(dtype), B=b.to(dtype), alpha=alpha, scale=alpha / r)
    return out


# Digests of format-1 packs (B stored [out, rank]), written before storage formats existed:
# those stored bytes must stay readable as they are.
GOLDEN_V1 = [
    (torch.float32, "fdd5b7c3b62aea633ae75eba4e9e0b347a3b0232c7720ac4cdc9960ff6886dd3"),
    (torch.float16, "30745f7221385093481114dedd20546088449281518162eceeebbb77af15692c"),
    (torch.bfloat16, "4a9fe0136cf6345d0a0317b6c532da1b8a4948823eeffa158e5c717a28780160"),
]
# Digests of the same weights packed in format 2 (B stored as B^T): packing must not drift.
GOLDEN = [
    (torch.float32, "40fca95be3206958f763ba0a65893dbc08baaa0c65d10f5d5cb09f4de8231825"),
    (torch.float16, "495add30f6d69941b45e58474a58e35d800daee65e05fdf8a5fff1d0c063fe95"),
    (torch.bfloat16, "38643098510bc313c495f484c081ad0080c179237a447d67209731fafa234072"),
]


def _as_format1(buf: bytes) -> bytes:
    """The format-1 bytes of a float format-2 pack: header "format" 1, each B row-major."""
    header, mods = packed.unpack(buf)
    out = bytearray(buf)
    at = out.index(b'"format":2')
    out[at : at + 10] = b'"format":1'
    for m in header.modules:
        raw = mods[m.name].B.contiguous().view(torch.uint8).numpy().tobytes()
        start = header.data_offset + m.b_offset
        out[start : start + len(raw)] = raw
    return bytes(out)


@pytest.mark.parametrize("dtype,want", GOLDEN, ids=[str(d) for d, _ in GOLDEN])
def test_float_packs_are_stable(dtype, want):
    kw = dict(base_fingerprint="f" * 64, peft_config={"r": 3})
    by_dtype = packed.pack(_golden_modules(dtype), **kw)
    by_storage = packed.pack(
        _golden_modules(torch.float32), storage=packed.DTYPE_NAMES[dtype], **kw
    )
    assert packed.digest(by_dtype) == want
    assert by_storage == by_dtype
    header = packed.read_header(by_dtype)
    assert header.storage_format == packed.DTYPE_NAMES[dtype]
    assert header.format_version == packed.FORMAT_VERSION == 2


@pytest.mark.parametrize("dtype,want", GOLDEN_V1, ids=[str(d) for d, _ in GOLDEN_V1])
def test_format1_packs_still_unpack_to_the_same_weights(dtype, want):
    mods = _golden_modules(dtype)
    v1 = _as_format1(packed.pack(mods, base_fingerprint="f" * 64, peft_config={"r": 3}))
    assert packed.digest(v1) == want  # byte for byte what format 1 wrote
    header, got = packed.unpack(v1)
    assert header.format_version == 1
    for name, mw in mods.items():
        assert torch.equal(got[name].A, mw.A) and torch.equal(got[name].B, mw.B), name
    # B^T is stored contiguous in format 2: the pool's copy of it is a plain row copy.
    _, v2 = packed.unpack(packed.pack(mods, base_fingerprint="f" * 64))
    assert all(m.B.t().is_contiguous() for m in v2.values())


@pytest.mark.parametrize("rows,cols", [(1, 64), (16, 1024), (2816, 16), (7, 3)])
def test_int8_rows_round_trip_within_half_a_step(rows, cols):
    g = torch.Generator().manual_seed(rows)
    t = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g)
    t[0] = 0.0  # an all-zero row stays zero
    q, scales = packed.quantize_rows(t)
    assert q.dtype == torch.int8 and scales.shape == (rows,)
    back = packed.dequantize_rows(q, scales)
    assert torch.all((back - t).abs() <= scales[:, None] / 2 + 1e-7)
    assert torch.equal(back[0], torch.zeros(cols))


def test_int8_pack_dequantizes_and_is_smaller(tiny_model_dir, base_info, tmp_path):
    d = make_peft_adapter(tiny_model_dir, tmp_path / "a", rank=8, seed=5, targets=ALL)
    cfg, weights = peft_io.read_peft_dir(d)
    fp32 = peft_io.validate_and_pack(cfg, weights, base_info, max_rank=16)
    sizes = {}
    for fmt, tol in [("bfloat16", 1e-2), ("float16", 1e-3), ("int8", 1e-2)]:
        p = peft_io.validate_and_pack(cfg, weights, base_info, max_rank=16, storage=fmt)
        assert p.storage_format == fmt and p.digest != fp32.digest
        sizes[fmt] = len(p.data)
        header, mods = packed.unpack(p.data)
        assert header.storage_format == fmt
        _, ref = packed.unpack(fp32.data)
        for name, mw in mods.items():
            assert mw.A.dtype == torch.float32 or fmt != "int8"
            delta = mw.scale * mw.B.float() @ mw.A.float()
            want = ref[name].scale * ref[name].B @ ref[name].A
            err = (delta - want).abs().max() / want.abs().max()
            assert err <= tol, (fmt, name, float(err))
        # PEFT export of a quantized pack gives float tensors that import again.
        out = peft_io.export_peft_dir(p.data, tmp_path / f"export-{fmt}")
        peft_io.validate_and_pack(*peft_io.read_peft_dir(out), base_info, max_rank=16)
    assert sizes["int8"] < 0.45 * len(fp32.data) and sizes["bfloat16"] < 0.6 * len(fp32.data)
    _, bf = packed.unpack(
        peft_io.validate_and_pack(cfg, weights, base_info, max_rank=16, storage="int8").data,
        dequantize_to=torch.bfloat16,
    )
    assert next(iter(bf.values())).A.dtype == torch.bfloat16


def test_int8_header_checks(tiny_model_dir, base_info, tmp_path):
    d = make_peft_adapter(tiny_model_dir, tmp_path / "a", rank=2, seed=3)
    p = peft_io.validate_and_pack(*peft_io.read_peft_dir(d), base_info, max_rank=8, storage="i8")
    assert packed.read_header(p.data).quantized
    with pytest.raises(InvalidAdapter, match="truncated"):
        packed.read_header(p.data[:-100])
    with pytest.raises(InvalidAdapter, match="storage format 'int4'"):
        peft_io.validate_and_pack(*peft_io.read_peft_dir(d), base_info, max_rank=8, storage="int4")
