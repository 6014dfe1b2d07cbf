"""A quick look at the server's address before the first session opens: fail fast, and say why.

`check(location, connect_timeout)` runs once, at a DataModule's first `setup()`. Within
`connect_timeout` seconds it connects to the Flight address over TCP and sends HTTP/2's client
preface (what gRPC speaks first). A gRPC server answers with a SETTINGS frame and the check
passes; anything else ends in `ServerUnavailable` naming what the address probably is:

- connection refused: nothing listens there (the server is not running, or the port is wrong);
- an HTTP/1 answer: an HTTP server, and when `/healthz` answers as cellfeed's does, cellfeed's
  own HTTP (control-plane) port given instead of its Flight port;
- a name that does not resolve: an unknown host;
- no answer in time (a host that drops packets, a firewall), or a peer that answers in a way
  gRPC does not. A peer that accepts and then says nothing (a hung server, too) is left to the
  Connection's call deadlines and retry budget, with a WARNING.

Failures that may pass (refused while a server starts, a slow DNS) are retried until the
deadline (the client's one policy, cellfeed.client.pipeline.retry, with waits up to 1 s), each
retry logged at WARNING with the address and its cause. Mid-epoch reconnection
is not this: the Connection retries with its own, longer budget (`retry_seconds`).

Only plain-TCP addresses (grpc://, grpc+tcp://) get the protocol probe; for grpc+tls:// the check
stops at the TCP connection (the TLS handshake is gRPC's), and grpc+unix:// is not checked.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import time
from urllib.parse import urlsplit

from cellfeed.client.errors import ServerUnavailable
from cellfeed.client.pipeline import retry as retry_policy
from cellfeed.client.pipeline.retry import Retry

log = logging.getLogger("cellfeed.client")

DEFAULT_CONNECT_TIMEOUT = 5.0
FLIGHT_PORT, HTTP_PORT = 8815, 8000
# HTTP/2's connection preface, then an empty SETTINGS frame (length 0, type 4, flags 0, stream 0)
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
_SETTINGS = 0x04


def env_seconds(name: str, value: float | None, default: float | None) -> float | None:
    """`value` if given, else the environment variable `name` (seconds > 0), else `default`."""
    if value is not None:
        if float(value) <= 0:
            raise ValueError(f"{name.removeprefix('CELLFEED_').lower()}={value!r} must be positive")
        return float(value)
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        seconds = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number of seconds") from None
    if seconds <= 0:
        raise ValueError(f"{name}={raw!r} must be positive")
    return seconds


class _Verdict(Exception):
    """What the address is, for a person; `final`: retrying will not change it."""

    def __init__(self, message: str, final: bool = False) -> None:
        super().__init__(message)
        self.final = final


def check(location: str, connect_timeout: float) -> None:
    """Pass when a gRPC server answers at `location` within `connect_timeout` s; else raise
    ServerUnavailable saying what is probably there (see the module's docstring)."""
    parts = urlsplit(location)
    if parts.scheme in ("grpc+unix", "unix") or not parts.hostname:
        return
    host, port = parts.hostname, parts.port or FLIGHT_PORT
    address = f"{host}:{port}"
    probe = parts.scheme in ("grpc", "grpc+tcp", "")
    deadline = time.monotonic() + connect_timeout

    def attempt() -> None:
        try:
            _look(host, port, address, deadline, probe)
        except _Verdict as verdict:
            if verdict.final:
                raise give_up(verdict, connect_timeout) from None
            raise Retry(verdict) from None

    def give_up(verdict: BaseException, budget: float) -> ServerUnavailable:
        return ServerUnavailable(f"cellfeed server at {location}: {verdict} (connect_timeout {budget:g} s)")

    def warn(verdict: BaseException, attempt_number: int) -> None:
        left = deadline - time.monotonic()
        log.warning("cellfeed: %s not ready (attempt %d, %.1f s left): %s", address, attempt_number, left, verdict)

    try:
        retry_policy.call(attempt, budget_s=lambda: connect_timeout, give_up=give_up, max_wait_s=1.0, on_retry=warn)
    except ServerUnavailable as exc:
        raise exc.with_traceback(None) from None


def _look(host: str, port: int, address: str, deadline: float, probe: bool) -> None:
    left = max(0.05, deadline - time.monotonic())
    try:
        sock = socket.create_connection((host, port), timeout=left)
    except socket.gaierror as exc:
        raise _Verdict(f"unknown host {host!r} (the name does not resolve: {exc.strerror or exc})") from None
    except ConnectionRefusedError:
        raise _Verdict(
            f"connection refused: nothing listens at {address}; is the server running, and is this its Flight port "
            f"({FLIGHT_PORT} by default), not the HTTP one ({HTTP_PORT})?"
        ) from None
    except (socket.timeout, TimeoutError):
        raise _Verdict(f"no answer from {address} in time: a wrong host, or a firewall dropping the connection?") from None
    except OSError as exc:
        raise _Verdict(f"cannot reach {address}: {exc.strerror or exc} (a wrong host or network?)") from None
    with sock:
        if not probe:
            return
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            sock.sendall(_PREFACE)
            answer = _read_some(sock)
        except (socket.timeout, TimeoutError):
            # a hung server looks the same as a silent stranger: leave it to the Connection's
            # call deadlines and retry budget, whose message says how long it waited
            log.warning("cellfeed: %s accepted the connection but sent nothing back within connect_timeout "
                        "(a hung server, or not a gRPC one?); trying the Flight call anyway", address)
            return
        except OSError as exc:
            answer = b""
            if not isinstance(exc, ConnectionResetError):
                raise _Verdict(f"{address}: {exc.strerror or exc}") from None
    if len(answer) >= 4 and answer[3] == _SETTINGS:
        return  # an HTTP/2 (gRPC) server
    # not HTTP/2: ask it as an HTTP/1 server (some answer the preface, some just hang up)
    reply = _http_get(host, port, deadline)
    if reply is not None or answer.startswith(b"HTTP/"):
        health = _cellfeed_health(reply)
        if health is not None:
            flight_uri = health.get("flight_uri")
            where = f"its Flight address is {flight_uri}" if flight_uri else f"give its --flight-port ({FLIGHT_PORT} by default)"
            raise _Verdict(f"{address} is cellfeed's HTTP port (its control plane), not its Flight port: {where}", final=True)
        raise _Verdict(f"an HTTP/1 server answers at {address}, not a cellfeed Flight (gRPC) server: a wrong port?", final=True)
    raise _Verdict(f"{address} does not answer as a gRPC (Flight) server does: a wrong port?", final=True)


def _read_some(sock: socket.socket) -> bytes:
    data = b""
    while len(data) < 9:
        chunk = sock.recv(64)
        if not chunk:
            break
        data += chunk
    return data


def _http_get(host: str, port: int, deadline: float) -> bytes | None:
    """The body of GET /healthz when an HTTP/1 server answers at all (any status); else None."""
    conn = http.client.HTTPConnection(host, port, timeout=max(0.2, deadline - time.monotonic()))
    try:
        conn.request("GET", "/healthz")
        return conn.getresponse().read(65536)
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def _cellfeed_health(body: bytes | None) -> dict | None:
    """/healthz's JSON when it reads as cellfeed's control plane's (a status and a version)."""
    try:
        health = json.loads(body or b"null")
    except ValueError:
        return None
    return health if isinstance(health, dict) and "version" in health and "status" in health else None
