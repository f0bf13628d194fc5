"""`mint adapter train`: fine-tune a personal adapter on the cluster, through the router's
training API (Router.CreateTrainingRun / ForwardBackward / OptimStep / SaveRunWeights), from a
JSONL file of {"prompt", "completion"} pairs (read as `mint adapter eval --data` reads it).

Each example becomes one datum: the prompt's and the completion's tokens (tokenized by the
executor: Router.Score of the prompt and of prompt + completion, the completion's tokens those
past their common prefix), cross_entropy weighted 1 on the completion's tokens only. A step is
one forward_backward over a batch of examples (cycling through the file) and one AdamW step;
the run ends as a new revision of the name (provenance: training, with the data file's digest,
its training state kept beside it so that `--from` that revision continues exactly) and is
dropped from the executor.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

from mintmesh.client import MintClient
from mintmesh.evaluate import Dataset, EvalError, completion_span


@dataclass
class TrainResult:
    run_id: str
    ref: str
    digest: str
    steps: int
    losses: list[float]  # per step: the batch's loss per completion token
    parent: str = ""  # the revision it started from ("" = the base)


def datums(client: MintClient, dataset: Dataset) -> list[tuple[dict, int]]:
    """(datum, completion tokens) per example; the executor tokenizes (base model's Score)."""
    out = []
    for ex in dataset.examples:
        prompt = client.score(ex.prompt)
        full = list(client.score(ex.prompt + ex.completion).token_ids)
        k = completion_span(list(prompt.token_ids), full)
        n = len(full) - k
        if n <= 0:
            raise EvalError(f"line {ex.line}: the completion adds no token to the prompt")
        w = [0.0] * (k - 1) + [1.0] * n
        out.append(({"input_ids": full[:-1], "target_tokens": full[1:], "weights": w}, n))
    return out


def train(
    client: MintClient,
    dataset: Dataset,
    name: str,
    *,
    rank: int = 8,
    alpha: float | None = None,
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj"),
    steps: int = 50,
    lr: float = 1e-3,
    batch: int = 8,
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
    from_ref: str = "",
) -> TrainResult:
    """from_ref: continue a revision (its LoRA, and its AdamW state and step count when it
    holds a training state) instead of a fresh LoRA; rank, alpha and targets are then its."""
    data = datums(client, dataset)
    with_optimizer = False
    if from_ref:
        with_optimizer = bool(client.resolve(from_ref).state_digest)
    run = client.create_training_run(
        rank=rank, alpha=alpha, targets=targets, seed=seed, from_ref=from_ref,
        with_optimizer=with_optimizer,
    )  # fmt: skip
    losses: list[float] = []
    try:
        for step in range(steps):
            picked = [data[(step * batch + i) % len(data)] for i in range(min(batch, len(data)))]
            fb = client.forward_backward(run.run_id, [d for d, _ in picked])
            per_token = fb.metrics["loss:sum"] / sum(n for _, n in picked)
            if not math.isfinite(per_token):
                raise EvalError(f"step {step + 1}: the loss is {per_token}; try a lower --lr")
            client.optim_step(run.run_id, learning_rate=lr, beta2=0.999, eps=1e-8)
            losses.append(per_token)
            if on_step is not None:
                on_step(step + 1, per_token)
        saved = client.save_run(
            run.run_id, name, labels={"mint.train.data": dataset.sha256}, with_state=True
        )
    finally:
        # The run's executor may be gone: then there is nothing to free.
        with contextlib.suppress(Exception):
            client.drop_run(run.run_id)
    return TrainResult(run.run_id, saved.ref, saved.digest, steps, losses, saved.parent_ref)
