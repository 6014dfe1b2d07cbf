"""Prometheus metrics (`GET /metrics`): counters the data plane feeds as it serves, and gauges
read from the server's own state at each scrape, so no other code has to keep them up to date.

Names are `cellfeed_*` in base units (seconds, bytes); labels are low-cardinality (stream kind,
transport, job kind and state), never a session id or a path. docs/metrics.md lists each one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

if TYPE_CHECKING:
    from cellfeed.server.context import ServerContext
    from cellfeed.server.serving.sessions import SessionRegistry
    from cellfeed.server.serving.shm import SlotPools

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BUILD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
JOB_BUCKETS = (1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)


class Metrics:
    """One server's metrics, in a registry of its own (several servers in one test process do
    not share counters)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.batches = Counter(
            "cellfeed_batches_served", "Training batches sent on DoGet streams", ["kind", "transport"], registry=self.registry
        )
        self.bytes = Counter(
            "cellfeed_served_bytes", "Bytes of batches sent (Arrow buffers; slot bytes for shared memory)", ["kind", "transport"], registry=self.registry
        )
        self.build_seconds = Histogram(
            "cellfeed_batch_build_seconds", "Time to read and build one training batch on the server", ["kind"], buckets=BUILD_BUCKETS, registry=self.registry
        )
        self.streams_ended = Counter(
            "cellfeed_streams_ended", "DoGet streams ended, by how they ended", ["kind", "outcome"], registry=self.registry
        )
        self._state: _StateCollector | None = None

    def served(self, kind: str, transport: str, nbytes: int, build_seconds: float) -> None:
        """One batch sent: `transport` is "grpc" or "shm"."""
        self.batches.labels(kind, transport).inc()
        self.bytes.labels(kind, transport).inc(nbytes)
        self.build_seconds.labels(kind).observe(build_seconds)

    def watch(self, ctx: "ServerContext", sessions: "SessionRegistry", pools: "SlotPools | None" = None, jobs: Callable[[], Iterable[Any]] | None = None) -> None:
        """Read sessions, streams, the block cache, slots and jobs at each scrape."""
        if self._state is not None:
            self.registry.unregister(self._state)
        self._state = _StateCollector(ctx, sessions, pools, jobs)
        self.registry.register(self._state)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector:
    """Gauges and counters that already live in the server's objects, read when scraped."""

    def __init__(self, ctx, sessions, pools, jobs) -> None:
        self.ctx, self.sessions, self.pools, self.jobs = ctx, sessions, pools, jobs

    def describe(self) -> list[Metric]:
        return []  # collected lazily: nothing to check for name clashes at registration

    def collect(self) -> Iterator[Metric]:
        described = self.sessions.describe()
        sessions = GaugeMetricFamily("cellfeed_sessions", "Open sessions", labels=["kind"])
        streams = GaugeMetricFamily("cellfeed_live_streams", "DoGet streams now sending", labels=["kind"])
        by_kind: dict[str, list[int]] = {}
        for s in described:
            counts = by_kind.setdefault(s["kind"], [0, 0])
            counts[0] += 1
            counts[1] += s["live_streams"]
        for kind, (n_sessions, n_streams) in sorted(by_kind.items()):
            sessions.add_metric([kind], n_sessions)
            streams.add_metric([kind], n_streams)
        yield sessions
        yield streams

        blocks = self.ctx.blocks
        hits = CounterMetricFamily("cellfeed_block_cache_hits", "Row-block reads served from the block cache")
        hits.add_metric([], blocks.hits)
        misses = CounterMetricFamily("cellfeed_block_cache_misses", "Row-block reads that went to the file")
        misses.add_metric([], blocks.misses)
        yield hits
        yield misses
        yield GaugeMetricFamily("cellfeed_block_cache_bytes", "Bytes of decoded row blocks held", value=blocks.nbytes)
        yield GaugeMetricFamily("cellfeed_block_cache_max_bytes", "The block cache's budget (--cache-bytes)", value=blocks.max_bytes)
        yield GaugeMetricFamily("cellfeed_open_files", "Dataset files the server holds open", value=len(self.ctx.handles.paths()))

        if self.pools is not None and self.pools.directory is not None:
            in_use, total, nbytes = self.pools.usage()
            yield GaugeMetricFamily("cellfeed_shm_slots_in_use", "Shared-memory slots written and not yet freed by their client", value=in_use)
            yield GaugeMetricFamily("cellfeed_shm_slots", "Shared-memory slots that exist", value=total)
            yield GaugeMetricFamily("cellfeed_shm_slot_bytes", "Bytes of all shared-memory slots", value=nbytes)

        if self.jobs is not None:
            yield from _job_metrics(list(self.jobs()))


def _job_metrics(jobs: list[Any]) -> Iterator[Metric]:
    states = ("queued", "running", "succeeded", "failed", "cancelled", "interrupted")
    by_state = GaugeMetricFamily("cellfeed_jobs", "Jobs by state", labels=["kind", "state"])
    files = CounterMetricFamily("cellfeed_job_files_processed", "Files of jobs that reached an end state", labels=["kind", "state"])
    durations: dict[str, list[float]] = {}
    counts: dict[tuple[str, str], int] = {}
    file_counts: dict[tuple[str, str], int] = {}
    for job in jobs:
        counts[(job.kind, job.state)] = counts.get((job.kind, job.state), 0) + 1
        for f in job.files:
            if f.state in ("succeeded", "failed", "skipped", "cancelled"):
                file_counts[(job.kind, f.state)] = file_counts.get((job.kind, f.state), 0) + 1
        if job.state in ("succeeded", "failed", "cancelled") and job.started_at is not None and job.finished_at is not None:
            durations.setdefault(job.kind, []).append(_seconds(job.finished_at) - _seconds(job.started_at))
    for kind in sorted({k for k, _ in counts} | {"preprocess", "sort"}):
        for state in states:
            by_state.add_metric([kind, state], counts.get((kind, state), 0))
    for (kind, state), n in sorted(file_counts.items()):
        files.add_metric([kind, state], n)
    yield by_state
    yield files
    hist = HistogramMetricFamily("cellfeed_job_duration_seconds", "Wall time of finished jobs, start to end", labels=["kind"])
    for kind, values in sorted(durations.items()):
        buckets = [(str(b), sum(1 for v in values if v <= b)) for b in JOB_BUCKETS] + [("+Inf", len(values))]
        hist.add_metric([kind], buckets, sum_value=sum(values))
    yield hist


def _seconds(t: Any) -> float:
    """A job record's time as epoch seconds: a float, or an ISO 8601 string."""
    if isinstance(t, (int, float)):
        return float(t)
    from datetime import datetime

    return datetime.fromisoformat(str(t).replace("Z", "+00:00")).timestamp()
