"""The multi-LoRA layer: base output plus each row's own adapter delta, backbone untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mintmesh.kernels import AdapterPool, BatchMeta
from mintmesh.model import TARGET_MODULES, load_model
from mintmesh.packed import ModuleWeights
from mintmesh.services.executor.lora import LoraContext, MultiLoraLinear, inject_lora, lora_layers

IN, OUT = 24, 40
NAME = "layer"


def _adapter(rank: int, seed: int, alpha: float | None = None) -> ModuleWeights:
    g = torch.Generator().manual_seed(seed)
    alpha = float(alpha if alpha is not None else 2 * rank)
    return ModuleWeights(
        A=torch.randn(rank, IN, generator=g),
        B=torch.randn(OUT, rank, generator=g),
        alpha=alpha,
        scale=alpha / rank,
    )


@pytest.fixture()
def layer():
    torch.manual_seed(0)
    base = nn.Linear(IN, OUT, bias=True)
    ctx = LoraContext(AdapterPool({NAME: (OUT, IN)}, max_adapters=4))
    return MultiLoraLinear(base, NAME, ctx)


def _expected(layer: MultiLoraLinear, x2: torch.Tensor, row_adapters, weights) -> torch.Tensor:
    y = layer.base_layer(x2).clone()
    for t, key in enumerate(row_adapters):
        if key is not None:
            mw = weights[key]
            y[t] += mw.scale * (x2[t] @ mw.A.t()) @ mw.B.t()
    return y


# (ranks of the loaded adapters, adapter of each token row: index or None)
CASES = [
    ((4,), [0, 0, 0]),
    ((1, 4, 16), [0, None, 1, 2, 2, None, 0]),
    ((8, 2), [None, None]),
    ((3, 5, 7), [2, 1, 0, 1, 2, 0, 0, 1, None, 2, 1]),
]


@pytest.mark.parametrize("ranks,rows", CASES)
@pytest.mark.parametrize("shape3d", [False, True])
def test_rows_get_their_own_adapter(layer, ranks, rows, shape3d):
    weights = {f"a{i}": _adapter(r, seed=i) for i, r in enumerate(ranks)}
    pool = layer.ctx.pool
    slots = {k: pool.load(k, {NAME: mw}) for k, mw in weights.items()}
    keys = [None if i is None else f"a{i}" for i in rows]
    token_slots = torch.tensor([-1 if k is None else slots[k] for k in keys])
    x2 = torch.randn(len(rows), IN)
    want = _expected(layer, x2, keys, weights)
    w_before = layer.base_layer.weight.detach().clone()
    layer.ctx.meta = BatchMeta.make().prepare(token_slots)
    x = x2.reshape(1, len(rows), IN) if shape3d else x2
    with torch.no_grad():
        got = layer(x)
    layer.ctx.meta = None
    assert got.shape == (*x.shape[:-1], OUT)
    torch.testing.assert_close(got.reshape(-1, OUT), want, rtol=1e-5, atol=1e-5)
    # The backbone is never merged or modified.
    assert torch.equal(layer.base_layer.weight, w_before)


def test_no_meta_is_exactly_the_base(layer):
    layer.ctx.pool.load("a", {NAME: _adapter(4, seed=1)})
    x = torch.randn(2, 3, IN)
    with torch.no_grad():
        assert torch.equal(layer(x), layer.base_layer(x))


def test_adapter_that_does_not_target_the_layer_leaves_rows_alone():
    base = nn.Linear(IN, OUT)
    pool = AdapterPool({NAME: (OUT, IN), "elsewhere": (OUT, IN)}, max_adapters=2)
    layer = MultiLoraLinear(base, NAME, LoraContext(pool))
    slot = pool.load("other", {"elsewhere": _adapter(4, seed=2)})
    layer.ctx.meta = BatchMeta.make().prepare(torch.tensor([slot, -1]))
    x = torch.randn(2, IN)
    with torch.no_grad():
        got = layer(x)
    layer.ctx.meta = None
    torch.testing.assert_close(got, layer.base_layer(x))


def test_wrong_row_count_is_refused(layer):
    slot = layer.ctx.pool.load("a", {NAME: _adapter(2, seed=3)})
    layer.ctx.meta = BatchMeta.make().prepare(torch.tensor([slot, slot, slot]))
    with pytest.raises(ValueError, match="rows"), torch.no_grad():
        layer(torch.randn(2, IN))
    layer.ctx.meta = None


def test_inject_wraps_every_target_module_of_the_backbone(tiny_model_dir, base_info):
    model, _ = load_model(tiny_model_dir)
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        before = model(input_ids=x).logits
    ctx = LoraContext()
    shapes = inject_lora(model, ctx)
    assert shapes == base_info.linear_shapes
    layers = lora_layers(model)
    assert len(layers) == base_info.num_layers * len(TARGET_MODULES)
    assert {m.name for m in layers} == set(base_info.linear_shapes)
    # The lm_head and embeddings are not wrapped.
    assert isinstance(model.lm_head, nn.Linear)
    with torch.no_grad():
        after = model(input_ids=x).logits
    assert torch.equal(before, after)
