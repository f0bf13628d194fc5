"""`mint bench serve` at a tiny scale: a real cluster, two paired capacity rounds (N = 1 and 1000,
then peft serially), the load sweep and its plot; the JSON line's keys, every median recomputed
from the per-round figures, every ratio, roofline and bound from the figures it is derived from,
the targets' "met" against their values; and the model-FLOP count against torch's own."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics

import pytest

from mintmesh.bench import serve

PNG = b"\x89PNG\r\n\x1a\n"


def _close(a: float, b: float, rel: float = 1e-3) -> bool:
    return a == pytest.approx(b, rel=rel)


@pytest.mark.e2e
@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_bench_serve_tiny(backend, tiny_model_dir, tmp_path, capsys):
    png = tmp_path / "plots" / "serve.png"
    argv = ["--json", "--preset", "tiny", "--model-dir", str(tiny_model_dir), "--adapters",
            "1,1000", "--requests", "6", "--rounds", "2", "--peft-requests", "2",
            "--prompt-min", "8", "--prompt-max", "24", "--out-min", "4", "--out-max", "12",
            "--max-batch-size", "3",
            "--plot", str(png), "--data-dir", str(tmp_path / "cluster"),
            "--backend", backend]  # fmt: skip
    assert serve.main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(out) == {"bench", "device", "params", "metrics", "targets"}
    assert out["bench"] == "serve" and out["device"] == "cpu"
    p, m, t = out["params"], out["metrics"], out["targets"]
    assert p["adapters"] == [1, 1000] and p["requests"] == 6 and p["rounds"] == 2
    assert p["capacity_n"] == p["peft_compared_n"] == 1000 and p["plot"] == str(png)
    # The executor's Status names the runner that served (onnxruntime:<provider>).
    assert p["backend"] == backend and p["runner"].split(":")[0] == backend

    rounds = m["rounds"]
    assert len(rounds) == 2
    for r in rounds:
        for v in r.values():
            assert math.isfinite(v) and v > 0, r
    med = lambda key: statistics.median(r[key] for r in rounds)  # noqa: E731
    # Capacity per N: medians of the rounds, spread around them, no errors.
    for n in (1, 1000):
        for k in ("tokens_per_s", "requests_per_s", "model_gflop_s"):
            key = f"{k}_{n}"
            assert m[key] > 0 and _close(m[key], med(key)), key
            assert m[f"{key}_min"] <= m[key] <= m[f"{key}_max"], key
        assert m[f"errors_{n}"] == 0
    assert m["adapters_used_1"] == 1 and 1 <= m["adapters_used_1000"] <= 6
    # Each round's model FLOPs/s is the requests' FLOPs over its makespan.
    for r in rounds:
        for n in (1, 1000):
            makespan = 6 / r[f"requests_per_s_{n}"]
            assert _close(r[f"model_gflop_s_{n}"], m["requests_gflop"] / makespan, 2e-3)
    assert _close(m["peft_serial_tokens_per_s"], med("peft_serial_tokens_per_s"))

    # The ratios: medians of the paired per-round ratios.
    tps = statistics.median(r["tokens_per_s_1000"] / r["tokens_per_s_1"] for r in rounds)
    assert _close(m["tps_1000_vs_1_saturated"], tps, 2e-3)
    vs = [r["tokens_per_s_1000"] / r["peft_serial_tokens_per_s"] for r in rounds]
    assert _close(m["vs_peft_serial_saturated"], statistics.median(vs), 2e-3)
    assert m["vs_peft_serial_saturated_min"] <= m["vs_peft_serial_saturated"]
    assert m["vs_peft_serial_saturated"] <= m["vs_peft_serial_saturated_max"]

    # Rooflines: the best measurements of the run, and what follows from them.
    peak = m["gemm_peak_gflop_s"]
    assert _close(peak, max(r["gemm_peak_gflop_s"] for r in rounds))
    assert _close(m["read_bandwidth_gb_s"], max(r["read_bandwidth_gb_s"] for r in rounds))
    assert _close(m["gemm_roofline_fraction"], m["model_gflop_s_1000"] / peak, 2e-3)
    ours_roof = m["generated_tokens"] / (m["requests_gflop"] / peak)
    assert _close(m["ours_roofline_tokens_per_s"], ours_roof, 2e-3)
    bound = m["ours_roofline_tokens_per_s"] / m["peft_roofline_tokens_per_s"]
    assert _close(m["vs_peft_serial_bound"], bound, 2e-3)
    ceiling = m["ours_roofline_tokens_per_s"] / m["peft_serial_tokens_per_s"]
    assert _close(m["vs_peft_serial_ceiling"], ceiling, 2e-3)
    peft_frac = m["peft_serial_tokens_per_s"] / m["peft_roofline_tokens_per_s"]
    assert _close(m["peft_roofline_fraction"], peft_frac, 2e-3)
    frac = m["vs_peft_serial_saturated"] / m["vs_peft_serial_bound"]
    assert _close(m["vs_peft_serial_fraction_of_bound"], frac, 2e-3)
    # The fraction's physical bound: the requests' FLOPs at the peak over their least time,
    # recomputed from the same requests (the seed's), peak and bandwidth.
    costs = serve.model_costs(tiny_model_dir)
    jobs = serve.make_jobs(6, p["seed"], (8, 24), (4, 12))
    bw = m["read_bandwidth_gb_s"] * 1e9
    least = sum(costs.batched_least_s(len(j.prompt), j.out_len, peak * 1e9, bw) for j in jobs)
    assert _close(m["requests_gflop"] * 1e9, sum(costs.request_flops(len(j.prompt), j.out_len)
                                                 for j in jobs), 2e-3)  # fmt: skip
    bound = m["requests_gflop"] / peak / least
    assert 0 < m["gemm_roofline_fraction_bound"] < 1
    assert _close(m["gemm_roofline_fraction_bound"], bound, 2e-3)
    of_bound = m["gemm_roofline_fraction"] / m["gemm_roofline_fraction_bound"]
    assert _close(m["gemm_roofline_fraction_of_bound"], of_bound, 2e-3)
    assert m["generated_tokens"] >= 6 * 4 and m["weight_mib"] > 0
    assert m["executor_steps"] > 0

    # Where the time went (the executor's steps by kind): medians of the rounds; the steps'
    # FLOPs, counted from what they computed, are the requests' (no preemption here).
    assert m["executor_preemptions"] == 0
    for key in serve.STEP_KEYS:
        xs = [r[key] for r in rounds if key in r]  # a window without decode-only steps: none
        assert (key in m) == bool(xs), key
        if xs:
            assert _close(m[key], statistics.median(xs), 2e-3), key
            assert m[f"{key}_min"] <= m[key] <= m[f"{key}_max"], key
    assert "saturated_prefill_steps_time_share" in m  # the first prompts are in the window
    for r in rounds:
        assert r["steps_flops_vs_requests"] == pytest.approx(1.0, rel=1e-4)
        shares = r["prefill_steps_time_share"] + r["decode_steps_time_share"]
        assert 0 < shares <= 1.0001, r
        # 6 requests: a decode step forwards one token for each sequence decoding.
        assert 1 <= r["decode_steps_mean_tokens"] <= 6 and r["prefill_steps_mean_tokens"] >= 1
        # 6 requests over 3 batch slots: a saturated window, then the drain (on the tiny
        # backbone it may be over by the time the counters are read). Every prompt is prefilled
        # (its first token sampled) before the window ends, so its FLOPs are in the window's;
        # the fraction is the window's FLOPs/s over the peak.
        assert 0 < r["saturated_time_share"] <= 1, r
        prefills = sum(costs.forward_flops(0, len(j.prompt), 1) for j in jobs)
        assert prefills / 1e9 * 0.999 <= r["saturated_gflop"] <= m["requests_gflop"] * 1.001, r
        window = r["saturated_time_share"] * 6 / r["requests_per_s_1000"]
        assert _close(r["saturated_gemm_fraction"], r["saturated_gflop"] / window / peak, 5e-3)
        kinds = [r.get(f"saturated_{k}_steps_time_share", 0) for k in ("prefill", "decode")]
        assert 0 < sum(kinds) <= 1.0001, r
        # Within the window a decode step forwards at most the batch's 3 sequences.
        assert 1 <= r.get("saturated_decode_steps_mean_tokens", 1) <= 3, r
        assert r["saturated_prefill_steps_mean_tokens"] >= 1, r
    # The decode bound from its definition: at an infinite bandwidth only FLOPs count.
    assert costs.decode_least_s(10, 10, 300, 1e11, math.inf) == pytest.approx(
        costs.work_flops(10, 10, 300) / 1e11
    )
    slow = costs.decode_least_s(10, 10, 300, 1e11, 1e3)  # K/V reads dominate the attention
    attn = 4.0 * 300 * costs.q_dim * costs.layers
    assert slow == pytest.approx((costs.work_flops(10, 10, 300) - attn) / 1e11
                                 + costs.kv_bytes(300) / 1e3)  # fmt: skip

    # The sweep: 25/50/75/100% of the capacity measured at N = 1000, latencies at each.
    sweep = m["sweep"]
    assert [s["offered_fraction"] for s in sweep] == [0.25, 0.5, 0.75, 1.0]
    rates = [s["offered_requests_per_s"] for s in sweep]
    assert rates == sorted(rates) and len(set(rates)) == 4
    assert _close(m["capacity_requests_per_s"], m["requests_per_s_1000"])
    for s in sweep:
        assert _close(s["offered_requests_per_s"], s["offered_fraction"] * m["requests_per_s_1000"])
        assert s["errors"] == 0 and s["tokens_per_s"] > 0
        for what in ("ttft", "itl"):
            assert 0 < s[f"{what}_p50_ms"] <= s[f"{what}_p99_ms"], s
    assert png.read_bytes()[:8] == PNG and png.stat().st_size > 1000

    assert set(t) == set(serve.TARGETS)
    for name, (op, thr) in serve.TARGETS.items():
        assert op == ">=" and t[name]["value"] == m[name]
        assert t[name]["met"] == (m[name] >= thr), name


def test_model_flops_match_torch_flop_counter(tiny_model_dir):
    """The bench's Linear FLOPs of a forward are what torch counts for the model's mm/addmm (its
    attention is not among them: the bench adds it causally)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mintmesh.model import load_model

    costs = serve.model_costs(tiny_model_dir)
    base = dataclasses.replace(costs, lora_weights=0)
    model, _ = load_model(tiny_model_dir)
    for n_tokens, keep in ((10, 1), (7, 3)):
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            model(input_ids=torch.randint(0, 200, (1, n_tokens)), logits_to_keep=keep)
        counts = fc.get_flop_counts()["Global"]
        counted = sum(v for op, v in counts.items() if str(op) in ("aten.mm", "aten.addmm"))
        ours = base.forward_flops(0, n_tokens, keep) - base.attn_flops(0, n_tokens)
        assert ours == counted
    # Attention: (position + 1) keys for each token; a request forwards all but its last output.
    assert costs.attn_flops(0, 3) == 4 * (1 + 2 + 3) * costs.q_dim * costs.layers
    assert costs.attn_flops(3, 4) == 4 * 4 * costs.q_dim * costs.layers
    assert costs.request_flops(5, 3) == costs.forward_flops(0, 7, 3)
    # The batched least time: FLOPs at the peak, but each decode token's attention at least
    # its context's K/V bytes over the bandwidth (a slow memory makes that term the larger).
    peak, bw = 1e11, 1e3
    want = (costs.request_flops(5, 3) - costs.attn_flops(5, 7)) / peak
    want += costs.kv_bytes(6) / bw + costs.kv_bytes(7) / bw
    assert costs.batched_least_s(5, 3, peak, bw) == pytest.approx(want)
    assert costs.batched_least_s(5, 3, peak, 1e30) == pytest.approx(
        costs.request_flops(5, 3) / peak
    )
    assert costs.batched_least_s(5, 1, peak, bw) == pytest.approx(costs.request_flops(5, 1) / peak)
    assert costs.lora_weights > 0 and costs.weight_bytes() == 4 * (
        costs.layer_weights + costs.head_weights + costs.lora_weights
    )
