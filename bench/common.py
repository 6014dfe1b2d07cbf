"""Helpers every benchmark shares: a server subprocess, peak RSS readings, JSON results."""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

RESULTS = Path(__file__).resolve().parent / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`cellfeed serve` in a child process on loopback, for the length of a `with` block."""

    def __init__(self, data_root: Path, **settings: str) -> None:
        self.data_root = data_root
        self.settings = settings
        self.flight_port, self.http_port = free_port(), free_port()
        self.flight_uri = f"grpc://127.0.0.1:{self.flight_port}"
        self.http_url = f"http://127.0.0.1:{self.http_port}"

    def __enter__(self) -> "Server":
        args = [sys.executable, "-m", "cellfeed.server.cli", "serve", "--data-root", str(self.data_root),
                "--flight-port", str(self.flight_port), "--http-port", str(self.http_port), "--log-level", "WARNING"]
        for k, v in self.settings.items():
            args += [f"--{k.replace('_', '-')}", str(v)]
        self.proc = subprocess.Popen(args)
        for _ in range(600):
            try:
                if httpx.get(self.http_url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("server did not start")

    def peak_rss_mb(self) -> float:
        return proc_peak_rss_mb(self.proc.pid)

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.proc.pid)

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(15)


def proc_peak_rss_mb(pid: int) -> float:
    """VmHWM of a live process (Linux), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def self_peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_result(name: str, result: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2))
    return path


def cpu_info() -> str:
    return f"{os.cpu_count()} CPUs"
