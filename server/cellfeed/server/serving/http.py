"""The control plane: a FastAPI app for health, datasets, sessions and jobs."""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import Depends, FastAPI
from pydantic import BaseModel, Field

from cellfeed.server.context import ServerContext
from cellfeed.server.jobs.api import make_router
from cellfeed.server.serving.auth import require_token
from cellfeed.server.serving.sessions import SessionRegistry

DATASET_SUFFIXES = {".h5ad": "h5ad", ".h5": "h5ad", ".zarr": "ome-zarr", ".parquet": "parquet", ".pt": "embeddings"}


class Health(BaseModel):
    status: str
    flight_uri: str
    data_root: str
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


def create_app(ctx: ServerContext, sessions: SessionRegistry, flight_uri: str) -> FastAPI:
    """The HTTP app. /healthz is open (liveness probes); every /v1 route needs the token if set."""
    app = FastAPI(title="cellfeed", version="0.1.0", description="cellfeed control plane")
    app.state.ctx = ctx
    app.state.sessions = sessions
    guarded = [Depends(require_token)]

    @app.get("/healthz", response_model=Health)
    def healthz() -> Health:
        return Health(
            status="ok",
            flight_uri=flight_uri,
            data_root=str(ctx.data_root.path),
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

    app.include_router(make_router(ctx))
    return app


def _list_datasets(ctx: ServerContext) -> list[Dataset]:
    """Files and stores under the data root that cellfeed can serve (state dir excluded)."""
    root = ctx.data_root.path
    open_paths = set(ctx.handles.paths())
    found: list[Dataset] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for d in list(dirnames):
            if d.endswith(".zarr"):
                dirnames.remove(d)
                found.append(Dataset(path=str((here / d).relative_to(root)), format="ome-zarr", bytes=_du(here / d), open=here / d in open_paths))
        for f in sorted(filenames):
            kind = DATASET_SUFFIXES.get(Path(f).suffix)
            if kind and kind != "ome-zarr":
                p = here / f
                found.append(Dataset(path=str(p.relative_to(root)), format=kind, bytes=p.stat().st_size, open=p in open_paths))
    return found


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
