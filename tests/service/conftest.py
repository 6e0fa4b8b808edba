"""Fixtures for the service tests: a fresh Postgres database, a Redis key prefix and an S3 API on
loopback per test session, all real (nothing mocked). Each test works inside its own team, so tests
need no cleanup between them and every "nothing left behind" check counts that team's rows.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import psycopg
import pytest
import redis

from jobs.settings import Settings

PG_ADMIN = os.environ.get("VDU_TEST_PG_ADMIN", "host=127.0.0.1 port=5432 user=postgres dbname=postgres")
PG_URL_TEMPLATE = os.environ.get("VDU_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/{db}")
REDIS_URL = os.environ.get("VDU_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
REPO = Path(__file__).resolve().parents[2]


class PostgresDatabases:
    """Creates uniquely named databases and drops them all at the end of the session."""

    def __init__(self):
        self.created: list[str] = []

    def create(self, label: str = "") -> str:
        name = f"vdu_test_{label}{secrets.token_hex(4)}"
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        self.created.append(name)
        return PG_URL_TEMPLATE.format(db=name)

    def drop_all(self) -> None:
        from jobs.db import dispose_all

        dispose_all()
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            for name in self.created:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_databases() -> Iterator[PostgresDatabases]:
    dbs = PostgresDatabases()
    yield dbs
    dbs.drop_all()


def migrated_database(pg_databases: PostgresDatabases, label: str = "") -> str:
    from jobs.migrate import upgrade_head

    url = pg_databases.create(label)
    upgrade_head(url=url)
    return url


@pytest.fixture(scope="session")
def pg_url(pg_databases) -> str:
    """A migrated Postgres database shared by the session (tests isolate themselves by team)."""
    return migrated_database(pg_databases)


@pytest.fixture(scope="session")
def redis_prefix() -> Iterator[str]:
    """A key prefix of our own in the shared Redis; every key under it is deleted at the end."""
    prefix = f"vdu_test_{secrets.token_hex(4)}:"
    yield prefix
    r = redis.Redis.from_url(REDIS_URL)
    keys = list(r.scan_iter(match=prefix + "*", count=1000))
    if keys:
        r.delete(*keys)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """moto's S3 API on loopback; returns its endpoint URL."""
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per S3 request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def make_bucket(endpoint: str) -> str:
    import boto3

    name = f"vdu-test-{secrets.token_hex(4)}"
    boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    ).create_bucket(Bucket=name)
    return name


@pytest.fixture
def settings(pg_url, redis_prefix, tmp_path) -> Settings:
    """Settings for in-process tests: migrated Postgres, Redis broker, local storage in tmp."""
    return Settings(
        database_url=pg_url,
        broker_url=REDIS_URL,
        broker_key_prefix=redis_prefix,
        storage_url=str(tmp_path / "storage"),
        max_steps=1000,
        max_forget_set_upload_bytes=2 * 1024 * 1024,
        max_model_upload_bytes=8 * 1024 * 1024,
        log_json=False,
    )


class Api:
    """An in-process app (TestClient) on the session's Postgres/Redis and a local storage folder."""

    def __init__(self, client, settings: Settings, storage):
        self.client = client
        self.settings = settings
        self.storage = storage

    def new_team(self, name: str | None = None) -> tuple[str, dict[str, str]]:
        """A fresh team and the headers of one of its keys."""
        from api.keys import create_key
        from jobs.db import session_scope
        from tests.service.helpers import make_team

        with session_scope(self.settings) as s:
            team = make_team(s, name)
            key = create_key(s, team).key
            return team.id, {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="session")
def api(pg_url, redis_prefix, tmp_path_factory) -> Iterator[Api]:
    from fastapi.testclient import TestClient

    from api.main import create_app
    from jobs.storage import get_storage

    root = tmp_path_factory.mktemp("api")
    settings = Settings(
        database_url=pg_url,
        broker_url=REDIS_URL,
        broker_key_prefix=redis_prefix,
        storage_url=str(root / "storage"),
        max_steps=1000,
        max_forget_set_upload_bytes=2 * 1024 * 1024,
        max_model_upload_bytes=4 * 1024 * 1024,
        max_json_bytes=64 * 1024,
        log_json=False,
    )
    app = create_app(settings, configure_logs=False)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield Api(client, settings, get_storage(settings))


SERVICE_UPLOAD_LIMIT = 32 * 1024 * 1024


@pytest.fixture(scope="session")
def service_stack(pg_databases, redis_prefix, s3_server, tmp_path_factory):
    """The API under uvicorn and a Celery worker as real processes on the session's Postgres server,
    Redis and S3, started once and shared by every test that needs the real thing (each in its own
    team). It lives until the session ends, so its queue *and its database* are its own: its
    reconciler re-sends every queued job of its database, and would otherwise hand a module's own
    stack's jobs (whose inputs live in that stack's storage) to this worker, which fails them."""
    from tests.service.stack import stack_env, start_stack

    root = tmp_path_factory.mktemp("stack")
    env = stack_env(
        root,
        database_url=migrated_database(pg_databases, "stack_"),
        broker_url=REDIS_URL,
        broker_key_prefix=f"{redis_prefix}stack:",  # its own queue: other tests' workers never take its jobs
        storage_url=f"s3://{make_bucket(s3_server)}/vdu",
        s3_endpoint_url=s3_server,
        s3_access_key_id="testing",
        s3_secret_access_key="testing",
        max_steps=2000,
        max_forget_set_upload_bytes=SERVICE_UPLOAD_LIMIT,
        events_keepalive_s=0.5,
        worker_preload="true",  # torch is imported once, not in each job's fresh process
    )
    stack = start_stack(env, root)
    yield stack
    stack.stop()
    print("---- api log (tail) ----\n" + stack.api.log()[-4000:])
    print("---- worker log (tail) ----\n" + stack.worker.log()[-6000:])
