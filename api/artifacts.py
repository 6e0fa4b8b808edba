"""Job artifacts: the checkpoint archive and single files, streamed with Content-Length,
ETag (the sha256), Range (206) and conditional requests."""

from __future__ import annotations

import base64
from typing import Annotated

from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import StreamingResponse

from api.deps import CurrentTeam, SessionDep, StorageDep
from api.problems import error_responses, problem_response
from api.schemas import ArtifactList, ArtifactOut
from jobs.errors import Conflict, NotFound
from jobs.scoping import get_owned
from jobs.tables import Job, JobStatus

router = APIRouter(prefix="/v1/jobs", tags=["artifacts"])
CONTENT_TYPES = {
    ".png": "image/png",
    ".json": "application/json",
    ".md": "text/markdown; charset=utf-8",
    ".tar": "application/x-tar",
    ".txt": "text/plain; charset=utf-8",
    ".safetensors": "application/octet-stream",
}
CHECKPOINT_ALIAS = "checkpoint"


def content_type(name: str) -> str:
    suffix = "." + name.rsplit(".", 1)[-1].lower() if "." in name else ""
    return CONTENT_TYPES.get(suffix, "application/octet-stream")


def artifact_entries(job: Job, base_url: str = "") -> list[ArtifactOut]:
    files = (job.artifacts or {}).get("files", {})
    base = base_url.rstrip("/")
    return [
        ArtifactOut(
            name=name,
            bytes=info["size"],
            sha256=info["sha256"],
            content_type=content_type(name),
            url=f"{base}/v1/jobs/{job.id}/artifacts/{name}",
        )
        for name, info in sorted(files.items())
    ]


def _job_with_artifacts(session, job_id: str, team_id: str) -> Job:
    """A succeeded job, or a failed one that left evidence (a collapsed model's metrics and grids)."""
    job = get_owned(session, Job, job_id, team_id)
    if job.status == JobStatus.succeeded.value or (job.status == JobStatus.failed.value and job.artifacts):
        return job
    raise Conflict(f"job {job_id} is {job.status}; artifacts exist once it has succeeded", field="status")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None | str:
    """``[start, stop)`` of a single ``bytes=`` range; None: serve everything (absent, invalid or
    multi-range headers are ignored, as RFC 9110 allows); "unsatisfiable": answer 416."""
    if not header or not header.startswith("bytes=") or "," in header:
        return None
    spec = header[6:].strip()
    first, sep, last = spec.partition("-")
    if not sep:
        return None
    try:
        if first == "":
            n = int(last)
            if n <= 0:
                return "unsatisfiable"
            return (max(0, size - n), size) if size else "unsatisfiable"
        start = int(first)
        stop = int(last) + 1 if last else size
    except ValueError:
        return None
    if start < 0 or (last and stop <= start):
        return None
    if start >= size:
        return "unsatisfiable"
    return start, min(stop, size)


@router.get("/{job_id}/artifacts", response_model=ArtifactList, responses=error_responses(401, 404, 409))
def list_artifacts(job_id: str, request: Request, team: CurrentTeam, session: SessionDep) -> ArtifactList:
    """Every artifact of a succeeded job with its size and sha256. `checkpoint.tar` is the sanitized
    pipeline folder (plus model card, metrics and samples) as one archive."""
    job = _job_with_artifacts(session, job_id, team.id)
    return ArtifactList(data=artifact_entries(job, str(request.base_url)))


@router.head("/{job_id}/artifacts/{name:path}", include_in_schema=False)
@router.get(
    "/{job_id}/artifacts/{name:path}",
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "the file"},
        206: {"description": "a byte range of the file"},
        304: {"description": "not modified"},
        **error_responses(401, 404, 409, 416),
    },
)
def download_artifact(
    job_id: str,
    name: str,
    request: Request,
    team: CurrentTeam,
    session: SessionDep,
    storage: StorageDep,
    range_: Annotated[str | None, Header(alias="Range")] = None,
    if_range: Annotated[str | None, Header(alias="If-Range")] = None,
    if_none_match: Annotated[str | None, Header(alias="If-None-Match")] = None,
) -> Response:
    """Download one artifact (`checkpoint` is an alias of the checkpoint archive). Supports `Range`
    (one range, 206), `If-Range`, `If-None-Match` (304); `ETag` is the quoted sha256."""
    job = _job_with_artifacts(session, job_id, team.id)
    artifacts = job.artifacts or {}
    if name == CHECKPOINT_ALIAS:
        name = artifacts.get("checkpoint") or ""
    info = artifacts.get("files", {}).get(name)
    if info is None:
        raise NotFound("artifact", name, field="name")
    size, sha = int(info["size"]), info["sha256"]
    etag = f'"{sha}"'
    headers = {
        "ETag": etag,
        "Accept-Ranges": "bytes",
        "Cache-Control": "private, max-age=86400, immutable",
        "Repr-Digest": f"sha-256=:{base64.b64encode(bytes.fromhex(sha)).decode()}:",
        "X-Checksum-Sha256": sha,
        "Content-Disposition": f'attachment; filename="{job.id}-{name.replace("/", "_")}"',
    }
    if if_none_match and (if_none_match.strip() == "*" or etag in [t.strip() for t in if_none_match.split(",")]):
        return Response(status_code=304, headers=headers)
    span = parse_range(range_, size) if (if_range is None or if_range.strip() == etag) else None
    if span == "unsatisfiable":
        return problem_response(
            416,
            f"the range is outside the file ({size} bytes)",
            code="range_not_satisfiable",
            field="Range",
            request=request,
            headers={"Content-Range": f"bytes */{size}"},
        )
    status, start, stop = 200, 0, size
    if isinstance(span, tuple):
        status, (start, stop) = 206, span
        headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
    headers["Content-Length"] = str(stop - start)
    media_type = content_type(name)
    if request.method == "HEAD":
        return Response(status_code=status, headers=headers, media_type=media_type)
    if stop <= start:
        body = iter(())
    elif start == 0 and stop == size:
        body = storage.iter_range(info["key"])  # no Range sent to S3 for whole files
    else:
        body = storage.iter_range(info["key"], start, stop)
    return StreamingResponse(body, status_code=status, headers=headers, media_type=media_type)
