"""Measured evaluation of an adapter revision on a JSONL data set, computed on the cluster
through the router (`mint adapter eval REF --data FILE.jsonl`).

Each line of the file is {"prompt": str, "completion": str} (blank lines are skipped). Per
example:

- Log-likelihood, from Router.Score. The executor tokenizes the text with the backbone's own
  tokenizer (BOS included, as Engine.encode does for every prompt), twice: the prompt alone and
  prompt + completion. The completion's tokens are the tokens of prompt + completion past their
  common prefix with the prompt's tokens: past the prompt's token count whenever the prompt
  tokenizes to a prefix of the whole (always, with a byte-level tokenizer), and a token that
  spans the boundary (a BPE merge across it) counts as the completion's. So the CLI needs no
  tokenizer and no model directory, and the tokens scored are the ones the executor itself
  makes of that text, whatever the backbone.
- Greedy exact match, from Router.Generate at temperature 0 with max_tokens = the completion's
  token count + EXTRA_TOKENS: 1 when the generated text starts with the completion.

The data set's metrics: nll_per_token = the summed negative log-likelihood of every completion
token / their number (token-weighted), perplexity = exp(nll_per_token), exact_match = the
fraction of examples that match. Every call names the revision REF resolved to when the run
started, so an alias moved meanwhile does not mix two revisions.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc

from mintmesh.client import MintClient, sampling_params
from mintmesh.v1 import common_pb2

# Tokens generated beyond the completion's own count: room to see where the match ends.
EXTRA_TOKENS = 4
DEFAULT_EVALUATOR = "mint adapter eval"
METRICS = ("nll_per_token", "perplexity", "exact_match")


class DatasetError(ValueError):
    """A data file that cannot be evaluated; the message names the file and the line."""


class EvalError(RuntimeError):
    """An example that could not be measured; the message names its line."""


@dataclass(frozen=True)
class Example:
    line: int  # 1-based line number in the file
    prompt: str
    completion: str


@dataclass(frozen=True)
class Dataset:
    path: Path
    sha256: str  # of the file's bytes, as they are
    examples: tuple[Example, ...]


def read_dataset(path: Path | str) -> Dataset:
    """Read and check a JSONL data file; DatasetError names the file and the bad line."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"{p}: no such file") from None
    except OSError as e:
        raise DatasetError(f"{p}: cannot read it ({e.strerror or e})") from None
    examples: list[Example] = []
    for n, raw in enumerate(data.split(b"\n"), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DatasetError(f"{p}, line {n}: not UTF-8 text (byte {e.start + 1})") from None
        if not text.strip():
            continue
        examples.append(_example(p, n, text))
    if not examples:
        what = "the file is empty" if not data else "only blank lines"
        raise DatasetError(
            f'{p}: no examples ({what}); each line must be {{"prompt": "...", "completion": "..."}}'
        )
    return Dataset(path=p, sha256=hashlib.sha256(data).hexdigest(), examples=tuple(examples))


def _example(path: Path, n: int, text: str) -> Example:
    where = f"{path}, line {n}"
    try:
        obj = json.loads(text)
    except ValueError as e:
        msg = getattr(e, "msg", str(e))
        col = getattr(e, "colno", None)
        at = f" at column {col}" if col else ""
        raise DatasetError(f"{where}: not JSON ({msg}{at})") from None
    if not isinstance(obj, dict):
        raise DatasetError(
            f'{where}: expected a JSON object {{"prompt": ..., "completion": ...}}, '
            f"got {type(obj).__name__}"
        )
    fields = {}
    for key in ("prompt", "completion"):
        if key not in obj:
            raise DatasetError(f'{where}: no "{key}" field (it has {sorted(obj)})')
        val = obj[key]
        if not isinstance(val, str):
            raise DatasetError(f'{where}: "{key}" must be a string, not {type(val).__name__}')
        if not val:
            raise DatasetError(f'{where}: "{key}" is empty')
        fields[key] = val
    return Example(line=n, prompt=fields["prompt"], completion=fields["completion"])


@dataclass(frozen=True)
class ExampleResult:
    line: int
    nll: float  # summed over the completion's tokens
    tokens: int  # the completion's token count
    exact_match: bool
    generated: str


@dataclass(frozen=True)
class EvalResult:
    revision: common_pb2.AdapterRevision  # the revision REF resolved to
    dataset: Dataset
    examples: tuple[ExampleResult, ...]

    @property
    def completion_tokens(self) -> int:
        return sum(e.tokens for e in self.examples)

    @property
    def nll_per_token(self) -> float:
        return sum(e.nll for e in self.examples) / self.completion_tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_per_token)

    @property
    def exact_match(self) -> float:
        return sum(e.exact_match for e in self.examples) / len(self.examples)

    def metrics(self) -> dict[str, float]:
        return {m: float(getattr(self, m)) for m in METRICS}


def completion_span(prompt_ids: list[int], full_ids: list[int]) -> int:
    """Where the completion's tokens start in full_ids: the length of the common prefix of the
    prompt's tokens and the whole text's (at least 1: the first token has no logprob)."""
    k = 0
    for a, b in zip(prompt_ids, full_ids, strict=False):
        if a != b:
            break
        k += 1
    return max(k, 1)


def evaluate_example(
    client: MintClient, ref: str, ex: Example, *, timeout: float | None = None
) -> ExampleResult:
    """One example's completion NLL (Router.Score) and greedy exact match (Router.Generate)."""
    try:
        prompt = client.score(ex.prompt, adapter=ref, timeout=timeout)
        full = client.score(ex.prompt + ex.completion, adapter=ref, timeout=timeout)
        ids = list(full.token_ids)
        k = completion_span(list(prompt.token_ids), ids)
        n = len(ids) - k
        if n <= 0:
            raise EvalError(
                f"line {ex.line}: the completion adds no token to the prompt's "
                f"{len(prompt.token_ids)}"
            )
        nll = -math.fsum(full.logprobs[k - 1 :])
        sp = sampling_params(max_tokens=n + EXTRA_TOKENS, temperature=0.0)
        gen = client.generate(ex.prompt, adapter=ref, sampling=sp, timeout=timeout)
    except grpc.RpcError as err:
        raise EvalError(f"line {ex.line}: {err.code().name}: {err.details()}") from None
    return ExampleResult(
        line=ex.line,
        nll=nll,
        tokens=n,
        exact_match=gen.text.startswith(ex.completion),
        generated=gen.text,
    )


def evaluate(
    client: MintClient,
    ref: str,
    dataset: Dataset,
    *,
    concurrency: int = 4,
    timeout: float | None = None,
    on_example: Callable[[ExampleResult], None] | None = None,
) -> EvalResult:
    """Measure the revision ref resolves to on every example, `concurrency` at a time (the
    executor batches them). EvalError names the first example that failed and its line."""
    if concurrency < 1:
        raise ValueError(f"concurrency {concurrency} must be >= 1")
    rev = client.resolve(ref)
    pinned = rev.ref  # tenant/name@N: every call measures the same revision
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="mint-eval")
    try:
        futures = [
            pool.submit(evaluate_example, client, pinned, ex, timeout=timeout)
            for ex in dataset.examples
        ]
        results = []
        for f in futures:
            res = f.result()
            results.append(res)
            if on_example is not None:
                on_example(res)
    except EvalError as e:
        raise EvalError(f"{dataset.path}, {e}") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return EvalResult(revision=rev, dataset=dataset, examples=tuple(results))


def record(
    client: MintClient, result: EvalResult, evaluator: str = DEFAULT_EVALUATOR
) -> common_pb2.AdapterRevision:
    """Record the metrics as evaluations of the measured revision, with the evaluator and the
    data set's sha256; returns the revision as the store has it after the last one."""
    rev = result.revision
    for metric, value in result.metrics().items():
        rev = client.add_evaluation(
            result.revision.ref, metric, value, evaluator, dataset_digest=result.dataset.sha256
        )
    return rev
