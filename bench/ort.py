"""`mint bench kernels --backend onnxruntime`: the onnxruntime runner against the torch runner as
it serves today, on the same batches, and one mixed ORT run against ORT's own Multi-LoRA API.

- ort_vs_torch_decode: one decode step of `batch` sequences (each its own adapter, rank `rank`
  on q/k/v/o, contexts of prompt_len tokens in the paged cache): TorchModelRunner.run over
  OrtModelRunner.run, the median of paired interleaved rounds (with _min/_max).
- ort_vs_torch_prefill: one step of the engine's prefill (max_step_tokens tokens: fresh prompts
  of prompt_len, each its own adapter), likewise.
- mixed_vs_ort_native: the same decode batch served by ORT's per-run Multi-LoRA API (the pool's
  inputs of the same graph made overridable initializers; each adapter an ort.AdapterFormat
  file, loaded as ort.LoraAdapter and activated with RunOptions.add_active_adapter; one run per
  adapter over its rows) over the one mixed run.

Fairness: the torch runner is timed as it serves, with the native LoRA and attention libraries
loaded (blocking on their build first: load(block=False) would time the torch fallbacks until a
background build lands), its oneDNN-packed Linears, torch's threads; the ORT session gets as many
intra-op threads (torch_threads, ort_intra_op_threads in the JSON). Other processes' CPU use
during the timed rounds is measured (host_other_cpu_cores: /proc/stat's busy time less this
process's CPU time, in cores) because it decides the result on a shared machine: with one of two
cores taken by a neighbour, every oneDNN/OpenMP parallel region of the torch runner (2 threads,
statically split) waits a scheduler slice for its descheduled thread, measured 85 -> 750 ms per
decode step while ORT's work-sharing pool went 190 -> 240 ms. torch_runner_decode_1thread_ms
(the torch runner at one torch thread, same rounds) shows how much of a run's torch time is that.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mintmesh.bench.common import progress

LEAVES = ("q_proj", "k_proj", "v_proj", "o_proj")


def _adapters(shapes, n: int, rank: int) -> list[dict]:
    from mintmesh.bench.kernels import make_adapter_weights

    sub = {k: v for k, v in shapes.items() if k.rsplit(".", 1)[-1] in LEAVES}
    return [make_adapter_weights(sub, rank, seed) for seed in range(n)]


def _batch(kv, seqs, *, decode: bool):
    """ForwardBatch of seqs [(tokens, slot, blocks)]: each one decode token after its prompt,
    or each whole prompt fresh."""
    from mintmesh.services.executor.kv import AttentionPlan, SeqSpan
    from mintmesh.services.executor.runner import ForwardBatch

    ids, pos, slots, spans, rows = [], [], [], [], []
    for toks, slot, blocks in seqs:
        if decode:
            n, c = 1, len(toks)
            ids.append(toks[-1] if toks else 1)
        else:
            n, c = len(toks), 0
            ids += toks
        spans.append(SeqSpan(len(pos), n, c + n, blocks))
        pos += range(c, c + n)
        slots += [slot] * n
        rows.append(len(pos) - 1)
    return ForwardBatch(ids, pos, slots, AttentionPlan(spans, kv), rows)


def _native_session(runner, tmp: Path):
    """The runner's graph with the pool's inputs made overridable initializers (empty
    defaults), as ORT's Multi-LoRA API expects."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    m = onnx.load(str(runner.path))
    names = {"page_table", "ranks", "scales"} | {
        i.name for i in m.graph.input if i.name.startswith(("a_pages.", "b_pages."))
    }
    for inp in m.graph.input:
        if inp.name in names:
            dims = [d.dim_value if d.dim_value else 0 for d in inp.type.tensor_type.shape.dim]
            if inp.name == "page_table":
                arr = np.zeros([0, dims[1] or 1], np.int32)
            elif inp.name in ("ranks", "scales"):
                arr = np.zeros([dims[0], 0], np.int32 if inp.name == "ranks" else np.float32)
            else:
                arr = np.zeros([0] + dims[1:], np.float32)
            m.graph.initializer.append(numpy_helper.from_array(arr, inp.name))
    path = tmp / "native.onnx"
    onnx.save(m, str(path))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    # No spinning threads after a run: on shared CPUs they take the cores from the step's
    # other work (the sampler, the torch runner in a benchmark's interleaved rounds).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _adapter_file(runner, slot: int, path: Path):
    """One adapter of the pool as an .onnx_adapter file: its pages only, at slot 0."""
    import onnxruntime as ort

    pool = runner.pool
    res = pool.resident_at(slot)
    pages = torch.tensor(res.pages)
    params = {
        "page_table": torch.arange(pool.max_pages_per_adapter, dtype=torch.int32)[None]
        .clamp(max=len(res.pages) - 1)
        .numpy(),
        "ranks": pool.ranks[:, slot : slot + 1].contiguous().numpy(),
        "scales": pool.scales[:, slot : slot + 1].contiguous().numpy(),
    }
    for i in range(len(pool.layer_names)):
        params[f"a_pages.{i}"] = pool.a_pages[i].index_select(0, pages).numpy()
        params[f"b_pages.{i}"] = pool.b_pages[i].index_select(0, pages).numpy()
    af = ort.AdapterFormat()
    af.set_adapter_version(1)
    af.set_model_version(1)
    af.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in params.items()})
    af.export_adapter(str(path))
    la = ort.LoraAdapter()
    la.Load(str(path))
    return la


def _host_busy_s() -> float | None:
    """Seconds of CPU the whole host spent busy (all processes, /proc/stat), or None."""
    import os

    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # less idle and iowait


class _OtherCpu:
    """Other processes' CPU use (cores) over a stretch of wall time: the host's busy time less
    this process's own CPU time (all its threads)."""

    def __enter__(self):
        self.host, self.own, self.wall = _host_busy_s(), time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        host = _host_busy_s()
        wall = time.perf_counter() - self.wall
        self.cores = None
        if host is not None and self.host is not None and wall > 0:
            other = (host - self.host) - (time.process_time() - self.own)
            self.cores = max(0.0, other / wall)


def run_ort(args, model_dir: Path) -> dict:
    import onnxruntime as ort

    from mintmesh.kernels import native as native_libs
    from mintmesh.kernels.settings import SETTINGS
    from mintmesh.model import base_model_info, load_model
    from mintmesh.services.executor.config import ExecutorConfig
    from mintmesh.services.executor.kv import PagedKVCache
    from mintmesh.services.executor.ort_export import OUTPUT_NAMES
    from mintmesh.services.executor.ort_runner import OrtModelRunner, step_inputs
    from mintmesh.services.executor.torch_runner import TorchModelRunner

    B, L, rank = int(args.ort_batch), int(args.prompt_len), int(args.rank)
    step_tokens = int(args.max_step_tokens)
    info = base_model_info(model_dir)
    cfg = ExecutorConfig(model_dir=model_dir, max_adapters=B, max_rank=max(rank, 8),
                         max_batch_size=B, dense_kernels=args.dense)  # fmt: skip
    # The torch runner as it serves: its native kernels loaded, not the fallbacks that serve
    # while a background build runs (load(block=False) until it lands).
    if SETTINGS.native:
        progress("onnxruntime: loading the native LoRA and attention libraries (built if missing)")
        native_libs.load(block=True)
        native_libs.load_attn(block=True)
    threads = torch.get_num_threads()
    progress("onnxruntime: loading both runners (the export is cached beside the model)")
    t0 = time.perf_counter()
    tr = TorchModelRunner(load_model(model_dir)[0], cfg, max_batch_size=B)
    # As many ORT intra-op threads as torch has.
    orr = OrtModelRunner(load_model(model_dir)[0], cfg, max_batch_size=B,
                         fingerprint=info.fingerprint, threads=threads)  # fmt: skip
    load_s = time.perf_counter() - t0
    ads = _adapters(tr.layer_shapes, B, rank)
    slots = []
    for i, a in enumerate(ads):
        slots.append(tr.load_adapter(f"a{i}", a))
        assert orr.load_adapter(f"a{i}", a) == slots[-1]
    mc = tr.model.config
    bs = 16
    nb = -(-(L + 2) // bs)
    g = torch.Generator().manual_seed(int(args.seed))
    prompts = [torch.randint(3, 250, (L,), generator=g).tolist() for _ in range(B)]

    def cache():
        return PagedKVCache.for_model(
            mc, max_bytes=(B * nb + 1) * PagedKVCache.block_nbytes(mc, bs, torch.float32),
            block_size=bs, device="cpu", dtype=torch.float32,
        )  # fmt: skip

    kvs = {"torch": cache(), "ort": cache()}
    seqs = [(p, s, list(range(i * nb, (i + 1) * nb))) for i, (p, s) in
            enumerate(zip(prompts, slots, strict=True))]  # fmt: skip
    runners = {"torch": tr, "ort": orr}
    # Fill both caches: every prompt prefilled (in engine-sized steps).
    per_step = max(1, step_tokens // L)
    for name, r in runners.items():
        for i in range(0, B, per_step):
            r.run(_batch(kvs[name], seqs[i : i + per_step], decode=False))
    dec = {n: _batch(kvs[n], [(p + [p[-1]], s, b) for p, s, b in seqs], decode=True)
           for n in runners}  # fmt: skip
    pre_seqs = seqs[:per_step]
    pre = {n: _batch(kvs[n], pre_seqs, decode=False) for n in runners}
    with torch.inference_mode():
        want, got = tr.run(dec["torch"]), orr.run(dec["ort"])
        diff = float((want - got).abs().max())
        lora_effect = float((want - tr.run(_batch(kvs["torch"], [(p + [p[-1]], -1, b)
                            for p, _, b in seqs], decode=True))).abs().max())  # fmt: skip

    def timed(fn) -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    # ORT's own Multi-LoRA API: one run per adapter over its rows (decode).
    tmp = Path(tempfile.mkdtemp(prefix="mint-ort-native-"))
    native = _native_session(orr, tmp)
    groups = []
    for i, (p, s, b) in enumerate(seqs):
        fb = _batch(kvs["ort"], [(p + [p[-1]], 0, b)], decode=True)
        inp = step_inputs(fb, orr.pool, num_layers=orr.num_layers, kv_heads=orr.kv_heads,
                          head_dim=orr.head_dim, device=torch.device("cpu"))  # fmt: skip
        feeds = {k: v.numpy() for k, v in inp.items()}
        ro = ort.RunOptions()
        la = _adapter_file(orr, s, tmp / f"a{i}.onnx_adapter")
        ro.add_active_adapter(la)
        groups.append((feeds, ro, la))  # RunOptions does not keep the adapter alive

    def native_decode():
        for feeds, ro, _ in groups:
            native.run(OUTPUT_NAMES[:1], feeds, ro)

    native_logits = native.run(OUTPUT_NAMES[:1], groups[0][0], groups[0][1])[0]
    with torch.inference_mode():
        native_diff = float(np.abs(native_logits[0] - orr.run(dec["ort"])[0].numpy()).max())

    def one_thread(fn):
        torch.set_num_threads(1)
        try:
            return fn()
        finally:
            torch.set_num_threads(threads)

    res: dict[str, list[float]] = {k: [] for k in ("td", "od", "nd", "tp", "op", "t1")}
    other: list[float] = []
    for rnd in range(int(args.repeats)):
        with _OtherCpu() as oc, torch.inference_mode():
            res["td"].append(timed(lambda: tr.run(dec["torch"])))
            res["od"].append(timed(lambda: orr.run(dec["ort"])))
            res["nd"].append(timed(native_decode))
            res["t1"].append(one_thread(lambda: timed(lambda: tr.run(dec["torch"]))))
            if rnd < int(args.prefill_repeats):
                res["tp"].append(timed(lambda: tr.run(pre["torch"])))
                res["op"].append(timed(lambda: orr.run(pre["ort"])))
        if oc.cores is not None:
            other.append(oc.cores)
        ms = {k: v[-1] * 1e3 for k, v in res.items() if v}
        busy = f", other processes {oc.cores:.2f} cores" if oc.cores is not None else ""
        progress(f"  round {rnd}: decode torch {ms['td']:.1f} ms ({ms['t1']:.1f} ms at 1 thread), "
                 f"ort {ms['od']:.1f} ms, ort native {ms['nd']:.1f} ms{busy}")  # fmt: skip
    contended = bool(other) and statistics.median(other) >= 0.25
    if contended:
        progress(
            f"onnxruntime: other processes took {statistics.median(other):.2f} of "
            f"{len(os.sched_getaffinity(0))} cores during the rounds: the torch runner's OpenMP "
            "regions stall on a shared machine, the ratios are not its serving speed"
        )

    def paired(num: str, den: str) -> dict:
        r = [a / b for a, b in zip(res[num], res[den], strict=True)]
        return {"": statistics.median(r), "_min": min(r), "_max": max(r)}

    out: dict = {
        "ort_provider": orr.provider,
        "torch_threads": threads,
        "ort_intra_op_threads": threads,
        "torch_runner_dense_kernels": tr.dense_kernels,
        "torch_runner_native_lora": native_libs.load(block=False) is not None,
        "torch_runner_native_attn": dec["torch"].plan.native is not None,
        "torch_runner_lora_threads": SETTINGS.lora_threads,
        "torch_runner_attn_threads": SETTINGS.attn_threads,
        "host_cores": len(os.sched_getaffinity(0)),
        "host_other_cpu_cores": statistics.median(other) if other else None,
        "host_other_cpu_cores_max": max(other) if other else None,
        "host_contended": contended,
        "ort_load_s": load_s,
        "ort_batch": B,
        "ort_prefill_tokens": len(pre["ort"].token_ids),
        "ort_decode_logits_max_abs_diff_vs_torch": diff,
        "decode_logits_max_abs_lora_effect": lora_effect,
        "ort_native_logits_max_abs_diff_vs_mixed": native_diff,
        "torch_runner_decode_ms": statistics.median(res["td"]) * 1e3,
        "torch_runner_decode_1thread_ms": statistics.median(res["t1"]) * 1e3,
        "ort_runner_decode_ms": statistics.median(res["od"]) * 1e3,
        "ort_native_decode_ms": statistics.median(res["nd"]) * 1e3,
        "torch_runner_prefill_ms": statistics.median(res["tp"]) * 1e3,
        "ort_runner_prefill_ms": statistics.median(res["op"]) * 1e3,
    }
    for key, (num, den) in {
        "ort_vs_torch_decode": ("td", "od"),
        "ort_vs_torch_prefill": ("tp", "op"),
        "mixed_vs_ort_native": ("nd", "od"),
        "torch_1thread_vs_torch_decode": ("td", "t1"),
    }.items():
        for suf, v in paired(num, den).items():
            out[key + suf] = v
    return out
