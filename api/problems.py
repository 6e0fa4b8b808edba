"""RFC 9457 problem details for every error the API returns.

Each problem has ``type`` (a URI reference, ``/problems/{code}``, served as a short description),
``title``, ``status``, ``detail``, ``instance`` (the request path), our ``code`` and, where an
input is at fault, ``field`` naming it (``params.gamma``, ``file``, ``Authorization``) and for
validation failures ``errors`` listing each ``{field, message, type}``.
"""

from __future__ import annotations

import logging
import re
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as SQLAlchemyTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from jobs.db import is_transient
from jobs.errors import ServiceError
from jobs.logs import redact
from vdu_core.errors import VDUError

log = logging.getLogger(__name__)
PROBLEM_JSON = "application/problem+json"
DATABASE_RETRY_AFTER_S = 5

#: code -> (status, title, description): served at /problems/{code}
PROBLEM_TYPES: dict[str, tuple[int, str, str]] = {
    "validation_error": (422, "Invalid request", "A parameter, header or body field is missing or invalid."),
    "invalid_input": (422, "Invalid input", "A value is well-formed but not acceptable."),
    "invalid_parameter": (
        422,
        "Invalid parameter",
        "A method or evaluation parameter is unknown or out of range.",
    ),
    "invalid_forget_set": (
        422,
        "Invalid forget set",
        "The forget set breaks a rule (see `rule` and `file`).",
    ),
    "invalid_model": (422, "Invalid model", "The model cannot be used safely (see `rule`)."),
    "idempotency_key_reused": (
        422,
        "Idempotency key reused",
        "The key was used before with a different request body.",
    ),
    "malformed_json": (400, "Malformed JSON", "The body is not valid JSON."),
    "malformed_multipart": (
        400,
        "Malformed multipart body",
        "The multipart/form-data body cannot be parsed.",
    ),
    "unauthorized": (401, "Unauthorized", "A valid `Authorization: Bearer <key>` header is required."),
    "not_found": (404, "Not found", "No such resource for your team."),
    "method_not_allowed": (405, "Method not allowed", "The resource does not support this method."),
    "conflict": (409, "Conflict", "The resource is not in a state that allows this."),
    "payload_too_large": (413, "Payload too large", "The body is larger than the configured limit."),
    "unsupported_media_type": (415, "Unsupported media type", "The Content-Type is not accepted here."),
    "range_not_satisfiable": (416, "Range not satisfiable", "The requested byte range is outside the file."),
    "storage_unavailable": (503, "Storage unavailable", "Artifact storage refused the operation."),
    "artifact_missing": (404, "Artifact missing", "The artifact is recorded but missing from storage."),
    "not_ready": (503, "Not ready", "A dependency (database, broker, storage) is unavailable."),
    "database_unavailable": (
        503,
        "Database unavailable",
        "The database cannot be reached (a restart or an outage); retry after `Retry-After` seconds.",
    ),
    "internal_error": (
        500,
        "Internal server error",
        "An unexpected error; the request id identifies it in logs.",
    ),
}


class Problem(BaseModel):
    """An RFC 9457 problem (the OpenAPI schema of every error response)."""

    type: str
    title: str
    status: int
    detail: str
    instance: str | None = None
    code: str
    field: str | None = None
    errors: list[dict[str, Any]] | None = None


def problem_response(
    status: int,
    detail: str,
    *,
    code: str,
    title: str | None = None,
    field: str | None = None,
    request: Request | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": f"/problems/{code}",
        "title": title or PROBLEM_TYPES.get(code, (0, HTTPStatus(status).phrase))[1],
        "status": status,
        "detail": detail,
        "code": code,
    }
    if request is not None:
        body["instance"] = request.url.path
        request_id = getattr(request.state, "request_id", None)
        if request_id:
            body["request_id"] = request_id
    if field is not None:
        body["field"] = field
    body.update({k: v for k, v in extra.items() if v is not None})
    body = {k: redact(v) if isinstance(v, str) else v for k, v in body.items()}  # no API key echoed back
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries documenting problem+json answers."""
    return {
        s: {
            "model": Problem,
            "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}},
            "description": HTTPStatus(s).phrase,
        }
        for s in statuses
    }


def loc_to_field(loc: tuple | list) -> str:
    """``("body", "params", "gamma")`` -> ``params.gamma``; ``("query", "limit")`` -> ``limit``."""
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header", "cookie"):
        parts = parts[1:]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() and out else (f".{p}" if out else p)
    return out or "body"


def _validation_problem(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = []
    for err in exc.errors():
        loc = tuple(err.get("loc", ()))
        field = loc_to_field(loc)
        if loc and loc[0] == "header":
            field = str(loc[-1]).replace("_", "-").title()
        errors.append({"field": field, "message": err.get("msg", "invalid"), "type": err.get("type", "invalid")})
    first = errors[0] if errors else {"field": "body", "message": "invalid request"}
    if any(e["type"] == "json_invalid" for e in errors):
        return problem_response(400, "the body is not valid JSON", code="malformed_json", field="body", request=request)
    detail = f"{first['field']}: {first['message']}"
    if len(errors) > 1:
        detail += f" (and {len(errors) - 1} more)"
    return problem_response(422, detail, code="validation_error", field=first["field"], errors=errors, request=request)


def allowed_methods(app: FastAPI, path: str) -> list[str]:
    """Every method any route offers on ``path`` (Starlette reports only the first route's)."""
    table = getattr(app.state, "allow_table", None)
    if table is None:
        table = []
        for template, operations in app.openapi().get("paths", {}).items():
            pattern = re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template))
            if template.endswith("/artifacts/{name}"):
                pattern = pattern[: -len("[^/]+")] + ".+"
            methods = {m.upper() for m in operations}
            if "GET" in methods:
                methods.add("HEAD")
            table.append((re.compile(f"^{pattern}$"), methods))
        app.state.allow_table = table
    found: set[str] = set()
    for regex, methods in table:
        if regex.match(path):
            found |= methods
    return sorted(found)


def install_problem_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError):
        headers = {"WWW-Authenticate": 'Bearer realm="vdu"'} if exc.status == 401 else None
        return problem_response(
            exc.status,
            exc.message,
            code=exc.code,
            title=exc.title,
            field=exc.field,
            request=request,
            headers=headers,
            **exc.extra,
        )

    @app.exception_handler(VDUError)
    async def _library_error(request: Request, exc: VDUError):
        extra = {k: v for k, v in exc.to_dict().items() if k not in ("code", "message", "field")}
        return problem_response(422, exc.message, code=exc.code, field=exc.field, request=request, **extra)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return _validation_problem(request, exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        codes = {
            404: "not_found",
            405: "method_not_allowed",
            401: "unauthorized",
            413: "payload_too_large",
            415: "unsupported_media_type",
            409: "conflict",
            400: "bad_request",
        }
        code = codes.get(exc.status_code, f"http_{exc.status_code}")
        detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no route matches {request.method} {request.url.path}"
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path}"
            allowed = allowed_methods(request.app, request.url.path)
            if allowed:
                headers = {**(headers or {}), "Allow": ", ".join(allowed)}
        return problem_response(exc.status_code, detail, code=code, request=request, headers=headers)

    @app.exception_handler(SQLAlchemyTimeoutError)
    @app.exception_handler(DBAPIError)
    async def _database_error(request: Request, exc: DBAPIError | SQLAlchemyTimeoutError):
        # a lost connection, or no pooled connection free within pool_timeout: both pass
        if isinstance(exc, DBAPIError) and not is_transient(exc):
            return await _unexpected(request, exc)
        log.warning(
            "database unavailable on %s %s: %s",
            request.method,
            request.url.path,
            type(getattr(exc, "orig", None) or exc).__name__,
        )
        return problem_response(
            503,
            "the database is unavailable; retry shortly",
            code="database_unavailable",
            request=request,
            headers={"Retry-After": str(DATABASE_RETRY_AFTER_S)},
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return problem_response(500, "an unexpected error occurred", code="internal_error", request=request)

    @app.get("/problems/{code}", include_in_schema=False)
    async def problem_type(code: str):
        from jobs.errors import NotFound

        if code not in PROBLEM_TYPES:
            raise NotFound("problem type", code)
        status, title, description = PROBLEM_TYPES[code]
        return {"type": f"/problems/{code}", "title": title, "status": status, "description": description}
