"""Training on the executor's resident backbone (services/executor/training.py): K steps of one
run equal a plain peft + torch.optim.AdamW loop (losses and final weights to 1e-5), the RL losses
equal Tinker's formulas written out in torch, four runs in one pass get the gradients each gets
alone, the base model is untouched, and bad input is refused naming the field."""

from __future__ import annotations

import math
import time

import pytest
import torch

from mintmesh.errors import (
    AdapterNotFound,
    AlreadyExists,
    FailedPrecondition,
    InvalidAdapter,
    InvalidArgument,
    ResourceExhausted,
    TrainingRunNotFound,
)
from mintmesh.model import load_model
from mintmesh.services.executor.config import ExecutorConfig
from mintmesh.services.executor.engine import Engine
from mintmesh.services.executor.training import AdamParams, Datum, LoraSpec, Trainer


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    eng = Engine.from_config(ExecutorConfig(model_dir=tiny_model_dir))
    yield eng
    eng.close()


@pytest.fixture()
def trainer(engine):
    t = Trainer(
        engine.model,
        engine.ctx,
        engine.pool.layer_shapes,
        vocab_size=engine.vocab_size,
        max_positions=engine.max_positions,
        lock=engine._model_lock,
    )
    yield t
    for rid in list(t.runs):
        t.drop_run(rid)


def _data(seed: int, lens=(12, 7, 20)) -> list[Datum]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lens:
        toks = torch.randint(0, 256, (n + 1,), generator=g).tolist()
        w = [0.0] * (n // 3) + [1.0] * (n - n // 3)  # a prompt, then the completion
        out.append(Datum(input_ids=toks[:-1], target_tokens=toks[1:], weights=w))
    return out


def _peft(model_dir, rank, alpha, targets, seed):
    from peft import LoraConfig, get_peft_model

    base, _ = load_model(model_dir)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0,
                     init_lora_weights=False)  # fmt: skip
    pm = get_peft_model(base, cfg)
    with torch.no_grad():  # adapters strong enough to move the logits
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(3.0)
    return pm


def _peft_weights(pm) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    for name, mod in pm.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            path = name.removeprefix("base_model.model.")
            out[path] = (mod.lora_A["default"].weight, mod.lora_B["default"].weight)
    return out


def _peft_lps(pm, d: Datum) -> torch.Tensor:
    logits = pm(input_ids=torch.tensor([d.input_ids])).logits[0].float()
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(d.target_tokens)[:, None])[:, 0]


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def test_k_steps_equal_peft_with_adamw(trainer, tiny_model_dir):
    rank, alpha, targets = 4, 8.0, ("q_proj", "v_proj", "down_proj")
    pm = _peft(tiny_model_dir, rank, alpha, targets, seed=7)
    ref = _peft_weights(pm)
    run = trainer.create_run("r1", "alice", LoraSpec(rank, alpha, targets))
    assert set(run.layers) == set(ref)
    run.load_weights({k: (a.detach(), b.detach()) for k, (a, b) in ref.items()})
    adam = AdamParams(learning_rate=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.01,
                      grad_clip_norm=0.0)  # fmt: skip
    params = [p for pair in ref.values() for p in pair]
    opt = torch.optim.AdamW(
        params, lr=adam.learning_rate, betas=(adam.beta1, adam.beta2), eps=adam.eps,
        weight_decay=adam.weight_decay, foreach=False,
    )  # fmt: skip
    data = _data(1)
    for step in range(5):
        (res,) = trainer.forward_backward([("r1", data, "cross_entropy", None)])
        run.optim_step(adam)
        loss = sum(-(torch.tensor(d.weights) * _peft_lps(pm, d)).sum() for d in data)
        loss.backward()
        opt.step()
        opt.zero_grad()
        assert _rel(res.loss, float(loss)) <= 1e-5, (step, res.loss, float(loss))
        assert res.metrics == {"loss:sum": res.loss}
        assert [len(x) for x in res.logprobs] == [len(d.input_ids) for d in data]
    first = _rel(res.loss, float(loss))
    assert run.steps == 5 and first <= 1e-5
    got = run.weights()
    for k, (a, b) in ref.items():
        for x, y in ((got[k][0], a), (got[k][1], b)):
            assert (x - y.detach()).abs().max() <= 1e-5 * max(1.0, float(y.abs().max())), k
    # And training moved them: this is not a comparison of untouched weights.
    moved = max(float((got[k][1] - _peft_weights(_peft(tiny_model_dir, rank, alpha, targets, 7))
                       [k][1]).abs().max()) for k in ref)  # fmt: skip
    assert moved > 1e-3


@pytest.mark.parametrize("loss_fn", ["importance_sampling", "ppo"])
def test_rl_losses_equal_tinkers_formulas(trainer, tiny_model_dir, loss_fn):
    rank, alpha, targets = 2, 4.0, ("q_proj", "k_proj")
    pm = _peft(tiny_model_dir, rank, alpha, targets, seed=11)
    ref = _peft_weights(pm)
    run = trainer.create_run("rl", "bob", LoraSpec(rank, alpha, targets))
    run.load_weights({k: (a.detach(), b.detach()) for k, (a, b) in ref.items()})
    g = torch.Generator().manual_seed(3)
    data = _data(2, lens=(9, 14))
    with torch.no_grad():
        for d in data:  # "sampling" logprobs near the current policy's, advantages of both signs
            lp = _peft_lps(pm, d)
            d.logprobs = (lp + 0.3 * torch.randn(len(lp), generator=g)).tolist()
            d.advantages = torch.randn(len(lp), generator=g).mul(2).tolist()
    cfg = {"clip_low_threshold": 0.7, "clip_high_threshold": 1.25}
    (res,) = trainer.forward_backward([("rl", data, loss_fn, cfg)])
    loss = 0.0
    for d in data:
        lp = _peft_lps(pm, d)
        ratio = torch.exp(lp - torch.tensor(d.logprobs))
        adv = torch.tensor(d.advantages)
        if loss_fn == "importance_sampling":
            loss = loss - (ratio * adv).sum()
        else:
            loss = loss - torch.minimum(ratio * adv, ratio.clamp(0.7, 1.25) * adv).sum()
    loss.backward()
    assert _rel(res.loss, float(loss)) <= 1e-5
    for k, (a, b) in ref.items():
        ga, gb = run.layers[k][0].grad, run.layers[k][1].grad
        assert (ga - a.grad).abs().max() <= 1e-4 * max(1.0, float(a.grad.abs().max())), k
        assert (gb - b.grad).abs().max() <= 1e-4 * max(1.0, float(b.grad.abs().max())), k


def test_four_runs_in_one_pass_get_their_own_gradients(trainer):
    specs = {
        "a": LoraSpec(2, 4.0, ("q_proj", "v_proj")),
        "b": LoraSpec(8, 8.0, ("q_proj", "k_proj", "v_proj", "o_proj")),
        "c": LoraSpec(4, 16.0, ("gate_proj", "up_proj", "down_proj")),
        "d": LoraSpec(1, 1.0, ("v_proj",)),
    }
    data = {n: _data(20 + i, lens=(5 + 3 * i, 9)) for i, n in enumerate(specs)}
    for i, (n, spec) in enumerate(specs.items()):
        run = trainer.create_run(n, "t", spec, seed=i)
        with torch.no_grad():  # B nonzero, so every layer passes gradient to the ones below
            for _, b in run.layers.values():
                b.normal_(0, 0.5, generator=torch.Generator().manual_seed(i))
    alone = {}
    for n in specs:
        (res,) = trainer.forward_backward([(n, data[n], "cross_entropy", None)])
        alone[n] = (res.loss, [p.grad.clone() for p in trainer.run(n).parameters()])
        trainer.run(n).optimizer.zero_grad(set_to_none=True)
    # In one pass, the calls in another order than the runs were made.
    order = ["c", "a", "d", "b"]
    together = trainer.forward_backward([(n, data[n], "cross_entropy", None) for n in order])
    for n, res in zip(order, together, strict=True):
        loss, grads = alone[n]
        assert _rel(res.loss, loss) <= 1e-5, n
        for p, g in zip(trainer.run(n).parameters(), grads, strict=True):
            assert (p.grad - g).abs().max() <= 1e-5 * max(1.0, float(g.abs().max())), n


def test_training_leaves_the_served_base_untouched(engine, trainer):
    ids = list(range(40, 70))
    (before,) = engine.forward([(None, ids)])
    run = trainer.create_run("u", "t", LoraSpec(4, 8.0, ("q_proj", "o_proj", "up_proj")))
    for _ in range(2):
        trainer.forward_backward([("u", _data(5), "cross_entropy", None)])
        run.optim_step(AdamParams(learning_rate=0.05))
    (after,) = engine.forward([(None, ids)])
    assert torch.equal(before, after)
    assert all(not p.requires_grad for p in engine.model.parameters())


def test_forward_only_computes_no_gradients(trainer):
    run = trainer.create_run("f", "t", LoraSpec(2, 2.0, ("q_proj",)))
    (res,) = trainer.forward_backward([("f", _data(9), "cross_entropy", None)], forward_only=True)
    assert math.isfinite(res.loss) and all(p.grad is None for p in run.parameters())
    with pytest.raises(FailedPrecondition, match="no gradients"):
        run.optim_step(AdamParams())


@pytest.mark.parametrize(
    "datum, loss_fn, needle",
    [
        (Datum([1, 2, 999], [2, 3, 4], [1, 1, 1]), "cross_entropy", "token id 999"),
        (Datum([1, 2, 3], [2, 3, 4, 5], [1, 1, 1]), "cross_entropy", "target_tokens has 4"),
        (Datum([1, 2, 3], [2, 3, 4], [1, 1]), "cross_entropy", "weights has 2"),
        (Datum([1, 2, 3], [2, 3, 4], [1, float("nan"), 1]), "cross_entropy", "not finite"),
        (Datum([1, 2], [2, 3], None, [0.0, 0.0], [1.0, float("inf")]), "ppo", "advantages"),
        (Datum([1, 2], [2, 3], None, None, [1.0, 1.0]), "importance_sampling", "logprobs is"),
        (Datum([], [], []), "cross_entropy", "model_input is empty"),
        (Datum([1], [2], [1.0]), "mse", "loss_fn 'mse'"),
    ],
)
def test_bad_training_input_is_refused_naming_it(trainer, datum, loss_fn, needle):
    trainer.create_run("bad", "t", LoraSpec(2, 2.0, ("q_proj",)))
    with pytest.raises(InvalidArgument, match=needle.replace("(", r"\(")):
        trainer.forward_backward([("bad", [datum], loss_fn, None)])


def test_bad_specs_hyperparameters_and_memory(trainer):
    with pytest.raises(InvalidArgument, match="rank=500"):
        trainer.create_run("x", "t", LoraSpec(500, 1.0, ("q_proj",)))
    with pytest.raises(InvalidArgument, match="lm_head"):
        trainer.create_run("x", "t", LoraSpec(2, 1.0, ("lm_head",)))
    run = trainer.create_run("x", "t", LoraSpec(2, 1.0, ("q_proj",)))
    trainer.forward_backward([("x", _data(3), "cross_entropy", None)])
    with pytest.raises(InvalidArgument, match="learning_rate=0"):
        run.optim_step(AdamParams(learning_rate=0.0))
    with pytest.raises(AdapterNotFound, match="no training run .nope."):
        trainer.forward_backward([("nope", _data(3), "cross_entropy", None)])
    trainer.max_bytes = trainer.bytes_used() + 1000
    with pytest.raises(ResourceExhausted, match="training memory of this executor is full"):
        trainer.create_run("big", "t", LoraSpec(64, 64.0, ("q_proj", "v_proj")))


def test_runs_no_call_touches_for_idle_s_are_dropped(trainer):
    """expire_idle drops the runs untouched for idle_s (their memory freed), never one whose
    call is under way; a call to a dropped run is not found and says why; its id is free."""
    spec = LoraSpec(2, 4.0, ("q_proj",))
    assert trainer.expire_idle(time.monotonic() + 1e9) == []  # idle_s 0: never
    trainer.idle_s = 100.0
    for rid in ("old", "fresh", "busy", "waits"):
        trainer.create_run(rid, "t", spec)
    t0 = time.monotonic()
    trainer.forward_backward([("old", _data(1), "cross_entropy", None)])
    assert trainer.run("old").last_used >= t0  # a call touches its run when it ends
    for rid, ago in (("old", 150.0), ("fresh", 50.0), ("busy", 500.0)):
        trainer.runs[rid].last_used = t0 - ago
    trainer.runs["busy"].active = 1  # a forward_backward of it under way
    trainer.runs["waits"].last_used = t0 - 500.0
    trainer.runs["waits"].queued = 1  # a call of it waiting in the training queue
    held = trainer.bytes_used() - trainer.runs["waits"].bytes()
    assert trainer.expire_idle(t0) == ["old"]
    trainer.drop_run("waits")
    assert sorted(trainer.runs) == ["busy", "fresh"] and trainer.expired_runs == 1
    assert trainer.bytes_used() == held - trainer.runs["fresh"].bytes()
    with pytest.raises(AdapterNotFound, match=r"'old' was dropped after 1\d\d s without a call"):
        trainer.run("old")
    with pytest.raises(AdapterNotFound, match="training_run_idle_s is 100"):
        trainer.forward_backward([("old", _data(1), "cross_entropy", None)])
    trainer.runs["busy"].active = 0
    assert trainer.expire_idle(t0) == ["busy"]
    assert trainer.create_run("old", "t", spec).steps == 0  # the id makes a fresh run
    assert trainer.run("old").run_id == "old"
    # Overdue when looked up (before any sweep): dropped then, not served.
    trainer.runs["old"].last_used = time.monotonic() - 1000.0
    with pytest.raises(TrainingRunNotFound, match="'old' was dropped after") as ei:
        trainer.run("old")
    assert ei.value.metadata == {"run_id": "old"} and "old" not in trainer.runs
    trainer.create_run("old", "t", spec)
    # Memory full of idle runs: a new run makes room by dropping them first.
    trainer.runs["fresh"].last_used = time.monotonic() - 1000.0
    trainer.runs["old"].last_used = time.monotonic() - 1000.0
    trainer.max_bytes = trainer.bytes_used()
    trainer.create_run("new", "t", spec)
    assert sorted(trainer.runs) == ["new"]


def test_a_run_dropped_while_its_call_waits_fails_that_call_alone(trainer):
    """Three calls queued for one pass; one run is dropped meanwhile: its call is NOT_FOUND,
    the other two train as if it had not been there."""
    import threading

    from mintmesh.services.executor.training import TrainingQueue

    spec = LoraSpec(2, 4.0, ("q_proj",))
    for rid in ("a", "b", "c"):
        trainer.create_run(rid, "t", spec, seed=3)
    q = TrainingQueue(trainer, batch_wait_s=0.0)
    out: dict = {}

    def call(rid):
        try:
            out[rid] = q.submit(rid, _data(5), "cross_entropy", timeout=60)
        except Exception as e:  # noqa: BLE001 - what the caller gets
            out[rid] = e

    try:
        with trainer.lock:  # the worker takes a's call and waits for the model
            threads = [threading.Thread(target=call, args=("a",))]
            threads[0].start()
            while trainer.runs["a"].active == 0:
                time.sleep(0.01)
            threads += [threading.Thread(target=call, args=(r,)) for r in ("b", "c")]
            for t in threads[1:]:
                t.start()
            while len(q._pending) < 2:
                time.sleep(0.01)
            assert trainer.runs["b"].queued == 1
            trainer.drop_run("b")
        for t in threads:
            t.join(60)
    finally:
        q.close()
    assert isinstance(out["b"], TrainingRunNotFound), out["b"]
    assert "no training run 'b'" in str(out["b"])
    assert out["a"].loss == pytest.approx(out["c"].loss, rel=1e-6)  # same seed, same data
    assert trainer.runs["c"].queued == 0 and trainer.runs["c"].has_grads
    assert q.batches == 2 and q.batched_calls == 3


def test_micro_batches_give_the_whole_batchs_gradients(trainer):
    """Split into forward/backward slices of a few tokens (time-slicing with serving), a batch
    gets the same loss and gradients as in one pass."""
    data = _data(31, lens=(6, 11, 4, 9))
    runs = []
    for i, spec in enumerate([LoraSpec(4, 8.0, ("q_proj", "v_proj")), LoraSpec(2, 2.0, ALL_ATTN)]):
        run = trainer.create_run(f"m{i}", "t", spec, seed=i)
        with torch.no_grad():
            for _, b in run.layers.values():
                b.normal_(0, 0.5, generator=torch.Generator().manual_seed(i))
        runs.append(run)
    calls = [("m0", data[:2], "cross_entropy", None), ("m1", data[2:], "cross_entropy", None)]
    whole = trainer.forward_backward(calls)
    grads = [[p.grad.clone() for p in r.parameters()] for r in runs]
    for r in runs:
        r.optimizer.zero_grad(set_to_none=True)
    yields = []
    trainer.micro_tokens, trainer.yield_fn = 12, lambda: yields.append(1)
    trainer.busy_fn = lambda: True  # as if sequences were being served
    sliced = trainer.forward_backward(calls)
    assert len(yields) >= 2  # really sliced, and the serving hook ran between slices
    for a, b in zip(whole, sliced, strict=True):
        assert _rel(b.loss, a.loss) <= 1e-6
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            assert x == pytest.approx(y, abs=1e-5)
    for r, gs in zip(runs, grads, strict=True):
        for p, g in zip(r.parameters(), gs, strict=True):
            assert (p.grad - g).abs().max() <= 1e-5 * max(1.0, float(g.abs().max()))


ALL_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def _train(trainer, run_id, steps, seed0, adam):
    losses = []
    for k in range(steps):
        (res,) = trainer.forward_backward([(run_id, _data(seed0 + k), "cross_entropy", None)])
        trainer.run(run_id).optim_step(adam)
        losses.append(res.loss)
    return losses


def test_a_saved_state_resumes_exactly(trainer):
    """save_state after 3 steps, load it into a new run (with the optimizer): its next 3 steps
    are bit-equal to the uninterrupted run's, losses and weights; without the optimizer the
    weights are the saved ones but AdamW starts afresh (so the steps differ)."""
    from mintmesh.services.executor.training import TrainingState

    spec = LoraSpec(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"))
    adam = AdamParams(learning_rate=3e-2, weight_decay=0.1, grad_clip_norm=1.0)
    trainer.create_run("whole", "t", spec, seed=5)
    _train(trainer, "whole", 3, 10, adam)
    state = trainer.run("whole").state_bytes()
    digest_at_3 = trainer.run("whole").data_hash.hexdigest()
    want = _train(trainer, "whole", 3, 13, adam)

    parsed = TrainingState.parse(state)
    assert parsed.spec == spec and parsed.steps == 3 and parsed.data_digest == digest_at_3
    assert parsed.moments and all(step == 3.0 for _, _, step in parsed.moments.values())
    trainer.create_run("resumed", "t", LoraSpec(1, 1.0, ("q_proj",)), init=parsed, optimizer=True)
    r = trainer.run("resumed")
    assert r.spec == spec and r.steps == 3  # the state's spec, not the request's
    got = _train(trainer, "resumed", 3, 13, adam)
    assert got == want  # bit-equal: same weights, moments and step counts
    for name, (a, b) in trainer.run("whole").layers.items():
        ra, rb = r.layers[name]
        assert torch.equal(a, ra) and torch.equal(b, rb), name
    # The data digest chains on from the saved one: sha256(saved digest, then the new tokens).
    import hashlib
    import json

    h = hashlib.sha256(digest_at_3.encode())
    for k in range(13, 16):
        for d in _data(k):
            h.update(json.dumps(d.input_ids).encode())
    assert r.data_hash.hexdigest() == h.hexdigest() != digest_at_3

    trainer.create_run("weights-only", "t", spec, init=TrainingState.parse(state))
    w = trainer.run("weights-only")
    assert w.steps == 0 and not w.optimizer.state
    fresh = _train(trainer, "weights-only", 1, 13, adam)
    assert fresh[0] == want[0]  # the same weights: the same first loss
    q = "model.layers.0.self_attn.q_proj"
    assert not torch.equal(w.layers[q][1], trainer.run("resumed").layers[q][1])


def test_loading_replaces_a_live_run_and_refuses_what_does_not_fit(trainer, tiny_model_dir):
    from mintmesh import peft_io
    from mintmesh.model import base_model_info
    from mintmesh.services.executor.training import TrainingState

    spec = LoraSpec(rank=2, alpha=4.0, targets=("q_proj",))
    trainer.create_run("a", "t", spec, seed=1)
    _train(trainer, "a", 2, 1, AdamParams(learning_rate=1e-2))
    state = TrainingState.parse(trainer.run("a").state_bytes())
    with pytest.raises(AlreadyExists, match="exists already"):
        trainer.create_run("a", "t", spec, init=state)
    with pytest.raises(InvalidArgument, match="another tenant"):
        trainer.create_run("a", "u", spec, init=state, replace=True)
    trainer.create_run("b", "t", LoraSpec(rank=3, alpha=3.0, targets=("v_proj",)), seed=2)
    trainer.create_run("b", "t", spec, init=state, replace=True, optimizer=True)
    assert trainer.run("b").spec == spec and trainer.run("b").steps == 2
    # A served revision (packed) as the start: its weights in fp32, no optimizer state.
    cfg, st = trainer.run("a").peft_bytes()
    packed = peft_io.validate_and_pack(cfg, st, base_model_info(tiny_model_dir), max_rank=64).data
    init = TrainingState.from_packed(packed)
    assert init.spec == spec and not init.moments
    for name, (a, b) in trainer.run("a").layers.items():
        assert torch.equal(init.weights[name][0], a.detach())
        assert torch.equal(init.weights[name][1], b.detach())
    with pytest.raises(FailedPrecondition, match="no optimizer state"):
        trainer.create_run("c", "t", spec, init=init, optimizer=True)
    with pytest.raises(InvalidArgument, match="does not parse|format"):
        TrainingState.parse(st)  # a LoRA's safetensors is not a training state


def test_reverse_kl_is_the_kl_to_the_reference_and_training_shrinks_it(trainer, engine):
    """reverse_kl: sum_t w_t KL(softmax(student/T) || q_t) over the vocabulary, q a reference's
    log-probabilities spanning a wide range; a fresh run is the base model, so the loss equals
    the KL computed from the base's own logits; optim steps on it bring the student closer."""
    spec = LoraSpec(rank=4, alpha=16.0, targets=("q_proj", "v_proj", "up_proj"))
    trainer.create_run("kl", "t", spec, seed=2)
    data = _data(21, lens=(9, 14))
    g = torch.Generator().manual_seed(4)
    tau = 0.7
    for d in data:
        n = len(d.input_ids)
        d.reference_logprobs = torch.log_softmax(
            torch.randn(n, engine.vocab_size, generator=g) * 6.0 / tau, dim=-1
        )
    with torch.no_grad():
        want = []
        for d in data:
            logits = engine.model(input_ids=torch.tensor([d.input_ids])).logits[0].double()
            lp = torch.log_softmax(logits / tau, dim=-1)
            kl = (lp.exp() * (lp - d.reference_logprobs.double())).sum(-1)
            want.append(torch.tensor(d.weights, dtype=torch.float64) * kl)
    (res,) = trainer.forward_backward([("kl", data, "reverse_kl", {"temperature": tau})])
    for got, w in zip(res.logprobs, want, strict=True):
        assert got == pytest.approx(w.tolist(), rel=1e-4, abs=1e-5)
    assert res.loss == pytest.approx(float(sum(w.sum() for w in want)), rel=1e-5)
    assert res.loss > 1.0
    losses = [res.loss]
    run = trainer.run("kl")
    for _ in range(5):
        run.optim_step(AdamParams(learning_rate=2e-2))
        (res,) = trainer.forward_backward([("kl", data, "reverse_kl", {"temperature": tau})])
        losses.append(res.loss)
    assert losses[-1] < 0.8 * losses[0], losses
    # Without the reference's log-probabilities the loss is refused, naming the field.
    bare = _data(21, lens=(9,))
    with pytest.raises(InvalidArgument, match="reference_input is needed"):
        trainer.forward_backward([("kl", bare, "reverse_kl", None)])


def test_a_runs_pack_is_the_stores_and_installs_without_a_fetch(trainer, engine, tiny_model_dir):
    """The run packed straight from its weights is byte-for-byte what the store makes of its
    PEFT files (so the digest its revision gets); Engine.install makes it resident with no
    fetch (this engine's source has never seen it), serving the run's own outputs."""
    from mintmesh import peft_io
    from mintmesh.model import base_model_info

    spec = LoraSpec(rank=3, alpha=6.0, targets=("q_proj", "o_proj", "gate_proj"))
    trainer.create_run("p", "t", spec, seed=4)
    _train(trainer, "p", 2, 40, AdamParams(learning_rate=5e-2))
    run = trainer.run("p")
    cfg, st = run.peft_bytes()
    store_side = peft_io.validate_and_pack(cfg, st, base_model_info(tiny_model_dir), max_rank=64)
    ours = run.packed(engine.base_fingerprint)
    assert ours.data == store_side.data and ours.digest == store_side.digest
    fetches = engine.residency.fetches
    digest, resident = run.install(engine)  # what SaveRunWeights does
    assert digest == ours.digest and resident
    assert ours.digest in engine.residency.resident() and engine.residency.fetches == fetches
    ids = _data(41, lens=(10,))[0].input_ids
    (served,) = engine.forward([(ours.digest, ids)])
    (res,) = trainer.forward_backward([("p", _data(41, lens=(10,)), "cross_entropy", None)],
                                      forward_only=True)  # fmt: skip
    lp = torch.log_softmax(served.double(), -1)
    want = lp.gather(1, torch.tensor(_data(41, lens=(10,))[0].target_tokens)[:, None])[:, 0]
    assert res.logprobs[0] == pytest.approx(want.tolist(), abs=1e-4)
    with torch.no_grad():
        run.layers["model.layers.0.self_attn.q_proj"][1][0, 0] = float("nan")
    with pytest.raises(InvalidAdapter, match=r"q_proj: lora_B contains NaN or Inf"):
        run.packed(engine.base_fingerprint)
    host = engine.residency.host.nbytes
    with pytest.raises(InvalidAdapter, match=r"q_proj: lora_B contains NaN or Inf"):
        run.install(engine)
    assert engine.residency.host.nbytes == host  # its region given back, nothing kept
    for bad in (float("inf"), float("-inf")):  # an Inf of either sign, in the last module
        name = sorted(run.layers)[-1]
        with torch.no_grad():
            run.layers["model.layers.0.self_attn.q_proj"][1][0, 0] = 0.0
            run.layers[name][0][-1, -1] = bad
        with pytest.raises(InvalidAdapter, match=rf"{name}: lora_A contains NaN or Inf"):
            run.install(engine)
        assert engine.residency.host.nbytes == host


def test_serving_runs_between_the_layers_of_a_training_pass_and_each_gets_its_own(trainer, engine):
    """Layer-granular time-slicing: with a slice of 0 s and sequences 'being served', a
    training forward/backward lets the model go at every decoder layer and the LM head, both
    ways; a real serving forward (an adapter's rows, through the pool) runs in each gap. The
    served logits are those served alone, bit for bit (the training's LoRA context is its own
    thread's), and the training's loss and gradients those of the pass without gaps."""
    import threading

    from mintmesh.peft_io import check_finite_pack, lora_layout

    g = torch.Generator().manual_seed(3)
    layers = {n: (torch.randn(4, fi, generator=g) * 0.3, torch.randn(fo, 4, generator=g) * 0.3)
              for n, (fo, fi) in engine.pool.layer_shapes.items()
              if n.endswith(("q_proj", "v_proj"))}  # fmt: skip
    layout, _ = lora_layout(layers, rank=4, alpha=8.0, targets=("q_proj", "v_proj"),
                            base_fingerprint=engine.base_fingerprint)  # fmt: skip
    digest, resident = engine.install_layout(
        layout, lambda buf: check_finite_pack(buf, layout, layers)
    )
    assert resident
    ids = _data(50, lens=(7,))[0].input_ids
    (alone,) = engine.forward([(digest, ids)])

    run = trainer.create_run("s", "t", LoraSpec(4, 8.0, ("q_proj", "v_proj", "up_proj")), seed=8)
    with torch.no_grad():
        for _, b in run.layers.values():
            b.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    calls = [("s", _data(51, lens=(9, 5)), "cross_entropy", None)]
    whole = trainer.forward_backward(calls)
    grads = [p.grad.clone() for p in run.parameters()]
    run.optimizer.zero_grad(set_to_none=True)

    served, threads = [], set()

    def serve_between():  # in the gap: a serving forward on another thread (a step loop's)
        def serve():
            threads.add(threading.get_ident())
            served.append(engine.forward([(digest, ids)])[0])

        t = threading.Thread(target=serve)
        t.start()
        t.join()

    trainer.slice_s, trainer.micro_tokens = 0.0, 10**6
    trainer.yield_fn, trainer.busy_fn = serve_between, lambda: True
    y0 = trainer.yields
    sliced = trainer.forward_backward(calls)
    n_layers = engine.model.config.num_hidden_layers
    # One gap after every decoder layer and the LM head forward, and as many in the backward
    # (plus the one before the micro-batch).
    assert trainer.yields - y0 >= 2 * (n_layers + 1), (trainer.yields - y0, n_layers)
    assert len(served) >= 2 * (n_layers + 1)
    for got in served:
        assert torch.equal(got, alone)
    assert threading.get_ident() not in threads
    assert sliced[0].loss == whole[0].loss
    for p, g in zip(run.parameters(), grads, strict=True):
        assert torch.equal(p.grad, g)


def test_a_long_backbone_gemm_is_sliced_too_and_keeps_the_gradients(trainer, engine):
    """Yield points inside a backbone GEMM longer than a slice (the LM head's on a real vocab):
    with a piece of a few rows' multiply-adds, the packed Linears' training forward and
    backward run in pieces with a serving step between two, many more than the layer
    boundaries give; the loss and gradients stay those of the pass without pieces (float32
    rounding of another row count)."""
    from mintmesh.kernels.dense import PackedLinear

    if not any(isinstance(m, PackedLinear) for m in engine.model.modules()):
        pytest.skip("the backbone is not packed here (no oneDNN)")
    run = trainer.create_run("p", "t", LoraSpec(4, 8.0, ("q_proj", "v_proj")), seed=2)
    with torch.no_grad():
        for _, b in run.layers.values():
            b.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
    calls = [("p", _data(52, lens=(9, 5, 12)), "cross_entropy", None)]
    whole = trainer.forward_backward(calls)
    grads = [p.grad.clone() for p in run.parameters()]
    run.optimizer.zero_grad(set_to_none=True)
    gaps = []
    trainer.slice_s, trainer.micro_tokens = 0.0, 10**6
    trainer.yield_fn, trainer.busy_fn = lambda: gaps.append(1), lambda: True
    y0 = trainer.yields
    trainer.forward_backward(calls)  # layer boundaries only: no GEMM is longer than a piece
    layer_gaps = trainer.yields - y0
    run.optimizer.zero_grad(set_to_none=True)
    head = engine.model.lm_head
    trainer.piece_macs = 4 * head.in_features * head.out_features  # 4 rows of the LM head
    y0 = trainer.yields
    pieced = trainer.forward_backward(calls)
    # 36 rows: the LM head alone is 9 pieces forward and 9 backward; every other Linear too.
    assert trainer.yields - y0 >= layer_gaps + 2 * 8, (trainer.yields - y0, layer_gaps)
    assert _rel(pieced[0].loss, whole[0].loss) <= 1e-6
    for p, g in zip(run.parameters(), grads, strict=True):
        assert (p.grad - g).abs().max() <= 1e-5 * max(1.0, float(g.abs().max()))


def test_a_queued_batch_leaves_no_openmp_team_on_the_queues_thread(trainer):
    """The training queue runs each batch on a thread that ends with it: its own long-lived
    worker keeps no OpenMP team, which would throttle the step thread's for the rest of the
    process (services/executor/passing.py). The control, a pass run on a thread that stays,
    leaves one: the check can fail."""
    from openmp_util import native_workers, openmp_on, settled_new_workers, workers_left_by

    from mintmesh.services.executor.training import TrainingQueue

    if not openmp_on():
        pytest.skip("torch runs no OpenMP teams here")
    spec = LoraSpec(8, 16.0, ("q_proj", "v_proj"))
    trainer.create_run("omp", "t", spec, seed=3)
    data = _data(7, lens=(200, 180, 150))
    assert workers_left_by(
        lambda: trainer.forward_backward([("omp", data, "cross_entropy", None)])
    ), "the control started no OpenMP team on its thread"
    q = TrainingQueue(trainer, batch_wait_s=0.0)
    try:
        before = native_workers()
        res = q.submit("omp", data, "cross_entropy", timeout=60)
        assert math.isfinite(res.loss)
        assert q._thread.is_alive()
        assert not settled_new_workers(before)
    finally:
        q.close()
