"""Admin CLI: ``python -m api.admin create-team NAME | create-key TEAM | revoke-key PREFIX | list-keys TEAM``.

Uses the database in ``VDU_DATABASE_URL``. A new key is printed once and never stored in clear.
"""

from __future__ import annotations

import argparse
import sys

from sqlalchemy import select

from api.keys import create_key, revoke_key
from jobs.db import session_scope
from jobs.ids import new_id
from jobs.settings import get_settings
from jobs.tables import ApiKey, Team


def _team(session, ref: str) -> Team:
    team = session.scalar(select(Team).where((Team.id == ref) | (Team.name == ref)))
    if team is None:
        raise SystemExit(f"no team named or with id {ref!r}")
    return team


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vdu-admin", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("create-team", help="create a team")
    p.add_argument("name")
    p = sub.add_parser("create-key", help="create an API key for a team (printed once)")
    p.add_argument("team", help="team name or id")
    p.add_argument("--name", help="a label for the key")
    p = sub.add_parser("revoke-key", help="revoke a key by its prefix (vdu_xxxxxxxx)")
    p.add_argument("prefix")
    p = sub.add_parser("list-keys", help="list a team's keys (prefixes only)")
    p.add_argument("team")
    sub.add_parser("list-teams", help="list teams")
    args = parser.parse_args(argv)
    settings = get_settings()

    with session_scope(settings) as session:
        if args.command == "create-team":
            if session.scalar(select(Team).where(Team.name == args.name)):
                raise SystemExit(f"team {args.name!r} already exists")
            team = Team(id=new_id("team"), name=args.name)
            session.add(team)
            session.flush()
            print(team.id)
        elif args.command == "create-key":
            new = create_key(session, _team(session, args.team), args.name)
            print(new.key)
            print(f"(prefix {new.prefix}; this key is shown once)", file=sys.stderr)
        elif args.command == "revoke-key":
            if not revoke_key(session, args.prefix):
                raise SystemExit(f"no active key with prefix {args.prefix!r}")
            print(f"revoked {args.prefix}")
        elif args.command == "list-keys":
            team = _team(session, args.team)
            for key in session.scalars(select(ApiKey).where(ApiKey.team_id == team.id).order_by(ApiKey.id)):
                state = f"revoked {key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else "active"
                print(f"{key.prefix}\t{key.name or ''}\t{key.created_at:%Y-%m-%d %H:%M}\t{state}")
        elif args.command == "list-teams":
            for team in session.scalars(select(Team).order_by(Team.name)):
                print(f"{team.id}\t{team.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
