"""`cellfeed` at the command line: a version, and start-up failures said in one line, not a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import version


def _cellfeed(*args: str, prelude: str = "") -> subprocess.CompletedProcess:
    code = f"import sys\n{prelude}\nfrom cellfeed.server.cli import main\nsys.exit(main({list(args)!r}))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_version():
    done = _cellfeed("--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"cellfeed {version('cellfeed')}"


def test_unwritable_state_dir_is_one_clear_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    done = _cellfeed("serve", "--data-root", str(tmp_path), "--state-dir", str(blocker / "state"), "--flight-port", "0", "--http-port", "0")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert f"the state folder {blocker / 'state'} cannot be written by uid {os.getuid()}" in done.stderr
    assert "--state-dir" in done.stderr


def test_missing_data_root_is_one_clear_line(tmp_path):
    done = _cellfeed("serve", "--data-root", str(tmp_path / "nope"), "--flight-port", "0", "--http-port", "0")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert f"the data root {tmp_path / 'nope'} is not a folder (by uid {os.getuid()})" in done.stderr


def test_invalid_setting_is_one_clear_line_naming_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("CELLFEED_FLIGHT_PORT", "abc")
    done = _cellfeed("serve", "--data-root", str(tmp_path), "--http-port", "0")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "cellfeed serve: CELLFEED_FLIGHT_PORT='abc': Input should be a valid integer" in done.stderr
    done = _cellfeed("serve", "--data-root", str(tmp_path), "--flight-port", "70000")
    assert done.returncode == 2
    assert "--flight-port='70000': Input should be less than or equal to 65535" in done.stderr


def test_serve_help_lists_every_setting_with_its_variable_and_description():
    from cellfeed.server.settings import Settings

    done = _cellfeed("serve", "--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    for name, field in Settings.model_fields.items():
        assert f"--{name.replace('_', '-')}" in text
        assert f"{' '.join(field.description.split())} [CELLFEED_{name.upper()}" in text


def test_client_only_install_is_told_what_to_install(tmp_path):
    done = _cellfeed("serve", "--data-root", str(tmp_path), prelude="sys.modules['uvicorn'] = None")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "'uvicorn' is not installed" in done.stderr and "cellfeed[server]" in done.stderr


def test_slot_left_by_another_users_dead_server_does_not_stop_start_up(tmp_path, monkeypatch, caplog):
    """Root can unlink anything, so the refusal a sticky /dev/shm gives other users is played by
    Path.unlink; everything else (the folder, the files, the pid check) is real."""
    import pathlib

    from cellfeed.server.serving.shm import SlotPools

    dead_pid = 2**22 + 12345  # above pid_max's default: no such process
    theirs = tmp_path / f"cellfeed-{dead_pid}-{'ab' * 8}-0"
    gone = tmp_path / f"cellfeed-{dead_pid}-{'cd' * 8}-1"
    theirs.write_bytes(b"x")
    gone.write_bytes(b"x")
    real_unlink = pathlib.Path.unlink

    def unlink(self, missing_ok=False):
        if self == theirs:
            raise PermissionError(1, "Operation not permitted", str(self))
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(pathlib.Path, "unlink", unlink)
    pools = SlotPools(tmp_path)
    try:
        assert not gone.exists()  # a dead server's slot that can be removed is
        assert theirs.exists()
        assert any("another user" in r.getMessage() and str(theirs) in r.getMessage() for r in caplog.records)
    finally:
        pools.close()


def test_no_token_on_every_interface_is_warned_about(tmp_path):
    """Serving 0.0.0.0 without a token is allowed (a lab's closed network) but never silent."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "cellfeed.server.cli", "serve", "--data-root", str(tmp_path), "--host", "0.0.0.0", "--flight-port", "0", "--http-port", "0"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "cellfeed serving" in line:
                break
        warned = [line for line in lines if "WARNING" in line and "no token" in line]
        assert warned and "--token" in warned[0] and "0.0.0.0" in warned[0]
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_json_logs_are_one_object_a_line(tmp_path):
    import json

    proc = subprocess.Popen(
        [sys.executable, "-m", "cellfeed.server.cli", "serve", "--data-root", str(tmp_path), "--flight-port", "0", "--http-port", "0", "--log-format", "json"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in proc.stderr:
            record = json.loads(line)  # every line, the third-party ones too
            assert set(record) >= {"time", "level", "logger", "message"}
            if record["message"].startswith("cellfeed serving"):
                assert record["level"] == "INFO" and record["logger"] == "cellfeed"
                assert record["time"].endswith("+00:00")
                break
        else:
            raise AssertionError("the server never logged that it serves")
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_auth_failures_are_logged_without_the_secret(serve, tmp_path):
    import httpx
    import pyarrow.flight as flight

    server = serve(tmp_path, token="t0p-s3cret")
    assert httpx.get(f"{server.http_url}/v1/datasets", headers={"authorization": "Bearer guess-123"}).status_code == 401
    client = flight.FlightClient(server.flight_uri)
    try:
        try:
            list(client.do_action(flight.Action("open_session", b"")))
        except flight.FlightUnauthenticatedError:
            pass
        else:
            raise AssertionError("an unauthenticated call went through")
    finally:
        client.close()
    import time

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        log = server.log.read_text()
        if "auth failed: Flight" in log:
            break
        time.sleep(0.1)
    assert "auth failed: GET /v1/datasets from 127.0.0.1:" in log and "with a wrong token" in log
    assert "auth failed: Flight DO_ACTION with no token" in log
    assert "guess-123" not in log and "t0p-s3cret" not in log
