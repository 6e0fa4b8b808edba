"""``/v1/forget-sets``: upload (streamed, validated by vdu_core), get, list, delete."""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

from fastapi import APIRouter, Request, Response
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.deps import CurrentTeam, SessionDep, SettingsDep, StorageDep, UploadSessionDep
from api.metrics import UPLOAD_BYTES
from api.pagination import AfterQuery, LimitQuery, paginate
from api.problems import error_responses
from api.schemas import ForgetSetOut, ForgetSetPage
from api.uploads import Upload, file_sha256, receive_upload
from jobs.errors import Conflict, InvalidInput
from jobs.ids import new_id
from jobs.scoping import get_owned, scoped
from jobs.settings import Settings
from jobs.storage import Storage
from jobs.tables import ACTIVE_STATUSES, ForgetSet, Job
from vdu_core.errors import ForgetSetError

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/forget-sets", tags=["forget sets"])

UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "one archive (zip/tar) of images, or one image",
                        },
                        "files": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "several PNG/JPEG/WebP images",
                        },
                        "name": {"type": "string", "maxLength": 200},
                    },
                }
            }
        },
    }
}


def check_name(value: str | None, default: str, field: str = "name") -> str:
    name = default if value is None else value.strip()
    if not name or len(name) > 200 or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise InvalidInput("a name of 1-200 printable characters is required", field=field)
    return name


def _inspect(path: Path, settings: Settings, field: str) -> dict:
    from vdu_core.forget_set import inspect_forget_set

    try:
        return inspect_forget_set(path, settings.forget_set_limits())
    except ForgetSetError as exc:
        exc.field = field
        raise


def _pack(upload: Upload) -> Path:
    """Several uploaded images become one zip (stored, not recompressed) under their names."""
    names = [f.filename for f in upload.files]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InvalidInput(f"two files are named {dupes[0]!r}", field="files")
    target = upload.dir / "forget-set.zip"
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_STORED) as zf:
        for f in upload.files:
            zf.write(f.path, f.filename)
    return target


def _create(session: Session, settings: Settings, storage: Storage, team_id: str, upload: Upload) -> ForgetSet:
    files = upload.files
    if not files:
        raise InvalidInput("no file uploaded: send `file` (an archive or image) or `files` (images)", field="file")
    field = "file" if len(files) == 1 else "files"
    if len(files) == 1:
        path, filename, sha, size = files[0].path, files[0].filename, files[0].sha256, files[0].size
    else:
        path, filename = _pack(upload), "forget-set.zip"
        sha, size = file_sha256(path), path.stat().st_size
    name = check_name(upload.fields.get("name"), filename)
    summary = _inspect(path, settings, field)
    fs_id = new_id("forget_set")
    key = f"teams/{team_id}/forget-sets/{fs_id}/{filename}"
    storage.put_file(key, path, move=True)
    try:
        row = ForgetSet(
            id=fs_id,
            team_id=team_id,
            name=name,
            filename=filename,
            storage_key=key,
            archive_bytes=size,
            sha256=sha,
            image_count=summary["count"],
            total_bytes=summary["total_bytes"],
            summary=summary,
        )
        session.add(row)
        session.commit()
    except BaseException:
        session.rollback()
        storage.delete(key)
        raise
    UPLOAD_BYTES.labels("forget_set").inc(size)
    log.info(
        "forget set %s stored (%d images, %d bytes)",
        fs_id,
        row.image_count,
        size,
        extra={"event": "forget_set_created"},
    )
    return row


@router.post(
    "",
    status_code=201,
    response_model=ForgetSetOut,
    openapi_extra=UPLOAD_BODY,
    responses=error_responses(400, 401, 413, 415, 422, 503),
)
async def create_forget_set(
    request: Request, team: CurrentTeam, session: UploadSessionDep, settings: SettingsDep, storage: StorageDep
) -> ForgetSetOut:
    """Upload a forget set: one archive (zip/tar) or image as `file`, or several images as `files`.

    The body is streamed to disk with the size limit enforced while it arrives (413), every image is
    decoded and checked (422 naming the `rule` and the `file` at fault), and only then is it stored
    and recorded."""
    upload = await receive_upload(
        request,
        tmp_root=settings.resolved_upload_tmp_dir(),
        max_bytes=settings.max_forget_set_upload_bytes,
        max_files=settings.max_upload_files,
        file_fields={"file", "files"},
        text_fields={"name"},
    )
    try:
        row = await run_in_threadpool(_create, session, settings, storage, team.id, upload)
    finally:
        upload.cleanup()
    return ForgetSetOut.of(row)


@router.get("", response_model=ForgetSetPage, responses=error_responses(401, 422))
def list_forget_sets(
    team: CurrentTeam, session: SessionDep, limit: LimitQuery = 20, after: AfterQuery = None
) -> ForgetSetPage:
    rows, more = paginate(session, scoped(ForgetSet, team.id), ForgetSet, limit=limit, after=after)
    return ForgetSetPage(
        data=[ForgetSetOut.of(r) for r in rows], has_more=more, next_cursor=rows[-1].id if more else None
    )


@router.get("/{forget_set_id}", response_model=ForgetSetOut, responses=error_responses(401, 404))
def get_forget_set(forget_set_id: str, team: CurrentTeam, session: SessionDep) -> ForgetSetOut:
    return ForgetSetOut.of(get_owned(session, ForgetSet, forget_set_id, team.id))


@router.delete("/{forget_set_id}", status_code=204, responses=error_responses(401, 404, 409, 503))
def delete_forget_set(forget_set_id: str, team: CurrentTeam, session: SessionDep, storage: StorageDep) -> Response:
    """Delete a forget set and its file. Refused (409) while a queued or running job uses it."""
    row = get_owned(session, ForgetSet, forget_set_id, team.id, for_update=True)
    busy = session.scalar(select(Job.id).where(Job.forget_set_id == row.id, Job.status.in_(ACTIVE_STATUSES)).limit(1))
    if busy:
        raise Conflict(f"job {busy} still uses this forget set; cancel it or wait", field="forget_set_id")
    storage.delete(row.storage_key)
    session.delete(row)
    session.commit()
    return Response(status_code=204)
