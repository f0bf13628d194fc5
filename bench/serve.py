"""`mint bench serve`: the serving engine end to end at its capacity, against peft serving serially.

A local cluster (store, one cache sidecar + executor, router, no HTTP gateway:
mintmesh.cluster.LocalCluster with executors=1) on the small backbone (~170M parameters, cached
under ~/.cache/mintmesh/small or --model-dir), its executor on --backend's model runner (torch or
onnxruntime; params.runner is what the executor's Status names). The requests: --requests
generation requests
(prompt lengths uniform in [--prompt-min, --prompt-max] tokens, output lengths uniform in
[--out-min, --out-max], greedy, exact lengths via ignore_eos), fixed by --seed. For each N in
--adapters (default 1 and 1000) each request runs on one of a separate set of N distinct rank-16
q/v adapters (mintmesh.synth; a fixed uniform draw per request, so the lengths are the same for
every N and only the adapters differ); only the adapters the requests use are pushed (R requests
use at most R of the N) and each is loaded once (a 1-token request) before the rounds: cold
loads are `mint bench cold-load`'s, these rounds measure serving. The same requests run in every
round and sweep point, so the executor runs without prefix caching (a repeat would hit it).

Capacity (saturated), --rounds paired rounds, interleaved: in each round, for each N this
machine's GEMM peak and read bandwidth (mintmesh.bench.common.gemm_peak, measure_read_bandwidth,
with --threads threads; measured again before peft's turn, the round's best counts) and then
every request submitted at once (ours: tokens/s = generated tokens
over first send to last token; requests/s likewise), then peft serving the first --peft-requests
of the same requests one at a time in this process on the largest N's adapters (set_adapter,
greedy generate of exactly the output length; its tokens/s over its serial time). Reported:
medians over rounds with _min/_max:

- tokens_per_s_N, requests_per_s_N (the capacity), model_gflop_s_N; peft_serial_tokens_per_s;
- tps_HI_vs_LO_saturated: the largest N's tokens/s over the smallest N's, the median of the
  per-round ratios; also under the literal name tps_1000_vs_1_saturated when N = 1 and N = 1000
  both run (target >= 0.95; S-LoRA reports 0.95 with 2,000 adapters);
- vs_peft_serial_saturated: ours at the largest N over peft, the median of the per-round ratios.

Model FLOPs (implementation-independent, what every engine must compute for these requests): per
token forwarded through the layers (a request's prompt and its outputs but the last),
2 FLOP per weight of every decoder Linear plus 2 per LoRA weight of the request's adapter plus
causal attention (QK^T and PV: 4 * (position + 1) * heads * head_dim per layer); per generated
token, 2 FLOP per LM-head weight (logits only for the rows sampled). Norms, rotary, softmax and
sampling are not counted. gemm_roofline_fraction = model FLOPs/s at capacity (the largest N's
model_gflop_s) over gemm_peak_gflop_s (target >= 0.8); the peak and the bandwidth are the best of
the run's measurements. Its physical bound, gemm_roofline_fraction_bound: the requests' model
FLOPs at the peak over the least time a layer-by-layer forward needs for them (Costs.
batched_least_s: all FLOPs at the peak, except that a decode token's attention takes at least
the bytes of its context's K and V over the read bandwidth: it reads them once per layer and
shares them with no other sequence; weight reads are left out, so the bound is optimistic);
gemm_roofline_fraction_of_bound = gemm_roofline_fraction / gemm_roofline_fraction_bound.

Where that time goes, per round at the largest N, from the executor's /metrics around each
capacity run (its step seconds and step work counters by kind: prefill, a step that computed
prompt tokens, maybe beside decodes; decode, one that only decoded):
{prefill,decode}_steps_time_share (those steps' seconds over the makespan; the rest is outside
steps: empty steps, requests in transit), {prefill,decode}_steps_gemm_fraction (the model
FLOPs those steps computed, counted as above from their tokens, sampled tokens and attention
keys, per second of them, over the peak), decode_steps_gemm_fraction_bound (the decode steps'
FLOPs at the peak over their least time, as batched_least_s counts it),
{prefill,decode}_steps_mean_tokens (tokens forwarded per step of the kind: how full those
steps were; a decode step forwards one token per sequence), steps_flops_vs_requests (the steps'
FLOPs over the requests': 1 when nothing was computed twice, above after preemptions).
With more requests than --max-batch-size, the saturated window: from the first send until the
last request gets its first token and the executor's counters are then read (until the last
admission some request waits for a batch slot, so the engine, not the offered load, sets the
pace; after it the batch drains as the last requests finish, which a finite burst must end
with): saturated_time_share (the window over the makespan), saturated_gflop (the model FLOPs of
the steps begun by the read, counted as above, the one running then waited for) and
saturated_gemm_fraction (those FLOPs per second of the window over the peak: the engine's
FLOPs/s at capacity without the burst's drain), and by step kind within the window
saturated_{prefill,decode}_steps_{time_share,gemm_fraction,mean_tokens} (as above, over the
window: how full its decode steps ran with requests waiting). Not reported when every request
fits a batch, nor for a round where a request failed before its first token.

The bound on vs_peft_serial_saturated (what batching can win at most on this machine), from the
same measurements: a forward pass takes at least max(its FLOPs / GEMM peak, the bytes it must read
/ read bandwidth). peft serial runs batch 1: each request's prefill, then one forward per further
output token, each reading every weight (fp32 Linears + the adapter's LoRA weights) and the KV
cache so far: peft_roofline_tokens_per_s = its generated tokens over the sum of those maxima. Ours
at capacity batches every request, so weight reads are shared and at best it computes at the GEMM
peak: ours_roofline_tokens_per_s = generated tokens / (model FLOPs / peak) (its byte bound is left
out: optimistic for ours). vs_peft_serial_bound = ours_roofline_tokens_per_s /
peft_roofline_tokens_per_s, and vs_peft_serial_saturated = vs_peft_serial_bound *
gemm_roofline_fraction / peft_roofline_fraction (peft's tokens/s over its roofline; equal with
one round, medians otherwise); vs_peft_serial_fraction_of_bound = vs_peft_serial_saturated /
vs_peft_serial_bound; vs_peft_serial_ceiling = ours_roofline_tokens_per_s over peft's measured
tokens/s (the most ours at the full GEMM peak could show against this peft). Each round's own
figures are in metrics["rounds"].

Sweep: the largest N at 25/50/75/100% of its measured capacity (requests/s): --sweep-requests of
the same requests with Poisson arrivals (one fixed draw of gaps, scaled to the rate), TTFT
(send to first token) and inter-token latency p50/p99 (nearest rank) at each point, in
metrics["sweep"] (offered_fraction increasing). --plot PATH.png draws them against the offered
load (matplotlib, Agg backend).

Progress goes to stderr; the last stdout line is one JSON object
{"bench": "serve", "device", "params", "metrics", "targets"}.
    python -m mintmesh.bench.serve --json [--model-dir DIR] [--requests 96] [--rounds 3]
        [--plot serve.png]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from mintmesh.bench.common import (
    ensure_model,
    gemm_peak,
    measure_read_bandwidth,
    percentile,
)

logger = logging.getLogger(__name__)

RANK = 16
LORA_TARGETS = ("q_proj", "v_proj")  # mintmesh.synth's default
SWEEP_FRACTIONS = (0.25, 0.5, 0.75, 1.0)
# Per round at the largest N, from the executor's step counters (module docstring).
STEP_KEYS = (
    "prefill_steps_time_share",
    "decode_steps_time_share",
    "prefill_steps_gemm_fraction",
    "decode_steps_gemm_fraction",
    "decode_steps_gemm_fraction_bound",
    "prefill_steps_mean_tokens",
    "decode_steps_mean_tokens",
    "steps_flops_vs_requests",
    "saturated_time_share",
    "saturated_gflop",
    "saturated_gemm_fraction",
    *(
        f"saturated_{kind}_steps_{what}"
        for kind in ("prefill", "decode")
        for what in ("time_share", "gemm_fraction", "mean_tokens")
    ),
)
TARGETS = {"tps_1000_vs_1_saturated": (">=", 0.95), "gemm_roofline_fraction": (">=", 0.8)}


def _progress(msg: str) -> None:
    print(f"[bench serve] {msg}", file=sys.stderr, flush=True)


@dataclass
class Job:
    at: float  # Poisson arrival at rate 1/s (scaled to the offered rate); 0 at capacity
    prompt: list[int]
    out_len: int
    adapter: int  # index into the N adapters (mod N)


@dataclass
class Outcome:
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0
    end: float = 0.0
    error: str = ""


def make_jobs(n: int, seed: int, prompt_range, out_range) -> list[Job]:
    rng = random.Random(seed)
    t = 0.0
    jobs = []
    for _ in range(n):
        t += rng.expovariate(1.0)
        plen = rng.randint(*prompt_range)
        jobs.append(
            Job(
                at=t,
                prompt=[rng.randrange(256) for _ in range(plen)],
                out_len=rng.randint(*out_range),
                adapter=rng.getrandbits(32),
            )
        )
    return jobs


def at_rate(jobs: list[Job], rate: float | None) -> list[Job]:
    """The jobs arriving at `rate` per second (None: all at once)."""
    return [Job(0.0 if rate is None else j.at / rate, j.prompt, j.out_len, j.adapter) for j in jobs]


def adapter_name(n: int, i: int) -> str:
    # One tenant per adapter: fairness treats them as the personal models they stand for.
    return f"bench-n{n}-u{i}/lora"


def adapter_seed(n: int, i: int) -> int:
    return n * 1_000_003 + i


def push_adapters(client, info, n: int, used: list[int]) -> None:
    from mintmesh.synth import synth_peft_bytes

    def one(i: int) -> None:
        cfg, data = synth_peft_bytes(info, rank=RANK, seed=adapter_seed(n, i))
        client.push_adapter_bytes(adapter_name(n, i), cfg, data, timeout=120)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, used))


def run_stream(
    client, jobs: list[Job], n: int, on_all_started: Callable[[float], None] | None = None
) -> tuple[list[Outcome], float]:
    """Send every job at its arrival time (one thread each); (outcomes, makespan).
    on_all_started(seconds since the first send) runs at most once, on a thread of its own (the
    streams go on being read), as the last job to get a first token gets it: from then on no
    request waits to be admitted. Never, when a job fails before its first token."""
    from mintmesh.client import sampling_params

    outcomes = [Outcome() for _ in jobs]
    started = [0]
    lock = threading.Lock()
    watchers: list[threading.Thread] = []
    t0 = time.perf_counter()

    def first_token(now: float) -> None:
        with lock:
            started[0] += 1
            last = started[0] == len(jobs)
        if last and on_all_started is not None:
            w = threading.Thread(target=on_all_started, args=(now - t0,), daemon=True)
            watchers.append(w)
            w.start()

    def one(k: int) -> None:
        job, oc = jobs[k], outcomes[k]
        delay = job.at - (time.perf_counter() - t0)
        if delay > 0:
            time.sleep(delay)
        sent = last = time.perf_counter()
        adapter = adapter_name(n, job.adapter % n) if n else ""
        sp = sampling_params(max_tokens=job.out_len, ignore_eos=True)
        try:
            for ch in client.generate_stream(
                adapter=adapter, prompt_token_ids=job.prompt, sampling=sp, timeout=900
            ):
                if not ch.token_ids:
                    continue
                now = time.perf_counter()
                if oc.ttft is None:
                    oc.ttft = now - sent
                    first_token(now)
                else:
                    oc.gaps.append(now - last)
                last = now
                oc.tokens += len(ch.token_ids)
        except Exception as e:  # recorded, reported in the metrics
            oc.error = f"{type(e).__name__}: {e}"
        oc.end = time.perf_counter() - t0

    threads = [threading.Thread(target=one, args=(k,), daemon=True) for k in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    makespan = max(o.end for o in outcomes)
    for w in watchers:
        w.join()
    return outcomes, makespan


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000, 2)


def latency_summary(outcomes: list[Outcome], makespan: float) -> dict:
    ttft = [o.ttft for o in outcomes if o.ttft is not None]
    gaps = [g for o in outcomes for g in o.gaps]
    return {
        "tokens_per_s": round(sum(o.tokens for o in outcomes) / makespan, 2),
        "ttft_p50_ms": _ms(percentile(ttft, 0.50)),
        "ttft_p99_ms": _ms(percentile(ttft, 0.99)),
        "itl_p50_ms": _ms(percentile(gaps, 0.50)),
        "itl_p99_ms": _ms(percentile(gaps, 0.99)),
        "errors": sum(1 for o in outcomes if o.error),
    }


# -- model FLOPs and bytes -------------------------------------------------------------------


STEP_WORK = {
    "steps": "mint_executor_step_seconds_count",
    "seconds": "mint_executor_step_seconds_sum",
    "tokens": "mint_executor_step_tokens_total",
    "sampled": "mint_executor_step_sampled_total",
    "keys": "mint_executor_step_attention_keys_total",
}


def _read_step_work(url: str) -> tuple[dict[str, dict[str, float]], float]:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    names = {v: k for k, v in STEP_WORK.items()}
    out: dict[str, dict[str, float]] = {}
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            if smp.name in names and "kind" in smp.labels:
                out.setdefault(smp.labels["kind"], {})[names[smp.name]] = smp.value
            elif smp.name == "mint_executor_steps_total":
                total = smp.value
    return out, total


def step_work(url: str, timeout: float = 10.0) -> dict[str, dict[str, float]]:
    """{kind: {steps, seconds, tokens, sampled, keys}} so far, from an executor's /metrics (its
    step seconds histogram and its step work counters, by step kind), read once every step it
    had begun at the first read (mint_executor_steps_total, which counts a step from its start)
    is counted by kind: the step that streams a request's last token is counted when it
    returns, after the client may have read that token; a busy executor's running step is
    waited for, not the steps after it."""
    deadline = time.monotonic() + timeout
    begun = None
    while True:
        out, total = _read_step_work(url)
        begun = total if begun is None else begun
        counted = sum(w.get("steps", 0.0) for w in out.values())
        if counted >= begun:
            return out
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{url}: {total:.0f} steps run but {counted:.0f} counted by kind after {timeout} s"
            )
        time.sleep(0.02)


def work_delta(before: dict, after: dict, kind: str) -> dict[str, float] | None:
    """What the steps of `kind` did between two step_work readings; None when a counter went
    back (the executor restarted in between)."""
    b, a = before.get(kind, {}), after.get(kind, {})
    d = {k: a.get(k, 0.0) - b.get(k, 0.0) for k in STEP_WORK}
    return None if any(v < 0 for v in d.values()) else d


def _kind_figures(rec: dict, name: str, w: dict, flops: float, span: float, peak: float) -> None:
    """rec's {name}_steps_{time_share,gemm_fraction,mean_tokens} from one step kind's work w
    (work_delta) and its model FLOPs, over a span of seconds; nothing when no step ran."""
    if w["seconds"] > 0:
        rec[f"{name}_steps_time_share"] = w["seconds"] / span
        rec[f"{name}_steps_gemm_fraction"] = flops / w["seconds"] / peak
        rec[f"{name}_steps_mean_tokens"] = w["tokens"] / w["steps"]


@dataclass
class Costs:
    """The backbone's per-token work (see the module docstring)."""

    layer_weights: int  # weights of the decoder Linears
    head_weights: int  # the LM head's
    lora_weights: int  # one adapter's (rank RANK on LORA_TARGETS)
    layers: int
    q_dim: int  # heads * head_dim
    kv_dim: int  # kv heads * head_dim
    bytes_per_weight: int = 4  # float32 on the CPU

    @staticmethod
    def causal_keys(t0: int, t1: int) -> float:
        """Keys the tokens at positions t0 .. t1 - 1 attend to: the sum of (position + 1)."""
        return (t1 * (t1 + 1) - t0 * (t0 + 1)) / 2

    def key_flops(self, keys: float) -> float:
        """Attention FLOPs (QK^T and PV over every layer) of `keys` query-key pairs."""
        return 4.0 * keys * self.q_dim * self.layers

    def attn_flops(self, t0: int, t1: int) -> float:
        """Causal attention FLOPs of the tokens at positions t0 .. t1 - 1."""
        return self.key_flops(self.causal_keys(t0, t1))

    def forward_flops(self, t0: int, t1: int, logits: int) -> float:
        """One forward of the tokens at positions t0 .. t1 - 1, `logits` rows sampled."""
        return self.work_flops(t1 - t0, logits, self.causal_keys(t0, t1))

    def request_flops(self, prompt: int, out: int) -> float:
        """A request's model FLOPs: its prompt and its outputs but the last forwarded, every
        output token's logits."""
        return self.forward_flops(0, prompt + out - 1, 0) + 2.0 * self.head_weights * out

    def weight_bytes(self) -> int:
        w = self.layer_weights + self.head_weights + self.lora_weights
        return w * self.bytes_per_weight

    def kv_bytes(self, context: int) -> int:
        return 2 * context * self.kv_dim * self.layers * self.bytes_per_weight

    def work_flops(self, tokens: int, sampled: int, keys: float) -> float:
        """Model FLOPs of steps that forwarded `tokens` (each with its adapter), sampled
        `sampled` of them and attended to `keys` keys in all (the executor's per-kind step
        counters): what request_flops counts, summed by step instead of by request."""
        per_token = 2.0 * (self.layer_weights + self.lora_weights)
        return per_token * tokens + self.key_flops(keys) + 2.0 * self.head_weights * sampled

    def decode_least_s(self, tokens: int, sampled: int, keys: int, peak: float, bw: float) -> float:
        """batched_least_s for decode steps' work: their attention at max(its FLOPs / peak, the
        K and V bytes of the contexts / bandwidth) (both are proportional to the keys, so the
        sum over tokens is exact), the rest at the peak; weights left out."""
        attn = self.key_flops(keys)
        rest = self.work_flops(tokens, sampled, keys) - attn
        return rest / peak + max(attn / peak, self.kv_bytes(keys) / bw)

    def batched_least_s(self, prompt: int, out: int, peak: float, bw: float) -> float:
        """The least time a request's share of batched serving takes in a forward that runs
        its layers' ops one after another (as every engine here does): its FLOPs at the GEMM
        peak, but each decode token's attention at max(its FLOPs / peak, the bytes of its
        context's K and V / bandwidth) (a decode token reads its whole context once per layer,
        shared with no other sequence; a prefill chunk's tokens share the reads). The weights'
        bytes are left out (read once per step for the whole batch): optimistic."""
        t = (self.request_flops(prompt, out) - self.attn_flops(prompt, prompt + out - 1)) / peak
        for p in range(prompt, prompt + out - 1):  # the outputs fed back, at positions p
            t += max(self.attn_flops(p, p + 1) / peak, self.kv_bytes(p + 1) / bw)
        return t

    def serial_roofline_s(self, prompt: int, out: int, peak: float, bw: float) -> float:
        """The least time batch-1 serving takes for a request: the prefill, then one forward per
        further output token; each forward max(FLOPs / peak, bytes read / bandwidth)."""
        t = max(self.forward_flops(0, prompt, 1) / peak, self.weight_bytes() / bw)
        for k in range(1, out):
            p = prompt + k - 1  # the position of the token fed back
            t += max(
                self.forward_flops(p, p + 1, 1) / peak,
                (self.weight_bytes() + self.kv_bytes(p + 1)) / bw,
            )
        return t


def model_costs(model_dir: Path) -> Costs:
    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    layer = head = lora = 0
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        w = m.in_features * m.out_features
        if name.rsplit(".", 1)[-1] == "lm_head":
            head += w
        else:
            layer += w
        if name.rsplit(".", 1)[-1] in LORA_TARGETS:
            lora += RANK * (m.in_features + m.out_features)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    return Costs(
        layer_weights=layer,
        head_weights=head,
        lora_weights=lora,
        layers=cfg.num_hidden_layers,
        q_dim=cfg.num_attention_heads * head_dim,
        kv_dim=kv_heads * head_dim,
    )


# -- peft, one request at a time ---------------------------------------------------------------


class PeftSerial:
    """peft serving jobs one at a time on `device` (the executor's): set_adapter, greedy generate
    of exactly out_len. The adapters are loaded once, before the rounds."""

    def __init__(self, model_dir: Path, info, jobs: list[Job], n: int, device: str = "cpu"):
        from peft import PeftModel

        from mintmesh.model import load_model
        from mintmesh.synth import write_synth_adapter

        self.jobs, self.n, self.device = jobs, n, device
        tmp = Path(tempfile.mkdtemp(prefix="mint-bench-peft-"))
        self.names: dict[int, str] = {}
        for job in jobs:
            i = job.adapter % n
            if i not in self.names:
                self.names[i] = f"u{i}"
                write_synth_adapter(info, tmp / self.names[i], rank=RANK, seed=adapter_seed(n, i))
        base, _ = load_model(model_dir, device=device)
        first = next(iter(self.names.values()))
        self.pm = PeftModel.from_pretrained(base, str(tmp / first), adapter_name=first)
        for name in self.names.values():
            if name != first:
                self.pm.load_adapter(str(tmp / name), adapter_name=name)
        self.pm.eval()

    def _one(self, job: Job) -> int:
        import torch

        self.pm.set_adapter(self.names[job.adapter % self.n])
        x = torch.tensor([job.prompt], device=self.device)
        with torch.inference_mode():
            out = self.pm.generate(
                input_ids=x,
                attention_mask=torch.ones_like(x),
                do_sample=False,
                max_new_tokens=job.out_len,
                min_new_tokens=job.out_len,
                pad_token_id=0,
            )
        return out.shape[1] - x.shape[1]

    def run(self) -> dict:
        import torch

        tokens = 0
        t0 = time.perf_counter()
        for job in self.jobs:
            tokens += self._one(job)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        return {"tokens_per_s": tokens / dt, "tokens": tokens, "seconds": dt}

    def warm(self) -> None:
        self._one(Job(0.0, self.jobs[0].prompt[:8], 2, self.jobs[0].adapter))


# -- report ------------------------------------------------------------------------------------


def _r(x: float) -> float:
    """x to 5 significant digits (the figures span 1e-3 .. 1e6)."""
    return float(f"{x:.5g}")


def _spread(metrics: dict, name: str, xs: list[float]) -> None:
    """metrics[name] = median of xs, with name_min / name_max."""
    metrics[name] = _r(statistics.median(xs))
    metrics[f"{name}_min"] = _r(min(xs))
    metrics[f"{name}_max"] = _r(max(xs))


def plot_sweep(path: Path, sweep: list[dict], title: str) -> None:
    """TTFT and inter-token latency p50/p99 against the offered load, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [100 * s["offered_fraction"] for s in sweep]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, what, label in ((axes[0], "ttft", "time to first token"),
                            (axes[1], "itl", "inter-token latency")):  # fmt: skip
        for q, style in (("p50", "o-"), ("p99", "s--")):
            ys = [s[f"{what}_{q}_ms"] for s in sweep]
            ax.plot(x, [math.nan if y is None else y for y in ys], style, label=q)
        ax.set_xlabel("offered load (% of measured capacity)")
        ax.set_ylabel(f"{label} (ms)")
        ax.set_xticks(x)
        sec = ax.secondary_xaxis("top")
        sec.set_xticks(x, [f"{s['offered_requests_per_s']:.2f}" for s in sweep])
        sec.set_xlabel("requests/s")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mint bench serve", description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="print only the JSON line on stdout")
    p.add_argument("--preset", default="small", help="backbone preset (tiny: a smoke run)")
    p.add_argument("--model-dir", type=Path, default=None,
                   help="backbone directory (built there if missing; default "
                        "~/.cache/mintmesh/PRESET)")  # fmt: skip
    p.add_argument("--adapters", default="1,1000", help="comma list of N (distinct adapters)")
    p.add_argument("--requests", type=int, default=96,
                   help="requests per capacity round (more than --max-batch-size: some wait, "
                        "so the engine runs saturated)")  # fmt: skip
    p.add_argument("--rounds", type=int, default=3, help="paired capacity rounds")
    p.add_argument("--peft-requests", type=int, default=8,
                   help="how many of the requests peft serves serially per round")  # fmt: skip
    p.add_argument("--sweep-requests", type=int, default=None,
                   help="requests per sweep point (default min(--requests, 24))")  # fmt: skip
    p.add_argument("--plot", type=Path, default=None, help="draw the sweep into this PNG")
    p.add_argument("--prompt-min", type=int, default=64)
    p.add_argument("--prompt-max", type=int, default=256)
    p.add_argument("--out-min", type=int, default=32)
    p.add_argument("--out-max", type=int, default=128)
    p.add_argument("--max-batch-size", type=int, default=48)
    p.add_argument("--max-step-tokens", type=int, default=512)
    p.add_argument("--kv-cache-mib", type=int, default=1536)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", choices=("torch", "onnxruntime"), default="torch",
                   help="the executor's model runner (its --backend)")  # fmt: skip
    p.add_argument("--threads", type=int, default=2, help="torch threads per process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", type=Path, default=None, help="cluster state (default: temp)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    warnings.filterwarnings("ignore", category=FutureWarning)
    ns = sorted({int(x) for x in args.adapters.split(",") if x.strip()})
    if not ns or ns[0] < 1:
        p.error(f"--adapters {args.adapters!r}: give positive integers")
    if not (1 <= args.prompt_min <= args.prompt_max and 1 <= args.out_min <= args.out_max):
        p.error(
            f"lengths: prompt [{args.prompt_min}, {args.prompt_max}], output "
            f"[{args.out_min}, {args.out_max}] must be non-empty ranges of positive integers"
        )
    sweep_requests = args.sweep_requests or min(args.requests, 24)
    if args.requests < 1 or args.rounds < 1 or sweep_requests < 1:
        p.error("--requests, --rounds and --sweep-requests must be >= 1")
    if not 1 <= args.peft_requests <= args.requests:
        p.error("--peft-requests must be in [1, --requests]")

    import torch

    from mintmesh.client import MintClient
    from mintmesh.cluster import ClusterConfig, LocalCluster
    from mintmesh.model import base_model_info
    from mintmesh.v1 import executor_pb2, executor_pb2_grpc

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    load0 = [round(x, 2) for x in os.getloadavg()]
    model_dir = ensure_model(args.preset, args.model_dir)
    info = base_model_info(model_dir)
    costs = model_costs(model_dir)
    all_jobs = make_jobs(
        max(args.requests, sweep_requests),
        args.seed,
        (args.prompt_min, args.prompt_max),
        (args.out_min, args.out_max),
    )
    jobs, sweep_jobs = all_jobs[: args.requests], all_jobs[:sweep_requests]
    # More requests than batch slots: some wait to be admitted until the saturated window ends.
    saturated = len(jobs) > args.max_batch_size
    lo, hi = ns[0], ns[-1]
    gen_tokens = sum(j.out_len for j in jobs)
    flops = sum(costs.request_flops(len(j.prompt), j.out_len) for j in jobs)
    _progress(f"peft: the {args.peft_requests} requests' adapters (N={hi}) on the backbone")
    peft = PeftSerial(model_dir, info, jobs[: args.peft_requests], hi, args.device)
    peft.warm()
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="mint-bench-serve-"))
    env = {
        "MINT_EXECUTOR_DEVICE": args.device,
        "MINT_EXECUTOR_BACKEND": args.backend,
        "MINT_EXECUTOR_MAX_STEP_TOKENS": str(args.max_step_tokens),
        "MINT_EXECUTOR_KV_CACHE_BYTES": str(args.kv_cache_mib << 20),
        "MINT_EXECUTOR_MAX_QUEUE": str(max(256, 2 * len(all_jobs))),
        "OMP_NUM_THREADS": str(args.threads),
        # Every round repeats the same prompts: cached prefixes would skip their prefill.
        "MINT_EXECUTOR_PREFIX_CACHING": "0",
    }
    cluster = LocalCluster(
        ClusterConfig(
            model_dir=model_dir,
            data_dir=data_dir,
            executors=1,
            port=0,
            max_batch_size=args.max_batch_size,
            env=env,
            http_port=None,
        )
    )
    _progress(f"starting a local cluster ({args.preset} backbone) in {data_dir}")
    cluster.start()
    device = args.device
    rounds: list[dict] = []
    errors = {n: 0 for n in ns}
    used = {n: sorted({j.adapter % n for j in all_jobs}) for n in ns}
    sweep: list[dict] = []
    # Per round at N = hi: (after, before, makespan, [(step_work, seconds) once none waits]).
    work: list[tuple[dict, dict, float, list]] = []
    try:
        with MintClient(cluster.router_address, timeout=120, api_key=cluster.admin_key) as client:

            def status():
                with cluster.mesh_channel(cluster.executor_addresses[0]) as ch:
                    return executor_pb2_grpc.ExecutorStub(ch).Status(
                        executor_pb2.ExecutorStatusRequest(), timeout=10
                    )

            st0 = status()
            device, runner = st0.device, st0.runner
            exec_metrics = cluster.metrics_urls["executor-0"]
            for n in ns:
                _progress(f"N={n}: pushing and loading the {len(used[n])} adapters used")
                push_adapters(client, info, n, used[n])
                # Each adapter loaded once (and the process's first forwards done).
                run_stream(client, [Job(0.0, [1, 2, 3, 4], 1, i) for i in used[n]], n)
            steps0 = status()
            for r in range(args.rounds):
                # The machine's rooflines next to each measured phase (its speed drifts): the
                # GEMM peak before each N and before peft, the bandwidth before each too.
                rec, peaks, bws = {}, [], []
                for n in ns:
                    peaks.append(gemm_peak(args.device))
                    bws.append(measure_read_bandwidth(args.device))
                    before = step_work(exec_metrics)
                    mid: list = []  # at N = hi: (step_work, seconds) once none waits

                    def watch(seconds: float, mid: list = mid) -> None:
                        # The window ends when the counters are read (the step running then
                        # counted): their steps, its time.
                        t = time.perf_counter()
                        try:
                            w = step_work(exec_metrics)
                        except Exception as e:  # the round goes without the window's figures
                            _progress(f"the saturated window's step counters: {e}")
                            return
                        mid.append((w, seconds + time.perf_counter() - t))

                    outcomes, makespan = run_stream(
                        client, at_rate(jobs, None), n, watch if n == hi and saturated else None
                    )
                    if n == hi and saturated and not mid:
                        _progress("no saturated window this round (a request failed first?)")
                    if n == hi:
                        work.append((step_work(exec_metrics), before, makespan, mid))
                    errors[n] += sum(1 for o in outcomes if o.error)
                    rec[f"tokens_per_s_{n}"] = sum(o.tokens for o in outcomes) / makespan
                    rec[f"requests_per_s_{n}"] = len(jobs) / makespan
                    rec[f"model_gflop_s_{n}"] = flops / makespan / 1e9
                peaks.append(gemm_peak(args.device))
                bws.append(measure_read_bandwidth(args.device))
                rec["peft_serial_tokens_per_s"] = peft.run()["tokens_per_s"]
                rec["gemm_peak_gflop_s"] = max(peaks) / 1e9
                rec["read_bandwidth_gb_s"] = max(bws) / 1e9
                rounds.append(rec)
                _progress(f"round {r + 1}/{args.rounds}: " + ", ".join(
                    f"{k} {v:.2f}" for k, v in rec.items()))  # fmt: skip
            steps1 = status()
            capacity = statistics.median(x[f"requests_per_s_{hi}"] for x in rounds)
            for frac in SWEEP_FRACTIONS:
                rate = frac * capacity
                _progress(f"sweep: {len(sweep_jobs)} requests at {rate:.2f}/s ({frac:.0%})")
                outcomes, makespan = run_stream(client, at_rate(sweep_jobs, rate), hi)
                s = {"offered_fraction": frac, "offered_requests_per_s": round(rate, 3)}
                s.update(latency_summary(outcomes, makespan))
                sweep.append(s)
                _progress(f"sweep {frac:.0%}: {s}")
    finally:
        cluster.stop()

    # Where the time went at N = hi: the executor's steps by kind, their model FLOPs/s (from
    # what they computed) against the peak, and the decode steps' own bound.
    peak = max(x["gemm_peak_gflop_s"] for x in rounds) * 1e9
    bw = max(x["read_bandwidth_gb_s"] for x in rounds) * 1e9
    for rec, (after, before, makespan, mid) in zip(rounds, work, strict=True):
        pre, dec = work_delta(before, after, "prefill"), work_delta(before, after, "decode")
        if pre is None or dec is None:
            _progress("the executor's step counters went back (a restart?): round left out")
            continue
        if mid:
            at, window = mid[0]
            window = min(window, makespan)  # a read after the last token: every step counted
            done = [work_delta(before, at, k) for k in ("prefill", "decode")]
            if all(d is not None for d in done) and window > 0:
                kf = [costs.work_flops(int(d["tokens"]), int(d["sampled"]), int(d["keys"]))
                      for d in done]  # fmt: skip
                rec["saturated_time_share"] = window / makespan
                rec["saturated_gflop"] = sum(kf) / 1e9
                rec["saturated_gemm_fraction"] = sum(kf) / window / peak
                for kind, d, f in zip(("prefill", "decode"), done, kf, strict=True):
                    _kind_figures(rec, f"saturated_{kind}", d, f, window, peak)
        fl = {k: costs.work_flops(int(w["tokens"]), int(w["sampled"]), int(w["keys"]))
              for k, w in (("prefill", pre), ("decode", dec))}  # fmt: skip
        rec["steps_flops_vs_requests"] = (fl["prefill"] + fl["decode"]) / flops
        for kind, w in (("prefill", pre), ("decode", dec)):
            _kind_figures(rec, kind, w, fl[kind], makespan, peak)
        if dec["seconds"] > 0:
            least = costs.decode_least_s(
                int(dec["tokens"]), int(dec["sampled"]), int(dec["keys"]), peak, bw
            )
            rec["decode_steps_gemm_fraction_bound"] = fl["decode"] / peak / least

    metrics: dict = {}
    for n in ns:
        _spread(metrics, f"tokens_per_s_{n}", [x[f"tokens_per_s_{n}"] for x in rounds])
        _spread(metrics, f"requests_per_s_{n}", [x[f"requests_per_s_{n}"] for x in rounds])
        _spread(metrics, f"model_gflop_s_{n}", [x[f"model_gflop_s_{n}"] for x in rounds])
        metrics[f"adapters_used_{n}"] = len(used[n])
        metrics[f"errors_{n}"] = errors[n]
    _spread(metrics, "peft_serial_tokens_per_s", [x["peft_serial_tokens_per_s"] for x in rounds])
    if hi != lo:
        ratios = [x[f"tokens_per_s_{hi}"] / x[f"tokens_per_s_{lo}"] for x in rounds]
        _spread(metrics, f"tps_{hi}_vs_{lo}_saturated", ratios)
        if {1, 1000} <= set(ns) and (lo, hi) != (1, 1000):
            ratios = [x["tokens_per_s_1000"] / x["tokens_per_s_1"] for x in rounds]
            _spread(metrics, "tps_1000_vs_1_saturated", ratios)
    peft_ratios = [x[f"tokens_per_s_{hi}"] / x["peft_serial_tokens_per_s"] for x in rounds]
    _spread(metrics, "vs_peft_serial_saturated", peft_ratios)

    for key in STEP_KEYS:
        xs = [x[key] for x in rounds if key in x]
        if xs:
            _spread(metrics, key, xs)

    # Rooflines: the best of the run's measurements of this machine (peak, bw above).
    model_fs = statistics.median(x[f"model_gflop_s_{hi}"] for x in rounds) * 1e9
    pj = peft.jobs
    peft_roof = sum(j.out_len for j in pj) / sum(
        costs.serial_roofline_s(len(j.prompt), j.out_len, peak, bw) for j in pj
    )
    ours_roof = gen_tokens / (flops / peak)
    least = sum(costs.batched_least_s(len(j.prompt), j.out_len, peak, bw) for j in jobs)
    fraction, fraction_bound = model_fs / peak, flops / peak / least
    peft_tps = statistics.median(x["peft_serial_tokens_per_s"] for x in rounds)
    metrics.update(
        capacity_requests_per_s=_r(capacity),
        gemm_peak_gflop_s=_r(peak / 1e9),
        read_bandwidth_gb_s=_r(bw / 1e9),
        weight_mib=_r(costs.weight_bytes() / 2**20),
        requests_gflop=_r(flops / 1e9),
        generated_tokens=gen_tokens,
        gemm_roofline_fraction=_r(fraction),
        gemm_roofline_fraction_bound=_r(fraction_bound),
        gemm_roofline_fraction_of_bound=_r(fraction / fraction_bound),
        ours_roofline_tokens_per_s=_r(ours_roof),
        peft_roofline_tokens_per_s=_r(peft_roof),
        peft_roofline_fraction=_r(peft_tps / peft_roof),
        vs_peft_serial_bound=_r(ours_roof / peft_roof),
        vs_peft_serial_ceiling=_r(ours_roof / peft_tps),
        executor_steps=steps1.steps - steps0.steps,
        executor_preemptions=steps1.preemptions - steps0.preemptions,
        sweep=sweep,
        rounds=[{k: _r(v) for k, v in x.items()} for x in rounds],
    )
    metrics["vs_peft_serial_fraction_of_bound"] = _r(
        statistics.median(peft_ratios) / (ours_roof / peft_roof)
    )
    targets = {}
    for name, (op, thr) in TARGETS.items():
        val = metrics.get(name)
        targets[name] = {"target": f"{op} {thr}", "value": val,
                         "met": val is not None and val >= thr}  # fmt: skip
    params = {
        "preset": args.preset,
        "adapters": ns,
        "rank": RANK,
        "targets_modules": list(LORA_TARGETS),
        "requests": args.requests,
        "rounds": args.rounds,
        "peft_requests": args.peft_requests,
        "peft_compared_n": hi,
        "capacity_n": hi,
        "sweep_requests": sweep_requests,
        "sweep_fractions": list(SWEEP_FRACTIONS),
        "prompt_tokens": [args.prompt_min, args.prompt_max],
        "output_tokens": [args.out_min, args.out_max],
        "max_batch_size": args.max_batch_size,
        "max_step_tokens": args.max_step_tokens,
        "kv_cache_mib": args.kv_cache_mib,
        "threads_per_process": args.threads,
        "backend": args.backend,
        "runner": runner,
        "seed": args.seed,
        "plot": str(args.plot) if args.plot else None,
        "loadavg_start": load0,
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
    }
    if args.plot:
        plot_sweep(args.plot, sweep, f"mint bench serve: {args.preset} backbone, N={hi}, {device}")
        _progress(f"sweep plot: {args.plot}")
    metrics["wall_s"] = round(time.perf_counter() - t_start, 1)
    out = {"bench": "serve", "device": device, "params": params, "metrics": metrics,
           "targets": targets}  # fmt: skip
    if not args.json:
        for k, v in metrics.items():
            if k not in ("sweep", "rounds"):
                print(f"{k}: {v}")
        for s in sweep:
            print(f"sweep: {json.dumps(s)}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
