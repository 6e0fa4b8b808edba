"""Alembic is the only way tables are created, and the migrations match the models exactly."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, pool

from jobs.migrate import alembic_config, upgrade_head
from jobs.tables import Base

pytestmark = pytest.mark.timeout(120)


def _diff(url: str) -> list:
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
            return compare_metadata(ctx, Base.metadata)
    finally:
        engine.dispose()


def test_upgrade_head_on_an_empty_postgres_matches_the_models(pg_databases):
    url = pg_databases.create("mig_")
    upgrade_head(url=url)
    assert _diff(url) == []
    engine = create_engine(url, poolclass=pool.NullPool)
    tables = set(inspect(engine).get_table_names())
    engine.dispose()
    assert tables >= {"alembic_version", "teams", "api_keys", "forget_sets", "models", "jobs", "job_events"}
    assert tables >= {"team_webhook_secrets", "webhook_deliveries", "dashboard_sessions"}


def test_downgrade_to_base_and_back(pg_databases):
    from alembic import command

    url = pg_databases.create("mig_")
    cfg = alembic_config(url)
    command.upgrade(cfg, "head")
    command.downgrade(cfg, "base")
    engine = create_engine(url, poolclass=pool.NullPool)
    assert set(inspect(engine).get_table_names()) == {"alembic_version"}
    engine.dispose()
    command.upgrade(cfg, "head")
    assert _diff(url) == []


def test_the_same_migrations_build_sqlite_for_the_embedded_mode(tmp_path):
    url = f"sqlite:///{tmp_path / 'vdu.db'}"
    upgrade_head(url=url)
    assert _diff(url) == []
