"""`mint bench prefix`: automatic prefix caching on a multi-turn chat workload, on vs off.

The case it is for: a personal model's chat re-sends the whole conversation every turn, so each
prompt's prefix was already computed under the same adapter revision. CONVERSATIONS chats run
side by side on one in-process engine (small backbone, each chat its own rank-8 adapter on
q/v); every turn re-sends the history plus NEW fresh tokens and generates GEN tokens (greedy,
exact lengths). The same workload runs with prefix caching off and on, alternately, twice each
(the CPUs are shared: the faster run of each counts). Adapters are loaded before the clock
starts: cold loads are `mint bench cold-load`'s business.

Metrics: prompt tokens computed and wall time each way, `prefill_saving` (1 - on / off, of the
prompt tokens computed), `speedup` (wall off / on), the hit ratio of the prompt tokens looked
up, and `identical_outputs` (every greedy output with caching equals the one without).
Last stdout line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path


def _progress(msg: str) -> None:
    print(f"[bench prefix] {msg}", file=sys.stderr, flush=True)


def _run(model_dir, packed, args, prefix_caching: bool) -> tuple[dict, list]:
    from mintmesh.services.executor.config import ExecutorConfig
    from mintmesh.services.executor.engine import Engine, GenerationRequest, SamplingOptions
    from mintmesh.services.executor.sources import PackedBytesSource

    eng = Engine.from_config(
        ExecutorConfig(
            model_dir=model_dir,
            prefix_caching=prefix_caching,
            max_batch_size=args.conversations,
            host_cache_bytes=64 << 20,
        ),
        source=PackedBytesSource({p.digest: p.data for p in packed}),
        autostart=False,
    )
    try:
        for p in packed:
            eng.residency.ensure(p.digest, timeout=120)
            eng.residency.release(p.digest)
        rng = random.Random(args.seed)
        top = min(1000, eng.vocab_size)
        fresh = lambda: [rng.randrange(10, top) for _ in range(args.new)]  # noqa: E731
        history = [fresh() for _ in packed]
        turn = [0] * len(packed)
        live: dict[int, object] = {}
        outputs = []
        t0 = time.perf_counter()
        while True:
            for c, p in enumerate(packed):
                if c not in live and turn[c] < args.turns:
                    live[c] = eng.submit(
                        GenerationRequest(
                            prompt_token_ids=list(history[c]),
                            sampling=SamplingOptions(max_tokens=args.gen, ignore_eos=True),
                            adapter_digest=p.digest,
                        )
                    )
            if not live:
                break
            eng.step()
            for c, h in list(live.items()):
                if h.done:
                    ids = h.result().token_ids
                    outputs.append((c, turn[c], ids))
                    history[c] += ids + fresh()
                    turn[c] += 1
                    del live[c]
        wall = time.perf_counter() - t0
        return {
            "wall_s": wall,
            "prompt_tokens_computed": eng.prefill_tokens_computed,
            "prompt_tokens_queried": eng.prefix_query_tokens,
            "prompt_tokens_hit": eng.prefix_hit_tokens,
        }, sorted(outputs)
    finally:
        eng.close(timeout=0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mint bench prefix", description=__doc__)
    p.add_argument("--preset", default="small", choices=["tiny", "small"])
    p.add_argument("--model-dir", type=Path, help="default ~/.cache/mintmesh/PRESET")
    p.add_argument("--conversations", type=int, default=8)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--new", type=int, default=32, help="fresh prompt tokens per turn")
    p.add_argument("--gen", type=int, default=16, help="generated tokens per turn")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--json", action="store_true", help="last line: one JSON object")
    args = p.parse_args(argv)

    import torch

    from mintmesh.bench.common import ensure_model
    from mintmesh.model import base_model_info
    from mintmesh.peft_io import validate_and_pack
    from mintmesh.synth import synth_peft_bytes

    torch.set_num_threads(max(1, torch.get_num_threads()))
    t_all = time.perf_counter()
    model_dir = ensure_model(args.preset, args.model_dir)
    info = base_model_info(model_dir)
    packed = [
        validate_and_pack(*synth_peft_bytes(info, rank=8, seed=100 + i), info, max_rank=64)
        for i in range(args.conversations)
    ]
    runs: dict[bool, list[dict]] = {False: [], True: []}
    outs: dict[bool, list] = {}
    for rnd in range(2):
        for on in (False, True):
            res, outs[on] = _run(model_dir, packed, args, on)
            runs[on].append(res)
            state = "on" if on else "off"
            _progress(
                f"round {rnd + 1}, caching {state}: {res['wall_s']:.2f}s, "
                f"{res['prompt_tokens_computed']} prompt tokens"
            )
    off = min(runs[False], key=lambda r: r["wall_s"])
    on = min(runs[True], key=lambda r: r["wall_s"])
    identical = sum(a == b for a, b in zip(outs[False], outs[True], strict=True))
    metrics = {
        "wall_s_off": round(off["wall_s"], 2),
        "wall_s_on": round(on["wall_s"], 2),
        "speedup": round(off["wall_s"] / on["wall_s"], 3),
        "prompt_tokens_computed_off": off["prompt_tokens_computed"],
        "prompt_tokens_computed_on": on["prompt_tokens_computed"],
        "prefill_saving": round(
            1 - on["prompt_tokens_computed"] / off["prompt_tokens_computed"], 3
        ),
        "hit_ratio": round(on["prompt_tokens_hit"] / max(1, on["prompt_tokens_queried"]), 3),
        "identical_outputs": f"{identical}/{len(outs[True])}",
        "wall_s": round(time.perf_counter() - t_all, 1),
    }
    out = {
        "bench": "prefix",
        "device": "cpu",
        "params": {
            "preset": args.preset,
            "conversations": args.conversations,
            "turns": args.turns,
            "new_tokens": args.new,
            "gen_tokens": args.gen,
            "rank": 8,
            "seed": args.seed,
        },  # fmt: skip
        "metrics": metrics,
    }
    if not args.json:
        for k, v in metrics.items():
            print(f"{k:>28}: {v}")
    print(json.dumps(out))
    return 0 if identical == len(outs[True]) else 1


if __name__ == "__main__":
    sys.exit(main())
