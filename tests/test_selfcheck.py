"""The start-up self-check (kernels/selfcheck.py): every native or compiled kernel is run against
its reference on adversarial inputs before it may serve; one that disagrees is refused with one
warning naming it, and the fallback serves.

The broken kernels here are real builds: the shipped C++ sources with one line changed (the
attention bug of issue 11 put back; the LoRA scale dropped for the last rank component), compiled
into a temporary extensions directory and loaded through the same loader the executor uses.
"""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from mintmesh.kernels import dense, native, selfcheck
from mintmesh.kernels.backends import ReferenceBackend, get_backend
from mintmesh.kernels.settings import SETTINGS
from mintmesh.services.executor.kv import AttentionPlan, PagedKVCache, SeqSpan

needs_cxx = pytest.mark.skipif(native._compiler() is None, reason="no C++ compiler here")

# Issue 11's bug: the accumulator was not cleared when the rescale factor underflowed to 0.
ATTN_FIX = """            const float alpha = expf(m[i] - mn);
            l[i] *= alpha;
            scale_row(acc + i * D, alpha, D);"""
ATTN_BUG = """            const float alpha = expf(m[i] - mn);
            l[i] *= alpha;
            if (l[i] != 0.f || alpha != 0.f) scale_row(acc + i * D, alpha, D);"""
LORA_OK = "for (int k = 0; k < r; ++k) v[i][k] *= sc;"
LORA_BUG = "for (int k = 0; k < r - 1; ++k) v[i][k] *= sc;"


def _mutant(tmp_path, source, old, new):
    text = source.read_text()
    assert text.count(old) == 1, f"the mutation's anchor is not in {source.name} once"
    out = tmp_path / source.name
    out.write_text(text.replace(old, new))
    return out


@pytest.fixture
def fresh_loader(monkeypatch, tmp_path):
    """The native loader's state reset, builds cached in a temporary directory."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setattr(SETTINGS, "native", True)
    for prefix in ("_", "_attn_"):
        monkeypatch.setattr(native, prefix + "lib", None)
        monkeypatch.setattr(native, prefix + "failed", False)
        monkeypatch.setattr(native, prefix + "builder", None)
    return monkeypatch


def test_shipped_kernels_pass_their_self_check():
    attn = native.load_attn(block=True)
    lora = native.load(block=True)
    if attn is None or lora is None:
        pytest.skip("the native CPU kernels could not be built here")
    for lib in (attn, lora):
        for isa in ("baseline", None):
            lib.set_isa(isa)
            try:
                check = (
                    selfcheck.check_decode_attention if lib is attn else selfcheck.check_native_lora
                )
                assert check(lib) is None, f"{lib.path.name} ({lib.isa})"
            finally:
                lib.set_isa(None)
    cpu = get_backend("cpu")
    assert selfcheck.check_lora(lambda y, x, lw, md, hm: cpu.fused(y, x, lw, md, hm)) is None
    assert dense._run_probe() is None


@needs_cxx
@pytest.mark.slow
def test_attention_kernel_with_issue_11_bug_is_refused(fresh_loader, tmp_path, caplog):
    bad = _mutant(tmp_path, native.ATTN_SOURCE, ATTN_FIX, ATTN_BUG)
    fresh_loader.setattr(native, "_ATTN", dataclasses.replace(native._ATTN, source=bad))
    with caplog.at_level(logging.WARNING, logger="mintmesh.kernels.native"):
        assert native.load_attn(block=True) is None
        assert native.load_attn(block=False) is None
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, warnings
    assert "attention kernel unavailable" in warnings[0]
    assert "self-check against the reference failed" in warnings[0]
    assert "using the torch attention path" in warnings[0]
    # The refused library still exists and is still wrong: the check, not luck, kept it out.
    lib = native.AttnLib(next((tmp_path / "ext").rglob("attn_cpu_*.so")))
    assert selfcheck.check_decode_attention(lib) is not None
    # The plan serves decode tokens on the torch path instead.
    cache = PagedKVCache(num_layers=1, num_kv_heads=2, head_dim=16, block_size=16, num_blocks=4)
    plan = AttentionPlan([SeqSpan(0, 1, 31, [0, 1])], cache)
    assert plan.native is None and plan.decode_rows is None and plan.runs


@needs_cxx
@pytest.mark.slow
def test_lora_kernel_that_drops_a_scale_is_refused(fresh_loader, tmp_path, caplog):
    bad = _mutant(tmp_path, native.SOURCE, LORA_OK, LORA_BUG)
    fresh_loader.setattr(native, "_LORA", dataclasses.replace(native._LORA, source=bad))
    with caplog.at_level(logging.WARNING, logger="mintmesh.kernels.native"):
        assert native.load(block=True) is None
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "LoRA kernels unavailable" in msgs[0], msgs
    assert "self-check against the reference failed" in msgs[0]
    # The CPU backend then serves with its torch strategies, correctly.
    assert (
        selfcheck.check_lora(lambda y, x, lw, md, hm: get_backend("cpu").fused(y, x, lw, md, hm))
        is None
    )


def test_lora_check_catches_a_small_scale_error():
    def off(y, x, lw, md, hm):
        lw2 = lw._replace(scales=lw.scales * torch.tensor([1.0, 1.0, 1.001, 1.0]))
        ReferenceBackend().fused(y, x, lw2, md)

    why = selfcheck.check_lora(off)
    assert why is not None and "slot 2" in why


def test_dense_probe_refuses_a_wrong_packed_linear(monkeypatch, caplog):
    real = dense._linear

    def off_by_a_little(x, packed, bias):  # one output column 1e-3 relative off
        y = real(x, packed, bias)
        y[:, -1] *= 1.001
        return y

    monkeypatch.setattr(dense, "_linear", off_by_a_little)
    monkeypatch.setattr(dense, "_probe", {})
    monkeypatch.setattr(dense, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="mintmesh.kernels.dense"):
        assert dense.select_dense("cpu", torch.float32, "auto") == "torch"
        assert dense.select_dense("cpu", torch.float32, "auto") == "torch"
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "does not match F.linear" in msgs[0], msgs
    with pytest.raises(ValueError, match="does not match F.linear"):
        dense.select_dense("cpu", torch.float32, "onednn")
