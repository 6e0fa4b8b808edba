"""Small builders shared by the service tests (rows, archives, keys)."""

from __future__ import annotations

import secrets

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from jobs.ids import new_id
from jobs.tables import ForgetSet, Job, Model, Team


def make_team(session: Session, name: str | None = None) -> Team:
    team = Team(id=new_id("team"), name=name or f"team-{secrets.token_hex(4)}")
    session.add(team)
    session.flush()
    return team


def make_model_row(session: Session, team_id: str) -> Model:
    model = Model(
        id=new_id("model"), team_id=team_id, name="m", source="hub", hub_id="org/model", revision="main"
    )
    session.add(model)
    session.flush()
    return model


def make_forget_set_row(session: Session, team_id: str) -> ForgetSet:
    fs = ForgetSet(
        id=new_id("forget_set"),
        team_id=team_id,
        name="fs",
        filename="fs.zip",
        storage_key=f"teams/{team_id}/forget-sets/x/fs.zip",
        archive_bytes=1,
        sha256="0" * 64,
        image_count=1,
        total_bytes=1,
    )
    session.add(fs)
    session.flush()
    return fs


def count_rows(session: Session, table, team_id: str) -> int:
    return session.scalar(select(func.count()).select_from(table).where(table.team_id == team_id))


def job_count(session: Session, team_id: str) -> int:
    return count_rows(session, Job, team_id)
