"""What the OpenAI gateway relies on at the executor, over its gRPC API: chat messages rendered
by the tokenizer's chat template, per-token strings and top alternatives in the stream, and
Score (a prompt's logprobs), each against the tokenizer and the model's own logits; bad input
refused with INVALID_ARGUMENT naming it."""

from __future__ import annotations

import grpc
import pytest
import torch

from mintmesh.model import load_model
from mintmesh.services.common.server import mesh_channel
from mintmesh.services.executor.config import ExecutorConfig
from mintmesh.services.executor.sampling import TokenPieces
from mintmesh.services.executor.server import create_server
from mintmesh.v1 import common_pb2, executor_pb2, executor_pb2_grpc


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    server, engine = create_server(ExecutorConfig(model_dir=tiny_model_dir, executor_id="cs"))
    ch = mesh_channel(server.address, traced=False)
    yield executor_pb2_grpc.ExecutorStub(ch), engine
    ch.close()
    server.stop(grace=1.0)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(tiny_model_dir)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].double()


def test_chat_messages_use_the_chat_template(served, model):
    stub, _ = served
    m, tok = model
    msgs = [("system", "be brief"), ("user", "héllo")]
    text = tok.apply_chat_template(
        [{"role": r, "content": c} for r, c in msgs], add_generation_prompt=True, tokenize=False
    )
    assert text.startswith("<s><|system|>\nbe brief</s>\n") and text.endswith("<|assistant|>\n")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    req = executor_pb2.ExecutorGenerateRequest(
        messages=[common_pb2.ChatMessage(role=r, content=c) for r, c in msgs],
        sampling=common_pb2.SamplingParams(max_tokens=1, logprobs=True, top_logprobs=4),
    )
    lg = _logits(m, ids)[-1]
    want = int(lg.argmax())
    chunks = [r.chunk for r in stub.Generate(req, timeout=30)]
    assert chunks[-1].usage.prompt_tokens == len(ids)
    got = [t for c in chunks for t in c.token_ids]
    assert got == [want]
    (top,) = [t for c in chunks for t in c.top_logprobs]
    ref = torch.log_softmax(lg, -1).topk(4)
    assert list(top.token_ids) == ref.indices.tolist()
    assert list(top.logprobs) == pytest.approx(ref.values.tolist(), abs=1e-4)
    pieces = TokenPieces(tok)
    assert list(top.tokens) == [pieces(t) for t in top.token_ids]
    assert [p for c in chunks for p in c.tokens] == [pieces(want)]


def test_token_pieces_name_partial_utf8_as_bytes(model):
    _, tok = model
    pieces = TokenPieces(tok)
    ids = tok("é!", add_special_tokens=False)["input_ids"]  # é is two bytes: two tokens
    assert [pieces(t) for t in ids] == ["bytes:\\xc3", "bytes:\\xa9", "!"]
    assert pieces(tok.eos_token_id) == "</s>"


def test_score_returns_the_prompts_logprobs_and_alternatives(served, model):
    stub, _ = served
    m, tok = model
    ids = tok("score this prompt")["input_ids"]
    resp = stub.Score(
        executor_pb2.ExecutorScoreRequest(prompt="score this prompt", top_logprobs=3), timeout=30
    )
    r = resp.result
    assert list(r.token_ids) == ids and r.executor == "cs"
    lp = torch.log_softmax(_logits(m, ids)[:-1], -1)
    want = lp.gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
    assert list(r.logprobs) == pytest.approx(want.tolist(), abs=1e-4)
    assert len(r.top_logprobs) == len(ids) - 1
    for row, t in zip(r.top_logprobs, lp, strict=True):
        assert list(row.token_ids) == t.topk(3).indices.tolist()
    one = stub.Score(executor_pb2.ExecutorScoreRequest(prompt_token_ids=[7]), timeout=30).result
    assert list(one.token_ids) == [7] and list(one.logprobs) == []


@pytest.mark.parametrize(
    "req, needle",
    [
        (executor_pb2.ExecutorGenerateRequest(
            prompt="x", messages=[common_pb2.ChatMessage(role="user", content="y")],
            sampling=common_pb2.SamplingParams(max_tokens=1)), "not ['prompt', 'messages']"),
        (executor_pb2.ExecutorGenerateRequest(
            messages=[common_pb2.ChatMessage(role="wizard", content="y")],
            sampling=common_pb2.SamplingParams(max_tokens=1)), "messages[0].role is 'wizard'"),
        (executor_pb2.ExecutorGenerateRequest(
            prompt="x", sampling=common_pb2.SamplingParams(max_tokens=1, top_logprobs=3)),
         "top_logprobs needs logprobs"),
        (executor_pb2.ExecutorGenerateRequest(
            prompt="x", sampling=common_pb2.SamplingParams(max_tokens=1, logprobs=True,
                                                           top_logprobs=21)),
         "top_logprobs=21 must be in [0, 20]"),
    ],
)  # fmt: skip
def test_bad_generate_input_is_invalid_argument(served, req, needle):
    stub, _ = served
    with pytest.raises(grpc.RpcError) as ei:
        list(stub.Generate(req, timeout=30))
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in ei.value.details()


def test_bad_score_input_is_invalid_argument(served):
    stub, _ = served
    for req, needle in [
        (executor_pb2.ExecutorScoreRequest(prompt="x", top_logprobs=99), "top_logprobs=99"),
        (executor_pb2.ExecutorScoreRequest(), "prompt is empty"),
        (executor_pb2.ExecutorScoreRequest(prompt_token_ids=[10**6]), "is not a token id"),
    ]:
        with pytest.raises(grpc.RpcError) as ei:
            stub.Score(req, timeout=30)
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert needle in ei.value.details(), ei.value.details()
