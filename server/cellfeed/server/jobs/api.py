"""The jobs REST API (/v1/jobs), mounted on the server's HTTP plane.

Start-up wiring: the HTTP app calls `make_router(ctx)`, which starts the job service itself
(`start_jobs(ctx)`: SQLite records under <state_dir>/jobs, jobs left running by a previous
server marked interrupted, the executor chosen by --dask-scheduler) and returns the router. The
service is reachable as `router.service`. Every route needs the token when one is configured.
Bad requests answer 4xx with a message: 400 (bad option or path), 403 (a path outside the data
root), 404 (no such job, or an input not in the data root), 409 (wrong state, or an output
another job is writing), 413 (a body over 1 MiB), 422 (malformed body). The OpenAPI documents
each (`ERRORS`), and tests/test_openapi_fuzz.py holds it to that with schemathesis.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Query, status
from fastapi.routing import APIRoute
from pydantic import BaseModel

from cellfeed.server.auth import require_token
from cellfeed.server.context import ServerContext
from cellfeed.server.errors import CellfeedError, MissingFile, NotFound, OutsideRoot
from cellfeed.server.jobs.models import Accepted, Job, JobLogs, JobRequest, LogEntry
from cellfeed.server.jobs.service import Conflict, JobService


def start_jobs(ctx: ServerContext) -> JobService:
    """The job service of this server process (one per process)."""
    return JobService(ctx)


def _http(exc: CellfeedError) -> HTTPException:
    if isinstance(exc, (NotFound, MissingFile)):
        code = status.HTTP_404_NOT_FOUND
    elif isinstance(exc, OutsideRoot):
        code = status.HTTP_403_FORBIDDEN
    elif isinstance(exc, Conflict):
        code = status.HTTP_409_CONFLICT
    else:
        code = status.HTTP_400_BAD_REQUEST
    return HTTPException(status_code=code, detail=str(exc))


class Problem(BaseModel):
    detail: str


# every status a jobs route answers besides its success, in the OpenAPI
ERRORS = {
    400: {"model": Problem, "description": "a bad path or option: the message names it"},
    401: {"model": Problem, "description": "the server has a token and the request does not carry it"},
    403: {"model": Problem, "description": "a path outside the server's data root"},
    404: {"model": Problem, "description": "no such job, or an input that is not in the data root"},
    409: {"model": Problem, "description": "the job is not in a state that allows this (or its output is being written by another job)"},
    413: {"model": Problem, "description": "a request body over the server's limit (1 MiB)"},
}


class _JobsRoute(APIRoute):
    """Every jobs route answers a CellfeedError with its status (404, 409, else 400) and message."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def route(request):
            try:
                return await handler(request)
            except CellfeedError as exc:
                raise _http(exc) from None

        return route


def make_router(ctx: ServerContext, service: JobService | None = None) -> APIRouter:
    """The /v1/jobs routes, backed by `service` (started here when not given)."""
    service = service or start_jobs(ctx)
    router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[Depends(require_token)], route_class=_JobsRoute, responses=ERRORS)
    router.service = service  # type: ignore[attr-defined]

    @router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=Accepted, summary="Submit a preprocess or sort job")
    def submit(request: JobRequest) -> Accepted:
        job = service.submit(request)
        return Accepted(id=job.id, state=job.state)

    @router.get("", response_model=list[Job], summary="Every job, oldest first")
    def list_jobs() -> list[Job]:
        return service.list()

    @router.get("/{job_id}", response_model=Job, summary="One job: state, per-file progress and timings, errors")
    def get_job(job_id: str) -> Job:
        return service.get(job_id)

    @router.get("/{job_id}/logs", response_model=JobLogs, summary="The job's log entries (JSON lines), from an offset")
    def job_logs(job_id: str, offset: int = Query(0, ge=0)) -> JobLogs:
        entries, next_offset = service.logs(job_id, offset)
        return JobLogs(id=job_id, entries=[LogEntry(**e) for e in entries if "time" in e and "event" in e], next_offset=next_offset)

    @router.delete("/{job_id}", status_code=status.HTTP_202_ACCEPTED, response_model=Job, summary="Cancel a queued or running job")
    def cancel_job(job_id: str) -> Job:
        return service.cancel(job_id)

    @router.post("/{job_id}/resume", status_code=status.HTTP_202_ACCEPTED, response_model=Accepted, summary="Resume an interrupted, failed or cancelled job; finished files are skipped")
    def resume_job(job_id: str) -> Accepted:
        job = service.resume(job_id)
        return Accepted(id=job.id, state=job.state)

    return router
