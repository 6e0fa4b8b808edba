"""Webhook delivery: an outbox written with the job's final transition, sent by the workers.

- ``enqueue_job_webhook`` is called by ``jobs.ledger`` in the transaction that makes a job
  ``succeeded``, ``failed`` or ``cancelled``: the message exists if and only if the state changed.
- ``deliver_due`` (run every ``webhook_poll_interval_s`` by ``WebhookLoop`` in every worker's main
  process and in the embedded service) claims due messages with a conditional update, signs them with
  the team's current secret (Standard Webhooks, ``jobs.webhooks``), re-checks the URL (the host is
  resolved now, non-public addresses refused unless ``allow_private_urls``, and the connection is
  pinned to the address that was checked), follows no redirect, and records each attempt: status
  code, latency, error and the next attempt (exponential backoff: base, 4x base, 16x base ...).

Never called from an API request.
"""

from __future__ import annotations

import json
import logging
import random
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlparse, urlunparse

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from jobs.db import session_scope
from jobs.errors import InvalidInput
from jobs.ids import new_id
from jobs.maintenance import MaintenanceLoop
from jobs.settings import Settings
from jobs.tables import Job, TeamWebhookSecret, WebhookDelivery, utcnow
from jobs.urls import check_url, resolve_public
from jobs.webhooks import new_secret, signed_headers

log = logging.getLogger(__name__)
FINAL_EVENTS = {"succeeded": "job.succeeded", "failed": "job.failed", "cancelled": "job.cancelled"}
USER_AGENT = "vdu-webhooks/1"
CLAIM_MARGIN_S = 30.0


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value is not None else None


def job_payload(job: Job, event_type: str) -> dict[str, Any]:
    """The message body: fixed when the job ends, so every retry sends the same bytes."""
    return {
        "type": event_type,
        "timestamp": _iso(utcnow()),
        "data": {
            "object": "job",
            "id": job.id,
            "status": job.status,
            "model": job.model_id,
            "forget_set": job.forget_set_id,
            "method": job.method,
            "attempt": job.attempt,
            "error": job.error,
            "metrics": job.metrics,
            "created_at": _iso(job.created_at),
            "started_at": _iso(job.started_at),
            "finished_at": _iso(job.finished_at),
        },
    }


def enqueue_job_webhook(session: Session, job: Job, settings: Settings | None = None) -> WebhookDelivery | None:
    """Record the webhook of a job's final state (the caller's transaction commits it)."""
    event_type = FINAL_EVENTS.get(job.status)
    if event_type is None or not job.webhook_url:
        return None
    from jobs.settings import get_settings

    settings = settings or get_settings()
    now = utcnow()
    row = WebhookDelivery(
        id=new_id("webhook_delivery"),
        team_id=job.team_id,
        job_id=job.id,
        event_type=event_type,
        url=job.webhook_url,
        payload=job_payload(job, event_type),
        status="pending",
        attempts=0,
        max_attempts=settings.webhook_max_attempts,
        next_attempt_at=now,
        log=[],
        created_at=now,
        updated_at=now,
    )
    session.add(row)
    session.flush()
    return row


# --- the team's secret ---------------------------------------------------------------------------
def team_secret(session: Session, team_id: str) -> TeamWebhookSecret:
    """The team's secret row, created on first use."""
    row = session.get(TeamWebhookSecret, team_id)
    if row is None:
        row = TeamWebhookSecret(team_id=team_id, secret=new_secret(), created_at=utcnow())
        session.add(row)
        session.flush()
    return row


def rotate_team_secret(session: Session, team_id: str, grace_s: float) -> TeamWebhookSecret:
    """A new secret; the old one keeps signing (beside the new) for ``grace_s`` seconds."""
    row = team_secret(session, team_id)
    now = utcnow()
    row.previous_secret = row.secret if grace_s > 0 else None
    row.previous_expires_at = now + timedelta(seconds=grace_s) if grace_s > 0 else None
    row.secret = new_secret()
    row.rotated_at = now
    session.flush()
    return row


def signing_secrets(row: TeamWebhookSecret, now: datetime) -> list[str]:
    secrets_ = [row.secret]
    if row.previous_secret and row.previous_expires_at and row.previous_expires_at > now:
        secrets_.append(row.previous_secret)
    return secrets_


# --- sending -------------------------------------------------------------------------------------
@dataclass
class AttemptResult:
    status_code: int | None
    latency_ms: int
    error: str | None

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def _addresses(host: str, port: int, allow_private: bool) -> list[str]:
    if not allow_private:
        return resolve_public(host, port)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise InvalidInput(f"cannot resolve host {host!r}", field="url") from exc
    return list(dict.fromkeys(info[4][0] for info in infos))


def send_webhook(url: str, body: bytes, headers: dict[str, str], settings: Settings) -> AttemptResult:
    """One POST: URL rules re-checked, the host resolved and the connection pinned to a checked
    address (no DNS rebinding between check and connect), no redirects, short timeouts."""
    import httpx

    t0 = time.monotonic()

    def result(code: int | None, error: str | None) -> AttemptResult:
        return AttemptResult(code, int((time.monotonic() - t0) * 1000), error[:500] if error else None)

    try:
        check_url(url, field="url", allow_private=settings.allow_private_urls, schemes=("https", "http"), resolve=False)
        parsed = urlparse(url)
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        addr = _addresses(parsed.hostname, port, settings.allow_private_urls)[0]
    except InvalidInput as exc:
        return result(None, f"refused: {exc.message}")
    host_for_url = f"[{addr}]" if ":" in addr else addr
    pinned = urlunparse(parsed._replace(netloc=f"{host_for_url}:{port}"))
    default_port = (parsed.scheme == "https" and port == 443) or (parsed.scheme == "http" and port == 80)
    host_header = parsed.hostname if default_port else f"{parsed.hostname}:{port}"
    request_headers = {
        **headers,
        "Host": host_header,
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
    }
    timeout = httpx.Timeout(settings.webhook_timeout_s, connect=min(3.0, settings.webhook_timeout_s))
    try:
        with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client:
            request = client.build_request(
                "POST", pinned, content=body, headers=request_headers, extensions={"sni_hostname": parsed.hostname}
            )
            response = client.send(request, stream=True)  # the body is never read: status only
            response.close()
    except (httpx.HTTPError, OSError, ValueError) as exc:  # whatever the receiver does, the attempt is recorded
        return result(None, f"{type(exc).__name__}: {exc}")
    code = response.status_code
    if 300 <= code < 400:
        return result(code, "redirect not followed")
    return result(code, None if 200 <= code < 300 else f"HTTP {code}")


def next_delay_s(attempts: int, settings: Settings) -> float:
    """Backoff after ``attempts`` failed attempts: base x 4^(attempts-1), capped, with 0-20% jitter."""
    delay = min(settings.webhook_retry_base_s * 4 ** (attempts - 1), settings.webhook_retry_max_s)
    return delay * (1 + random.random() * 0.2)


def _claim(session: Session, delivery_id: str, seen: datetime, settings: Settings) -> WebhookDelivery | None:
    """Take one due message for this attempt (a conditional update: two workers never both send it)."""
    lease = utcnow() + timedelta(seconds=settings.webhook_timeout_s + CLAIM_MARGIN_S)
    stmt = (
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id == delivery_id,
            WebhookDelivery.status == "pending",
            WebhookDelivery.next_attempt_at == seen,
        )
        .values(next_attempt_at=lease, attempts=WebhookDelivery.attempts + 1, updated_at=utcnow())
        .returning(WebhookDelivery)
        .execution_options(synchronize_session=False, populate_existing=True)
    )
    return session.scalars(stmt).one_or_none()


def _record(session: Session, delivery_id: str, outcome: AttemptResult, settings: Settings) -> WebhookDelivery:
    row = session.get(WebhookDelivery, delivery_id, populate_existing=True)
    now = utcnow()
    if outcome.ok:
        row.status, row.delivered_at, row.next_attempt_at = "succeeded", now, None
    elif row.attempts >= row.max_attempts:
        row.status, row.next_attempt_at = "failed", None
    else:
        row.next_attempt_at = now + timedelta(seconds=next_delay_s(row.attempts, settings))
    row.last_status_code, row.last_latency_ms, row.last_error = outcome.status_code, outcome.latency_ms, outcome.error
    row.log = [
        *row.log,
        {
            "attempt": row.attempts,
            "at": _iso(now),
            "status_code": outcome.status_code,
            "latency_ms": outcome.latency_ms,
            "error": outcome.error,
            "next_attempt_at": _iso(row.next_attempt_at),
        },
    ]
    row.updated_at = now
    return row


def deliver_one(settings: Settings, delivery_id: str, seen: datetime) -> WebhookDelivery | None:
    """Claim, sign, send and record one message; None when another worker took it."""
    with session_scope(settings) as session:
        row = _claim(session, delivery_id, seen, settings)
        if row is None:
            return None
        now = utcnow()
        secrets_ = signing_secrets(team_secret(session, row.team_id), now)
        url, attempt = row.url, row.attempts
        body = json.dumps(row.payload, sort_keys=True, separators=(",", ":")).encode()
    headers = signed_headers(secrets_, delivery_id, int(time.time()), body)
    outcome = send_webhook(url, body, headers, settings)
    with session_scope(settings) as session:
        row = _record(session, delivery_id, outcome, settings)
        session.flush()
        session.expunge(row)
    level = logging.INFO if outcome.ok else logging.WARNING
    log.log(
        level,
        "webhook %s attempt %d: %s",
        delivery_id,
        attempt,
        outcome.status_code or outcome.error,
        extra={"job_id": row.job_id, "event": "webhook_attempt"},
    )
    return row


def deliver_due(settings: Settings, limit: int = 20) -> list[WebhookDelivery]:
    """One pass: every pending message whose time has come (oldest first)."""
    with session_scope(settings) as session:
        due = session.execute(
            select(WebhookDelivery.id, WebhookDelivery.next_attempt_at)
            .where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= utcnow())
            .order_by(WebhookDelivery.next_attempt_at)
            .limit(limit)
        ).all()
    done = []
    for delivery_id, seen in due:
        row = deliver_one(settings, delivery_id, seen)
        if row is not None:
            done.append(row)
    return done


class WebhookLoop(MaintenanceLoop):
    """A daemon thread calling ``deliver_due`` every ``settings.webhook_poll_interval_s``."""

    thread_name = "vdu-webhooks"

    def tick(self) -> None:
        deliver_due(self.settings)

    def interval(self) -> float:
        return self.settings.webhook_poll_interval_s
