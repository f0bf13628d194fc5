"""The backbone's dense Linears packed for oneDNN (kernels/dense.py): equal to nn.Linear on every
shape the engine feeds them, every Linear of a model replaced (the LoRA wrappers' base layers and
the LM head too), the selector's choices and refusals."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from mintmesh.kernels import dense
from mintmesh.kernels.dense import PackedLinear, pack_linears, select_dense
from mintmesh.model import load_model
from mintmesh.services.executor.lora import LoraContext, MultiLoraLinear, inject_lora

needs_onednn = pytest.mark.skipif(
    select_dense("cpu", torch.float32) != "onednn", reason="no oneDNN linear in this torch build"
)


@needs_onednn
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 64), (7, 64), (133, 64), (1, 5, 64), (2, 9, 64)])
@pytest.mark.parametrize("out_in", [(96, 64), (777, 64)])
def test_packed_linear_equals_nn_linear(bias, shape, out_in):
    torch.manual_seed(0)
    out_f, in_f = out_in
    lin = nn.Linear(in_f, out_f, bias=bias)
    x = torch.randn(*shape[:-1], in_f)
    packed = PackedLinear(lin, batch_hint=8)
    with torch.inference_mode():
        want = lin(x)
        got = packed(x)
    assert got.shape == want.shape == (*shape[:-1], out_f)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # The packed weight gives the dense one back exactly; the packed copy is independent of the
    # module it came from.
    assert torch.equal(packed.weight, lin.weight.detach())
    with torch.no_grad():
        lin.weight.add_(1.0)
    assert not torch.equal(packed.weight, lin.weight.detach())


@needs_onednn
def test_packed_linear_takes_strided_and_empty_input():
    torch.manual_seed(1)
    lin = nn.Linear(48, 32)
    packed = PackedLinear(lin)
    xt = torch.randn(48, 11).t()  # not contiguous
    torch.testing.assert_close(packed(xt), lin(xt), rtol=1e-5, atol=1e-5)
    assert packed(torch.randn(0, 48)).shape == (0, 32)


@needs_onednn
def test_packed_linear_refuses_what_it_cannot_run():
    with pytest.raises(ValueError, match="CPU float32"):
        PackedLinear(nn.Linear(8, 8).to(torch.bfloat16))
    packed = PackedLinear(nn.Linear(8, 8))
    with pytest.raises(TypeError, match="float32"):
        packed(torch.randn(2, 8, dtype=torch.float64))


@needs_onednn
def test_pack_linears_replaces_every_linear_and_keeps_the_models_output(tiny_model_dir):
    ref, _ = load_model(tiny_model_dir, device="cpu", dtype=torch.float32)
    model, _ = load_model(tiny_model_dir, device="cpu", dtype=torch.float32)
    # The engine's order: LoRA wrappers first, then the base layers inside them are packed.
    inject_lora(model, LoraContext())
    before = {n: p.untyped_storage().data_ptr() for n, p in model.named_parameters()}
    n_linear = sum(type(m) is nn.Linear for m in model.modules())
    assert n_linear > 0
    assert pack_linears(model, batch_hint=4) == n_linear
    assert not any(type(m) is nn.Linear for m in model.modules())
    wrapped = [m for m in model.modules() if isinstance(m, MultiLoraLinear)]
    assert wrapped and all(isinstance(m.base_layer, PackedLinear) for m in wrapped)
    assert isinstance(model.lm_head, PackedLinear)
    # What is left (embeddings, norms) was copied out of the checkpoint's memory: nothing of the
    # model keeps the file mapping alive.
    left = dict(model.named_parameters())
    assert left and all(left[n].untyped_storage().data_ptr() != before[n] for n in left)
    # The wrappers still describe their layer (the pool's shapes come from them).
    assert all(m.in_features == m.weight.shape[1] for m in wrapped)
    ids = torch.tensor([[5, 17, 99, 3, 200, 42, 7]])
    with torch.inference_mode():
        want = ref(ids).logits
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert got.argmax(-1).tolist() == want.argmax(-1).tolist()


def test_select_dense_modes():
    f32 = torch.float32
    if dense._probe_cpu() is None:
        assert select_dense("cpu", f32, "auto") == "onednn"
        assert select_dense("cpu", f32, "onednn") == "onednn"
    else:  # a torch build without the oneDNN ops: auto keeps nn.Linear, onednn is refused
        assert select_dense("cpu", f32, "auto") == "torch"
        with pytest.raises(ValueError):
            select_dense("cpu", f32, "onednn")
    assert select_dense("cpu", f32, "torch") == "torch"
    # Not its job: other dtypes and devices keep nn.Linear under auto, and are refused when
    # oneDNN is required, with the reason.
    assert select_dense("cpu", torch.bfloat16, "auto") == "torch"
    assert select_dense("cuda", torch.float16, "auto") == "torch"
    with pytest.raises(ValueError, match="float32"):
        select_dense("cpu", torch.bfloat16, "onednn")
    with pytest.raises(ValueError, match="CPU path"):
        select_dense("cuda", f32, "onednn")
    with pytest.raises(ValueError, match="use one of auto, onednn, torch"):
        select_dense("cpu", f32, "mkl")


def test_a_failed_probe_keeps_nn_linear_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(dense, "_probe", {"cpu": "the packed oneDNN linear failed: boom"})
    monkeypatch.setattr(dense, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="mintmesh.kernels.dense"):
        assert select_dense("cpu", torch.float32, "auto") == "torch"
        assert select_dense("cpu", torch.float32, "auto") == "torch"  # an engine per test...
    warnings = [r for r in caplog.records if r.name == "mintmesh.kernels.dense"]
    assert len(warnings) == 1, warnings  # ...one warning
    assert "boom" in warnings[0].getMessage() and "nn.Linear" in warnings[0].getMessage()
    with pytest.raises(ValueError, match="boom"):
        select_dense("cpu", torch.float32, "onednn")


@needs_onednn
def test_probe_compares_against_f_linear(monkeypatch):
    # A oneDNN linear that answers wrongly is caught by the probe, not served.
    monkeypatch.setattr(dense, "_linear", lambda x, p, b: F.linear(x, p.to_dense(), b) + 1.0)
    assert "does not match" in dense._run_probe()


@needs_onednn
def test_a_tied_lm_head_is_not_packed_twice():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 16), nn.Linear(16, 50, bias=False))
    model[2].weight = model[0].weight  # tie_word_embeddings
    ids = torch.tensor([[1, 7, 49]])
    with torch.inference_mode():
        want = model(ids)
    assert pack_linears(model) == 1
    assert isinstance(model[1], PackedLinear) and type(model[2]) is nn.Linear
    assert model[2].weight is model[0].weight  # still one matrix
    with torch.inference_mode():
        torch.testing.assert_close(model(ids), want, rtol=1e-5, atol=1e-5)
