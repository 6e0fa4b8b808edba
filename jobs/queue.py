"""How a job id reaches a worker: Celery on Redis, or an in-process queue (embedded mode).

Postgres is the truth; the queue is only a transport. Publishing is therefore allowed to fail or
to duplicate: a lost message is re-sent by the reconciler (``jobs.maintenance``), a duplicate
finds nothing to claim. This module builds the Celery *app configuration* shared by the API
(which only sends) and the worker (which registers the task); it defines no tasks.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import uuid
from typing import Protocol

from jobs.settings import Settings

log = logging.getLogger(__name__)

RUN_JOB_TASK = "vdu.run_job"
PRIORITY_SEP = "\x06\x16"


class Dispatcher(Protocol):
    def publish(self, job_id: str) -> None: ...

    def pending_job_ids(self) -> set[str] | None:
        """Job ids the transport still holds (waiting or delivered-unacknowledged); None: unknown."""

    def ping(self) -> None:
        """Raise if the transport cannot take a message (readiness)."""


def make_celery_app(settings: Settings, main: str = "vdu"):
    """A Celery app configured for GPU jobs (no tasks registered here)."""
    from celery import Celery
    from kombu import Exchange, Queue

    app = Celery(main, broker=settings.broker_url)
    transport_options = {
        # A message held by a busy worker must not be redelivered while the job may still run.
        "visibility_timeout": settings.job_hard_time_limit_s + 600,
    }
    if settings.broker_key_prefix:
        transport_options["global_keyprefix"] = settings.broker_key_prefix
    exchange = Exchange(settings.queue_name, type="direct")
    app.conf.update(
        task_queues=[Queue(settings.queue_name, exchange, routing_key=settings.queue_name)],
        task_default_queue=settings.queue_name,
        task_routes={RUN_JOB_TASK: {"queue": settings.queue_name}},
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=False,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        worker_max_tasks_per_child=1,
        task_soft_time_limit=settings.job_soft_time_limit_s,
        task_time_limit=settings.job_hard_time_limit_s,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5,
        task_publish_retry_policy={
            "max_retries": 2,
            "interval_start": 0,
            "interval_step": 0.2,
            "interval_max": 0.5,
        },
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        enable_utc=True,
    )
    return app


class CeleryDispatcher:
    """Send ``vdu.run_job(job_id)`` to the training queue; inspect Redis for what it holds."""

    def __init__(self, settings: Settings, app=None):
        self.settings = settings
        self.app = app or make_celery_app(settings)
        self._redis = None

    def publish(self, job_id: str) -> None:
        self.app.send_task(
            RUN_JOB_TASK,
            args=[job_id],
            queue=self.settings.queue_name,
            task_id=f"{job_id}.{uuid.uuid4().hex[:8]}",
        )

    def _redis_client(self):
        if self._redis is None:
            import redis

            self._redis = redis.Redis.from_url(self.settings.broker_url, socket_timeout=5, socket_connect_timeout=5)
        return self._redis

    def pending_job_ids(self) -> set[str] | None:
        if not self.settings.broker_url.startswith(("redis://", "rediss://")):
            return None
        r = self._redis_client()
        prefix = self.settings.broker_key_prefix
        q = self.settings.queue_name
        raw: list[bytes] = []
        for key in [q] + [f"{q}{PRIORITY_SEP}{p}" for p in (3, 6, 9)]:
            raw.extend(r.lrange(prefix + key, 0, -1))
        raw.extend(r.hvals(prefix + "unacked"))
        ids: set[str] = set()
        for item in raw:
            try:
                message = json.loads(item)
                if isinstance(message, list):  # unacked entries: [message, exchange, routing_key]
                    message = message[0]
                task_id = message["headers"]["id"]
            except (ValueError, KeyError, TypeError, IndexError):
                continue
            ids.add(str(task_id).split(".", 1)[0])
        return ids

    def ping(self) -> None:
        if self.settings.broker_url.startswith(("redis://", "rediss://")):
            self._redis_client().ping()
            return
        with self.app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1)


class InProcessDispatcher:
    """Embedded mode: job ids go to a thread in this process that runs the same job function."""

    def __init__(self):
        self.queue: queue.Queue[str | None] = queue.Queue()
        self.current: str | None = None
        self.consumer: threading.Thread | None = None
        self._lock = threading.Lock()

    def publish(self, job_id: str) -> None:
        self.queue.put(job_id)

    def pending_job_ids(self) -> set[str] | None:
        with self.queue.mutex:
            ids = {j for j in self.queue.queue if j}
        if self.current:
            ids.add(self.current)
        return ids

    def ping(self) -> None:
        if self.consumer is None or not self.consumer.is_alive():
            raise RuntimeError("the in-process worker thread is not running")


class NoWorkerDispatcher:
    """``broker_url=embedded://`` in a process that runs no embedded worker: jobs wait, readyz fails."""

    def publish(self, job_id: str) -> None:
        log.warning("no worker in this process; job %s waits for the reconciler", job_id, extra={"job_id": job_id})

    def pending_job_ids(self) -> set[str] | None:
        return None

    def ping(self) -> None:
        raise RuntimeError(
            "broker_url is embedded:// but this process runs no in-process worker "
            "(start the embedded service, or point VDU_BROKER_URL at Redis)"
        )


def dispatcher_from_settings(settings: Settings) -> Dispatcher:
    if settings.embedded_broker:
        return NoWorkerDispatcher()
    return CeleryDispatcher(settings)
