"""The ONNX Runtime runner (issue 16) against its references: the export-friendly functional
forward against the HF model and the torch runner, and ORT's logits against the torch runner's
over multi-step mixed batches (prefill chunks and decodes in one row, rows of no adapter,
adapters of different ranks and targets, contexts over several scattered KV blocks), with
strong adapters (they change most argmax tokens: asserted)."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from peft_util import make_peft_adapter, make_strong_adapter

from mintmesh.model import load_model
from mintmesh.packed import unpack
from mintmesh.peft_io import read_peft_dir, validate_and_pack
from mintmesh.services.executor.config import ExecutorConfig
from mintmesh.services.executor.kv import AttentionPlan, PagedKVCache, SeqSpan
from mintmesh.services.executor.ort_export import OrtForward, ensure_export
from mintmesh.services.executor.ort_runner import OrtModelRunner, pool_inputs, step_inputs
from mintmesh.services.executor.runner import ForwardBatch
from mintmesh.services.executor.torch_runner import TorchModelRunner

pytest.importorskip("onnxruntime")

# name: (kind, rank, seed): strong on all seven modules, or peft-random on q/v only.
ADAPTERS = {"s8": ("strong", 8, 101), "s16": ("strong", 16, 7), "s4": ("strong", 4, 3),
            "qv2": ("qv", 2, 5)}  # fmt: skip
BLOCK = 4


@pytest.fixture(scope="module")
def modules(tiny_model_dir, base_info, tmp_path_factory):
    root = tmp_path_factory.mktemp("ort-adapters")
    out = {}
    for name, (kind, rank, seed) in ADAPTERS.items():
        if kind == "strong":
            d = make_strong_adapter(tiny_model_dir, root / name, rank=rank, seed=seed)
        else:
            d = make_peft_adapter(tiny_model_dir, root / name, rank=rank, seed=seed)
        pa = validate_and_pack(*read_peft_dir(d), base_info, max_rank=64)
        out[name] = (pa.digest, unpack(pa.data, copy=True)[1])
    return out


def _runners(tiny_model_dir, base_info, modules, **cfg):
    config = ExecutorConfig(model_dir=tiny_model_dir, max_rank=64, **cfg)
    tr = TorchModelRunner(load_model(tiny_model_dir)[0], config, max_batch_size=8)
    orr = OrtModelRunner(
        load_model(tiny_model_dir)[0], config, max_batch_size=8, fingerprint=base_info.fingerprint
    )
    slots = {}
    for name, (digest, mods) in modules.items():
        slots[name] = tr.load_adapter(digest, mods)
        assert orr.load_adapter(digest, mods) == slots[name]
    return tr, orr, slots


def _cache(model_config):
    return PagedKVCache.for_model(
        model_config, max_bytes=64 * PagedKVCache.block_nbytes(model_config, BLOCK, torch.float32),
        block_size=BLOCK, device="cpu", dtype=torch.float32,
    )  # fmt: skip


class Driver:
    """Sequences stepped through one runner with its own paged cache (scattered blocks)."""

    def __init__(self, runner, seqs):
        self.runner = runner
        self.kv = _cache(runner.model.config)
        self.seqs = seqs  # name -> dict(tokens, slot, blocks, done)

    def step(self, work: dict[str, int]) -> torch.Tensor:
        ids, pos, slots, spans, rows = [], [], [], [], []
        for name, n in work.items():
            s = self.seqs[name]
            c = s["done"]
            spans.append(SeqSpan(len(ids), n, c + n, s["blocks"]))
            ids += s["tokens"][c : c + n]
            pos += range(c, c + n)
            slots += [s["slot"]] * n
            rows.append(len(ids) - 1)
        plan = AttentionPlan(spans, self.kv)
        out = self.runner.run(ForwardBatch(ids, pos, slots, plan, rows))
        for name, n in work.items():
            self.seqs[name]["done"] += n
        return out


def _seqs(slots):
    g = torch.Generator().manual_seed(0)

    def prompt(n):
        return torch.randint(0, 256, (n,), generator=g).tolist()

    # Blocks scattered (and interleaved between sequences) so contexts are gathered.
    tables = [[30, 3, 17, 9, 40, 22, 1], [50, 2, 33, 8, 12, 6, 44], [5, 60, 7, 25, 11, 38, 14],
              [21, 0, 47, 16, 55, 4, 29], [10, 36, 19, 61, 26, 42, 31]]  # fmt: skip
    spec = [("a", "s8", 9), ("b", None, 5), ("c", "s16", 13), ("d", "qv2", 3), ("e", "s4", 6)]
    return {
        name: dict(tokens=prompt(n), slot=slots[a] if a else -1, blocks=tables[i], done=0)
        for i, (name, a, n) in enumerate(spec)
    }


# Steps: fresh prefills; decodes with a later prefill chunk over a cached context; a fresh
# prefill with decodes; then decodes (contexts grow across blocks), with a chunk of 1 token.
PLAN = [
    {"a": 9, "b": 5, "c": 7},
    {"a": 1, "b": 1, "c": 6, "d": 3},
    {"a": 1, "c": 1, "d": 1, "e": 6},
    {"a": 1, "b": 1, "c": 1, "d": 1, "e": 1},
    {"a": 1, "b": 1, "c": 1, "d": 1, "e": 1},
    {"a": 1, "b": 1, "c": 1, "e": 1},
    {"a": 1, "c": 1, "e": 1},
    # Only the q/v adapter and no adapter (the other LoRA layers are skipped), then no adapter.
    {"b": 1, "d": 1},
    {"b": 1},
]


def test_ort_runner_equals_torch_runner_on_mixed_multistep_batches(
    tiny_model_dir, base_info, modules
):
    tr, orr, slots = _runners(tiny_model_dir, base_info, modules)
    assert orr.provider == "CPUExecutionProvider"
    seqs = _seqs(slots)
    dt, do = Driver(tr, seqs), Driver(orr, {k: dict(v) for k, v in seqs.items()})
    base_tr = TorchModelRunner(
        load_model(tiny_model_dir)[0], ExecutorConfig(model_dir=tiny_model_dir), max_batch_size=8
    )
    worst, changed, total = 0.0, 0, 0
    for work in PLAN:
        want = dt.step(work)
        got = do.step(work)
        assert got.shape == want.shape
        worst = max(worst, float((got - want).abs().max()))
        assert torch.equal(got.argmax(-1), want.argmax(-1))
        # Next tokens: the torch runner's greedy ones, fed to both.
        for (name, _), tok in zip(work.items(), want.argmax(-1).tolist(), strict=True):
            for d in (dt, do):
                s = d.seqs[name]
                if s["done"] == len(s["tokens"]):
                    s["tokens"].append(tok)
        # The adapters matter: the same rows without adapters give other argmax tokens.
        nb = Driver(base_tr, {k: dict(v, slot=-1, done=0) for k, v in dt.seqs.items()})
        ids_work = {n: dt.seqs[n]["done"] for n in work}
        base = nb.step(ids_work)
        changed += int((base.argmax(-1) != want.argmax(-1)).sum())
        total += len(work)
    assert worst < 1e-4, worst
    assert changed >= total // 2, (changed, total)
    # The cache stays the truth: both caches hold the same K/V where sequences wrote.
    written = [
        (s["blocks"][p // BLOCK], p % BLOCK) for s in seqs.values() for p in range(s["done"])
    ]
    b, o = torch.tensor(written).T
    for got_c, want_c in ((do.kv.k, dt.kv.k), (do.kv.v, dt.kv.v)):
        got_c, want_c = got_c[:, b, o], want_c[:, b, o]
        assert float(want_c.abs().max()) > 0.1
        # Relative to the cache's scale (strong adapters: values up to ~10).
        assert float((got_c - want_c).abs().max()) < 1e-4 * float(want_c.abs().max())
    print(f"worst logit diff {worst:.2e}, cache scale {float(dt.kv.v.abs().max()):.2f}")


def test_functional_forward_equals_hf_and_the_torch_runner(tiny_model_dir, base_info, modules):
    """OrtForward in torch (the graph before export) against HF eager (base rows) and the torch
    runner (rows with strong adapters of mixed ranks, and none), to 1e-5."""
    tr, orr, slots = _runners(tiny_model_dir, base_info, modules)
    hf, _ = load_model(tiny_model_dir)
    fwd = OrtForward(orr.model, orr.pool.layer_names, orr.pool.page_rows)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (11, 6, 17, 4)]
    names = ["s8", None, "s16", "qv2"]
    ids, pos, tslots, spans = [], [], [], []
    for p, a in zip(prompts, names, strict=True):
        spans.append(SeqSpan(len(ids), len(p), len(p)))
        ids += p
        pos += range(len(p))
        tslots += [slots[a] if a else -1] * len(p)
    batch = ForwardBatch(ids, pos, tslots, AttentionPlan(spans), None)
    inputs = step_inputs(batch, orr.pool, num_layers=2, kv_heads=2, head_dim=16,
                         device=torch.device("cpu"))  # fmt: skip
    inputs.update(pool_inputs(orr.pool))
    from mintmesh.services.executor.ort_export import input_names

    with torch.no_grad():
        got, new_k, _ = fwd(*[inputs[n] for n in input_names(len(orr.pool.layer_names))])
        want = tr.run(batch)
        base = hf(input_ids=torch.tensor([prompts[1]])).logits[0]
    # fp32 rounding, relative to the logits' scale (strong adapters: |logits| up to ~20).
    assert (got - want).abs().max() < 1e-5 + 1e-6 * want.abs().max()
    start = spans[1].q_start
    assert (got[start : start + len(prompts[1])] - base).abs().max() < 1e-5
    assert new_k.shape == (2, len(ids), 2, 16)
    # The adapters change most argmax tokens of their rows.
    with torch.no_grad():
        plain = tr.run(ForwardBatch(ids, pos, [-1] * len(ids), AttentionPlan(spans), None))
    adapted = torch.tensor([s >= 0 for s in tslots])
    differ = (plain.argmax(-1) != want.argmax(-1))[adapted].float().mean()
    assert differ > 0.5, float(differ)


def test_step_inputs_gather_pages_only_where_the_steps_adapters_are(
    tiny_model_dir, base_info, modules
):
    """layer_pages: per LoRA layer, the pages of the widest adapter of the step there; 0 where
    no adapter of the step targets the layer (the graph skips it)."""
    _, orr, slots = _runners(tiny_model_dir, base_info, modules)
    pool = orr.pool

    def pages(names):
        ids = list(range(len(names)))
        tslots = [slots[n] if n else -1 for n in names]
        spans = [SeqSpan(i, 1, 1) for i in ids]
        batch = ForwardBatch(ids, ids, tslots, AttentionPlan(spans), None)
        inp = step_inputs(batch, pool, num_layers=2, kv_heads=2, head_dim=16,
                          device=torch.device("cpu"))  # fmt: skip
        return dict(zip(pool.layer_names, inp["layer_pages"].tolist(), strict=True))

    qv = {n: int(n.endswith(("q_proj", "v_proj"))) for n in pool.layer_names}
    assert pages(["qv2", None]) == qv and 0 in qv.values()
    assert set(pages([None]).values()) == {0}
    wide = -(-16 // pool.page_rows)
    assert set(pages(["s16", "qv2", "s4"]).values()) == {wide}


def test_export_is_cached_by_fingerprint(tiny_model_dir, base_info, tmp_path):
    import shutil

    d = tmp_path / "model"
    shutil.copytree(tiny_model_dir, d, ignore=shutil.ignore_patterns(".onnx"))
    config = ExecutorConfig(model_dir=d)
    runner = TorchModelRunner(load_model(d)[0], config, max_batch_size=4)
    p1, made1 = ensure_export(runner.model, model_dir=d, fingerprint=base_info.fingerprint,
                              pool=runner.pool)  # fmt: skip
    mtime = os.stat(p1).st_mtime_ns
    p2, made2 = ensure_export(runner.model, model_dir=d, fingerprint=base_info.fingerprint,
                              pool=runner.pool)  # fmt: skip
    assert made1 and not made2 and p1 == p2 and os.stat(p2).st_mtime_ns == mtime
    assert p1.parent.parent == d / ".onnx"
    other = dataclasses.replace(base_info, fingerprint="f" * 64).fingerprint
    p3, made3 = ensure_export(runner.model, model_dir=d, fingerprint=other, pool=runner.pool)
    assert made3 and p3 != p1 and p3.is_file() and p1.is_file()
    # Nothing half-written stays behind.
    assert sorted(x.name for x in (d / ".onnx").iterdir()) == sorted([p1.parent.name,
                                                                       p3.parent.name])  # fmt: skip


def test_bench_kernels_onnxruntime_runs_on_the_tiny_backbone(tiny_model_dir, capsys):
    import json

    from mintmesh.bench.kernels import main

    argv = ["--backend", "onnxruntime", "--json", "--preset", "tiny", "--model-dir",
            str(tiny_model_dir), "--ort-batch", "6", "--prompt-len", "12", "--rank", "4",
            "--repeats", "3", "--prefill-repeats", "2", "--max-step-tokens", "48"]  # fmt: skip
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    m = out["metrics"]
    assert out["params"]["runner"] == "onnxruntime"
    assert m["ort_provider"] == "CPUExecutionProvider"
    for key in ("ort_vs_torch_decode", "ort_vs_torch_prefill", "mixed_vs_ort_native"):
        assert 0 < m[f"{key}_min"] <= m[key] <= m[f"{key}_max"], key
    # Same batches: the runners agree (5 significant digits), and the adapters matter.
    assert m["ort_decode_logits_max_abs_diff_vs_torch"] <= 1e-4
    assert m["ort_native_logits_max_abs_diff_vs_mixed"] <= 1e-4
    assert m["decode_logits_max_abs_lora_effect"] > 0.01
    assert m["ort_prefill_tokens"] == 48 and m["ort_batch"] == 6
    # What makes the comparison fair is in the JSON: the torch runner timed with the native
    # kernels it serves with (loaded before timing), both runners at the same thread count,
    # other processes' CPU use during the rounds.
    from mintmesh.kernels import native

    assert m["torch_threads"] == m["ort_intra_op_threads"] == out["params"]["threads"]
    assert m["torch_runner_native_lora"] == (native.unavailable_reason() is None)
    assert m["torch_runner_native_attn"] == (native.unavailable_reason("attn") is None)
    assert m["torch_runner_decode_1thread_ms"] > 0 and isinstance(m["host_contended"], bool)
    assert m["host_other_cpu_cores"] is None or m["host_other_cpu_cores"] >= 0
    assert set(out["targets"]) == {"ort_vs_torch_decode"}
    t = out["targets"]["ort_vs_torch_decode"]
    assert t["value"] == pytest.approx(m["ort_vs_torch_decode"], abs=1e-4)
    assert t["met"] == (t["value"] >= 1.0)


def test_a_huge_adapter_cannot_reach_the_rows_batched_with_it(tiny_model_dir, base_info, modules):
    """Isolation between sequences of one row: an adapter with huge but finite k/v weights
    (K and V up to ~1e31, past the graph's additive mask NEG = -1e30, and overflowing to inf in
    places) prefilled and decoded beside other sequences, its KV in block 0 (where the gathered
    context's padding points). The other rows' logits equal the torch runner's, which attends
    per sequence."""
    digest, mods = modules["s8"]
    kv_leaves = ("k_proj", "v_proj")
    huge = {
        name: dataclasses.replace(w, B=w.B * 1e30) if name.rsplit(".", 1)[-1] in kv_leaves else w
        for name, w in mods.items()
    }
    tr, orr, slots = _runners(tiny_model_dir, base_info, modules)
    for r in (tr, orr):
        slots["huge"] = r.load_adapter("f" * 64, huge)
    g = torch.Generator().manual_seed(1)

    def prompt(n):
        return torch.randint(0, 256, (n,), generator=g).tolist()

    seqs = {
        "x": dict(tokens=prompt(7), slot=slots["huge"], blocks=[0, 13, 27, 41], done=0),
        "a": dict(tokens=prompt(6), slot=slots["s8"], blocks=[5, 6, 18, 33], done=0),
        "b": dict(tokens=prompt(5), slot=-1, blocks=[50, 2, 44, 9], done=0),
        "c": dict(tokens=prompt(9), slot=slots["s16"], blocks=[21, 36, 3, 58], done=0),
    }
    dt, do = Driver(tr, seqs), Driver(orr, {k: dict(v) for k, v in seqs.items()})
    steps = [{"x": 7, "a": 6, "b": 5}, {"x": 1, "a": 1, "b": 1, "c": 9}, {"a": 1, "x": 1, "c": 1}]
    poisoned = False
    for work in steps:
        want, got = dt.step(work), do.step(work)
        names = list(work)
        for i, name in enumerate(names):
            if name == "x":
                continue
            assert torch.isfinite(got[i]).all(), (name, work)
            assert float((got[i] - want[i]).abs().max()) < 1e-4, (name, work)
            assert int(got[i].argmax()) == int(want[i].argmax()), (name, work)
        for name, tok in zip(names, want.argmax(-1).tolist(), strict=True):
            for d in (dt, do):
                s = d.seqs[name]
                if s["done"] == len(s["tokens"]):
                    s["tokens"].append(tok)
        poisoned = poisoned or float(dt.kv.k[:, 0].abs().max()) > 1e29
    # The attack is real: its K/V in the cache are past the additive mask's reach.
    assert poisoned


@pytest.mark.parametrize("which", ["torch", "onnxruntime"])
def test_an_overflowing_adapter_leaves_no_inf_in_the_cache(
    which, tiny_model_dir, base_info, modules
):
    """An adapter whose v values overflow to inf: what reaches the paged cache is finite (the
    cache is read under masks by every sequence that shares a padded gather or reuses a block,
    and 0 x inf is NaN), and a sequence decoding in the same rows keeps the torch runner's
    logits."""
    digest, mods = modules["s8"]
    inf_v = {
        name: dataclasses.replace(w, B=w.B * 3e38) if name.endswith("v_proj") else w
        for name, w in mods.items()
    }
    tr, orr, slots = _runners(tiny_model_dir, base_info, modules)
    runner = tr if which == "torch" else orr
    slot = runner.load_adapter("e" * 64, inf_v)
    ref_slot = tr.load_adapter("e" * 64, inf_v) if which != "torch" else slot
    g = torch.Generator().manual_seed(2)
    seqs = {
        "x": dict(tokens=torch.randint(0, 256, (6,), generator=g).tolist(), slot=slot,
                  blocks=[0, 1, 2], done=0),
        "a": dict(tokens=torch.randint(0, 256, (5,), generator=g).tolist(), slot=slots["s8"],
                  blocks=[7, 8, 9], done=0),
    }  # fmt: skip
    d = Driver(runner, seqs)
    ref = Driver(
        tr, {k: dict(v, slot=ref_slot if k == "x" else v["slot"]) for k, v in seqs.items()}
    )
    for work in ({"x": 6, "a": 5}, {"x": 1, "a": 1}):
        got, want = d.step(work), ref.step(work)
        assert torch.isfinite(d.kv.k).all() and torch.isfinite(d.kv.v).all()
        assert float((got[1] - want[1]).abs().max()) < 1e-4
        for s in (d.seqs, ref.seqs):
            for name in work:
                s[name]["tokens"].append(int(want[list(work).index(name)].argmax()))
