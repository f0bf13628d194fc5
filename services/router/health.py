"""Background health checks of executors (grpc.health.v1) and their Status."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mintmesh.services.common.server import mesh_channel
from mintmesh.v1 import executor_pb2, executor_pb2_grpc

logger = logging.getLogger(__name__)


@dataclass
class ExecutorState:
    address: str
    channel: grpc.Channel
    stub: executor_pb2_grpc.ExecutorStub
    health: health_pb2_grpc.HealthStub
    healthy: bool = False
    error: str = ""
    status: executor_pb2.ExecutorStatusResponse = field(
        default_factory=executor_pb2.ExecutorStatusResponse
    )


class ExecutorSet:
    """The executors the router knows, kept up to date by one checker thread."""

    def __init__(self, addresses: tuple[str, ...], interval_s: float = 1.0):
        self.interval_s = interval_s
        self.executors: dict[str, ExecutorState] = {}
        for addr in addresses:
            ch = mesh_channel(addr, traced=True)
            self.executors[addr] = ExecutorState(
                address=addr,
                channel=ch,
                stub=executor_pb2_grpc.ExecutorStub(ch),
                health=health_pb2_grpc.HealthStub(mesh_channel(addr, traced=False)),
            )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="executor-health", daemon=True)

    def start(self) -> None:
        self.check_all()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        for st in self.executors.values():
            st.channel.close()

    def healthy(self) -> list[str]:
        return [a for a, st in self.executors.items() if st.healthy]

    def mark_unhealthy(self, address: str, error: str) -> None:
        st = self.executors.get(address)
        if st is not None:
            st.healthy = False
            st.error = error

    def check_all(self) -> None:
        for st in self.executors.values():
            self._check(st)

    def _check(self, st: ExecutorState) -> None:
        try:
            resp = st.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
            ok = resp.status == health_pb2.HealthCheckResponse.SERVING
            if ok:
                st.status = st.stub.Status(executor_pb2.ExecutorStatusRequest(), timeout=1.0)
            if ok != st.healthy:
                logger.info("executor %s is now %s", st.address, "healthy" if ok else "unhealthy")
            st.healthy, st.error = ok, "" if ok else "not serving"
        except grpc.RpcError as err:
            if st.healthy:
                logger.warning("executor %s failed its health check: %s", st.address, err.code())
            st.healthy, st.error = False, f"{err.code().name}: {err.details()}"

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.check_all()
