"""The Celery task: a thin wrapper; the work is ``worker.runner.execute_job``."""

from __future__ import annotations

from jobs.queue import RUN_JOB_TASK
from worker.celery_app import app, settings


@app.task(name=RUN_JOB_TASK, acks_late=True, ignore_result=True)
def run_job(job_id: str) -> str:
    from worker.runner import execute_job

    return execute_job(job_id, settings)
