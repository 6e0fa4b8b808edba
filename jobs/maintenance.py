"""Recovery, run periodically by every worker (and by the embedded service): no job is stuck or lost.

- The *reaper* moves jobs whose lease expired (their worker died) back to ``queued`` until
  ``max_attempts``, then to ``failed`` with the reason, and re-sends the re-queued ones.
- The *reconciler* re-sends ``queued`` jobs that the broker no longer holds (Redis restarted and
  lost its queue; the API died between commit and publish). A job is re-sent only when it is
  older than the grace period and, where the broker can be inspected, absent from it; the
  conditional ``mark_published`` makes two reconcilers racing for one job send it once.

Several workers may run this at once: every step is a conditional update.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import timedelta

from jobs import ledger
from jobs.db import session_scope
from jobs.queue import Dispatcher
from jobs.settings import Settings
from jobs.tables import JobStatus, utcnow

log = logging.getLogger(__name__)


@dataclass
class MaintenanceReport:
    reaped: list[ledger.Reaped] = field(default_factory=list)
    republished: list[str] = field(default_factory=list)


def run_maintenance(settings: Settings, dispatcher: Dispatcher) -> MaintenanceReport:
    report = MaintenanceReport()
    with session_scope(settings) as session:
        report.reaped = ledger.reap_expired_leases(session)
    requeued = [r.job_id for r in report.reaped if r.status == JobStatus.queued.value]

    cutoff = utcnow() - timedelta(seconds=settings.reconcile_grace_s)
    with session_scope(settings) as session:
        candidates = ledger.queued_needing_publish(session, older_than=cutoff)
    pending = None
    if candidates:
        try:
            pending = dispatcher.pending_job_ids()
        except Exception as exc:  # broker down: nothing can be re-sent now anyway
            log.warning("cannot inspect the broker: %s", exc)
            return report
    lost = [j for j in candidates if (pending is None or j not in pending) and j not in requeued]
    with session_scope(settings) as session:
        # Re-queued jobs have no publish time, so the conditional update picks them up too.
        to_send = ledger.mark_published(session, requeued + lost, older_than=cutoff)
    for job_id in to_send:
        try:
            dispatcher.publish(job_id)
            report.republished.append(job_id)
            log.info("re-sent job %s to the queue", job_id, extra={"job_id": job_id, "event": "republished"})
        except Exception as exc:
            log.warning("could not re-send job %s: %s", job_id, exc, extra={"job_id": job_id})
    return report


class MaintenanceLoop:
    """A daemon thread calling ``run_maintenance`` every ``settings.maintenance_interval_s``
    (subclasses change ``tick`` and ``interval``: ``jobs.webhook_delivery.WebhookLoop``)."""

    thread_name = "vdu-maintenance"

    def __init__(self, settings: Settings, dispatcher: Dispatcher | None = None):
        self.settings = settings
        self.dispatcher = dispatcher
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)

    def start(self) -> MaintenanceLoop:
        self.thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self.thread.join(timeout)

    def tick(self) -> None:
        run_maintenance(self.settings, self.dispatcher)

    def interval(self) -> float:
        return self.settings.maintenance_interval_s

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception as exc:  # the database may be restarting: try again next period
                log.warning("%s pass failed: %s: %s", self.thread_name, type(exc).__name__, exc)
            self._stop.wait(self.interval())
