"""``python -m jobs.migrate``: ``alembic upgrade head`` for the configured database.

The same as running ``alembic upgrade head`` in the repository root; usable from an installed
package (the embedded service calls ``upgrade_head`` before it starts).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from jobs.settings import Settings, get_settings

ROOT = Path(__file__).resolve().parents[1]


def alembic_config(url: str):
    from alembic.config import Config

    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(ROOT / "migrations"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["configure_logger"] = False
    return cfg


def upgrade_head(settings: Settings | None = None, url: str | None = None) -> None:
    from alembic import command

    settings = settings or get_settings()
    url = url or settings.database_url
    if url.startswith("sqlite:///"):
        db_path = url.removeprefix("sqlite:///")
        if db_path and db_path != ":memory:":
            Path(db_path).parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(url), "head")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Create or upgrade the service's tables (alembic upgrade head)")
    parser.add_argument("--url", help="database URL (default: VDU_DATABASE_URL)")
    args = parser.parse_args(argv)
    upgrade_head(url=args.url)
    print("database is at the latest revision")


if __name__ == "__main__":
    main()
