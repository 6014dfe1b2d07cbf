"""Fast, visible failure at setup(): a wrong address fails within connect_timeout, saying what it
probably is, each retry logged at WARNING; a server that comes up within it is waited for; the
mid-epoch budget (retry_seconds) stays the Connection's own. Real sockets, a real server."""

from __future__ import annotations

import http.server
import logging
import socket
import threading
import time

import pytest

from cellfeed.client import MultiExperimentDataModule, PerturbationDataModule, TableDataModule
from cellfeed.client.cell_load.data_modules import PerturbationDataModule as CellLoadDataModule
from cellfeed.client.errors import ServerUnavailable
from tests.conftest import ServerProcess, free_port

SMALL = dict(files=["k562.h5ad"], group_size_S=4, batch_size=8, num_workers=1)


def fails_fast(dm, timeout: float) -> str:
    started = time.monotonic()
    with pytest.raises(ServerUnavailable) as info:
        dm.setup("fit")
    assert time.monotonic() - started < timeout + 0.5
    return str(info.value)


def modules(server: str, tmp_path, **kw) -> list:
    toml = tmp_path / "exp.toml"
    toml.write_text('[datasets]\nscreen = "data"\n[training]\nscreen = "train"\n')
    return [
        PerturbationDataModule(server=server, **SMALL, **kw),
        CellLoadDataModule(toml_config_path=str(toml), should_yield_control_cells=False, server=server, **kw),
        MultiExperimentDataModule(experiments_yaml="experiments.yml", z_range=(0, 2), server=server, **kw),
        TableDataModule(server=server, dataset="out/cells", **kw),
    ]


def test_nothing_listening_fails_within_connect_timeout_for_every_module(tmp_path, caplog):
    port = free_port()
    for dm in modules(f"grpc://127.0.0.1:{port}", tmp_path, connect_timeout=1.0):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="cellfeed.client"):
            message = fails_fast(dm, 1.0)
        assert f"nothing listens at 127.0.0.1:{port}" in message and "Flight port (8815" in message, message
        assert "is the server running" in message
        retries = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert retries and all(f"127.0.0.1:{port}" in r.getMessage() and "refused" in r.getMessage() for r in retries)


def test_cellfeed_http_port_given_for_the_flight_port(serve, pert_root):
    server = serve(pert_root)
    dm = PerturbationDataModule(server=f"grpc://127.0.0.1:{server.http_port}", connect_timeout=3, **SMALL)
    message = fails_fast(dm, 3)
    assert "cellfeed's HTTP port" in message and str(server.flight_port) in message, message
    # the same server's Flight port passes
    good = PerturbationDataModule(server=server.flight_uri, connect_timeout=3, **SMALL)
    good.setup("fit")
    assert len(good.train_dataloader()) > 0


def test_unknown_host():
    dm = PerturbationDataModule(server="grpc://no-such-host.invalid:8815", connect_timeout=1.5, **SMALL)
    message = fails_fast(dm, 1.5)
    assert "unknown host 'no-such-host.invalid'" in message, message


def test_another_http_server_and_a_silent_peer(monkeypatch, caplog):
    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"hello")

        def log_message(self, *args):
            pass

    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    silent = socket.create_server(("127.0.0.1", 0))  # accepts (the kernel does), never answers
    try:
        message = fails_fast(PerturbationDataModule(server=f"grpc://127.0.0.1:{web.server_port}", connect_timeout=2, **SMALL), 2)
        assert "an HTTP/1 server answers" in message and "not a cellfeed Flight" in message, message
        # a silent peer (a hung server looks the same) is left to the Connection's deadlines
        monkeypatch.setenv("CELLFEED_CALL_TIMEOUT", "1")
        with caplog.at_level(logging.WARNING, logger="cellfeed.client"):
            dm = PerturbationDataModule(server=f"grpc://127.0.0.1:{silent.getsockname()[1]}", connect_timeout=1, retry_seconds=2, **SMALL)
            message = fails_fast(dm, 1 + 2 + 2)
        assert "unreachable for 2 s" in message, message
        assert any("sent nothing back within connect_timeout" in r.getMessage() for r in caplog.records)
    finally:
        web.shutdown()
        silent.close()


def test_environment_sets_both_budgets(monkeypatch, serve, pert_root):
    port = free_port()
    monkeypatch.setenv("CELLFEED_CONNECT_TIMEOUT", "0.8")
    monkeypatch.setenv("CELLFEED_RETRY_SECONDS", "7")
    assert "nothing listens" in fails_fast(PerturbationDataModule(server=f"grpc://127.0.0.1:{port}", **SMALL), 0.8)
    server = serve(pert_root)
    dm = PerturbationDataModule(server=server.flight_uri, **SMALL)
    dm.setup("fit")
    assert dm.connect_timeout == 0.8 and dm._connection.retry_seconds == 7  # the mid-epoch budget, apart
    dm = PerturbationDataModule(server=server.flight_uri, retry_seconds=90, connect_timeout=2, **SMALL)
    dm.setup("fit")
    assert dm.connect_timeout == 2 and dm._connection.retry_seconds == 90
    with pytest.raises(ValueError, match="connect_timeout"):
        PerturbationDataModule(server=server.flight_uri, connect_timeout=0, **SMALL).setup("fit")


def test_a_server_that_comes_up_within_connect_timeout_is_waited_for(pert_root, caplog):
    server = ServerProcess(pert_root)
    starter = threading.Timer(0.5, server.start)
    starter.start()
    try:
        dm = PerturbationDataModule(server=server.flight_uri, connect_timeout=60, **SMALL)
        with caplog.at_level(logging.WARNING, logger="cellfeed.client"):
            dm.setup("fit")
        assert len(dm.train_dataloader()) > 0
        assert any("refused" in r.getMessage() for r in caplog.records)  # it was not up at first
    finally:
        starter.join()
        server.stop()
