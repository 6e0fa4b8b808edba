"""Request and response bodies of the v1 API (the OpenAPI schema at /docs)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from jobs.tables import ForgetSet, Job, JobEvent, Model

PRINTABLE_ID = r"^[\x21-\x7e]+$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- forget sets -------------------------------------------------------------------------------
class ImageSize(BaseModel):
    width: int
    height: int
    count: int


class ForgetSetOut(BaseModel):
    object: Literal["forget_set"] = "forget_set"
    id: str
    name: str
    filename: str
    image_count: int
    sizes: list[ImageSize]
    bytes: int = Field(description="size of the stored archive (or image)")
    image_bytes: int = Field(description="uncompressed bytes of all images")
    sha256: str = Field(description="sha256 of the stored archive")
    content_sha256: str | None = Field(None, description="sha256 over the images, independent of packaging")
    captions: int = Field(0, description="images with a caption (captions.jsonl / captions.csv; text-to-image models)")
    prompts: int = Field(0, description="prompts naming the feature (prompts.txt; text-to-image models)")
    created_at: datetime

    @classmethod
    def of(cls, fs: ForgetSet) -> ForgetSetOut:
        counts: dict[tuple[int, int], int] = {}
        for w, h in fs.summary.get("sizes", []):
            counts[(w, h)] = counts.get((w, h), 0) + 1
        return cls(
            id=fs.id,
            name=fs.name,
            filename=fs.filename,
            image_count=fs.image_count,
            sizes=[ImageSize(width=w, height=h, count=c) for (w, h), c in sorted(counts.items())],
            bytes=fs.archive_bytes,
            image_bytes=fs.total_bytes,
            sha256=fs.sha256,
            content_sha256=fs.summary.get("content_sha256"),
            captions=fs.summary.get("captions", 0),
            prompts=fs.summary.get("prompts", 0),
            created_at=fs.created_at,
        )


# --- models ------------------------------------------------------------------------------------
class HubRef(Strict):
    source: Literal["hub"] = "hub"
    hub_id: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
    revision: str = Field(
        min_length=1,
        max_length=200,
        pattern=r"^[\w./-]+$",
        description="a commit sha (recommended) or tag; required so the model is pinned",
    )


class UrlRef(Strict):
    source: Literal["url"] = "url"
    url: str = Field(
        min_length=1,
        max_length=2048,
        description="https:// or s3:// location of a safetensors file or an archive of a diffusers folder",
    )


class ModelCreate(Strict):
    """Register a model by reference (JSON). To upload files, POST multipart/form-data instead."""

    name: str = Field(min_length=1, max_length=200)
    source: Literal["hub", "url"]
    hub_id: str | None = Field(None, min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
    revision: str | None = Field(None, min_length=1, max_length=200, pattern=r"^[\w./-]+$")
    url: str | None = Field(None, min_length=1, max_length=2048)
    lineage: list[HubRef | UrlRef] = Field(
        default_factory=list, max_length=16, description="extra checkpoints of the same lineage (posterior)"
    )


class LineageOut(BaseModel):
    source: str
    hub_id: str | None = None
    revision: str | None = None
    url: str | None = None
    filename: str | None = None
    sha256: str | None = None
    bytes: int | None = None


class ModelOut(BaseModel):
    object: Literal["model"] = "model"
    id: str
    name: str
    source: Literal["hub", "url", "upload"]
    hub_id: str | None = None
    revision: str | None = None
    url: str | None = None
    format: str | None = None
    bytes: int | None = None
    sha256: str | None = None
    lineage: list[LineageOut]
    description: dict[str, Any] | None = Field(
        None, description="what the upload checks found: kind, classes, parameters, sample size, channels"
    )
    created_at: datetime

    @classmethod
    def of(cls, m: Model) -> ModelOut:
        lineage = [LineageOut(**{k: v for k, v in ref.items() if k in LineageOut.model_fields}) for ref in m.lineage]
        return cls(
            id=m.id,
            name=m.name,
            source=m.source,
            hub_id=m.hub_id,
            revision=m.revision,
            url=m.url,
            format=m.file_format,
            bytes=m.size_bytes,
            sha256=m.sha256,
            lineage=lineage,
            description=(m.summary or {}).get("model"),
            created_at=m.created_at,
        )


# --- jobs --------------------------------------------------------------------------------------
class JobCreate(Strict):
    model: str = Field(min_length=1, max_length=64, pattern=PRINTABLE_ID, description="id of a registered model")
    forget_set: str = Field(
        min_length=1, max_length=64, pattern=PRINTABLE_ID, description="id of an uploaded forget set"
    )
    method: str = Field("vdu", min_length=1, max_length=32)
    params: dict[str, Any] = Field(default_factory=dict, description="method parameters (vdu_core UnlearnConfig)")
    evaluation: dict[str, Any] = Field(default_factory=dict, description="evaluation options (vdu_core EvalConfig)")
    webhook_url: str | None = Field(None, max_length=2048)


class JobError(BaseModel):
    code: str
    message: str
    field: str | None = None


class ArtifactOut(BaseModel):
    name: str
    bytes: int
    sha256: str
    content_type: str
    url: str


class JobOut(BaseModel):
    object: Literal["job"] = "job"
    id: str
    status: Literal["queued", "running", "cancelling", "succeeded", "failed", "cancelled"]
    model: str
    forget_set: str | None
    method: str
    params: dict[str, Any]
    evaluation: dict[str, Any]
    webhook_url: str | None = None
    progress: dict[str, Any] | None = Field(None, description="step, total, eta_s, phase, losses ...")
    metrics: dict[str, Any] | None = None
    error: JobError | None = None
    attempt: int
    max_attempts: int
    checkpoint: ArtifactOut | None = Field(None, description="the sanitized pipeline as one archive")
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None

    @classmethod
    def of(cls, job: Job, base_url: str = "") -> JobOut:
        from api.artifacts import artifact_entries

        checkpoint = None
        if job.status == "succeeded" and job.artifacts:
            entries = {a.name: a for a in artifact_entries(job, base_url)}
            checkpoint = entries.get(job.artifacts.get("checkpoint") or "")
        return cls(
            id=job.id,
            status=job.status,
            model=job.model_id,
            forget_set=job.forget_set_id,
            method=job.method,
            params=job.params,
            evaluation=job.evaluation,
            webhook_url=job.webhook_url,
            progress=job.progress,
            metrics=job.metrics,
            error=JobError(**job.error) if job.error else None,
            attempt=job.attempt,
            max_attempts=job.max_attempts,
            checkpoint=checkpoint,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
        )


class EventOut(BaseModel):
    seq: int
    type: str
    data: dict[str, Any]
    created_at: datetime

    @classmethod
    def of(cls, e: JobEvent) -> EventOut:
        return cls(seq=e.seq, type=e.type, data=e.data, created_at=e.created_at)


class Page(BaseModel):
    object: Literal["list"] = "list"
    has_more: bool
    next_cursor: str | None = Field(None, description="pass as `after` to get the next page")


class JobPage(Page):
    data: list[JobOut]


class ForgetSetPage(Page):
    data: list[ForgetSetOut]


class ModelPage(Page):
    data: list[ModelOut]


class EventPage(Page):
    data: list[EventOut]


class ArtifactList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ArtifactOut]
