"""A user's script on tinker 0.22.0 (the tinker mindlab-toolkit 0.2.0 pins), run by
tests/test_tinker022.py with .venv-tinker022/bin/python: the SDK as installed, nothing patched,
nothing of ours imported (this interpreter has no mintmesh).

argv[1] is a JSON object: base_url, api_key, sdk ("mint": `import mint` and its re-exports;
"tinker": plain `import tinker`), name (of the saved weights), seqs (token id lists), prompt,
steps, lr, seed, max_tokens. The last line of stdout is the JSON of what it saw.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import sys


def main() -> None:
    args = json.loads(sys.argv[1])
    sdk = importlib.import_module(args["sdk"])  # mint re-exports tinker's public names
    import tinker

    types = sdk.types
    out: dict = {
        "module": sdk.__name__,
        "tinker_version": tinker.__version__,
        "mint_tinker_version": getattr(sdk, "__tinker_version__", None),
        "same_classes": sdk.ServiceClient is tinker.ServiceClient,
    }
    sc = sdk.ServiceClient(base_url=args["base_url"], api_key=args["api_key"])
    base = sc.get_server_capabilities().supported_models[0].model_name
    out["base"] = base
    # 0.22 answers the client itself (0.38: a future of one).
    tc = sc.create_lora_training_client(base_model=base, rank=4, seed=args["seed"])
    out["training_client"] = type(tc).__name__
    data = [
        types.Datum(
            model_input=types.ModelInput.from_ints(s[:-1]),
            loss_fn_inputs={"target_tokens": s[1:], "weights": [1.0] * (len(s) - 1)},
        )
        for s in args["seqs"]
    ]
    losses, first_logprobs = [], None
    for _ in range(args["steps"]):
        fb = tc.forward_backward(data, loss_fn="cross_entropy")  # 0.22: a JSON body
        op = tc.optim_step(types.AdamParams(learning_rate=args["lr"]))  # posted before fb's poll
        res = fb.result()
        op.result()
        losses.append(res.metrics["loss:sum"])
        if first_logprobs is None:
            first_logprobs = [o["logprobs"].tolist() for o in res.loss_fn_outputs]
    out["losses"] = losses
    out["finite"] = all(math.isfinite(x) for x in losses)
    out["first_logprobs"] = first_logprobs
    out["path"] = tc.save_weights_for_sampler(args["name"]).result().path

    sampler = sc.create_sampling_client(model_path=out["path"])
    out["sampling_client"] = type(sampler).__name__
    res = sampler.sample(
        prompt=types.ModelInput.from_ints(args["prompt"]),
        num_samples=1,
        sampling_params=types.SamplingParams(max_tokens=args["max_tokens"], temperature=0.0),
    ).result()
    out["greedy"] = [
        {"tokens": list(s.tokens), "logprobs": s.logprobs, "stop_reason": s.stop_reason}
        for s in res.sequences
    ]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    # Everything this script checks has been printed. The SDK leaves its event-loop thread
    # (a daemon) and grpc's C core running, and one CI run saw this interpreter abort in teardown
    # (SIGABRT, nothing on stderr) after the whole result was out; teardown of a third-party
    # client is not what the test is about, so leave without it.
    os._exit(0)
