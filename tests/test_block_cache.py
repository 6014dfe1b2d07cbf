"""The block cache over a long run: a file closed when its sessions go idle takes its blocks
with it, so reopening it again and again does not fill the budget with copies of stale blocks."""

from __future__ import annotations

import time

import httpx

from tests.helpers import datamodule


def _metric(server, name: str) -> float:
    for line in httpx.get(f"{server.http_url}/metrics", timeout=10).text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    raise AssertionError(f"{name} is not in /metrics")


def _read_some(server, seed: int) -> None:
    dm = datamodule(server, files=["k562.h5ad"], seed=seed)
    for _, _batch in zip(range(3), dm.train_dataloader()):
        pass
    dm.teardown("fit")


def _sweep_until_closed(server) -> None:
    """Idle sessions closed and k562's handle released (opening another file's session sweeps)."""
    for seed in range(20):
        time.sleep(1.2)
        datamodule(server, files=["rpe1.h5ad"], seed=1000 + seed)
        if httpx.get(f"{server.http_url}/healthz", timeout=10).json()["open_files"] == 1:
            return
    raise AssertionError("k562.h5ad was never released")


def test_a_released_file_takes_its_blocks_out_of_the_cache(serve, pert_root):
    server = serve(pert_root, session_idle_seconds=1)
    _read_some(server, seed=1)
    held = _metric(server, "cellfeed_block_cache_bytes")
    assert held > 0
    _sweep_until_closed(server)
    after_close = _metric(server, "cellfeed_block_cache_bytes")
    assert after_close < held  # k562's blocks left with its handle; only rpe1's may remain

    for round_ in range(3):  # reopen, read, release: the cache does not grow round after round
        _read_some(server, seed=1)
        assert _metric(server, "cellfeed_block_cache_bytes") <= held + after_close
        _sweep_until_closed(server)
        assert _metric(server, "cellfeed_block_cache_bytes") <= after_close * 1.01 + 1
