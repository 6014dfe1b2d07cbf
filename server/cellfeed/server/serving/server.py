"""Run one cellfeed server process: the Flight data plane in a thread, the HTTP plane in front."""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import threading

import pyarrow as pa
import uvicorn

from cellfeed.server.auth import TokenMiddlewareFactory
from cellfeed.server.context import ServerContext
from cellfeed.server.errors import StartupError
from cellfeed.server.serving.flight import FlightService
from cellfeed.server.serving.http import create_app
from cellfeed.server.serving.sessions import SessionRegistry
from cellfeed.server.serving.shm import SlotPools
from cellfeed.server.settings import Settings
from cellfeed.wire.malloc import reuse_freed_memory
from cellfeed.wire.shm import shm_dir

log = logging.getLogger("cellfeed")
SHUTDOWN_GRACE_S = 5.0


def build_flight(ctx: ServerContext, sessions: SessionRegistry) -> tuple[FlightService, str]:
    s = ctx.settings
    kwargs: dict = {}
    scheme = "grpc+tcp"
    if bool(s.tls_cert) != bool(s.tls_key):
        raise StartupError("--tls-cert and --tls-key go together: give both, or neither")
    if s.tls_client_ca and not s.tls_cert:
        raise StartupError("--tls-client-ca (mutual TLS) needs the server's own --tls-cert and --tls-key")
    if s.tls_cert and s.tls_key:
        with open(s.tls_cert, "rb") as cert, open(s.tls_key, "rb") as key:
            kwargs["tls_certificates"] = [(cert.read(), key.read())]
        scheme = "grpc+tls"
        if s.tls_client_ca:
            with open(s.tls_client_ca, "rb") as ca:
                kwargs["verify_client"] = True
                kwargs["root_certificates"] = ca.read()
    if s.token:
        kwargs["middleware"] = {"auth": TokenMiddlewareFactory(s.token)}
    service = FlightService(f"{scheme}://{s.host}:{s.flight_port}", sessions, SlotPools(shm_dir()), **kwargs)
    return service, f"{scheme}://{s.host}:{service.port}"


def serve(settings: Settings) -> None:
    """Serve until SIGINT/SIGTERM; both planes share one context (handles, caches, sessions)."""
    reuse_freed_memory()
    _check_folders(settings)
    ctx = ServerContext.from_settings(settings)
    sessions = SessionRegistry(ctx)
    try:
        flight_service, flight_uri = build_flight(ctx, sessions)
    except OSError as exc:
        raise StartupError(f"cannot read the TLS certificate or key: {exc}") from None
    except pa.ArrowException as exc:
        raise StartupError(f"cannot serve Flight on {settings.host}:{settings.flight_port} (--flight-port): {exc}") from None
    thread = threading.Thread(target=flight_service.serve, name="flight", daemon=True)
    thread.start()
    app = create_app(
        ctx, sessions, flight_uri, flight_alive=lambda: thread.is_alive() and not flight_service.closing.is_set(), pools=flight_service.pools
    )
    if not settings.token and not _loopback(settings.host):
        log.warning(
            "no token: anyone who can reach %s (ports %s and %d) can read every dataset under the data root and run jobs; "
            "set --token (CELLFEED_TOKEN)",
            settings.host,
            flight_uri.rsplit(":", 1)[1],
            settings.http_port,
        )
    log.info(
        "cellfeed serving %s: flight %s%s, http %s://%s:%d, shared-memory slots %s",
        ctx.data_root.path,
        flight_uri,
        " (client certificates required)" if settings.tls_client_ca else "",
        "https" if settings.tls_cert else "http",
        settings.host,
        settings.http_port,
        flight_service.pools.directory or "off",
    )
    # uvicorn shuts down on SIGTERM, then raises it again: exit through `finally`, not by signal
    signal.signal(signal.SIGTERM, _exit)
    try:
        tls = {"ssl_certfile": settings.tls_cert, "ssl_keyfile": settings.tls_key} if settings.tls_cert else {}
        uvicorn.run(app, host=settings.host, port=settings.http_port, log_level="warning", **tls)
    finally:
        stopper = threading.Thread(target=flight_service.shutdown, name="flight-shutdown", daemon=True)
        stopper.start()
        stopper.join(SHUTDOWN_GRACE_S)
        app.state.jobs.close()
        sessions.close()
        flight_service.pools.close()
        ctx.handles.close()
        if stopper.is_alive():
            # a client that stopped reading holds its stream open (gRPC waits for it forever)
            log.warning("streams still open after %.0f s; exiting without them", SHUTDOWN_GRACE_S)
            logging.shutdown()
            os._exit(0)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _check_folders(settings: Settings) -> None:
    """Refuse to start on a data root this user cannot list, or a state folder (job records and
    logs) it cannot write: one line naming the folder and the uid, not a traceback later."""
    root = settings.data_root
    if not os.path.isdir(root) or not os.access(root, os.R_OK | os.X_OK):
        what = "is not a folder" if not os.path.isdir(root) else "cannot be read"
        raise StartupError(f"the data root {root} {what} (by uid {os.getuid()}); give --data-root (CELLFEED_DATA_ROOT) a readable folder")
    try:
        folder = settings.resolved_state_dir()
        probe = folder / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise StartupError(
            f"the state folder {settings.state_dir or os.path.join(root, '.cellfeed')} cannot be written by uid {os.getuid()}: "
            f"{exc.strerror or exc}; give --state-dir (CELLFEED_STATE_DIR) a folder this user can write"
        ) from None


def _exit(signum: int, frame: object) -> None:
    raise SystemExit(0)
