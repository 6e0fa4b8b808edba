"""Cursor pagination over time-sortable ids: newest first, ``after`` = the last id seen."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Query
from sqlalchemy import Select
from sqlalchemy.orm import Session

from jobs.errors import InvalidInput
from jobs.ids import ID_PATTERN

LimitQuery = Annotated[int, Query(ge=1, le=100, description="page size")]
AfterQuery = Annotated[str | None, Query(max_length=64, description="cursor: `next_cursor` of the previous page")]


def paginate(session: Session, stmt: Select, table: Any, *, limit: int, after: str | None) -> tuple[list, bool]:
    if after is not None:
        if not ID_PATTERN.match(after):
            raise InvalidInput("not a valid cursor", field="after")
        stmt = stmt.where(table.id < after)
    rows = list(session.scalars(stmt.order_by(table.id.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit
