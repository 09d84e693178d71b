"""Start and stop real ``energon serve`` (and ``energon router``) processes for the serving tests.

Every server listens on 127.0.0.1 on a free port (``--port 0``) and reports the
ports it bound through ``--port-file``. Every wait is bounded; ``stop`` escalates
from SIGTERM to SIGKILL so no test leaves a process behind. ``CliProcess`` is any such
``energon`` subcommand; ``ServerProcess`` is ``energon serve`` over the mock engine by default.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
MOCK_FACTORY = "mock_engine:serve_binding"


class CliProcess:
    """One ``python -m energon_jax.cli ARGV --port-file F`` subprocess (``serve``, ``router``, ...);
    its stdout and stderr go to ``log_path``."""

    def __init__(self, argv: list[str], *, env: dict[str, str], prefix: str = "energon-") -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix=prefix)
        self.port_file = Path(self._tmp.name) / "ports.json"
        self.log_path = Path(self._tmp.name) / "server.log"
        cmd = [sys.executable, "-m", "energon_jax.cli", *argv, "--port-file", str(self.port_file)]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.http_port: int | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_ports(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.port_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} before binding:\n{self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"server did not bind within {timeout_s} s:\n{self.log()}")
            time.sleep(0.05)
        ports = json.loads(self.port_file.read_text())
        # (a router without --metrics-port has none)
        self.port, self.metrics_port = ports["port"], ports.get("metrics_port")
        self.http_port = ports.get("http_port")

    def health(self, channel: grpc.Channel | None = None, timeout_s: float = 5.0) -> int:
        own = channel is None
        channel = channel or grpc.insecure_channel(self.target)
        try:
            stub = health_pb2_grpc.HealthStub(channel)
            return stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout_s).status
        finally:
            if own:
                channel.close()

    def watch_health(self, timeout_s: float = 60.0) -> tuple[list[int], threading.Thread]:
        """Follow the health Watch stream in a daemon thread: every status it sends is appended to
        the returned list, until the server goes away or ``timeout_s`` passes."""
        seen: list[int] = []

        def watch() -> None:
            with grpc.insecure_channel(self.target) as channel:
                try:
                    for resp in health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(),
                                                                          timeout=timeout_s):
                        seen.append(resp.status)
                except grpc.RpcError:
                    return  # the server went away

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        return seen, watcher

    def wait_serving(self, timeout_s: float = 120.0, channel: grpc.Channel | None = None) -> None:
        self.wait_ports(timeout_s)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.health(channel) == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not SERVING within {timeout_s} s:\n{self.log()}")
            time.sleep(0.1)

    def metrics_text(self, timeout_s: float = 5.0) -> str:
        """The /metrics page as Prometheus prints it."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        return urllib.request.urlopen(url, timeout=timeout_s).read().decode()

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics as ``name{label=value,...}`` -> value."""
        text = self.metrics_text()
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out

    def wait_metrics(self, predicate, timeout_s: float = 10.0) -> dict[str, float]:
        """Poll /metrics until ``predicate(metrics)`` holds; bounded."""
        deadline = time.monotonic() + timeout_s
        while True:
            m = self.metrics()
            if predicate(m):
                return m
            if time.monotonic() > deadline:
                raise TimeoutError(f"metrics condition not met within {timeout_s} s: {m}")
            time.sleep(0.02)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait_exit(self, timeout_s: float = 30.0) -> int:
        return self.proc.wait(timeout=timeout_s)

    def stop(self) -> bool:
        """SIGTERM, then SIGKILL after 15 s; False when it had to be killed."""
        clean = True
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                clean = False
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()
        self._tmp.cleanup()
        return clean

    def __enter__(self) -> CliProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ServerProcess(CliProcess):
    """``energon serve`` with every port free (gRPC, metrics, HTTP); ``factory``: the engine
    factory (the mock engine unless None)."""

    def __init__(self, *args: str, factory: str | None = MOCK_FACTORY, env: dict[str, str] | None = None) -> None:
        argv = ["serve", "--port", "0", "--metrics-port", "0", "--http-port", "0", *args]
        if factory is not None:
            argv += ["--engine-factory", factory]
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(REPO), full_env.get("PYTHONPATH", "")])
        full_env.setdefault("JAX_PLATFORMS", "cpu")
        full_env.update(env or {})
        super().__init__(argv, env=full_env, prefix="energon-serve-")
