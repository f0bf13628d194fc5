"""Router logic: resolve the adapter, place the request, stream from the executor, retry.

Plain Python over gRPC stubs; the servicer only translates. Deadlines: every downstream call
gets the time left on the caller's deadline (or the configured default).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator

import grpc

from mintmesh import errors as E
from mintmesh.client import fetched_bytes, push_header, push_requests
from mintmesh.services.common.auth import ADMIN, Principal
from mintmesh.services.common.errors import error_info, reraise_downstream
from mintmesh.services.common.server import STORE_READS, mesh_channel
from mintmesh.services.router.auth import RouterAuth
from mintmesh.services.router.config import RouterConfig
from mintmesh.services.router.health import ExecutorSet
from mintmesh.services.router.metrics import RouterMetrics
from mintmesh.services.router.placement import Placement
from mintmesh.v1 import (
    common_pb2,
    executor_pb2,
    router_pb2,
    store_pb2,
    store_pb2_grpc,
    training_pb2,
)

logger = logging.getLogger(__name__)
BASE_KEY = "__base__"
# Errors that mean "this executor can't take it now; another may".
_FAILOVER = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
# Refs per Prefetch call (an executor keeps at most 64 hints pending by default).
MAX_PREFETCH_REFS = 64


def _interrupted(err: grpc.RpcError, address: str, chunks: int) -> E.MintError:
    """The domain error for a generation whose executor failed after streaming `chunks` chunks:
    the downstream code kept, reason GENERATION_INTERRUPTED, where it broke in the metadata."""
    exc = reraise_downstream(err, f"generating on {address}")
    code = err.code()
    exc.message = (
        f"generation interrupted after {chunks} chunk(s) from executor {address} "
        f"({code.name if code else 'error'}: {err.details()}); not retried, since the chunks "
        "already streamed would be generated again"
    )
    exc.args = (exc.message,)
    exc.reason = "GENERATION_INTERRUPTED"
    exc.metadata.update(
        executor=address, chunks_streamed=str(chunks), downstream_code=code.name if code else ""
    )
    return exc


def _run_id_ok(run_id: str) -> bool:
    """A training run id: letters, digits, - and _, at most 128 characters."""
    return 0 < len(run_id) <= 128 and run_id.replace("-", "").replace("_", "").isalnum()


class RouterCore:
    def __init__(self, config: RouterConfig):
        self.config = config
        self.store_channel = mesh_channel(
            config.store_address, wait_for_ready=True, idempotent=STORE_READS
        )
        self.store = store_pb2_grpc.AdapterStoreStub(self.store_channel)
        self.executors = ExecutorSet(config.executors, config.health_interval_s)
        self.placement = Placement(config.load_epsilon)
        self.metrics = RouterMetrics(config.executors)
        self.auth = RouterAuth(
            self.store,
            enabled=config.auth,
            internal_token=config.internal_token,
            failures_per_minute=config.auth_failures_per_minute,
        )
        # Training runs: run id -> [executor address, tenant, parent revision ref]. A run stays
        # where it was made; its parent is the revision it started from or last saved.
        self._runs: dict[str, list[str]] = {}
        self._runs_lock = threading.Lock()

    def start(self) -> None:
        self.executors.start()
        self.auth.start()

    def stop(self) -> None:
        self.auth.stop()
        self.executors.stop()
        self.store_channel.close()

    def _deadline(self, timeout: float | None, default: float) -> float:
        return time.monotonic() + (timeout if timeout is not None else default)

    def resolve(
        self, ref: str, timeout: float, caller: Principal = ADMIN
    ) -> common_pb2.AdapterRevision:
        try:
            return self.store.ResolveAdapter(
                store_pb2.ResolveAdapterRequest(ref=ref),
                timeout=timeout,
                metadata=self.auth.internal_metadata(caller),
            ).revision
        except grpc.RpcError as err:
            raise reraise_downstream(err, f"resolving {ref!r}") from None

    def _healthy(self) -> list[str]:
        healthy = self.executors.healthy()
        if not healthy:
            raise E.Unavailable(
                f"no healthy executor (of {len(self.executors.executors)} configured)"
            )
        return healthy

    def _place(
        self, adapter: str, deadline: float, caller: Principal
    ) -> tuple[common_pb2.AdapterRevision, list[str]]:
        """The revision adapter names (empty: the base model) and the executors to try."""
        revision = common_pb2.AdapterRevision()
        if adapter:
            # Checked before resolving, so another tenant's adapter names do not leak.
            caller.check_ref(adapter)
            left = deadline - time.monotonic()
            revision = self.resolve(adapter, min(left, self.config.store_timeout_s), caller)
        key = revision.digest or BASE_KEY
        healthy = self._healthy()
        return revision, self.placement.order(healthy, key)

    def score(
        self, req: router_pb2.ScoreRequest, time_left: float | None, caller: Principal = ADMIN
    ) -> router_pb2.ScoreResponse:
        """A prompt's log-probabilities, on the executor its Generate would go to (so its KV
        prefix and adapter are shared); a refusal is retried on the next, as for Generate."""
        deadline = self._deadline(time_left, self.config.request_timeout_s)
        revision, order = self._place(req.adapter, deadline, caller)
        ereq = executor_pb2.ExecutorScoreRequest(
            adapter=revision,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_token_ids,
            top_logprobs=req.top_logprobs,
        )
        last_err: grpc.RpcError | None = None
        for address in order[:2]:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.placement.acquire(address)
            self.metrics.placed(address, retry=last_err is not None)
            try:
                resp = self.executors.executors[address].stub.Score(ereq, timeout=left)
                return router_pb2.ScoreResponse(result=resp.result)
            except grpc.RpcError as err:
                if err.code() not in _FAILOVER:
                    raise reraise_downstream(err, f"scoring on {address}") from None
                if err.code() == grpc.StatusCode.UNAVAILABLE:
                    self.executors.mark_unhealthy(address, err.details() or "unavailable")
                last_err = err
            finally:
                self.placement.release(address)
        if last_err is None:
            raise E.Unavailable("deadline exceeded before an executor accepted the request")
        raise reraise_downstream(last_err, "scoring") from None

    def generate(
        self, req: router_pb2.GenerateRequest, time_left: float | None, caller: Principal = ADMIN
    ) -> Iterator[router_pb2.GenerateResponse]:
        deadline = self._deadline(time_left, self.config.request_timeout_s)
        revision, order = self._place(req.adapter, deadline, caller)
        ereq = executor_pb2.ExecutorGenerateRequest(
            adapter=revision,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_token_ids,
            sampling=req.sampling,
            request_id=req.request_id,
            messages=req.messages,
            tenant=caller.tenant,  # the batch's fairness key: who asks, not whose adapter
        )
        last_err: grpc.RpcError | None = None
        soonest_retry: float | None = None  # over the executors that said RESOURCE_EXHAUSTED
        unavailable_tries = 0
        for address in order:
            state = self.executors.executors[address]
            left = deadline - time.monotonic()
            if left <= 0:
                raise E.Unavailable("deadline exceeded before an executor accepted the request")
            self.placement.acquire(address)
            self.metrics.placed(address, retry=last_err is not None)
            call = state.stub.Generate(ereq, timeout=left)
            chunks = 0
            try:
                for resp in call:
                    chunks += 1
                    yield router_pb2.GenerateResponse(chunk=resp.chunk)
                return
            except grpc.RpcError as err:
                code = err.code()
                if chunks:
                    # The caller holds part of this generation: another executor would start it
                    # over, so the error goes back as it is, saying how far the stream got.
                    raise _interrupted(err, address, chunks) from None
                if code not in _FAILOVER:
                    raise reraise_downstream(err, f"generating on {address}") from None
                last_err = err
                if code == grpc.StatusCode.UNAVAILABLE:
                    self.executors.mark_unhealthy(address, err.details() or "unavailable")
                    unavailable_tries += 1
                    if unavailable_tries > 1:
                        break
                else:
                    retry = error_info(err)[2]
                    if retry is not None:
                        soonest_retry = (
                            retry if soonest_retry is None else min(soonest_retry, retry)
                        )
                logger.info("executor %s refused (%s); trying the next", address, code.name)
            finally:
                call.cancel()
                self.placement.release(address)
        assert last_err is not None
        exc = reraise_downstream(last_err, "generating")
        if isinstance(exc, E.ResourceExhausted) and soonest_retry is not None:
            # Every executor refused: the client may come back when the first expects room.
            exc.retry_after_s = soonest_retry
        raise exc from None

    # -- training ------------------------------------------------------------------------------

    def create_run(self, req, time_left: float | None, caller: Principal = ADMIN):
        """Place a new training run (rendezvous on its id over healthy executors; the first
        that has room takes it) and remember where it lives. from_ref: the run starts from that
        revision (resolved as the caller; its training state, when it has one, gives the exact
        fp32 weights, and with_optimizer its AdamW state). replace: the live run of that id is
        replaced on its executor (load_state)."""
        deadline = self._deadline(time_left, self.config.request_timeout_s)
        run_id = req.run_id or f"run-{uuid.uuid4().hex[:16]}"
        if not _run_id_ok(run_id):
            raise E.InvalidArgument(f"run_id {run_id!r}: letters, digits, - and _ only (<= 128)")
        with self._runs_lock:
            where = self._runs.get(run_id)
        if where is None and req.run_id:  # perhaps known to an executor (this router restarted)
            # Unavailable when an executor could not say: it may hold the id (a run placed
            # afresh would be a second one of that id).
            where = self._locate(run_id, deadline)
        owner = where is not None and (caller.is_admin or where[1] == caller.tenant)
        live = where is not None and where[0] in self.executors.healthy()
        # The owner's id on a live executor goes there: it answers ALREADY_EXISTS while the
        # run lives, and makes it afresh when it dropped the run idle (which no call told this
        # router of).
        if where is not None and not req.replace and not (owner and live):
            raise E.AlreadyExists(f"training run {run_id!r} exists")
        if where is not None and not owner:
            raise E.AdapterNotFound(f"no training run {run_id!r}")
        if req.replace and not req.from_ref:
            raise E.InvalidArgument("replace loads a revision into a run: give from_ref")
        if req.with_optimizer and not req.from_ref:
            raise E.InvalidArgument("with_optimizer needs from_ref (a saved training state)")
        ereq = training_pb2.CreateTrainingRunRequest()
        ereq.CopyFrom(req)
        ereq.run_id, ereq.tenant = run_id, caller.tenant
        parent = self._load_init(ereq, deadline, caller) if req.from_ref else ""
        ereq.parent_ref = parent
        if where is not None and live:
            addresses = [where[0]]  # the run stays where it lives (or lived)
        else:  # a new run, or one whose executor died: placed afresh
            addresses = self.placement.order(self._healthy(), f"run:{run_id}")
            where = None
        last: grpc.RpcError | None = None
        for address in addresses:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                resp = self.executors.executors[address].stub.CreateTrainingRun(ereq, timeout=left)
            except grpc.RpcError as err:
                if err.code() not in _FAILOVER or where is not None:
                    raise reraise_downstream(err, f"creating run on {address}") from None
                last = err
                continue
            with self._runs_lock:
                self._runs[run_id] = [address, caller.tenant, parent]
            return resp
        if last is None:
            raise E.Unavailable("deadline exceeded before an executor took the run")
        raise reraise_downstream(last, "creating a training run") from None

    def _load_init(self, ereq, deadline: float, caller: Principal) -> str:
        """Fill in what ereq.from_ref resolves to: its training state (exact), or its packed
        adapter when it has none, and its data digest; returns the revision's ref."""
        rev = self.resolve(ereq.from_ref, max(0.001, deadline - time.monotonic()), caller)
        if ereq.with_optimizer and not rev.state_digest:
            raise E.FailedPrecondition(
                f"revision {rev.ref} holds no optimizer state: it was not saved with save_state "
                "(load its weights only)"
            )
        data = self._fetch(rev.ref, bool(rev.state_digest), deadline, caller)
        if rev.state_digest:
            ereq.init_state = data
        else:
            ereq.init_adapter = data
        ereq.parent_data_digest = rev.provenance.data_digest
        return rev.ref

    def _fetch(self, ref: str, state: bool, deadline: float, caller: Principal) -> bytes:
        try:
            return fetched_bytes(
                self.store.FetchAdapter(
                    store_pb2.FetchAdapterRequest(ref=ref, state=state),
                    timeout=max(0.001, deadline - time.monotonic()),
                    metadata=self.auth.internal_metadata(caller),
                )
            )
        except grpc.RpcError as err:
            raise reraise_downstream(err, f"fetching {ref!r}") from None
        except ValueError as e:
            raise E.Unavailable(f"the bytes of {ref!r} from the store: {e}") from None

    def _locate(self, run_id: str, deadline: float) -> list[str] | None:
        """Where run_id lives, asked of the healthy executors (in the order its placement
        tried them) when this router does not know: it restarted, and the runs live on. Found,
        it is remembered as placed here: [address, tenant, parent ref]. None when every
        healthy executor says it has no such run; Unavailable when one could not say (an
        error, or the deadline)."""
        if not _run_id_ok(run_id):
            return None  # no run has such an id: not worth asking anyone
        req = training_pb2.LocateTrainingRunRequest(run_id=run_id)
        unsure: list[str] = []
        for address in self.placement.order(self.executors.healthy(), f"run:{run_id}"):
            left = deadline - time.monotonic()
            if left <= 0:
                unsure.append(f"{address}: the deadline passed first")
                continue
            try:
                got = self.executors.executors[address].stub.LocateTrainingRun(
                    req, timeout=min(left, 5.0)
                )
            except grpc.RpcError as err:
                if error_info(err)[0] == E.TrainingRunNotFound.reason:
                    continue
                if err.code() == grpc.StatusCode.UNAVAILABLE:
                    self.executors.mark_unhealthy(address, err.details() or "unavailable")
                unsure.append(f"{address}: {err.code().name}")
                continue
            with self._runs_lock:
                where = self._runs.setdefault(run_id, [address, got.tenant, got.parent_ref])
            logger.info("training run %s found on %s (%d steps)", run_id, address, got.steps)
            return where
        if unsure:
            raise E.Unavailable(
                f"could not ask every executor for run {run_id!r} ({'; '.join(unsure)}); try again"
            )
        return None

    def _run_call(self, method: str, req, time_left: float | None, caller: Principal):
        """Send a call of run req.run_id to the executor it lives on."""
        deadline = self._deadline(time_left, self.config.request_timeout_s)
        with self._runs_lock:
            where = self._runs.get(req.run_id)
        if where is None:
            where = self._locate(req.run_id, deadline)
        # Another tenant's run is "not found", as for adapters.
        if where is None or not (caller.is_admin or where[1] == caller.tenant):
            raise E.AdapterNotFound(f"no training run {req.run_id!r}")
        address = where[0]
        if address not in self.executors.healthy():
            raise E.Unavailable(
                f"the executor of run {req.run_id!r} ({address}) is down; resume the run from "
                "its last saved state on another"
            )
        left = deadline - time.monotonic()
        try:
            return getattr(self.executors.executors[address].stub, method)(req, timeout=left)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.UNAVAILABLE:
                self.executors.mark_unhealthy(address, err.details() or "unavailable")
                raise E.Unavailable(
                    f"the executor of run {req.run_id!r} ({address}) went away during "
                    f"{method}: {err.details()}; resume the run from its last saved state on "
                    "another"
                ) from None
            reason, meta, _ = error_info(err)
            if reason == E.TrainingRunNotFound.reason and meta.get("run_id") == req.run_id:
                with self._runs_lock:  # gone there (dropped idle): its id is free again
                    if self._runs.get(req.run_id) is where:
                        self._runs.pop(req.run_id, None)
            raise reraise_downstream(err, f"{method} of run {req.run_id!r}") from None

    def forward_backward(self, req, time_left, caller: Principal = ADMIN):
        if req.reference_ref:  # reverse_kl's reference, resolved as the caller
            left = self._deadline(time_left, self.config.request_timeout_s) - time.monotonic()
            req.reference.CopyFrom(self.resolve(req.reference_ref, max(0.001, left), caller))
        return self._run_call("ForwardBackward", req, time_left, caller)

    def optim_step(self, req, time_left, caller: Principal = ADMIN):
        return self._run_call("OptimStep", req, time_left, caller)

    def drop_run(self, req, time_left, caller: Principal = ADMIN):
        with self._runs_lock:
            where = self._runs.get(req.run_id)
        gone = where is not None and where[0] not in self.executors.healthy()
        if gone and (caller.is_admin or where[1] == caller.tenant):
            with self._runs_lock:  # its executor is gone, and the run with it: forget it
                self._runs.pop(req.run_id, None)
            return training_pb2.DropTrainingRunResponse()
        resp = self._run_call("DropTrainingRun", req, time_left, caller)
        with self._runs_lock:
            self._runs.pop(req.run_id, None)
        return resp

    def save_run_weights(self, req, time_left, caller: Principal = ADMIN):
        """The run's LoRA as a new revision of req.name (provenance: training, with the run,
        its steps, its last loss and the digest of its training tokens), then hinted to the
        executor its requests go to, so it serves at once."""
        if not req.name:
            raise E.InvalidArgument("name is empty: the adapter (tenant/name) to save the run as")
        caller.check_ref(req.name)
        deadline = self._deadline(time_left, self.config.request_timeout_s)
        got = self._run_call("SaveRunWeights", req, time_left, caller)
        labels = dict(req.labels)
        labels.update(
            {
                "mint.train.run": req.run_id,
                "mint.train.steps": str(got.steps),
                "mint.train.last_loss": f"{got.last_loss:.6g}",
            }
        )
        with self._runs_lock:
            parent = self._runs[req.run_id][2] if req.run_id in self._runs else ""
        weights, state = got.safetensors, got.state
        header = push_header(
            req.name, got.adapter_config_json, weights, labels, source="training",
            data_digest=got.data_digest, state=state, parents=[parent] if parent else None,
        )  # fmt: skip
        try:
            rev = self.store.PushAdapter(
                push_requests(header, weights, state),
                timeout=max(0.001, deadline - time.monotonic()),
                metadata=self.auth.internal_metadata(caller),
            ).revision
        except grpc.RpcError as err:
            raise reraise_downstream(err, f"saving run {req.run_id!r} as {req.name!r}") from None
        try:
            self.prefetch([rev.ref], max(0.001, deadline - time.monotonic()), caller)
        except E.MintError as e:  # a hint: the revision is saved whatever happens here
            logger.info("prefetch of the saved revision %s failed: %s", rev.ref, e)
        if got.digest and got.digest != rev.digest:  # the executor's pack is the store's
            logger.warning(
                "run %s: the executor packed digest %s, the store %s", req.run_id,
                got.digest[:12], rev.digest[:12],
            )  # fmt: skip
        with self._runs_lock:
            where = self._runs.get(req.run_id)
            if where is not None:
                where[2] = rev.ref
        if where is not None:  # the executor keeps it too, for a router that restarts
            try:  # given a second even when the save used up the caller's deadline
                self.executors.executors[where[0]].stub.NoteTrainingRunSaved(
                    training_pb2.NoteTrainingRunSavedRequest(run_id=req.run_id, ref=rev.ref),
                    timeout=max(1.0, min(5.0, deadline - time.monotonic())),
                )
            except grpc.RpcError as err:  # the save stands; only a restarted router's map lacks it
                logger.info("noting run %s's save on %s: %s", req.run_id, where[0], err.code().name)
        got.ref, got.digest, got.parent_ref = rev.ref, rev.digest, parent
        got.ClearField("safetensors")
        got.ClearField("adapter_config_json")
        got.ClearField("state")
        return got

    def prefetch(
        self, refs: list[str], time_left: float | None, caller: Principal = ADMIN
    ) -> router_pb2.RouterPrefetchResponse:
        """Resolve each ref and send the executor its Generate would go to a prefetch hint
        (one PrefetchAdapters call per executor). Bad or unknown refs fail the whole call
        before any hint is sent; an executor that cannot take its hints is reported dropped."""
        deadline = self._deadline(time_left, self.config.store_timeout_s)
        if not refs:
            raise E.InvalidArgument("prefetch needs at least one adapter ref")
        if len(refs) > MAX_PREFETCH_REFS:
            raise E.InvalidArgument(
                f"prefetch of {len(refs)} refs; at most {MAX_PREFETCH_REFS} per call"
            )
        revisions: list[tuple[str, common_pb2.AdapterRevision]] = []
        for ref in dict.fromkeys(refs):
            caller.check_ref(ref)
            left = deadline - time.monotonic()
            rev = self.resolve(ref, min(left, self.config.store_timeout_s), caller)
            revisions.append((ref, rev))
        healthy = self._healthy()
        by_executor: dict[str, list[tuple[str, common_pb2.AdapterRevision]]] = {}
        for ref, rev in revisions:
            first = self.placement.order(healthy, rev.digest)[0]
            by_executor.setdefault(first, []).append((ref, rev))
        out = router_pb2.RouterPrefetchResponse()
        for address, revs in by_executor.items():
            digests = list(dict.fromkeys(r.digest for _, r in revs))
            resident: set[str] = set()
            dropped: set[str] = set()
            try:
                resp = self.executors.executors[address].stub.PrefetchAdapters(
                    executor_pb2.PrefetchAdaptersRequest(digests=digests),
                    timeout=max(0.001, min(deadline - time.monotonic(), 5.0)),
                )
                resident, dropped = set(resp.resident), set(resp.dropped)
            except grpc.RpcError as err:
                logger.warning("prefetch hints to %s failed: %s", address, err.code().name)
                dropped = set(digests)
            for ref, r in revs:
                out.placements.append(
                    router_pb2.PrefetchPlacement(
                        adapter=ref,
                        digest=r.digest,
                        executor=address,
                        resident=r.digest in resident,
                        dropped=r.digest in dropped,
                    )
                )
        return out

    def after_delete(self, response: bytes) -> None:
        """Purge deleted revisions from every executor (device pool and node cache)."""
        resp = store_pb2.DeleteAdapterResponse.FromString(response)
        # Only digests no live revision still shares: the store freed their bytes.
        digests = sorted(set(resp.deleted_digests))
        if digests:
            self.purge(digests)

    def purge(self, digests: list[str]) -> None:
        for address, st in self.executors.executors.items():
            try:
                st.stub.PurgeAdapters(
                    executor_pb2.PurgeAdaptersRequest(digests=digests), timeout=35.0
                )
            except grpc.RpcError as err:
                logger.warning(
                    "purging %d digests on %s failed: %s", len(digests), address, err.code().name
                )

    def status(self, caller: Principal = ADMIN) -> router_pb2.RouterStatusResponse:
        """Health of the store and each executor. Placement detail (addresses, the adapters
        resident on each, health-check errors) is for admins; a tenant sees health and load."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        self.executors.check_all()  # a fresh view, not the last periodic one
        store_ok = False
        try:
            h = health_pb2_grpc.HealthStub(self.store_channel)
            resp = h.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
            store_ok = resp.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            store_ok = False
        detail = caller.is_admin
        out = router_pb2.RouterStatusResponse(
            store_address=self.config.store_address if detail else "", store_healthy=store_ok
        )
        for addr, st in self.executors.executors.items():
            out.executors.append(
                router_pb2.ExecutorHealth(
                    address=addr if detail else "",
                    healthy=st.healthy,
                    executor_id=st.status.executor_id,
                    resident_adapters=list(st.status.resident_adapters) if detail else [],
                    queue_depth=st.status.queue_depth,
                    error=st.error if detail else ("unhealthy" if st.error else ""),
                )
            )
        return out
