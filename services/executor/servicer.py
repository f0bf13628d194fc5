"""mintmesh.v1.Executor over the Engine: translation between protos and the core, and nothing
else. Domain exceptions raised by the engine become status codes in the shared interceptor."""

from __future__ import annotations

import functools
import logging
import time

import grpc

from mintmesh.errors import BaseModelMismatch, InvalidArgument, MintError, TrainingRunNotFound
from mintmesh.model import TARGET_MODULES
from mintmesh.services.common.server import MAX_MESSAGE_BYTES
from mintmesh.services.executor.engine import (
    FINISH_CANCELLED,
    FINISH_LENGTH,
    FINISH_STOP,
    Engine,
    GenerationRequest,
    SamplingOptions,
)
from mintmesh.services.executor.passing import on_a_passing_thread
from mintmesh.v1 import common_pb2, executor_pb2, executor_pb2_grpc, training_pb2

logger = logging.getLogger(__name__)

_FINISH = {
    FINISH_LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FINISH_STOP: common_pb2.FINISH_REASON_STOP,
    FINISH_CANCELLED: common_pb2.FINISH_REASON_CANCELLED,
}
# A repeated float costs 4 bytes on the wire; leave room for the rest of the message.
_MAX_FLOATS = (MAX_MESSAGE_BYTES - 64 * 1024) // 4


def sampling_from_proto(p: common_pb2.SamplingParams) -> SamplingOptions:
    return SamplingOptions(
        temperature=float(p.temperature),
        # 0 (unset) or 1 = no nucleus filtering.
        top_p=1.0 if p.top_p == 0 else float(p.top_p),
        top_k=int(p.top_k),
        max_tokens=int(p.max_tokens),
        seed=int(p.seed) if p.HasField("seed") else None,
        stop=tuple(p.stop),
        stop_token_ids=tuple(int(t) for t in p.stop_token_ids),
        logprobs=bool(p.logprobs),
        ignore_eos=bool(p.ignore_eos),
        top_logprobs=int(p.top_logprobs),
    )


def prompt_ids(engine: Engine, request) -> list[int]:
    """The prompt of a Generate or Score request: token ids, a chat or a text."""
    messages = getattr(request, "messages", ())
    fields = {"prompt": request.prompt, "prompt_token_ids": request.prompt_token_ids,
              "messages": messages}  # fmt: skip
    given = [name for name, value in fields.items() if value]
    if len(given) > 1:
        raise InvalidArgument(f"give one of prompt, prompt_token_ids and messages, not {given}")
    if request.prompt_token_ids:
        return list(request.prompt_token_ids)
    if messages:
        return engine.encode_chat([(m.role, m.content) for m in messages])
    if request.prompt:
        return engine.encode(request.prompt)
    raise InvalidArgument("prompt is empty: give prompt, prompt_token_ids or messages")


def _compute(method):
    """A unary RPC that runs torch on its thread: on a passing thread instead of the gRPC
    worker's (whose OpenMP team would stay, and throttle the step loop's; passing.py)."""

    @functools.wraps(method)
    def rpc(self, request, context):
        return on_a_passing_thread(lambda: method(self, request, context), name=method.__name__)

    return rpc


def _next_token_logprobs(logits, ids: list[int]):
    """(log-softmax of every position but the last [n-1, vocab], log p(ids[t+1]) [n-1])."""
    import torch

    lp = torch.log_softmax(logits[:-1].float(), dim=-1)
    nxt = torch.tensor(ids[1:], dtype=torch.long)
    return lp, lp.gather(1, nxt[:, None]).squeeze(1)


def _top(engine: Engine, pairs) -> common_pb2.TopLogprobs:
    ids = [int(t) for t, _ in pairs]
    return common_pb2.TopLogprobs(
        token_ids=ids, tokens=[engine.token_piece(t) for t in ids], logprobs=[lp for _, lp in pairs]
    )


class ExecutorServicer(executor_pb2_grpc.ExecutorServicer):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def _check_revision(self, rev: common_pb2.AdapterRevision) -> None:
        """What the catalog says about the revision, checked before any fetch."""
        e = self.engine
        if rev.base_fingerprint and rev.base_fingerprint != e.base_fingerprint:
            raise BaseModelMismatch(
                f"adapter {rev.ref or rev.digest[:12]} was made for base model "
                f"{rev.base_fingerprint[:12]}…, this executor serves {e.base_fingerprint[:12]}…"
            )
        max_rank = e.residency.max_rank
        if rev.rank > max_rank:
            raise InvalidArgument(
                f"adapter {rev.ref or rev.digest[:12]} has rank {rev.rank}, above max_rank "
                f"{max_rank} of this executor"
            )
        bad = sorted(set(rev.target_modules) - set(TARGET_MODULES))
        if bad:
            raise InvalidArgument(
                f"adapter {rev.ref or rev.digest[:12]} targets {bad}; this executor serves "
                f"LoRA on {list(TARGET_MODULES)}"
            )

    def Generate(self, request: executor_pb2.ExecutorGenerateRequest, context):
        e = self.engine
        has_adapter = request.HasField("adapter") and bool(request.adapter.digest)
        if has_adapter:
            self._check_revision(request.adapter)
        ids = prompt_ids(e, request)
        left = context.time_remaining()
        deadline = time.monotonic() + left if left is not None else None
        handle = e.submit(
            GenerationRequest(
                prompt_token_ids=ids,
                sampling=sampling_from_proto(request.sampling),
                adapter_digest=request.adapter.digest if has_adapter else None,
                request_id=request.request_id,
                deadline=deadline,
                tenant=request.tenant or (request.adapter.tenant if has_adapter else ""),
            )
        )
        if not context.add_callback(handle.cancel):
            handle.cancel()
        first = True
        try:
            for out in handle.chunks():
                chunk = common_pb2.GenerationChunk(
                    token_ids=out.token_ids,
                    text=out.text,
                    logprobs=out.logprobs,
                    request_id=request.request_id,
                    tokens=out.tokens,
                    top_logprobs=[_top(e, pairs) for pairs in out.top_logprobs],
                )
                if first:
                    if has_adapter:
                        chunk.adapter.CopyFrom(request.adapter)
                    chunk.executor = e.executor_id
                    first = False
                if out.finish_reason == FINISH_CANCELLED and handle.expired():
                    context.abort(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"request {request.request_id or ''} ran past its deadline after "
                        f"{out.completion_tokens} tokens",
                    )
                if out.finish_reason is not None:
                    chunk.finish_reason = _FINISH[out.finish_reason]
                    chunk.usage.prompt_tokens = out.prompt_tokens
                    chunk.usage.completion_tokens = out.completion_tokens
                yield executor_pb2.ExecutorGenerateResponse(chunk=chunk)
        finally:
            handle.cancel()

    @_compute
    def Forward(
        self, request: executor_pb2.ForwardRequest, context
    ) -> executor_pb2.ForwardResponse:
        want = request.output or executor_pb2.FORWARD_OUTPUT_LOGITS
        if want not in (executor_pb2.FORWARD_OUTPUT_LOGITS, executor_pb2.FORWARD_OUTPUT_LOGPROBS):
            raise InvalidArgument(f"output={request.output} is not a ForwardOutput")
        rows = [(r.adapter_digest or None, list(r.token_ids)) for r in request.rows]
        vocab = self.engine.vocab_size
        if want == executor_pb2.FORWARD_OUTPUT_LOGITS:
            n = sum(len(ids) for _, ids in rows) * vocab
            if n > _MAX_FLOATS:
                raise InvalidArgument(
                    f"output=FORWARD_OUTPUT_LOGITS for {sum(len(i) for _, i in rows)} tokens x "
                    f"vocab {vocab} is {n} floats, over the {MAX_MESSAGE_BYTES} byte message "
                    "limit; send fewer tokens or ask for FORWARD_OUTPUT_LOGPROBS"
                )
        left = context.time_remaining()
        logits = self.engine.forward(rows, timeout=left)
        resp = executor_pb2.ForwardResponse()
        for (_, ids), lg in zip(rows, logits, strict=True):
            row = resp.rows.add(num_tokens=len(ids), vocab_size=int(lg.shape[-1]))
            if want == executor_pb2.FORWARD_OUTPUT_LOGITS:
                row.logits.extend(lg.reshape(-1).tolist())
            else:
                row.logprobs.extend(_next_token_logprobs(lg, ids)[1].tolist())
        return resp

    @_compute
    def Score(self, request: executor_pb2.ExecutorScoreRequest, context):
        import torch

        from mintmesh.services.executor.sampling import MAX_TOP_LOGPROBS

        e = self.engine
        has_adapter = request.HasField("adapter") and bool(request.adapter.digest)
        if has_adapter:
            self._check_revision(request.adapter)
        k = int(request.top_logprobs)
        if k > MAX_TOP_LOGPROBS:
            raise InvalidArgument(f"top_logprobs={k} must be in [0, {MAX_TOP_LOGPROBS}]")
        ids = prompt_ids(e, request)
        digest = request.adapter.digest if has_adapter else None
        (lg,) = e.forward([(digest, ids)], timeout=context.time_remaining())
        res = common_pb2.ScoreResult(
            token_ids=ids, tokens=[e.token_piece(t) for t in ids], executor=e.executor_id
        )
        if has_adapter:
            res.adapter.CopyFrom(request.adapter)
        if len(ids) > 1:
            lp, chosen = _next_token_logprobs(lg, ids)
            res.logprobs.extend(chosen.tolist())
            if k:
                vals, idx = torch.topk(lp, k, dim=-1)
                for v, i in zip(vals.tolist(), idx.tolist(), strict=True):
                    res.top_logprobs.append(_top(e, list(zip(i, v, strict=True))))
        return executor_pb2.ExecutorScoreResponse(result=res)

    # -- training ----------------------------------------------------------------------------

    @_compute
    def CreateTrainingRun(self, request, context):
        import uuid

        from mintmesh.services.executor.training import LoraSpec, TrainingState

        lora = request.lora
        spec = LoraSpec(int(lora.rank), float(lora.alpha), tuple(lora.target_modules))
        run_id = request.run_id or f"run-{uuid.uuid4().hex[:16]}"
        init = None
        if request.init_state:
            init = TrainingState.parse(request.init_state)
        elif request.init_adapter:
            init = TrainingState.from_packed(request.init_adapter)
            init.data_digest = request.parent_data_digest
        elif request.with_optimizer:
            raise InvalidArgument("with_optimizer needs the revision's training state")
        q = self.engine.training()
        run = q.trainer.create_run(
            run_id,
            request.tenant,
            spec,
            seed=int(request.seed),
            init=init,
            optimizer=request.with_optimizer,
            replace=request.replace,
        )
        run.parent_ref = request.parent_ref
        return training_pb2.CreateTrainingRunResponse(
            run_id=run_id,
            executor=self.engine.executor_id,
            trainable_parameters=run.numel(),
            lora=training_pb2.LoraConfig(
                rank=run.spec.rank, alpha=run.spec.alpha, target_modules=list(run.spec.targets)
            ),
            steps=run.steps,
        )

    @_compute
    def ForwardBackward(self, request, context):
        from mintmesh.services.executor.training import Datum

        data = [
            Datum(
                input_ids=list(d.input_ids),
                target_tokens=list(d.target_tokens),
                weights=list(d.weights) or None,
                logprobs=list(d.logprobs) or None,
                advantages=list(d.advantages) or None,
            )
            for d in request.data
        ]
        if request.loss_fn == "reverse_kl":
            self._reference_logprobs(request, data, context)
        res = self.engine.training().submit(
            request.run_id,
            data,
            request.loss_fn or "cross_entropy",
            dict(request.loss_fn_config),
            forward_only=request.forward_only,
            timeout=context.time_remaining(),
        )
        return training_pb2.ForwardBackwardResponse(
            outputs=[training_pb2.DatumLogprobs(logprobs=lp) for lp in res.logprobs],
            metrics=res.metrics,
        )

    def _reference_logprobs(self, request, data, context) -> None:
        """reverse_kl: each datum's reference log-probabilities at the loss's temperature, from
        the reference revision (or the base) over its reference input, right-aligned with the
        student's input."""
        import math

        import torch

        tau = request.loss_fn_config.get("temperature", 1.0)
        if not math.isfinite(tau) or tau <= 0:
            raise InvalidArgument(f"temperature={tau} must be a finite number > 0")
        has_ref = request.HasField("reference") and bool(request.reference.digest)
        if has_ref:
            self._check_revision(request.reference)
        digest = request.reference.digest if has_ref else None
        rows = []
        for i, d in enumerate(request.data):
            if not d.reference_input_ids:
                raise InvalidArgument(f"data[{i}].reference_input is empty")
            rows.append((digest, list(d.reference_input_ids)))
        logits = self.engine.forward(rows, timeout=context.time_remaining())
        for i, (d, lg) in enumerate(zip(data, logits, strict=True)):
            n, m = len(d.input_ids), int(lg.shape[0])
            shift = m - n
            first = next((t for t, w in enumerate(d.weights or []) if w != 0), n)
            if first + shift < 0:
                raise InvalidArgument(
                    f"data[{i}]: position {first} has weight but the reference input "
                    f"({m} tokens) is shorter than the student's ({n}) before it: the inputs "
                    "are right-aligned (the same completion at the end of each)"
                )
            lq = torch.zeros(n, int(lg.shape[1]))
            lo = max(0, -shift)
            lq[lo:] = torch.log_softmax(lg[lo + shift :].float() / tau, dim=-1)
            d.reference_logprobs = lq

    @_compute
    def OptimStep(self, request, context):
        from mintmesh.services.executor.training import AdamParams

        q = self.engine.training()
        run = q.trainer.run(request.run_id)
        a = request.adam
        given = {f: getattr(a, f) for f in AdamParams.__dataclass_fields__ if a.HasField(f)}
        adam = AdamParams(**given)
        with q.trainer.quiet(run):  # not while a batch of the run is under way
            metrics = run.optim_step(adam)
        return training_pb2.OptimStepResponse(metrics=metrics, steps=run.steps)

    @_compute
    def SaveRunWeights(self, request, context):
        q = self.engine.training()
        run = q.trainer.run(request.run_id)
        with q.trainer.quiet(run):
            cfg, data = run.peft_bytes()
            state = run.state_bytes() if request.with_state else b""
            # Adapter-only handoff: the revision this becomes (the store packs these PEFT
            # bytes to the same digest) is ready here before the store has it; the router's
            # prefetch then finds it resident.
            try:
                digest, _ = run.install(self.engine)
            except MintError as e:  # a head start only: the save itself goes on
                logger.info("installing run %s's weights here failed: %s", request.run_id, e)
                digest = ""
        return training_pb2.SaveRunWeightsResponse(
            digest=digest,
            adapter_config_json=cfg,
            safetensors=data,
            steps=run.steps,
            last_loss=run.last_loss if run.last_loss is not None else float("nan"),
            data_digest=run.data_hash.hexdigest(),
            state=state,
        )

    def DropTrainingRun(self, request, context):
        self.engine.training().trainer.drop_run(request.run_id)
        return training_pb2.DropTrainingRunResponse()

    def _held_run(self, run_id: str):
        """A run this executor holds (TrainingRunNotFound if none), without setting up
        training here when nothing trained yet (as engine.training() would)."""
        q = self.engine.timeshare.queue
        if q is None:
            raise TrainingRunNotFound(
                f"no training run {run_id!r} on this executor", metadata={"run_id": run_id}
            )
        return q.trainer.run(run_id)

    def LocateTrainingRun(self, request, context):
        run = self._held_run(request.run_id)
        return training_pb2.LocateTrainingRunResponse(
            tenant=run.tenant, parent_ref=run.parent_ref, steps=run.steps
        )

    def NoteTrainingRunSaved(self, request, context):
        if not request.ref:
            raise InvalidArgument("ref is empty: the revision the run's save landed as")
        if len(request.ref) > 512:
            raise InvalidArgument(f"ref is {len(request.ref)} characters (at most 512)")
        self._held_run(request.run_id).parent_ref = request.ref
        return training_pb2.NoteTrainingRunSavedResponse()

    def Status(self, request, context) -> executor_pb2.ExecutorStatusResponse:
        st = self.engine.status(node_cache=request.include_node_cache)
        resp = self._status(st)
        q = self.engine.timeshare.queue
        if q is not None:
            resp.training_runs = len(q.trainer.runs)
            resp.training_bytes = q.trainer.bytes_used()
            resp.training_batches = q.batches
            resp.training_calls = q.batched_calls
            resp.training_tokens = q.trainer.tokens_trained
            resp.training_runs_expired = q.trainer.expired_runs
        return resp

    @staticmethod
    def _status(st) -> executor_pb2.ExecutorStatusResponse:
        return executor_pb2.ExecutorStatusResponse(
            executor_id=st.executor_id,
            base_fingerprint=st.base_fingerprint,
            resident_adapters=st.resident_adapters,
            queue_depth=st.queue_depth,
            running=st.running,
            max_batch_size=st.max_batch_size,
            max_adapters=st.max_adapters,
            device=st.device,
            draining=st.draining,
            kernel_backend=st.kernel_backend,
            loading=st.loading,
            tokens_per_s=st.tokens_per_s,
            kv_blocks_used=st.kv_blocks_used,
            kv_blocks_total=st.kv_blocks_total,
            kv_block_size=st.kv_block_size,
            host_adapters=st.host_adapters,
            node_cache_adapters=st.node_cache_adapters,
            loading_adapters=st.loading_adapters,
            adapter_pool_bytes_used=st.adapter_pool_bytes_used,
            adapter_pool_bytes_total=st.adapter_pool_bytes_total,
            host_bytes_used=st.host_bytes_used,
            host_bytes_total=st.host_bytes_total,
            steps=st.steps,
            preemptions=st.preemptions,
            tokens_generated=st.tokens_generated,
            prefix_caching=st.prefix_caching,
            prefix_query_tokens=st.prefix_query_tokens,
            prefix_hit_tokens=st.prefix_hit_tokens,
            kv_blocks_cached=st.kv_blocks_cached,
            dense_kernels=st.dense_kernels,
            runner=st.runner,
        )

    def PurgeAdapters(self, request, context) -> executor_pb2.PurgeAdaptersResponse:
        left = context.time_remaining()
        purged, busy = self.engine.purge(
            list(request.digests), timeout=30.0 if left is None else max(0.0, left - 1.0)
        )
        return executor_pb2.PurgeAdaptersResponse(purged=purged, busy=busy)

    def PrefetchAdapters(self, request, context) -> executor_pb2.PrefetchAdaptersResponse:
        resident, queued, dropped = self.engine.prefetch(list(request.digests))
        return executor_pb2.PrefetchAdaptersResponse(
            resident=resident, queued=queued, dropped=dropped
        )


def add_to_server(engine: Engine, server: grpc.Server) -> list[str]:
    executor_pb2_grpc.add_ExecutorServicer_to_server(ExecutorServicer(engine), server)
    return [executor_pb2.DESCRIPTOR.services_by_name["Executor"].full_name]
