"""``/v1/models``: register a model by reference (JSON: hub id + revision, or URL) or by upload
(multipart: a safetensors file or an archive of a diffusers folder), with optional lineage."""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.deps import CurrentTeam, SessionDep, SettingsDep, StorageDep, UploadSessionDep, read_json
from api.forget_sets import check_name
from api.metrics import UPLOAD_BYTES
from api.pagination import AfterQuery, LimitQuery, paginate
from api.problems import error_responses
from api.schemas import ModelCreate, ModelOut, ModelPage
from api.uploads import Upload, receive_upload
from jobs.errors import InvalidInput, UnsupportedMediaType
from jobs.ids import new_id
from jobs.model_files import ModelLimits, extract_model_archive, inspect_model_file
from jobs.scoping import get_owned, scoped
from jobs.settings import Settings
from jobs.storage import Storage
from jobs.tables import Model
from jobs.urls import check_url
from vdu_core.errors import ModelLoadError

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/models", tags=["models"])
MAX_LINEAGE = 16

REGISTER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/ModelCreate"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "a .safetensors file or a zip/tar of a diffusers folder",
                        },
                        "lineage": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "extra same-lineage checkpoints (safetensors or archives)",
                        },
                        "name": {"type": "string", "maxLength": 200},
                    },
                }
            },
        },
    }
}


def _register_ref(session: Session, settings: Settings, team_id: str, body: ModelCreate) -> Model:
    if body.source == "hub":
        if not body.hub_id:
            raise InvalidInput("hub models need `hub_id`", field="hub_id")
        if not body.revision:
            raise InvalidInput("hub models need a pinned `revision` (a commit sha or tag)", field="revision")
        if body.url is not None:
            raise InvalidInput("`url` is not used with source 'hub'", field="url")
    else:
        if not body.url:
            raise InvalidInput("url models need `url`", field="url")
        if body.hub_id is not None or body.revision is not None:
            raise InvalidInput(
                "`hub_id`/`revision` are not used with source 'url'",
                field="hub_id" if body.hub_id is not None else "revision",
            )
        check_url(body.url, field="url", allow_private=settings.allow_private_urls)
    lineage = []
    for i, ref in enumerate(body.lineage):
        if ref.source == "url":
            check_url(ref.url, field=f"lineage[{i}].url", allow_private=settings.allow_private_urls)
        lineage.append(ref.model_dump())
    row = Model(
        id=new_id("model"),
        team_id=team_id,
        name=check_name(body.name, "", field="name"),
        source=body.source,
        hub_id=body.hub_id,
        revision=body.revision,
        url=body.url,
        lineage=lineage,
    )
    session.add(row)
    session.commit()
    return row


def _describe(
    path: Path, summary: dict, limits: ModelLimits, workdir: Path, field: str, *, bare_ok: bool
) -> dict | None:
    """Validate what the worker will load, as it will load it (``vdu_core.models.describe_model``:
    configs, architecture, weights against the config; torch-free): unpack archives into the upload's
    temporary folder first."""
    from vdu_core.models import describe_model

    try:
        if summary["format"] == "safetensors":
            if bare_ok:
                return None
            raise ModelLoadError(
                "a bare .safetensors file has no config: upload a zip/tar of the UNet folder (config.json + "
                "diffusion_pytorch_model.safetensors) or of the whole pipeline folder",
                rule="missing_config",
            )
        root = extract_model_archive(path, workdir, limits)
        description = describe_model(root)
        description.pop("ref", None)  # a temporary path of ours
        return description
    except ModelLoadError as exc:
        exc.field = field
        exc.message = exc.message.replace(f"{workdir}/", "").replace(str(workdir), ".").replace(str(path), path.name)
        raise


def _register_upload(session: Session, settings: Settings, storage: Storage, team_id: str, upload: Upload) -> Model:
    mains = upload.files_for("file")
    if len(mains) != 1:
        raise InvalidInput("send exactly one model file as `file`", field="file")
    lineage_files = upload.files_for("lineage")
    if len(lineage_files) > MAX_LINEAGE:
        raise InvalidInput(f"at most {MAX_LINEAGE} lineage checkpoints", field="lineage")
    limits = ModelLimits.from_settings(settings)
    main = mains[0]
    name = check_name(upload.fields.get("name"), main.filename)
    summary = inspect_model_file(main.path, limits, field="file")
    summary["model"] = _describe(main.path, summary, limits, upload.dir / "check-main", "file", bare_ok=False)
    lineage_summaries = []
    for i, f in enumerate(lineage_files):
        lsummary = inspect_model_file(f.path, limits, field=f"lineage[{i}]")
        _describe(f.path, lsummary, limits, upload.dir / f"check-lineage-{i}", f"lineage[{i}]", bare_ok=True)
        lineage_summaries.append(lsummary)

    model_id = new_id("model")
    prefix = f"teams/{team_id}/models/{model_id}"
    stored: list[str] = []
    try:
        key = f"{prefix}/{main.filename}"
        storage.put_file(key, main.path, move=True)
        stored.append(key)
        lineage = []
        for i, (f, s) in enumerate(zip(lineage_files, lineage_summaries, strict=True)):
            lkey = f"{prefix}/lineage/{i:02d}-{f.filename}"
            storage.put_file(lkey, f.path, move=True)
            stored.append(lkey)
            lineage.append(
                {
                    "source": "upload",
                    "storage_key": lkey,
                    "filename": f.filename,
                    "format": s["format"],
                    "sha256": f.sha256,
                    "bytes": f.size,
                }
            )
        row = Model(
            id=model_id,
            team_id=team_id,
            name=name,
            source="upload",
            storage_key=key,
            file_format=summary["format"],
            size_bytes=main.size,
            sha256=main.sha256,
            lineage=lineage,
            summary={k: v for k, v in summary.items() if k != "files"} | {"files": summary.get("files", [])[:200]},
        )
        session.add(row)
        session.commit()
    except BaseException:
        session.rollback()
        for key in stored:
            try:
                storage.delete(key)
            except Exception:  # pragma: no cover - best effort; logged
                log.warning("could not remove %s after a failed model upload", key)
        raise
    UPLOAD_BYTES.labels("model").inc(main.size + sum(f.size for f in lineage_files))
    return row


@router.post(
    "",
    status_code=201,
    response_model=ModelOut,
    openapi_extra=REGISTER_BODY,
    responses=error_responses(400, 401, 413, 415, 422, 503),
)
async def register_model(
    request: Request, team: CurrentTeam, session: UploadSessionDep, settings: SettingsDep, storage: StorageDep
) -> ModelOut:
    """Register a model.

    - `application/json`: `{"name", "source": "hub", "hub_id", "revision"}` or `{"name", "source": "url",
      "url"}` (https or s3; private addresses refused), with optional `lineage` references.
    - `multipart/form-data`: `file` (a `.safetensors` or a zip/tar of a diffusers folder; pickles are
      refused), optional `lineage` files and `name`.
    """
    ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if ctype == "multipart/form-data":
        upload = await receive_upload(
            request,
            tmp_root=settings.resolved_upload_tmp_dir(),
            max_bytes=settings.max_model_upload_bytes,
            max_files=1 + MAX_LINEAGE,
            file_fields={"file", "lineage"},
            text_fields={"name"},
        )
        try:
            row = await run_in_threadpool(_register_upload, session, settings, storage, team.id, upload)
        finally:
            upload.cleanup()
        return ModelOut.of(row)
    if ctype != "application/json" and not ctype.endswith("+json"):
        raise UnsupportedMediaType(
            "send application/json (a reference) or multipart/form-data (an upload)", field="Content-Type"
        )
    data = await read_json(request, settings.max_json_bytes)
    try:
        body = ModelCreate.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)], body=data
        ) from exc
    row = await run_in_threadpool(_register_ref, session, settings, team.id, body)
    return ModelOut.of(row)


@router.get("", response_model=ModelPage, responses=error_responses(401, 422))
def list_models(team: CurrentTeam, session: SessionDep, limit: LimitQuery = 20, after: AfterQuery = None) -> ModelPage:
    rows, more = paginate(session, scoped(Model, team.id), Model, limit=limit, after=after)
    return ModelPage(data=[ModelOut.of(r) for r in rows], has_more=more, next_cursor=rows[-1].id if more else None)


@router.get("/{model_id}", response_model=ModelOut, responses=error_responses(401, 404))
def get_model(model_id: str, team: CurrentTeam, session: SessionDep) -> ModelOut:
    return ModelOut.of(get_owned(session, Model, model_id, team.id))
