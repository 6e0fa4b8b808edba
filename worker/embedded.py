"""The embedded service: one process, SQLite and local disk, the API plus an in-process worker.

    python -m worker.embedded serve [--host 127.0.0.1] [--port 8000]
    python -m worker.embedded demo  [--digit 0] [--steps 100]     (a real job end to end)

``serve`` runs the migrations (``alembic upgrade head`` on SQLite), creates a ``local`` team and
key on first start (the key is printed once and kept in ``<data dir>/api-key``), and serves the
same API as the full stack. New jobs go to an in-process queue instead of Redis; a worker thread
runs them with the *same* ``worker.runner.execute_job`` the Celery task runs, and the same reaper
and reconciler run in a thread. This module is the composition root of that mode, which is why it
may import both ``api`` and ``worker`` (``api`` itself never imports ``worker``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from jobs.queue import InProcessDispatcher  # noqa: E402
from jobs.settings import EMBEDDED_BROKER, Settings  # noqa: E402

log = logging.getLogger(__name__)


class EmbeddedWorker:
    """A daemon thread taking job ids from the in-process queue, one job at a time."""

    def __init__(self, settings: Settings, dispatcher: InProcessDispatcher):
        self.settings = settings
        self.dispatcher = dispatcher
        self.thread = threading.Thread(target=self._run, name="vdu-embedded-worker", daemon=True)
        dispatcher.consumer = self.thread

    def start(self) -> EmbeddedWorker:
        self.thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self.dispatcher.queue.put(None)
        self.thread.join(timeout)

    def _run(self) -> None:
        from worker.runner import execute_job

        while True:
            job_id = self.dispatcher.queue.get()
            if job_id is None:
                return
            self.dispatcher.current = job_id
            try:
                execute_job(job_id, self.settings)
            except Exception:  # execute_job records failures itself; never let the thread die
                log.exception("embedded worker: job %s raised", job_id)
            finally:
                self.dispatcher.current = None


def embedded_settings(data_dir: Path | None = None, **overrides) -> Settings:
    """Settings for the embedded mode: the environment's, with the broker forced in-process and,
    unless set, SQLite and storage under ``data_dir``."""
    env = Settings()
    data = Path(data_dir) if data_dir else Path("var")
    values = env.model_dump()
    if "VDU_DATABASE_URL" not in os.environ or data_dir:
        values["database_url"] = f"sqlite:///{(data / 'vdu.db').resolve()}"
    if "VDU_STORAGE_URL" not in os.environ or data_dir:
        values["storage_url"] = str((data / "storage").resolve())
    values["broker_url"] = EMBEDDED_BROKER
    values.update(overrides)
    return Settings.model_validate(values)


def ensure_local_key(settings: Settings, key_file: Path) -> str | None:
    """On a fresh database: a ``local`` team and a key, written to ``key_file`` (mode 0600)."""
    from sqlalchemy import select

    from api.keys import create_key
    from jobs.db import session_scope
    from jobs.ids import new_id
    from jobs.tables import Team

    with session_scope(settings) as session:
        if session.scalar(select(Team.id).limit(1)) is not None:
            return None
        team = Team(id=new_id("team"), name="local")
        session.add(team)
        session.flush()
        key = create_key(session, team, "embedded").key
    key_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
    return key


def serve(settings: Settings, host: str, port: int, key_file: Path) -> None:
    import uvicorn

    from api.main import create_app
    from jobs.logs import configure_logging
    from jobs.maintenance import MaintenanceLoop
    from jobs.migrate import upgrade_head
    from jobs.webhook_delivery import WebhookLoop

    configure_logging(settings.log_level, settings.log_json)
    upgrade_head(settings)
    key = ensure_local_key(settings, key_file)
    if key:
        print(f"created team 'local' with API key (shown once, also in {key_file}):\n  {key}", flush=True)
    dispatcher = InProcessDispatcher()
    worker = EmbeddedWorker(settings, dispatcher).start()
    maintenance = MaintenanceLoop(settings, dispatcher).start()
    webhooks = WebhookLoop(settings).start()
    app = create_app(settings, dispatcher=dispatcher, configure_logs=False)
    print(
        f"VDU service (embedded) on http://{host}:{port}  database={settings.database_url}  "
        f"storage={settings.storage_url}",
        flush=True,
    )
    try:
        uvicorn.run(app, host=host, port=port, log_config=None, access_log=False, timeout_graceful_shutdown=10)
    finally:
        webhooks.stop()
        maintenance.stop()
        worker.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vdu-service", description="the VDU service in one process")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the embedded service (API + in-process worker)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--data-dir", type=Path, help="where SQLite and storage live (default ./var)")
    p = sub.add_parser("demo", help="start the embedded service and run a real job through its REST API")
    p.add_argument("--data-dir", type=Path, default=Path("var/demo"))
    p.add_argument("--port", type=int, default=0, help="default: a free port")
    p.add_argument("--digit", type=int, default=0, help="the MNIST digit to forget")
    p.add_argument("--count", type=int, default=64, help="forget-set size")
    p.add_argument("--model", type=Path, help="a diffusers pipeline folder (default: reference/mnist-ddpm[-tiny])")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--params", default="{}", help="extra job params as JSON")
    p.add_argument("--evaluation", default="{}", help="extra evaluation options as JSON")
    args = parser.parse_args(argv)

    if args.command == "serve":
        settings = embedded_settings(args.data_dir)
        data = Path(args.data_dir) if args.data_dir else Path("var")
        serve(settings, args.host, args.port, data / "api-key")
    else:
        from worker.demo import run_demo

        sys.exit(run_demo(args))


if __name__ == "__main__":
    main()
