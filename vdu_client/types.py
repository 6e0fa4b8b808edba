"""Typed results. Each keeps the API's JSON in ``raw``; unknown fields are ignored, so a newer
server does not break an older client."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar, Generic, TypeVar

T = TypeVar("T")
FINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})


def _datetime(value: Any) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


@dataclass
class Resource:
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    _datetimes: ClassVar[tuple[str, ...]] = ("created_at",)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)} - {"raw"}
        values = {k: v for k, v in data.items() if k in names}
        for name in cls._datetimes:
            if name in values:
                values[name] = _datetime(values[name])
        return cls(raw=data, **values)


@dataclass
class ForgetSet(Resource):
    id: str = ""
    name: str = ""
    filename: str = ""
    image_count: int = 0
    sizes: list[dict[str, int]] = field(default_factory=list)
    bytes: int = 0
    image_bytes: int = 0
    sha256: str = ""
    content_sha256: str | None = None
    created_at: datetime | None = None


@dataclass
class Model(Resource):
    id: str = ""
    name: str = ""
    source: str = ""
    hub_id: str | None = None
    revision: str | None = None
    url: str | None = None
    format: str | None = None
    bytes: int | None = None
    sha256: str | None = None
    lineage: list[dict[str, Any]] = field(default_factory=list)
    description: dict[str, Any] | None = None
    created_at: datetime | None = None


@dataclass
class Artifact(Resource):
    name: str = ""
    bytes: int = 0
    sha256: str = ""
    content_type: str = ""
    url: str = ""


@dataclass
class JobError(Resource):
    code: str = ""
    message: str = ""
    field: str | None = None


@dataclass
class Job(Resource):
    _datetimes: ClassVar[tuple[str, ...]] = ("created_at", "started_at", "finished_at")

    id: str = ""
    status: str = ""
    model: str = ""
    forget_set: str | None = None
    method: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    webhook_url: str | None = None
    progress: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    error: JobError | None = None
    attempt: int = 0
    max_attempts: int = 0
    checkpoint: Artifact | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Job:
        job = super().from_dict(data)
        if isinstance(job.error, dict):
            job.error = JobError.from_dict(job.error)
        if isinstance(job.checkpoint, dict):
            job.checkpoint = Artifact.from_dict(job.checkpoint)
        return job

    @property
    def done(self) -> bool:
        """The job reached a final state (succeeded, failed or cancelled)."""
        return self.status in FINAL_STATUSES

    @property
    def ok(self) -> bool:
        return self.status == "succeeded"


@dataclass
class Event(Resource):
    seq: int = 0
    type: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    created_at: datetime | None = None

    @property
    def final(self) -> bool:
        return self.type in FINAL_STATUSES


@dataclass
class Page(Generic[T]):
    """One page of a list; pass ``next_cursor`` as ``after`` for the next one."""

    data: list[T]
    has_more: bool
    next_cursor: str | None

    def __iter__(self):
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)


@dataclass
class Download:
    """A verified download: where it is, its size and its sha256 (checked against the ETag)."""

    path: Any
    bytes: int
    sha256: str
    verified: bool


@dataclass
class WebhookSecret(Resource):
    """The team's webhook signing key (``whsec_...``); after a rotation the previous one also signs
    until ``previous_expires_at``."""

    _datetimes: ClassVar[tuple[str, ...]] = ("created_at", "rotated_at", "previous_expires_at")

    secret: str = ""
    created_at: datetime | None = None
    rotated_at: datetime | None = None
    previous_expires_at: datetime | None = None


@dataclass
class WebhookDelivery(Resource):
    """One webhook message of a job with every attempt (``log``)."""

    _datetimes: ClassVar[tuple[str, ...]] = ("created_at", "delivered_at", "next_attempt_at")

    id: str = ""
    job: str = ""
    event_type: str = ""
    url: str = ""
    status: str = ""
    attempts: int = 0
    max_attempts: int = 0
    next_attempt_at: datetime | None = None
    last_status_code: int | None = None
    last_latency_ms: int | None = None
    last_error: str | None = None
    log: list[dict[str, Any]] = field(default_factory=list)
    payload: dict[str, Any] = field(default_factory=dict)
    created_at: datetime | None = None
    delivered_at: datetime | None = None
