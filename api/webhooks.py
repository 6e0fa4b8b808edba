"""Webhooks: the team's signing secret (read, rotate) and each job's delivery log.

A job created with ``webhook_url`` receives ``job.succeeded``, ``job.failed`` or ``job.cancelled``,
signed with the Standard Webhooks scheme; verify with ``jobs.webhooks.verify_webhook``. Delivery
happens in the workers (``jobs.webhook_delivery``), never in a request.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field
from sqlalchemy import select

from api.deps import CurrentTeam, SessionDep, SettingsDep
from api.problems import error_responses
from jobs.scoping import get_owned
from jobs.tables import Job, TeamWebhookSecret, WebhookDelivery
from jobs.webhook_delivery import rotate_team_secret, team_secret

router = APIRouter(tags=["webhooks"])


class WebhookSecretOut(BaseModel):
    object: Literal["webhook_secret"] = "webhook_secret"
    secret: str = Field(description="whsec_<base64>: HMAC-SHA256 key of the `webhook-signature` header")
    created_at: datetime
    rotated_at: datetime | None = None
    previous_expires_at: datetime | None = Field(
        None, description="after a rotation, messages are also signed with the previous secret until then"
    )

    @classmethod
    def of(cls, row: TeamWebhookSecret) -> WebhookSecretOut:
        return cls(
            secret=row.secret,
            created_at=row.created_at,
            rotated_at=row.rotated_at,
            previous_expires_at=row.previous_expires_at if row.previous_secret else None,
        )


class WebhookAttemptOut(BaseModel):
    attempt: int
    at: datetime
    status_code: int | None = None
    latency_ms: int | None = None
    error: str | None = None
    next_attempt_at: datetime | None = None


class WebhookDeliveryOut(BaseModel):
    object: Literal["webhook_delivery"] = "webhook_delivery"
    id: str = Field(description="the `webhook-id` header: the same on every retry of this message")
    job: str
    event_type: str
    url: str
    status: Literal["pending", "succeeded", "failed"]
    attempts: int
    max_attempts: int
    next_attempt_at: datetime | None = None
    last_status_code: int | None = None
    last_latency_ms: int | None = None
    last_error: str | None = None
    log: list[WebhookAttemptOut]
    payload: dict[str, Any]
    created_at: datetime
    delivered_at: datetime | None = None

    @classmethod
    def of(cls, row: WebhookDelivery) -> WebhookDeliveryOut:
        return cls(
            id=row.id,
            job=row.job_id,
            event_type=row.event_type,
            url=row.url,
            status=row.status,
            attempts=row.attempts,
            max_attempts=row.max_attempts,
            next_attempt_at=row.next_attempt_at if row.status == "pending" else None,
            last_status_code=row.last_status_code,
            last_latency_ms=row.last_latency_ms,
            last_error=row.last_error,
            log=[WebhookAttemptOut(**entry) for entry in row.log],
            payload=row.payload,
            created_at=row.created_at,
            delivered_at=row.delivered_at,
        )


class WebhookDeliveryList(BaseModel):
    object: Literal["list"] = "list"
    data: list[WebhookDeliveryOut]


@router.get("/v1/webhook-secret", response_model=WebhookSecretOut, responses=error_responses(401))
def get_webhook_secret(team: CurrentTeam, session: SessionDep) -> WebhookSecretOut:
    """The team's webhook signing secret (created on first request)."""
    row = team_secret(session, team.id)
    session.commit()
    return WebhookSecretOut.of(row)


@router.post("/v1/webhook-secret/rotate", response_model=WebhookSecretOut, responses=error_responses(401))
def rotate_webhook_secret(team: CurrentTeam, session: SessionDep, settings: SettingsDep) -> WebhookSecretOut:
    """Replace the secret. Messages are signed with both (two `v1,` signatures) during the grace
    period (`VDU_WEBHOOK_SECRET_GRACE_S`, a day by default), so receivers can switch without loss."""
    row = rotate_team_secret(session, team.id, settings.webhook_secret_grace_s)
    session.commit()
    return WebhookSecretOut.of(row)


@router.get(
    "/v1/jobs/{job_id}/webhook-deliveries",
    response_model=WebhookDeliveryList,
    responses=error_responses(401, 404),
    tags=["jobs"],
)
def list_webhook_deliveries(job_id: str, team: CurrentTeam, session: SessionDep) -> WebhookDeliveryList:
    """The job's webhook messages with every attempt: status code, latency, error, next attempt."""
    get_owned(session, Job, job_id, team.id)
    rows = session.scalars(
        select(WebhookDelivery)
        .where(WebhookDelivery.team_id == team.id, WebhookDelivery.job_id == job_id)
        .order_by(WebhookDelivery.created_at)
    )
    return WebhookDeliveryList(data=[WebhookDeliveryOut.of(r) for r in rows])
