"""`mint bench train`: training on the resident backbone, side by side with peft, in one process.

On the small backbone (~170M parameters, cached under ~/.cache/mintmesh/small or --model-dir),
one Engine (the executor's core, the backbone resident, packed Linears) and one peft model on
its own copy of the same weights:

- batched_vs_serial: --runs runs (one --seq-len-token sequence each, cross_entropy, AdamW) per
  step: ours is one Trainer.forward_backward with every run's call in one pass plus each run's
  optim_step; peft trains the same runs one after another (set_adapter, forward, backward,
  AdamW step). Paired, interleaved repeats (ours, peft, ours, peft, ...); the metric is the
  median over pairs of peft's step time over ours (target >= 1.5).
- train_tokens_per_s: the tokens of one batched step over its median time.
- handoff_vs_peft: from the save call until the new weights serve where their requests go:
  ours = what the executor's SaveRunWeights does: the run packed straight from its weights
  (the store's bytes and digest for its PEFT files, checked each time) written straight into
  the host tier, hashed there and loaded into free device room (TrainingRun.install); peft =
  save_pretrained of the adapter + load_adapter into a serving PeftModel. The first token's
  compute is the same for both and is reported apart (first_token_ms_*). Median over paired
  repeats of peft's time over ours (target >= 10; MinT reports 18.3x for its adapter-only
  handoff). In one process: the store's network hop and the node cache's fetch are not in it.
- serve_itl_p99_ratio: the p99 inter-token latency of a served greedy stream while a run trains
  (a thread looping forward_backward + optim_step) over the same stream without training,
  paired (target <= 1.5). Training runs in micro-batches of training_micro_tokens, a serving
  step between two of them, and within one the forward/backward lets a serving step run at the
  first layer boundary after training_slice_ms (--slice-ms); train_yields counts those.

Progress on stderr; the last stdout line is one JSON object
{"bench": "train", "device", "params", "metrics", "targets"}.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from mintmesh.bench.common import ensure_model, gemm_peak, percentile

TARGETS = {
    "batched_vs_serial": (">=", 1.5),
    "handoff_vs_peft": (">=", 10.0),
    "serve_itl_p99_ratio": ("<=", 1.5),
}


def _progress(msg: str) -> None:
    print(f"[bench train] {msg}", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mint bench train", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--model-dir", type=Path)
    p.add_argument("--runs", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--handoff-repeats", type=int, default=5)
    p.add_argument("--serve-tokens", type=int, default=64)
    p.add_argument("--micro-tokens", type=int, default=64)
    p.add_argument("--slice-ms", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    return p


def _paired(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """median, min, max of b[i] / a[i]."""
    r = [y / x for x, y in zip(a, b, strict=True)]
    return statistics.median(r), min(r), max(r)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _step_flops(model, runs: int, seq_len: int, rank: int, targets) -> float:
    """Model FLOPs of one training step (every run's sequence): every Linear of the backbone
    (the LM head included) forward and its input gradient (the base is frozen: no weight
    gradient), the LoRA ops (forward, dX, dA, dB) on the targeted ones, and causal attention
    (QK^T and PV, forward and backward)."""
    from torch import nn

    from mintmesh.kernels.dense import PackedLinear

    tokens = runs * seq_len
    total = 0.0
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear | PackedLinear):
            fi, fo = m.in_features, m.out_features
            total += 2 * 2 * fi * fo * tokens
            if name.rsplit(".", 1)[-1] in targets or name.endswith(
                tuple(f"{t}.base_layer" for t in targets)
            ):
                total += 3 * 2 * rank * (fi + fo) * tokens
    cfg = model.config
    heads_dim = cfg.num_attention_heads * (cfg.hidden_size // cfg.num_attention_heads)
    # per token: QK^T + PV over (on average) seq_len / 2 keys, forward; backward twice that
    total += 3 * 2 * 2 * (seq_len / 2) * heads_dim * cfg.num_hidden_layers * tokens
    return total


def _run(args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    from mintmesh.model import base_model_info, load_model
    from mintmesh.peft_io import validate_and_pack
    from mintmesh.services.executor.config import ExecutorConfig
    from mintmesh.services.executor.engine import Engine, GenerationRequest
    from mintmesh.services.executor.sampling import SamplingOptions
    from mintmesh.services.executor.sources import PackedBytesSource
    from mintmesh.services.executor.training import AdamParams, Datum, LoraSpec

    torch.set_num_threads(args.threads)
    model_dir = ensure_model(args.preset, args.model_dir)
    base = base_model_info(model_dir)
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    source = PackedBytesSource()
    eng = Engine.from_config(
        ExecutorConfig(
            model_dir=model_dir,
            max_batch_size=8,
            training_micro_tokens=args.micro_tokens,
            training_slice_ms=args.slice_ms,
        ),
        source=source,
    )
    q = eng.training()
    tr = q.trainer
    g = torch.Generator().manual_seed(args.seed)
    vocab = eng.vocab_size
    data = []
    for _ in range(args.runs):
        toks = torch.randint(0, min(vocab, 32000), (args.seq_len + 1,), generator=g).tolist()
        data.append(Datum(toks[:-1], toks[1:], [1.0] * args.seq_len))
    alpha = 2.0 * args.rank
    spec = LoraSpec(args.rank, alpha, targets)
    for i in range(args.runs):
        tr.create_run(f"r{i}", "bench", spec, seed=i)
    adam = AdamParams(learning_rate=1e-4)

    def ours_work():
        tr.forward_backward([(f"r{i}", [data[i]], "cross_entropy", None) for i in range(args.runs)])
        for i in range(args.runs):  # as the executor's OptimStep: under the model lock
            run = tr.run(f"r{i}")
            with tr.quiet(run):
                run.optim_step(adam)

    # On a thread of its own, as the executor's training worker runs it, and peft's steps on
    # the same thread: glibc serves a thread's large blocks from an arena of its own, where
    # the main thread's are mmapped and unmapped, and faulted in again, every step (ours: 2.3-
    # 2.6 s a step on the main thread, 1.8-1.9 s on a thread).
    trainer_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mint-training")

    def ours_step():
        trainer_thread.submit(ours_work).result()

    _progress(f"peft: {args.runs} adapters on a copy of the {args.preset} backbone")
    pbase, _ = load_model(model_dir)
    cfg = LoraConfig(r=args.rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0)
    pm = get_peft_model(pbase, cfg, adapter_name="a0")
    for i in range(1, args.runs):
        pm.add_adapter(f"a{i}", cfg)
    opts = []
    for i in range(args.runs):
        ps = [p for n, p in pm.named_parameters() if f".a{i}." in n and "lora_" in n]
        opts.append(torch.optim.AdamW(ps, lr=1e-4, betas=(0.9, 0.95), eps=1e-12, foreach=False))

    def peft_step():
        trainer_thread.submit(peft_work).result()

    def peft_work():
        for i in range(args.runs):
            pm.set_adapter(f"a{i}")
            x = torch.tensor([data[i].input_ids])
            lp = torch.log_softmax(pm(input_ids=x).logits[0].float(), -1)
            loss = -lp.gather(1, torch.tensor(data[i].target_tokens)[:, None]).sum()
            loss.backward()
            opts[i].step()
            opts[i].zero_grad(set_to_none=True)

    flops = _step_flops(eng.model, args.runs, args.seq_len, args.rank, targets)
    peak = gemm_peak()
    _progress(f"a step is {flops / 1e9:.1f} GFLOP; this CPU's GEMM peak {peak / 1e9:.1f} GFLOP/s")
    ours_step(), peft_step()  # warm-up
    ours_t, peft_t = [], []
    for rep in range(args.repeats):
        ours_t.append(_timed(ours_step))
        peft_t.append(_timed(peft_step))
        _progress(f"step {rep + 1}/{args.repeats}: ours {ours_t[-1]:.3f}s, peft {peft_t[-1]:.3f}s")
    bvs = _paired(ours_t, peft_t)

    # -- handoff -------------------------------------------------------------------------------
    _progress("handoff: save -> serving")
    serving, _ = load_model(model_dir)
    from peft import PeftModel

    tmp = Path(tempfile.mkdtemp(prefix="mint-bench-train-"))
    pm.set_adapter("a0")
    pm.save_pretrained(tmp / "seed", selected_adapters=["a0"])
    serving = PeftModel.from_pretrained(serving, str(tmp / "seed" / "a0"), adapter_name="seed")
    run0 = tr.run("r0")

    def ours_handoff() -> str:
        # What the executor's SaveRunWeights does: the run packed straight from its weights
        # (the store's bytes and digest for its PEFT files, checked below) and installed into
        # the host tier and the device pool, resident before the store has committed it.
        digest, resident = run0.install(eng)
        assert resident, "no free device room for the handoff"
        return digest

    ours_h, peft_h, first_ours, first_peft = [], [], [], []
    for rep in range(args.handoff_repeats):
        ours_step()  # new weights: a new digest every time
        t0 = time.perf_counter()
        digest = ours_handoff()
        ours_h.append(time.perf_counter() - t0)
        cfg_json, weights = run0.peft_bytes()  # the store's pack of the same run: same digest
        store_side = validate_and_pack(cfg_json, weights, base, max_rank=eng.residency.max_rank)
        assert store_side.digest == digest, "the executor's pack differs from the store's"
        first_ours.append(_timed(lambda d=digest: eng.forward([(d, [1, 2, 3, 4])])))
        name = f"h{rep}"
        t0 = time.perf_counter()
        pm.save_pretrained(tmp / name, selected_adapters=["a0"])
        serving.load_adapter(str(tmp / name / "a0"), adapter_name=name)
        peft_h.append(time.perf_counter() - t0)
        serving.set_adapter(name)
        with torch.no_grad():
            first_peft.append(_timed(lambda: serving(input_ids=torch.tensor([[1, 2, 3, 4]]))))
        _progress(
            f"handoff {rep + 1}: ours {ours_h[-1] * 1e3:.1f} ms, peft {peft_h[-1] * 1e3:.1f} ms"
        )
    hvp = _paired(ours_h, peft_h)

    # -- serving while training ----------------------------------------------------------------
    prompt = data[0].input_ids[:16]

    def stream() -> list[float]:
        h = eng.submit(
            GenerationRequest(
                prompt_token_ids=prompt,
                sampling=SamplingOptions(max_tokens=args.serve_tokens, ignore_eos=True),
            )
        )
        times = []
        for _ in h:
            times.append(time.perf_counter())
        return [b - a for a, b in zip(times, times[1:], strict=False)]

    def stream_while_training() -> tuple[list[float], int]:
        stop, steps = threading.Event(), [0]

        def train():
            while not stop.is_set():
                ours_step()
                steps[0] += 1

        th = threading.Thread(target=train)
        th.start()
        try:
            return stream(), steps
        finally:
            stop.set()
            th.join()

    stream()  # warm-up
    alone, along, train_steps = [], [], []
    for rep in range(args.repeats):
        alone.append(percentile(stream(), 0.99))
        gaps, steps = stream_while_training()
        along.append(percentile(gaps, 0.99))
        train_steps.append(steps[0])
        _progress(
            f"ITL p99 {rep + 1}: alone {alone[-1] * 1e3:.1f} ms, training {along[-1] * 1e3:.1f} ms"
        )
    itl = _paired(alone, along)
    trainer_thread.shutdown()
    eng.close()
    ms = lambda xs: round(statistics.median(xs) * 1e3, 3)  # noqa: E731
    return {
        "ours_step_s": round(statistics.median(ours_t), 4),
        "peft_serial_step_s": round(statistics.median(peft_t), 4),
        "batched_vs_serial": round(bvs[0], 4),
        "batched_vs_serial_min": round(bvs[1], 4),
        "batched_vs_serial_max": round(bvs[2], 4),
        "train_tokens_per_s": round(args.runs * args.seq_len / statistics.median(ours_t), 1),
        # The bound: both sides do the same FLOPs, so ours can beat peft by at most the GEMM
        # peak over peft's rate (ours at 100% of the peak).
        "step_gflop": round(flops / 1e9, 2),
        "gemm_peak_gflop_s": round(peak / 1e9, 2),
        "ours_gemm_fraction": round(flops / statistics.median(ours_t) / peak, 3),
        "peft_gemm_fraction": round(flops / statistics.median(peft_t) / peak, 3),
        "batched_vs_serial_bound": round(statistics.median(peft_t) * peak / flops, 3),
        "handoff_ours_ms": ms(ours_h),
        "handoff_peft_ms": ms(peft_h),
        "handoff_vs_peft": round(hvp[0], 3),
        "handoff_vs_peft_min": round(hvp[1], 3),
        "handoff_vs_peft_max": round(hvp[2], 3),
        "first_token_ms_ours": ms(first_ours),
        "first_token_ms_peft": ms(first_peft),
        "serve_itl_p99_alone_ms": ms(alone),
        "serve_itl_p99_training_ms": ms(along),
        "serve_itl_p99_ratio": round(itl[0], 3),
        "serve_itl_p99_ratio_min": round(itl[1], 3),
        "serve_itl_p99_ratio_max": round(itl[2], 3),
        "train_steps_while_serving": train_steps,
        "train_yields": tr.yields,
        # The longest the training held the model before letting a serving step in: its
        # longest op between two yield points (the LM head's backward: its packed weight
        # unpacked, then the GEMM) bounds the inter-token gap it adds.
        "train_longest_slice_ms": round(tr.longest_slice_s * 1e3, 1),
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    load0 = round(os.getloadavg()[0], 2)
    metrics = _run(args)
    params = {k: v for k, v in vars(args).items() if k not in ("json", "model_dir")}
    params.update(loadavg_1m_start=load0, loadavg_1m_end=round(os.getloadavg()[0], 2),
                  wall_s=round(time.perf_counter() - t0, 1))  # fmt: skip
    targets = {}
    for name, (op, thr) in TARGETS.items():
        v = metrics[name]
        met = v >= thr if op == ">=" else v <= thr
        targets[name] = {"target": f"{op} {thr}", "value": v, "met": met}
    out = {"bench": "train", "device": "cpu", "params": params, "metrics": metrics,
           "targets": targets}  # fmt: skip
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in metrics.items():
            print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
