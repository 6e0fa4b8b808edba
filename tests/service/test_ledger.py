"""The job state machine on Postgres: each transition is atomic and conditional."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import select

from jobs import ledger
from jobs.db import session_scope
from jobs.maintenance import run_maintenance
from jobs.queue import InProcessDispatcher
from jobs.tables import Job, JobEvent, utcnow
from tests.service.helpers import make_forget_set_row, make_model_row, make_team

pytestmark = pytest.mark.timeout(60)


def new_job(settings, max_attempts=2, **kw) -> str:
    with session_scope(settings) as s:
        team = make_team(s)
        model = make_model_row(s, team.id)
        fs = make_forget_set_row(s, team.id)
        job = ledger.create_job(
            s,
            team_id=team.id,
            model_id=model.id,
            forget_set_id=fs.id,
            method="vdu",
            params={"steps": 3},
            evaluation={},
            max_attempts=max_attempts,
            **kw,
        )
        return job.id


def get(settings, job_id) -> Job:
    with session_scope(settings) as s:
        return s.get(Job, job_id)


def events(settings, job_id) -> list[tuple[int, str]]:
    with session_scope(settings) as s:
        return [
            (e.seq, e.type) for e in s.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.seq))
        ]


def test_claim_heartbeat_succeed_is_idempotent(settings):
    job_id = new_job(settings)
    with session_scope(settings) as s:
        job = ledger.claim(s, job_id, "w1", 30)
        assert job.status == "running" and job.attempt == 1 and job.worker_id == "w1"
        assert job.lease_expires_at > utcnow() + timedelta(seconds=25)
    with session_scope(settings) as s:
        assert ledger.claim(s, job_id, "w2", 30) is None  # a duplicate delivery finds nothing
    with session_scope(settings) as s:
        assert ledger.heartbeat(s, job_id, "w1", 30, {"step": 1, "total": 3}) == "running"
        assert ledger.heartbeat(s, job_id, "w2", 30, {"step": 1}) is None  # not the owner
    artifacts = {"files": {"metrics.json": {"sha256": "a" * 64}}}
    with session_scope(settings) as s:
        assert ledger.succeed(s, job_id, "w1", metrics={"pul": 0.1}, artifacts=artifacts).status == "succeeded"
    with session_scope(settings) as s:  # finalize repeated: same result, no new event
        assert ledger.succeed(s, job_id, "w1", metrics={"pul": 0.1}, artifacts=artifacts).status == "succeeded"
    job = get(settings, job_id)
    assert job.metrics == {"pul": 0.1} and job.finished_at is not None and job.lease_expires_at is None
    assert events(settings, job_id) == [(1, "queued"), (2, "started"), (3, "progress"), (4, "succeeded")]


def test_cancel_queued_is_immediate_and_running_goes_through_cancelling(settings):
    queued = new_job(settings)
    with session_scope(settings) as s:
        out = ledger.request_cancel(s, queued)
        assert out.changed and out.job.status == "cancelled"
    with session_scope(settings) as s:
        assert ledger.claim(s, queued, "w", 30) is None

    running = new_job(settings)
    with session_scope(settings) as s:
        ledger.claim(s, running, "w", 30)
    with session_scope(settings) as s:
        assert ledger.request_cancel(s, running).job.status == "cancelling"
    with session_scope(settings) as s:
        out = ledger.request_cancel(s, running)  # again: nothing changes
        assert not out.changed and out.job.status == "cancelling"
    with session_scope(settings) as s:
        assert ledger.heartbeat(s, running, "w", 30) == "cancelling"
        assert ledger.finish_cancelled(s, running, "w").status == "cancelled"
    assert [t for _, t in events(settings, running)] == ["queued", "started", "cancel_requested", "cancelled"]


def test_fail_records_the_error(settings):
    job_id = new_job(settings)
    with session_scope(settings) as s:
        ledger.claim(s, job_id, "w", 30)
    with session_scope(settings) as s:
        job = ledger.fail(s, job_id, "w", code="invalid_model", message="pickle refused", field="model")
    assert job.status == "failed"
    assert job.error == {"code": "invalid_model", "message": "pickle refused", "field": "model"}


def _expire(settings, job_id):
    with session_scope(settings) as s:
        s.get(Job, job_id).lease_expires_at = utcnow() - timedelta(seconds=1)


def test_reaper_requeues_until_max_attempts_then_fails_with_the_reason(settings):
    job_id = new_job(settings, max_attempts=2)
    dispatcher = InProcessDispatcher()
    with session_scope(settings) as s:
        ledger.claim(s, job_id, "w1", 30)
    _expire(settings, job_id)
    report = run_maintenance(settings, dispatcher)
    assert [(r.job_id, r.status) for r in report.reaped] == [(job_id, "queued")]
    # the session's database holds other tests' queued jobs too, which this pass may re-send as well
    sent = [dispatcher.queue.get_nowait() for _ in range(dispatcher.queue.qsize())]
    assert job_id in report.republished and job_id in sent
    with session_scope(settings) as s:
        assert ledger.heartbeat(s, job_id, "w1", 30) is None  # the old worker lost the job
        assert ledger.claim(s, job_id, "w2", 30).attempt == 2
    _expire(settings, job_id)
    report = run_maintenance(settings, dispatcher)
    job = get(settings, job_id)
    assert job.status == "failed" and job.error["code"] == "worker_lost"
    assert "2 attempts" in job.error["message"]
    with session_scope(settings) as s:
        assert ledger.succeed(s, job_id, "w2", metrics={}, artifacts={}) is None  # a zombie cannot finish it


def test_reaper_turns_an_abandoned_cancel_into_cancelled(settings):
    job_id = new_job(settings)
    with session_scope(settings) as s:
        ledger.claim(s, job_id, "w1", 30)
        ledger.request_cancel(s, job_id)
    _expire(settings, job_id)
    run_maintenance(settings, InProcessDispatcher())
    assert get(settings, job_id).status == "cancelled"


def test_reconciler_resends_only_jobs_the_broker_lost(settings):
    lost, held = new_job(settings), new_job(settings)
    with session_scope(settings) as s:
        for job_id in (lost, held):
            s.get(Job, job_id).last_published_at = utcnow() - timedelta(hours=1)
    dispatcher = InProcessDispatcher()
    dispatcher.publish(held)
    report = run_maintenance(settings, dispatcher)
    assert lost in report.republished and held not in report.republished
    assert get(settings, lost).publish_count == 2
    report = run_maintenance(settings, dispatcher)  # within the grace period: not again
    assert lost not in report.republished


def test_concurrent_claims_have_exactly_one_winner(settings):
    job_id = new_job(settings)
    winners, barrier = [], threading.Barrier(8)

    def worker(i):
        barrier.wait()
        with session_scope(settings) as s:
            if ledger.claim(s, job_id, f"w{i}", 30) is not None:
                winners.append(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1
    assert get(settings, job_id).attempt == 1


def test_event_numbers_stay_contiguous_under_concurrent_writers(settings):
    job_id = new_job(settings)
    with session_scope(settings) as s:
        ledger.claim(s, job_id, "w", 30)

    def beat():
        for i in range(10):
            with session_scope(settings) as s:
                ledger.heartbeat(s, job_id, "w", 30, {"step": i})

    threads = [threading.Thread(target=beat) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seqs = [seq for seq, _ in events(settings, job_id)]
    assert seqs == list(range(1, 43))


def test_reconciler_reads_redis_and_resends_what_a_restart_lost(settings):
    import redis

    from jobs.queue import CeleryDispatcher

    settings = settings.model_copy(update={"queue_name": "reconcile-test"})
    dispatcher = CeleryDispatcher(settings)
    job_id = new_job(settings)
    dispatcher.publish(job_id)
    assert job_id in dispatcher.pending_job_ids()
    with session_scope(settings) as s:
        s.get(Job, job_id).last_published_at = utcnow() - timedelta(hours=1)
    assert job_id not in run_maintenance(settings, dispatcher).republished  # Redis still holds it

    redis.Redis.from_url(settings.broker_url).delete(settings.broker_key_prefix + settings.queue_name)
    assert job_id not in dispatcher.pending_job_ids()  # "Redis restarted empty"
    assert job_id in run_maintenance(settings, dispatcher).republished
    assert job_id in dispatcher.pending_job_ids()
