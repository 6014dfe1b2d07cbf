"""The control plane: a FastAPI app for health, datasets, sessions and jobs."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

from fastapi import Depends, FastAPI
from pydantic import BaseModel, Field
from fastapi import Request
from fastapi.exception_handlers import http_exception_handler
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, PlainTextResponse, Response

from cellfeed.server.auth import require_token
from cellfeed.server.context import ServerContext
from cellfeed.server.errors import CellfeedError
from cellfeed.server.jobs.api import make_router
from cellfeed.server.limits import MAX_JSON_BYTES, check_json
from cellfeed.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from cellfeed.server.serving.sessions import SessionRegistry
from cellfeed.server.serving.shm import SlotPools
from cellfeed.server.suffixes import H5AD_SUFFIXES
from cellfeed.server.version import VERSION

DATASET_SUFFIXES = {**dict.fromkeys(H5AD_SUFFIXES, "h5ad"), ".zarr": "ome-zarr", ".parquet": "parquet", ".pt": "embeddings"}


class Health(BaseModel):
    status: str
    version: str = Field(description="the cellfeed version serving")
    flight_uri: str
    sessions: int
    open_files: int
    cache_bytes: int = Field(description="decoded blocks held in the block cache")
    cache_hits: int
    cache_misses: int


class Dataset(BaseModel):
    path: str
    format: str
    bytes: int
    open: bool


class Probe(BaseModel):
    status: str = Field(description="ok, or what is not ready")


def create_app(
    ctx: ServerContext,
    sessions: SessionRegistry,
    flight_uri: str,
    *,
    flight_alive: Callable[[], bool] | None = None,
    pools: SlotPools | None = None,
) -> FastAPI:
    """The HTTP app. /healthz, /livez and /readyz are open (probes) and show no paths; /metrics
    and every /v1 route need the token if set. Request bodies are bounded (MAX_JSON_BYTES,
    MAX_JSON_DEPTH). `flight_alive` says whether the data plane still serves (for /readyz)."""
    app = FastAPI(title="cellfeed", version=VERSION, description="cellfeed control plane")
    app.add_middleware(BoundedBody)
    app.state.ctx = ctx
    app.state.sessions = sessions
    guarded = [Depends(require_token)]

    @app.get("/healthz", response_model=Health)
    def healthz() -> Health:
        return Health(
            status="ok",
            version=VERSION,
            flight_uri=flight_uri,
            sessions=len(sessions),
            open_files=len(ctx.handles.paths()),
            cache_bytes=ctx.blocks.nbytes,
            cache_hits=ctx.blocks.hits,
            cache_misses=ctx.blocks.misses,
        )

    @app.get("/v1/datasets", response_model=list[Dataset], dependencies=guarded)
    def datasets() -> list[Dataset]:
        return _list_datasets(ctx)

    @app.get("/v1/sessions", dependencies=guarded)
    def list_sessions() -> list[dict]:
        return sessions.describe()

    @app.get("/livez", response_model=Probe, summary="Liveness: the process answers")
    def livez() -> Probe:
        return Probe(status="ok")

    @app.get("/readyz", response_model=Probe, summary="Readiness: Flight serves and the state folder is writable", responses={503: {"model": Probe, "description": "not ready; `status` says why"}})
    def readyz() -> JSONResponse:
        problem = _not_ready(ctx, flight_alive)
        return JSONResponse({"status": problem or "ok"}, status_code=503 if problem else 200)

    jobs = make_router(ctx)
    app.state.jobs = jobs.service
    ctx.metrics.watch(ctx, sessions, pools, jobs.service.list)

    @app.get("/metrics", dependencies=guarded, summary="Prometheus metrics (text format); docs/metrics.md lists them", response_class=PlainTextResponse)
    def metrics() -> Response:
        return Response(ctx.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    app.include_router(jobs)

    @app.exception_handler(StarletteHTTPException)
    async def method_not_allowed(request: Request, exc: StarletteHTTPException) -> Response:
        """A 405 names every method the path has (Starlette's names only its first route's)."""
        if exc.status_code != 405:
            return await http_exception_handler(request, exc)
        allowed = sorted(
            method.upper()
            for template, item in app.openapi()["paths"].items()
            if re.fullmatch(re.sub(r"\{[^/]+?\}", "[^/]+", template), request.url.path)
            for method in item
        )
        return JSONResponse({"detail": "Method Not Allowed"}, status_code=405, headers={"Allow": ", ".join(allowed)})

    return app


def _not_ready(ctx: ServerContext, flight_alive: Callable[[], bool] | None) -> str | None:
    if flight_alive is not None and not flight_alive():
        return "the Flight data plane is not serving"
    try:
        probe = ctx.state_dir / f".ready-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        return f"the state folder cannot be written: {exc.strerror or type(exc).__name__}"
    return None


def _list_datasets(ctx: ServerContext) -> list[Dataset]:
    """Files and stores under the data root that cellfeed can serve (hidden entries and the state
    dir excluded). A symlink is listed only when it resolves inside the root; its size is its
    target's. Nothing outside the root is listed or measured."""
    root = ctx.data_root
    open_paths = set(ctx.handles.paths())
    found: list[Dataset] = []
    for dirpath, dirnames, filenames in os.walk(root.path):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for d in list(dirnames):
            if d.endswith(".zarr"):
                dirnames.remove(d)
                real = _inside(root, here / d)
                if real is not None:
                    found.append(Dataset(path=str((here / d).relative_to(root.path)), format="ome-zarr", bytes=_du(root, real), open=real in open_paths))
        for f in sorted(filenames):
            kind = DATASET_SUFFIXES.get(Path(f).suffix)
            if kind and kind != "ome-zarr" and not f.startswith("."):
                real = _inside(root, here / f)
                if real is not None and real.is_file():
                    found.append(Dataset(path=str((here / f).relative_to(root.path)), format=kind, bytes=real.stat().st_size, open=real in open_paths))
    return found


def _inside(root, path: Path) -> Path | None:
    try:
        return root.contain(path)
    except CellfeedError:
        return None


def _du(root, path: Path) -> int:
    """Bytes of the files under a store, counting only those that resolve inside the root."""
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for f in filenames:
            real = _inside(root, Path(dirpath) / f)
            if real is not None and real.is_file():
                total += real.stat().st_size
    return total


class BoundedBody:
    """ASGI middleware: a request body over MAX_JSON_BYTES is refused (413), and a JSON body
    nested deeper than MAX_JSON_DEPTH (400), before any route parses it."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > MAX_JSON_BYTES:
            await _refuse(scope, receive, send, 413, f"request body of {int(length):,} bytes; at most {MAX_JSON_BYTES:,} are accepted")
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > MAX_JSON_BYTES:
                await _refuse(scope, receive, send, 413, f"request body over {MAX_JSON_BYTES:,} bytes; at most {MAX_JSON_BYTES:,} are accepted")
                return
        body = b"".join(chunks)
        if b"json" in dict(scope.get("headers") or []).get(b"content-type", b"json"):
            try:
                check_json(body, "request body")
            except CellfeedError as exc:
                await _refuse(scope, receive, send, 400, str(exc))
                return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _refuse(scope, receive, send, code: int, detail: str) -> None:
    await JSONResponse({"detail": detail}, status_code=code)(scope, receive, send)
