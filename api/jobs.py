"""``/v1/jobs``: create (validated against vdu_core's config; idempotent), get, list, cancel, events."""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query, Request, Response
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.deps import CurrentTeam, DispatcherDep, SessionDep, SettingsDep, json_body
from api.metrics import JOBS_CREATED
from api.pagination import AfterQuery, LimitQuery, paginate
from api.problems import error_responses
from api.schemas import EventOut, EventPage, JobCreate, JobOut, JobPage
from jobs import ledger
from jobs.errors import Conflict, InvalidInput
from jobs.scoping import get_owned, scoped
from jobs.settings import Settings
from jobs.tables import ForgetSet, Job, JobStatus, Model, Team
from jobs.urls import check_url
from vdu_core.config import EvalConfig, UnlearnConfig
from vdu_core.errors import ConfigError

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
StatusName = Literal["queued", "running", "cancelling", "succeeded", "failed", "cancelled"]
IDEMPOTENCY_HELP = "makes a retried POST return the same job (same key + same body); 255 printable chars max"


class IdempotencyKeyReused(InvalidInput):
    code = "idempotency_key_reused"
    title = "Idempotency key reused"


def json_request_body(model) -> dict:
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
        }
    }


def request_hash(body: JobCreate) -> str:
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def validate_job(
    session: Session, settings: Settings, team: Team, body: JobCreate
) -> tuple[dict, dict, Model, ForgetSet]:
    """Check everything a job needs before it is queued; return the resolved params and evaluation.

    A job on a Stable Diffusion model is validated with ``vdu_core.sd.config`` (torch-free)."""
    params = dict(body.params)
    if "method" in params and params["method"] != body.method:
        raise InvalidInput("params.method disagrees with method; set only `method`", field="params.method")
    params["method"] = body.method
    model = session.scalar(scoped(Model, team.id).where(Model.id == body.model))
    sd = model_family(model, params) == "sd"
    if sd:
        from vdu_core.sd.config import SDEvalConfig as eval_cls
        from vdu_core.sd.config import SDUnlearnConfig as config_cls
    else:
        config_cls, eval_cls = UnlearnConfig, EvalConfig
    try:
        config = config_cls.from_dict(params, prefix="params")
    except ConfigError as exc:
        if exc.field == "params.method":
            exc.field = "method"
        raise
    if config.steps > settings.max_steps:
        raise InvalidInput(
            f"params.steps must be <= {settings.max_steps} on this service; got {config.steps}",
            field="params.steps",
        )
    evaluation = eval_cls.from_dict(body.evaluation, prefix="evaluation")
    if sd:
        _check_sd_evaluation(evaluation)
    elif evaluation.classifier not in settings.allowed_classifiers:
        raise InvalidInput(
            f"evaluation.classifier must be one of {', '.join(settings.allowed_classifiers)}",
            field="evaluation.classifier",
        )
    if model is None:
        raise InvalidInput(f"model {body.model!r} not found", field="model")
    forget_set = session.scalar(scoped(ForgetSet, team.id).where(ForgetSet.id == body.forget_set))
    if forget_set is None:
        raise InvalidInput(f"forget set {body.forget_set!r} not found", field="forget_set")
    if sd and not config.prompts and not (forget_set.summary or {}).get("prompts"):
        raise InvalidInput(
            "name the feature: a prompts.txt in the forget set or params.prompts", field="params.prompts"
        )
    if not sd and config.posterior == "lineage" and not model.lineage:
        raise InvalidInput(
            "posterior 'lineage' needs lineage checkpoints registered with the model",
            field="params.posterior",
        )
    if body.webhook_url is not None:
        check_url(
            body.webhook_url,
            field="webhook_url",
            allow_private=settings.allow_private_urls,
            schemes=("https", "http"),
        )
    return config.to_dict(), evaluation.to_dict(), model, forget_set


def model_family(model: Model | None, params: dict) -> str:
    """'sd' or 'ddpm': as the upload checks found it; for hub and URL models (not inspected when
    registered), 'sd' when the parameters name an SD-only field or method (e.g. ``trainable``, ``esd``)."""
    if model is not None and model.source == "upload":
        return ((model.summary or {}).get("model") or {}).get("family", "ddpm")
    from vdu_core.sd.config import SD_ONLY_FIELDS

    return "sd" if params.get("method") == "esd" or any(k in SD_ONLY_FIELDS for k in params) else "ddpm"


def _check_sd_evaluation(evaluation) -> None:
    from vdu_core.sd.detectors import check_detector_name
    from vdu_core.sd.prompts import get_prompt_set

    check_detector_name(evaluation.detector)
    for field in ("feature_prompt_set", "neutral_prompt_set"):
        if getattr(evaluation, field) is not None:
            get_prompt_set(getattr(evaluation, field), field=f"evaluation.{field}")


def _replay(existing: Job, digest: str, response: Response, request: Request) -> JobOut:
    if existing.request_hash != digest:
        raise IdempotencyKeyReused(
            "this Idempotency-Key was used with a different request body", field="Idempotency-Key"
        )
    response.status_code = 200
    response.headers["Idempotent-Replayed"] = "true"
    response.headers["Location"] = f"/v1/jobs/{existing.id}"
    return JobOut.of(existing, str(request.base_url))


@router.post(
    "",
    status_code=201,
    response_model=JobOut,
    openapi_extra=json_request_body(JobCreate),
    responses=error_responses(400, 401, 413, 415, 422),
)
def create_job(
    request: Request,
    response: Response,
    team: CurrentTeam,
    session: SessionDep,
    settings: SettingsDep,
    dispatcher: DispatcherDep,
    body: Annotated[JobCreate, json_body(JobCreate)],
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=255,
            pattern=r"^[\x21-\x7e]+$",
            description=IDEMPOTENCY_HELP,
        ),
    ] = None,
) -> JobOut:
    """Start an unlearning job. It is recorded as `queued` and committed, *then* sent to a worker."""
    digest = request_hash(body)
    if idempotency_key is not None:
        existing = session.scalar(scoped(Job, team.id).where(Job.idempotency_key == idempotency_key))
        if existing is not None:
            return _replay(existing, digest, response, request)
    params, evaluation, model, forget_set = validate_job(session, settings, team, body)
    job = ledger.create_job(
        session,
        team_id=team.id,
        model_id=model.id,
        forget_set_id=forget_set.id,
        method=body.method,
        params=params,
        evaluation=evaluation,
        max_attempts=settings.max_attempts,
        webhook_url=body.webhook_url,
        idempotency_key=idempotency_key,
        request_hash=digest,
    )
    try:
        session.commit()
    except IntegrityError:  # the same key raced in from a concurrent retry
        session.rollback()
        existing = session.scalar(scoped(Job, team.id).where(Job.idempotency_key == idempotency_key))
        if idempotency_key is None or existing is None:
            raise
        return _replay(existing, digest, response, request)
    JOBS_CREATED.inc()
    try:
        dispatcher.publish(job.id)
    except Exception as exc:  # the job is safe in the ledger; the reconciler re-sends it
        log.warning(
            "publish of job %s failed (%s); the reconciler will re-send it",
            job.id,
            type(exc).__name__,
            extra={"job_id": job.id, "event": "publish_failed"},
        )
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    log.info("job %s queued", job.id, extra={"job_id": job.id, "event": "job_created"})
    return JobOut.of(job, str(request.base_url))


@router.get("", response_model=JobPage, responses=error_responses(401, 422))
def list_jobs(
    request: Request,
    team: CurrentTeam,
    session: SessionDep,
    limit: LimitQuery = 20,
    after: AfterQuery = None,
    status: Annotated[list[StatusName] | None, Query(description="filter; repeat for several")] = None,
) -> JobPage:
    """The team's jobs, newest first."""
    stmt = scoped(Job, team.id)
    if status:
        stmt = stmt.where(Job.status.in_(status))
    rows, more = paginate(session, stmt, Job, limit=limit, after=after)
    base = str(request.base_url)
    return JobPage(data=[JobOut.of(j, base) for j in rows], has_more=more, next_cursor=rows[-1].id if more else None)


@router.get("/{job_id}", response_model=JobOut, responses=error_responses(401, 404))
def get_job(job_id: str, request: Request, team: CurrentTeam, session: SessionDep) -> JobOut:
    return JobOut.of(get_owned(session, Job, job_id, team.id), str(request.base_url))


@router.post("/{job_id}/cancel", response_model=JobOut, responses=error_responses(401, 404, 409))
def cancel_job(job_id: str, request: Request, team: CurrentTeam, session: SessionDep) -> JobOut:
    """Cancel: a queued job ends `cancelled` at once; a running one goes `cancelling` and its training
    loop stops at the next step. Cancelling again is harmless; a finished job answers 409."""
    get_owned(session, Job, job_id, team.id)
    outcome = ledger.request_cancel(session, job_id)
    session.commit()
    job = outcome.job
    if not outcome.changed and job.status in (JobStatus.succeeded.value, JobStatus.failed.value):
        raise Conflict(f"job {job_id} already {job.status}", field="status")
    return JobOut.of(job, str(request.base_url))


@router.get("/{job_id}/events", response_model=EventPage, responses=error_responses(401, 404, 422))
def list_events(
    job_id: str,
    team: CurrentTeam,
    session: SessionDep,
    after: Annotated[int, Query(ge=0, le=2**31 - 1, description="sequence number of the last event seen")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> EventPage:
    """The job's events in order (queued, started, progress..., a final state), from `after`."""
    get_owned(session, Job, job_id, team.id)
    rows = ledger.events_after(session, job_id, after=after, limit=limit + 1)
    more = len(rows) > limit
    rows = rows[:limit]
    return EventPage(
        data=[EventOut.of(e) for e in rows], has_more=more, next_cursor=str(rows[-1].seq) if more else None
    )
