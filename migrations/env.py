"""Alembic environment: the URL comes from ``-x url=...``, the config, or ``VDU_DATABASE_URL``."""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy import create_engine, pool

from jobs.settings import Settings
from jobs.tables import Base

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def database_url() -> str:
    x_url = context.get_x_argument(as_dictionary=True).get("url")
    return x_url or config.get_main_option("sqlalchemy.url") or Settings().database_url


def render_item(type_, obj, autogen_context):
    """Render our UTCDateTime as a plain ``sa.DateTime(timezone=True)``: migrations must not
    depend on application code."""
    from jobs.tables import UTCDateTime

    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def _configure(**kwargs) -> None:
    url = kwargs.pop("url", None)
    context.configure(
        target_metadata=target_metadata,
        compare_type=True,
        compare_server_default=True,
        render_item=render_item,
        render_as_batch=(url or "").startswith("sqlite")
        or kwargs.get("connection") is not None
        and kwargs["connection"].dialect.name == "sqlite",
        url=url,
        **kwargs,
    )


def run_migrations_offline() -> None:
    _configure(url=database_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(database_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        _configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
