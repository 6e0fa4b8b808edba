"""Every query a caller makes goes through here: a resource of another team does not exist (404)."""

from __future__ import annotations

from typing import TypeVar

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from jobs.errors import NotFound
from jobs.ids import ID_PATTERN
from jobs.tables import ForgetSet, Job, Model

T = TypeVar("T", ForgetSet, Job, Model)

RESOURCE_NAMES = {ForgetSet: "forget set", Job: "job", Model: "model"}


def scoped(table: type[T], team_id: str) -> Select[tuple[T]]:
    """``SELECT`` of ``table`` restricted to ``team_id``: the start of every team query."""
    return select(table).where(table.team_id == team_id)


def get_owned(
    session: Session,
    table: type[T],
    resource_id: str,
    team_id: str,
    *,
    field: str | None = None,
    for_update: bool = False,
) -> T:
    """The row with ``resource_id`` if it belongs to ``team_id``; otherwise ``NotFound``
    (the same answer whether the id is unknown or someone else's)."""
    if not isinstance(resource_id, str) or not ID_PATTERN.match(resource_id):
        raise NotFound(RESOURCE_NAMES[table], str(resource_id), field=field)  # junk (a NUL byte...) never reaches SQL
    stmt = scoped(table, team_id).where(table.id == resource_id)
    if for_update:
        stmt = stmt.with_for_update()
    row = session.scalars(stmt).one_or_none()
    if row is None:
        raise NotFound(RESOURCE_NAMES[table], str(resource_id), field=field)
    return row
