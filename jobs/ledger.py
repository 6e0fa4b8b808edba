"""The job state machine, written once.

Every transition is one conditional ``UPDATE jobs ... WHERE id = :id AND status IN (...)
RETURNING ...``: it either happens atomically or finds nothing to change, whatever runs
concurrently (two workers, the reaper, a cancel from the API). Each transition that matters to a
user also bumps ``jobs.event_seq`` in the same statement and appends a ``job_events`` row with
that number, so events are numbered 1, 2, 3... per job without a race.

The functions take a ``Session`` and never commit: the caller's unit of work does.

    queued ──claim──▶ running ──succeed──▶ succeeded
      │                 │  └─────fail────▶ failed
      │ cancel          │ cancel
      ▼                 ▼
    cancelled ◀── cancelling          (reaper: running with an expired lease → queued again,
                                        or failed after max_attempts; cancelling → cancelled)
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, bindparam, func, insert, or_, select, update
from sqlalchemy.orm import Session

from jobs.ids import new_id
from jobs.tables import Job, JobEvent, JobStatus, UTCDateTime, utcnow

log = logging.getLogger(__name__)

S = JobStatus
RUNNING_STATES = (S.running.value, S.cancelling.value)


def _event(
    session: Session,
    job_id: str,
    seq: int,
    type_: str,
    data: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> None:
    session.execute(
        insert(JobEvent).values(job_id=job_id, seq=seq, type=type_, data=data or {}, created_at=now or utcnow())
    )


def _transition(
    session: Session,
    job_id: str,
    where,
    values: dict[str, Any],
    event: str | None,
    event_data: dict[str, Any] | None = None,
) -> Job | None:
    """Apply one conditional update; on success append ``event`` with the new sequence number."""
    now = values.setdefault("updated_at", utcnow())
    if event is not None:
        values["event_seq"] = Job.event_seq + 1
    stmt = (
        update(Job)
        .where(Job.id == job_id, where)
        .values(**values)
        .returning(Job)
        .execution_options(synchronize_session=False, populate_existing=True)
    )
    job = session.scalars(stmt).one_or_none()
    if job is not None and event is not None:
        _event(session, job_id, job.event_seq, event, event_data, now)
        if event == job.status and job.webhook_url:  # a final state: its webhook joins this transaction
            from jobs.webhook_delivery import enqueue_job_webhook

            enqueue_job_webhook(session, job)
    return job


# --- create ------------------------------------------------------------------------------------
def create_job(
    session: Session,
    *,
    team_id: str,
    model_id: str,
    forget_set_id: str,
    method: str,
    params: dict[str, Any],
    evaluation: dict[str, Any],
    max_attempts: int,
    webhook_url: str | None = None,
    idempotency_key: str | None = None,
    request_hash: str | None = None,
) -> Job:
    """Insert a ``queued`` job (and its first event). The caller commits, *then* publishes.

    ``last_published_at`` is set to now: the publish follows the commit, and if it never happens
    (the process died in between, or the broker was down) the reconciler re-sends the job once the
    grace period has passed.
    """
    now = utcnow()
    job = Job(
        id=new_id("job"),
        team_id=team_id,
        model_id=model_id,
        forget_set_id=forget_set_id,
        status=S.queued.value,
        method=method,
        params=params,
        evaluation=evaluation,
        webhook_url=webhook_url,
        attempt=0,
        max_attempts=max_attempts,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
        event_seq=1,
        publish_count=1,
        last_published_at=now,
        created_at=now,
        updated_at=now,
    )
    session.add(job)
    session.flush()
    _event(session, job.id, 1, "queued", {"method": method}, now)
    return job


# --- worker side -------------------------------------------------------------------------------
def claim(session: Session, job_id: str, worker_id: str, lease_seconds: float) -> Job | None:
    """queued → running with a lease and ``attempt += 1``. None: nothing to claim (a duplicate)."""
    now = utcnow()
    return _transition(
        session,
        job_id,
        and_(Job.status == S.queued.value, Job.attempt < Job.max_attempts),
        {
            "status": S.running.value,
            "attempt": Job.attempt + 1,
            "worker_id": worker_id,
            "lease_expires_at": now + timedelta(seconds=lease_seconds),
            "updated_at": now,
            "started_at": func.coalesce(Job.started_at, bindparam("claim_now", now, type_=UTCDateTime())),
            "error": None,
        },
        "started",
        {"worker": worker_id},
    )


def heartbeat(
    session: Session,
    job_id: str,
    worker_id: str,
    lease_seconds: float,
    progress: dict[str, Any] | None = None,
) -> str | None:
    """Extend the lease (and record progress as an event). Returns the job's status (``running``
    or ``cancelling``: the worker's cue to stop), or None when this worker no longer owns the job."""
    now = utcnow()
    values: dict[str, Any] = {"lease_expires_at": now + timedelta(seconds=lease_seconds), "updated_at": now}
    if progress is not None:
        values["progress"] = progress
    job = _transition(
        session,
        job_id,
        and_(Job.status.in_(RUNNING_STATES), Job.worker_id == worker_id),
        values,
        "progress" if progress is not None else None,
        progress,
    )
    return job.status if job is not None else None


def current_status(session: Session, job_id: str) -> str | None:
    return session.scalar(select(Job.status).where(Job.id == job_id))


def succeed(
    session: Session, job_id: str, worker_id: str, *, metrics: dict[str, Any], artifacts: dict[str, Any]
) -> Job | None:
    """running|cancelling → succeeded with metrics and artifact locations. Idempotent: finalising
    an already succeeded job returns it unchanged. None: the worker lost the job (its lease expired
    and the job was handed to another attempt)."""
    now = utcnow()
    job = _transition(
        session,
        job_id,
        and_(Job.status.in_(RUNNING_STATES), Job.worker_id == worker_id),
        {
            "status": S.succeeded.value,
            "metrics": metrics,
            "artifacts": artifacts,
            "finished_at": now,
            "lease_expires_at": None,
            "updated_at": now,
        },
        "succeeded",
        {"artifacts": sorted(artifacts.get("files", {}))},
    )
    if job is None:
        existing = session.get(Job, job_id, populate_existing=True)
        if existing is not None and existing.status == S.succeeded.value:
            return existing
    return job


def fail(
    session: Session,
    job_id: str,
    worker_id: str,
    *,
    code: str,
    message: str,
    field: str | None = None,
    artifacts: dict[str, Any] | None = None,
) -> Job | None:
    """running|cancelling → failed with ``error {code, message}`` (and, when the run left evidence,
    such as a collapsed model's metrics and grids, its ``artifacts``)."""
    now = utcnow()
    error = {"code": code, "message": message[:2000]}
    if field:
        error["field"] = field
    values: dict[str, Any] = {"artifacts": artifacts} if artifacts is not None else {}
    return _transition(
        session,
        job_id,
        and_(Job.status.in_(RUNNING_STATES), Job.worker_id == worker_id),
        {
            **values,
            "status": S.failed.value,
            "error": error,
            "finished_at": now,
            "lease_expires_at": None,
            "updated_at": now,
        },
        "failed",
        error,
    )


def finish_cancelled(session: Session, job_id: str, worker_id: str) -> Job | None:
    """running|cancelling → cancelled (the loop saw the request and stopped)."""
    now = utcnow()
    return _transition(
        session,
        job_id,
        and_(Job.status.in_(RUNNING_STATES), Job.worker_id == worker_id),
        {"status": S.cancelled.value, "finished_at": now, "lease_expires_at": None, "updated_at": now},
        "cancelled",
        {"by": "worker"},
    )


# --- API side ----------------------------------------------------------------------------------
@dataclass
class CancelOutcome:
    job: Job | None
    changed: bool


def request_cancel(session: Session, job_id: str) -> CancelOutcome:
    """queued → cancelled at once; running → cancelling (the loop stops at its next check).

    Cancelling a job that is already cancelling or cancelled changes nothing (``changed=False``);
    the caller decides what a finished job answers.
    """
    now = utcnow()
    job = _transition(
        session,
        job_id,
        Job.status == S.queued.value,
        {"status": S.cancelled.value, "finished_at": now, "cancel_requested_at": now, "updated_at": now},
        "cancelled",
        {"by": "user", "while": "queued"},
    )
    if job is None:
        job = _transition(
            session,
            job_id,
            Job.status == S.running.value,
            {"status": S.cancelling.value, "cancel_requested_at": now, "updated_at": now},
            "cancel_requested",
            {"by": "user"},
        )
    if job is not None:
        return CancelOutcome(job, True)
    return CancelOutcome(session.get(Job, job_id, populate_existing=True), False)


# --- recovery ----------------------------------------------------------------------------------
@dataclass
class Reaped:
    job_id: str
    status: str
    attempt: int


def reap_expired_leases(session: Session, *, now: datetime | None = None, limit: int = 100) -> list[Reaped]:
    """Jobs whose worker stopped renewing its lease: ``running`` → ``queued`` again while attempts
    remain, else ``failed`` with the reason; ``cancelling`` → ``cancelled``.

    Each job is moved by its own conditional update (on the status, attempt and lease seen), so a
    worker renewing at the same moment or a second reaper wins cleanly.
    """
    now = now or utcnow()
    rows = session.execute(
        select(Job.id, Job.status, Job.attempt, Job.max_attempts, Job.worker_id)
        .where(Job.status.in_(RUNNING_STATES), Job.lease_expires_at < now)
        .order_by(Job.lease_expires_at)
        .limit(limit)
    ).all()
    reaped: list[Reaped] = []
    for job_id, status, attempt, max_attempts, worker_id in rows:
        where = and_(Job.status == status, Job.attempt == attempt, Job.lease_expires_at < now)
        common = {"lease_expires_at": None, "worker_id": None, "updated_at": now}
        info = {"worker": worker_id, "attempt": attempt}
        if status == S.cancelling.value:
            job = _transition(
                session,
                job_id,
                where,
                {**common, "status": S.cancelled.value, "finished_at": now},
                "cancelled",
                {**info, "by": "reaper", "reason": "worker lost while cancelling"},
            )
        elif attempt >= max_attempts:
            error = {
                "code": "worker_lost",
                "message": f"the worker stopped reporting (lease expired) on each of {attempt} attempts",
            }
            job = _transition(
                session,
                job_id,
                where,
                {**common, "status": S.failed.value, "finished_at": now, "error": error},
                "failed",
                {**info, **error},
            )
        else:
            job = _transition(
                session,
                job_id,
                where,
                {**common, "status": S.queued.value, "last_published_at": None},
                "requeued",
                {**info, "reason": "lease expired"},
            )
        if job is not None:
            log.warning(
                "reaped job %s: %s -> %s",
                job_id,
                status,
                job.status,
                extra={"job_id": job_id, "event": "reaped"},
            )
            reaped.append(Reaped(job_id, job.status, attempt))
    return reaped


def queued_needing_publish(session: Session, *, older_than: datetime, limit: int = 500) -> list[str]:
    """Ids of queued jobs last sent to the broker before ``older_than`` (or never)."""
    return list(
        session.scalars(
            select(Job.id)
            .where(
                Job.status == S.queued.value,
                or_(Job.last_published_at.is_(None), Job.last_published_at < older_than),
            )
            .order_by(Job.id)
            .limit(limit)
        )
    )


def mark_published(session: Session, job_ids: Iterable[str], *, older_than: datetime | None = None) -> list[str]:
    """Record a (re-)publish. With ``older_than`` it is conditional, so that of two reconcilers
    racing for the same job only one re-sends it. Returns the ids this caller may publish."""
    ids: Sequence[str] = list(job_ids)
    if not ids:
        return []
    now = utcnow()
    where = [Job.id.in_(ids), Job.status == S.queued.value]
    if older_than is not None:
        where.append(or_(Job.last_published_at.is_(None), Job.last_published_at < older_than))
    stmt = (
        update(Job)
        .where(*where)
        .values(last_published_at=now, publish_count=Job.publish_count + 1)
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    )
    return list(session.scalars(stmt))


def events_after(session: Session, job_id: str, after: int = 0, limit: int = 100) -> list[JobEvent]:
    return list(
        session.scalars(
            select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.seq > after).order_by(JobEvent.seq).limit(limit)
        )
    )
