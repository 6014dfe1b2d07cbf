"""Shared fixtures: a real `cellfeed serve` subprocess on loopback, and perturbation files."""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from cellfeed.server.kinds.perturbation.synthetic import write_embeddings, write_perturbation_h5ad


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    """A cellfeed server in a child process; restart() brings it back on the same ports."""

    data_root: Path
    settings: dict[str, str] = field(default_factory=dict)
    flight_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    log: Path | None = None
    max_file_bytes: int | None = None  # RLIMIT_FSIZE of the server process, to make writes fail

    @property
    def flight_uri(self) -> str:
        return f"grpc://127.0.0.1:{self.flight_port}"

    @property
    def http_url(self) -> str:
        scheme = "https" if self.settings.get("tls_cert") else "http"  # the HTTP plane serves HTTPS with TLS
        return f"{scheme}://127.0.0.1:{self.http_port}"

    @property
    def token(self) -> str | None:
        return self.settings.get("token")

    def start(self) -> "ServerProcess":
        args = [sys.executable, "-m", "cellfeed.server.cli", "serve", "--data-root", str(self.data_root),
                "--host", "127.0.0.1", "--flight-port", str(self.flight_port), "--http-port", str(self.http_port)]
        for key, value in self.settings.items():
            args += [f"--{key.replace('_', '-')}", str(value)]
        self.log = self.data_root.parent / f"server-{self.http_port}.log"
        handle = open(self.log, "ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith("CELLFEED_")}
        limit = self.max_file_bytes
        preexec = None if limit is None else (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
        self.proc = subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, env=env, preexec_fn=preexec)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(f"{self.http_url}/healthz", timeout=1, verify=False).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server did not become healthy:\n{self.log.read_text()}")

    def kill(self) -> None:
        """SIGKILL: the server vanishes mid-whatever, as in a crash."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def restart(self) -> "ServerProcess":
        self.stop()
        return self.start()


@pytest.fixture
def serve():
    """`serve(data_root, **settings)` starts a real server; every one started is stopped after the test."""
    started: list[ServerProcess] = []

    def start(data_root: Path, **settings) -> ServerProcess:
        server = ServerProcess(Path(data_root), {k: str(v) for k, v in settings.items() if v is not None})
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


TARGETS = [f"G{i:03d}" for i in range(6)]


@pytest.fixture(scope="session")
def pert_root(tmp_path_factory) -> Path:
    """Two sorted perturbation files (k562, rpe1), embeddings missing one target, a TOML config."""
    root = tmp_path_factory.mktemp("pert") / "data"
    write_perturbation_h5ad(root / "k562.h5ad", cell_type="k562", seed=1)
    write_perturbation_h5ad(root / "rpe1.h5ad", cell_type="rpe1", seed=2)
    write_embeddings(root / "emb.pt", TARGETS[:-1], dim=8)
    return root


@pytest.fixture(scope="session")
def pert_server(pert_root, tmp_path_factory):
    """One server shared by the read-only perturbation tests."""
    server = ServerProcess(pert_root)
    server.start()
    yield server
    server.stop()
