"""A whole local cluster as real processes on 127.0.0.1: the store, N (cache sidecar, executor)
pairs, the router and the HTTP gateway. Used by `mint up`, `mint demo` and the end-to-end tests.

Every child is started with `python -m <service module>` on port 0 (the router on the port asked
for) and prints "READY <service> <address>" when it serves; its other output goes to a log file
under <data>/logs. stop() sends SIGTERM (graceful drain) in reverse start order, then SIGKILL to
anything still alive after the grace period.

Supervision (ClusterConfig.supervise, on by default): a child that exits while the cluster runs
is started again on the same ports (so its peers' channels reconnect to it) after a backoff that
doubles from 0.5 s to 10 s while it keeps dying, and resets once it has served for a minute.
Meanwhile the router serves from the other executors, and calls to a restarting store or sidecar
wait for it (wait_for_ready) within their deadlines.
"""

from __future__ import annotations

import ctypes
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import grpc

logger = logging.getLogger(__name__)


OPERATOR = "operator"  # the mesh certificate of tools and tests that call services directly


class ClusterError(RuntimeError):
    pass


# Linux's prctl(PR_SET_PDEATHSIG): a child started by a LocalCluster gets SIGTERM when the thread
# that started it exits, so a parent killed without stop() (kill -9 of `mint up`, a pytest run
# that timed out) does not leave its services running and holding their ports. Resolved here,
# before any fork: between fork and exec the child only calls it.
_PR_SET_PDEATHSIG = 1
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux: the children outlive a killed parent
    _prctl = None


def _die_with_parent(parent: int):
    def preexec() -> None:
        if _prctl is not None:
            _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the prctl took effect
            os._exit(1)

    return preexec


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str]
    proc: subprocess.Popen | None = None
    address: str = ""
    metrics_address: str = ""  # host:port of its /metrics, from "METRICS <service> <host:port>"
    _ready: threading.Event = field(default_factory=threading.Event)
    _reader: threading.Thread | None = None
    restarts: int = 0
    started_at: float = 0.0

    def pin_ports(self) -> None:
        """Once ready: run again on the same ports (its address and its metrics endpoint)."""
        for flag, addr in (("--port", self.address), ("--metrics-port", self.metrics_address)):
            if addr and flag in self.argv:
                self.argv[self.argv.index(flag) + 1] = addr.rpartition(":")[2]

    def start(self) -> None:
        self._ready = threading.Event()
        self.started_at = time.monotonic()
        self.log_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Logs name tenants and adapters: this user's only (0600).
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        log = os.fdopen(fd, "ab")
        self.proc = subprocess.Popen(
            self.argv,
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
            env=self.env,
            start_new_session=True,
            preexec_fn=_die_with_parent(os.getpid()),
            # Not the caller's directory: `python -m` puts its cwd first on sys.path, and from a
            # checkout the top-level kernels/ and cache/ folders would shadow the PyPI packages
            # of those names that transformers imports (transformers >= 5.25 needs `kernels`).
            cwd=str(self.log_path.parent),
        )
        self._reader = threading.Thread(
            target=self._read, args=(log,), name=f"out-{self.name}", daemon=True
        )
        self._reader.start()

    def _read(self, log) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace")
            if line.startswith("METRICS ") and not self._ready.is_set():
                parts = line.split()
                if len(parts) >= 3:
                    self.metrics_address = parts[2]
            if line.startswith("READY ") and not self._ready.is_set():
                parts = line.split()
                if len(parts) >= 3:
                    self.address = parts[2]
                    self._ready.set()
            log.write(raw)
            log.flush()
        log.close()

    def wait_ready(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.1):
            if self.proc is not None and self.proc.poll() is not None:
                raise ClusterError(
                    f"{self.name} exited with code {self.proc.returncode} before it was ready; "
                    f"log: {self.log_path}\n{tail(self.log_path)}"
                )
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"{self.name} not ready after {timeout:.0f}s; log: {self.log_path}\n"
                    f"{tail(self.log_path)}"
                )
        return self.address

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int | None:
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None


def tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


@dataclass
class ClusterConfig:
    model_dir: Path
    data_dir: Path
    executors: int = 2
    host: str = "127.0.0.1"
    port: int = 50051
    otlp_endpoint: str = ""
    max_batch_size: int = 32
    cache_capacity_bytes: int = 0
    env: dict[str, str] = field(default_factory=dict)
    # Tenants and API keys: on by default; the admin key is generated unless given.
    auth: bool = True
    admin_key: str = ""
    # The HTTP gateway (OpenAI API): its port (0 = any free one), or None for no gateway.
    http_port: int | None = 0
    # Restart a child that dies (see the module's docstring); False: leave it dead.
    supervise: bool = True
    # Mutual TLS between the services, from a CA made under <data>/certs (False: plaintext, for
    # development only; every service warns).
    mesh_tls: bool = True


class LocalCluster:
    def __init__(self, config: ClusterConfig):
        self.config = config
        self.children: dict[str, Child] = {}
        self.router_address = ""
        self.store_address = ""
        self.cache_addresses: list[str] = []
        self.executor_addresses: list[str] = []
        self.gateway_address = ""
        self.admin_key = config.admin_key or (
            f"mint_admin_{secrets.token_urlsafe(24)}" if config.auth else ""
        )
        self._internal_token = secrets.token_urlsafe(32) if config.auth else ""
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None
        self.events: list[str] = []  # what the supervisor did, oldest first

    @property
    def openai_base_url(self) -> str:
        """The gateway's OpenAI API root ("" without a gateway)."""
        return f"http://{self.gateway_address}/v1" if self.gateway_address else ""

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.config.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        # Each process is small: keep intra-op threads modest on shared CPUs.
        env.setdefault("OMP_NUM_THREADS", "2")
        if self.config.otlp_endpoint:
            env["MINT_OTLP_ENDPOINT"] = self.config.otlp_endpoint
        if self.config.auth:
            # Secrets travel in the environment, not on command lines others can read.
            env.update(
                MINT_STORE_AUTH="1",
                MINT_STORE_ADMIN_KEY=self.admin_key,
                MINT_STORE_INTERNAL_TOKEN=self._internal_token,
                MINT_CACHE_INTERNAL_TOKEN=self._internal_token,
                MINT_ROUTER_AUTH="1",
                MINT_ROUTER_INTERNAL_TOKEN=self._internal_token,
            )
        return env

    @property
    def certs_dir(self) -> Path:
        return self.config.data_dir / "certs"

    def _make_certs(self) -> None:
        from mintmesh.services.common.tls import make_mesh_pki

        names = ["store", "router", OPERATOR]
        names += [
            f"{kind}-{i}" for i in range(self.config.executors) for kind in ("cache", "executor")
        ]
        make_mesh_pki(self.certs_dir, names, hosts=[self.config.host])

    def mesh_credentials(self) -> tuple[grpc.ChannelCredentials | None, list[tuple[str, str]]]:
        """(credentials, options) of a mesh peer with the operator's certificate, for tools and
        tests that call an executor, a sidecar or the store directly; (None, []) in plaintext."""
        import grpc

        from mintmesh.services.common.tls import MESH_NAME

        if not self.config.mesh_tls:
            return None, []
        d = self.certs_dir
        creds = grpc.ssl_channel_credentials(
            root_certificates=(d / "ca.pem").read_bytes(),
            private_key=(d / f"{OPERATOR}-key.pem").read_bytes(),
            certificate_chain=(d / f"{OPERATOR}.pem").read_bytes(),
        )
        return creds, [("grpc.ssl_target_name_override", MESH_NAME)]

    def mesh_channel(self, address: str, *, aio: bool = False):
        """A channel (grpc, or grpc.aio with aio) to any service of this cluster as a peer."""
        import grpc

        api = grpc.aio if aio else grpc
        creds, options = self.mesh_credentials()
        if creds is None:
            return api.insecure_channel(address)
        return api.secure_channel(address, creds, options=options)

    def _child(self, name: str, module: str, args: list[str]) -> Child:
        argv = [sys.executable, "-m", module, *args]
        if self.config.otlp_endpoint:
            argv += ["--otlp-endpoint", self.config.otlp_endpoint]
        env = self._env()
        if module != "mintmesh.services.gateway":  # the gateway is a client of the router
            if self.config.mesh_tls:
                d = self.certs_dir
                env.update(
                    MINT_MESH_CA=str(d / "ca.pem"),
                    MINT_MESH_CERT=str(d / f"{name}.pem"),
                    MINT_MESH_KEY=str(d / f"{name}-key.pem"),
                )
            else:
                env["MINT_INSECURE_MESH"] = "1"
        child = Child(
            name=name,
            argv=argv,
            log_path=self.config.data_dir / "logs" / f"{name}.log",
            env=env,
        )
        self.children[name] = child
        return child

    def start(self, timeout: float = 180.0) -> str:
        c = self.config
        c.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if c.mesh_tls:
            self._make_certs()
        else:
            logger.warning(
                "the cluster's services talk in plaintext (mesh_tls off): development only"
            )
        try:
            store = self._child(
                "store",
                "mintmesh.services.store",
                [
                    "--data-dir",
                    str(c.data_dir / "store"),
                    "--model-dir",
                    str(c.model_dir),
                    "--host",
                    c.host,
                    "--port",
                    "0",
                    "--metrics-port",
                    "0",
                ],
            )
            store.start()
            self.store_address = store.wait_ready(timeout)
            caches = []
            for i in range(c.executors):
                args = [
                    "--cache-dir",
                    str(c.data_dir / f"node-{i}"),
                    "--store",
                    self.store_address,
                    "--host",
                    c.host,
                    "--port",
                    "0",
                    "--metrics-port",
                    "0",
                ]
                if c.cache_capacity_bytes:
                    args += ["--capacity-bytes", str(c.cache_capacity_bytes)]
                ch = self._child(f"cache-{i}", "mintmesh.cache", args)
                ch.start()
                caches.append(ch)
            self.cache_addresses = [ch.wait_ready(timeout) for ch in caches]
            execs = []
            for i in range(c.executors):
                ex = self._child(
                    f"executor-{i}",
                    "mintmesh.services.executor",
                    [
                        "--model-dir",
                        str(c.model_dir),
                        "--cache-dir",
                        str(c.data_dir / f"node-{i}"),
                        "--cache",
                        self.cache_addresses[i],
                        "--host",
                        c.host,
                        "--port",
                        "0",
                        "--executor-id",
                        f"executor-{i}",
                        "--max-batch-size",
                        str(c.max_batch_size),
                        "--metrics-port",
                        "0",
                    ],
                )
                ex.start()
                execs.append(ex)
            self.executor_addresses = [ex.wait_ready(timeout) for ex in execs]
            args = ["--store", self.store_address, "--host", c.host, "--port", str(c.port)]
            args += ["--metrics-port", "0"]
            for addr in self.executor_addresses:
                args += ["--executor", addr]
            router = self._child("router", "mintmesh.services.router", args)
            router.start()
            self.router_address = router.wait_ready(timeout)
            if c.http_port is not None:
                gw = self._child(
                    "gateway",
                    "mintmesh.services.gateway",
                    [
                        "--router",
                        self.router_address,
                        "--host",
                        c.host,
                        "--port",
                        str(c.http_port),
                        "--metrics-port",
                        "0",
                    ],  # fmt: skip
                )
                gw.start()
                self.gateway_address = gw.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        for child in self.children.values():
            child.pin_ports()
        try:
            self._wait_executors_healthy(timeout)
        except BaseException:
            self.stop()
            raise
        if c.supervise:
            self._supervisor = threading.Thread(
                target=self._supervise, name="cluster-supervisor", daemon=True
            )
            self._supervisor.start()
        return self.router_address

    def _supervise(self) -> None:
        """Restart children that exit, with a per-child backoff (see the module docstring)."""
        backoff: dict[str, float] = {}
        due: dict[str, float] = {}
        pending: set[str] = set()  # restarted, not ready yet
        while not self._stopping.wait(0.1):
            now = time.monotonic()
            for name, child in list(self.children.items()):
                if self._stopping.is_set():
                    return
                if child.alive:
                    if name in pending and child._ready.is_set():
                        pending.discard(name)
                        self._event(f"{name} is back on {child.address} (restart {child.restarts})")
                    if now - child.started_at > 60.0:
                        backoff.pop(name, None)
                    continue
                if name not in due:
                    code = child.proc.returncode if child.proc is not None else None
                    wait = backoff.get(name, 0.5)
                    backoff[name] = min(10.0, wait * 2)
                    due[name] = now + wait
                    pending.discard(name)
                    self._event(f"{name} exited with code {code}; restarting in {wait:.1f}s")
                elif now >= due[name]:
                    del due[name]
                    child.restarts += 1
                    try:
                        child.start()
                    except OSError as e:
                        self._event(f"{name} could not be started: {e}")
                        continue
                    pending.add(name)

    def _event(self, what: str) -> None:
        logger.warning("%s", what)
        self.events.append(what)

    def _wait_executors_healthy(self, timeout: float) -> None:
        from mintmesh.client import MintClient

        deadline = time.monotonic() + timeout
        with MintClient(self.router_address, timeout=5, api_key=self.admin_key) as cl:
            while True:
                st = cl.status()
                if st.executors and all(e.healthy for e in st.executors):
                    return
                if time.monotonic() > deadline:
                    raise ClusterError(f"executors not healthy after {timeout:.0f}s: {st}")
                time.sleep(0.2)

    @property
    def metrics_urls(self) -> dict[str, str]:
        """Each child's Prometheus endpoint, by child name (store, cache-0, executor-0, ...)."""
        return {
            name: f"http://{ch.metrics_address}/metrics"
            for name, ch in self.children.items()
            if ch.metrics_address
        }

    def stop(self, grace: float = 15.0) -> None:
        self._stopping.set()
        if self._supervisor is not None and self._supervisor is not threading.current_thread():
            self._supervisor.join(5)
        for child in reversed(list(self.children.values())):
            child.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for child in reversed(list(self.children.values())):
            if child.wait(max(0.1, deadline - time.monotonic())) is None and child.alive:
                logger.warning("%s did not stop within %.0fs: killing it", child.name, grace)
                child.signal(signal.SIGKILL)
                child.wait(5)

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
