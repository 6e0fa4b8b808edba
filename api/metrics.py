"""Prometheus metrics: HTTP traffic, upload bytes, and job figures read from the database at scrape."""

from __future__ import annotations

import logging
import statistics
from datetime import timedelta

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func, select

from jobs.db import session_scope
from jobs.settings import Settings
from jobs.tables import Job, JobStatus, utcnow

log = logging.getLogger(__name__)

HTTP_REQUESTS = Counter("vdu_http_requests_total", "HTTP requests", ["method", "route", "status"])
HTTP_LATENCY = Histogram(
    "vdu_http_request_duration_seconds",
    "HTTP request latency",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
UPLOAD_BYTES = Counter("vdu_upload_bytes_total", "bytes accepted by uploads", ["kind"])
JOBS_CREATED = Counter("vdu_jobs_created_total", "jobs created through the API")


class JobCollector:
    """Jobs by state, recent queue wait and the step rate of running jobs, from the ledger."""

    def __init__(self, settings: Settings):
        self.settings = settings

    def collect(self):
        by_state = GaugeMetricFamily("vdu_jobs", "jobs by state", labels=["status"])
        wait = GaugeMetricFamily(
            "vdu_job_queue_wait_seconds",
            "queue wait (created to first claim) of jobs started in the last hour",
            labels=["stat"],
        )
        rate = GaugeMetricFamily(
            "vdu_job_step_rate", "optimisation steps per second of running jobs", labels=["job_id"]
        )
        try:
            with session_scope(self.settings) as s:
                counts = dict(s.execute(select(Job.status, func.count()).group_by(Job.status)).all())
                since = utcnow() - timedelta(hours=1)
                started = s.execute(
                    select(Job.created_at, Job.started_at).where(Job.started_at.is_not(None), Job.started_at > since)
                ).all()
                running = s.execute(select(Job.id, Job.progress).where(Job.status == JobStatus.running.value)).all()
        except Exception as exc:  # the database is down: /readyz says so; keep /metrics answering
            log.warning("metrics: cannot read jobs: %s", type(exc).__name__)
            return
        for status in JobStatus:
            by_state.add_metric([status.value], counts.get(status.value, 0))
        waits = [(b - a).total_seconds() for a, b in started]
        if waits:
            wait.add_metric(["p50"], statistics.median(waits))
            wait.add_metric(["max"], max(waits))
        for job_id, progress in running:
            if progress and progress.get("elapsed_s"):
                rate.add_metric([job_id], float(progress.get("step", 0)) / float(progress["elapsed_s"]))
        yield by_state
        yield wait
        yield rate


def app_registry(settings: Settings) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(JobCollector(settings))
    return registry
