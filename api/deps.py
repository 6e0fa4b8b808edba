"""Dependencies of the routes, as ``Annotated`` aliases: ``SessionDep``, ``CurrentTeam``, ...

The app's collaborators (settings, storage, dispatcher) live on ``app.state`` and are reached
through these, so tests and the embedded mode wire them without globals.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from sqlalchemy.orm import Session

from api.keys import team_for_key
from jobs.db import session_factory
from jobs.errors import PayloadTooLarge, ServiceError, Unauthorized, UnsupportedMediaType
from jobs.queue import Dispatcher
from jobs.settings import Settings
from jobs.storage import Storage
from jobs.tables import Team

M = TypeVar("M", bound=BaseModel)


def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


def get_storage_dep(request: Request) -> Storage:
    return request.app.state.storage


def get_dispatcher_dep(request: Request) -> Dispatcher:
    return request.app.state.dispatcher


def get_session(request: Request) -> Iterator[Session]:
    """One session per request. Routes commit explicitly; anything uncommitted is rolled back."""
    session = session_factory(request.app.state.settings.database_url)()
    try:
        yield session
    finally:
        session.rollback()
        session.close()


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
StorageDep = Annotated[Storage, Depends(get_storage_dep)]
DispatcherDep = Annotated[Dispatcher, Depends(get_dispatcher_dep)]
# At most DB_CONCURRENCY requests hold a session at once; the others wait for a turn on the event loop,
# not in a worker thread. Without the bound, 100 concurrent clients left every pooled connection held
# by a request queued for a thread (a sync route's response is validated in one, after the route) while
# every thread waited for a connection: 30 s of pool timeout, then errors (bench/bench_load.py). It is
# below the API's pool (jobs.db: 10 + 10 overflow), which also serves authentication and /readyz. The
# session ends when the route function does (scope="function"), not after a streamed download.
DB_CONCURRENCY = 16
SessionDep = Annotated[Session, Depends(get_session, scope="function", max_concurrency=DB_CONCURRENCY)]
# For a route that streams an upload before it touches the database: no turn held meanwhile.
UploadSessionDep = Annotated[Session, Depends(get_session, scope="function")]


def get_current_team(request: Request) -> Team:
    """The caller's team, looked up in a short session of its own (no connection or turn is held
    while the request goes on)."""
    header = request.headers.get("authorization")
    if not header:
        raise Unauthorized("missing Authorization header; send `Authorization: Bearer <key>`", field="Authorization")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized("the Authorization header must be `Bearer <key>`", field="Authorization")
    with session_factory(request.app.state.settings.database_url)() as session:
        team = team_for_key(session, key.strip())
    if team is None:
        raise Unauthorized("invalid or revoked API key", field="Authorization")
    request.state.team_id = team.id
    return team


CurrentTeam = Annotated[Team, Depends(get_current_team)]


class MalformedJSON(ServiceError):
    status = 400
    code = "malformed_json"
    title = "Malformed JSON"


def _no_constants(value: str) -> Any:
    raise ValueError(f"{value} is not valid JSON")


def _is_json(content_type: str) -> bool:
    main = content_type.split(";", 1)[0].strip().lower()
    return main == "application/json" or (main.startswith("application/") and main.endswith("+json"))


async def read_json(request: Request, max_bytes: int) -> Any:
    """Read a JSON body (Content-Type checked, size limited while reading, NaN/Infinity refused)."""
    ctype = request.headers.get("content-type", "")
    if not _is_json(ctype):
        raise UnsupportedMediaType(
            f"expected Content-Type application/json, got {ctype or 'none'!r}", field="Content-Type"
        )
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLarge(f"JSON bodies are limited to {max_bytes} bytes", field="body")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise PayloadTooLarge(f"JSON bodies are limited to {max_bytes} bytes", field="body")
    try:
        data = json.loads(bytes(body), parse_constant=_no_constants)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedJSON(f"the body is not valid JSON: {exc}"[:300], field="body") from exc
    except RecursionError as exc:  # "[[[[..." within the size limit
        raise MalformedJSON("the body is not valid JSON: nested too deeply", field="body") from exc
    return data


def json_body(model: type[M]):
    """A dependency parsing the body as ``model`` *after* the dependencies declared before it (auth)."""

    async def dependency(request: Request) -> M:
        data = await read_json(request, request.app.state.settings.max_json_bytes)
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            errors = [{**e, "loc": ("body", *e.get("loc", ()))} for e in exc.errors(include_url=False)]
            raise RequestValidationError(errors, body=data) from exc

    dependency.__name__ = f"json_body_{model.__name__}"
    return Depends(dependency)
