"""Run one cellfeed server process: the Flight data plane in a thread, the HTTP plane in front."""

from __future__ import annotations

import logging
import os
import signal
import threading

import uvicorn

from cellfeed.server.context import ServerContext
from cellfeed.server.serving.auth import TokenMiddlewareFactory
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
    if s.tls_cert and s.tls_key:
        with open(s.tls_cert, "rb") as cert, open(s.tls_key, "rb") as key:
            kwargs["tls_certificates"] = [(cert.read(), key.read())]
        scheme = "grpc+tls"
    if s.token:
        kwargs["middleware"] = {"auth": TokenMiddlewareFactory(s.token)}
    service = FlightService(f"{scheme}://{s.host}:{s.flight_port}", sessions, SlotPools(shm_dir()), **kwargs)
    return service, f"{scheme}://{s.host}:{service.port}"


def serve(settings: Settings) -> None:
    """Serve until SIGINT/SIGTERM; both planes share one context (handles, caches, sessions)."""
    reuse_freed_memory()
    ctx = ServerContext.from_settings(settings)
    sessions = SessionRegistry(ctx)
    flight_service, flight_uri = build_flight(ctx, sessions)
    thread = threading.Thread(target=flight_service.serve, name="flight", daemon=True)
    thread.start()
    app = create_app(ctx, sessions, flight_uri)
    log.info(
        "cellfeed serving %s: flight %s, http http://%s:%d, shared-memory slots %s",
        ctx.data_root.path,
        flight_uri,
        settings.host,
        settings.http_port,
        flight_service.pools.directory or "off",
    )
    # uvicorn shuts down on SIGTERM, then raises it again: exit through `finally`, not by signal
    signal.signal(signal.SIGTERM, _exit)
    try:
        uvicorn.run(app, host=settings.host, port=settings.http_port, log_level="warning")
    finally:
        stopper = threading.Thread(target=flight_service.shutdown, name="flight-shutdown", daemon=True)
        stopper.start()
        stopper.join(SHUTDOWN_GRACE_S)
        flight_service.pools.close()
        ctx.handles.close()
        if stopper.is_alive():
            # a client that stopped reading holds its stream open (gRPC waits for it forever)
            log.warning("streams still open after %.0f s; exiting without them", SHUTDOWN_GRACE_S)
            logging.shutdown()
            os._exit(0)


def _exit(signum: int, frame: object) -> None:
    raise SystemExit(0)
