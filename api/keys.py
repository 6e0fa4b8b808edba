"""API keys: ``vdu_<prefix8>_<secret>``; only the sha256 is stored, the prefix identifies the key."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from jobs.ids import new_id
from jobs.tables import ApiKey, Team, utcnow

KEY_PREFIX = "vdu_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass
class NewKey:
    key: str  # shown once, never stored
    prefix: str
    id: str


def create_key(session: Session, team: Team, name: str | None = None) -> NewKey:
    ident = secrets.token_hex(4)
    key = f"{KEY_PREFIX}{ident}_{secrets.token_urlsafe(32)}"
    prefix = f"{KEY_PREFIX}{ident}"
    row = ApiKey(id=new_id("key"), team_id=team.id, name=name, prefix=prefix, key_hash=hash_key(key))
    session.add(row)
    session.flush()
    return NewKey(key=key, prefix=prefix, id=row.id)


def team_for_key(session: Session, key: str) -> Team | None:
    """The team owning an unrevoked ``key``, else None (unknown and revoked look the same)."""
    if not key.startswith(KEY_PREFIX) or len(key) > 200:
        return None
    return session.scalar(
        select(Team)
        .join(ApiKey, ApiKey.team_id == Team.id)
        .where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None))
    )


def revoke_key(session: Session, prefix: str) -> bool:
    result = session.execute(
        update(ApiKey).where(ApiKey.prefix == prefix, ApiKey.revoked_at.is_(None)).values(revoked_at=utcnow())
    )
    return result.rowcount == 1
