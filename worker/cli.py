"""``python -m worker.cli``: start a GPU worker with the settings the job queue needs."""

from __future__ import annotations

import os
import socket
import sys


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from worker.celery_app import app, settings

    args = [
        "worker",
        "-Q",
        settings.queue_name,
        "--concurrency",
        "1",
        "--prefetch-multiplier",
        "1",
        "--max-tasks-per-child",
        "1",
        "--pool",
        "prefork",
        "-n",
        f"vdu-{os.getpid()}@{socket.gethostname()}",
        "--without-gossip",
        "--without-mingle",
        "-l",
        settings.log_level,
    ]
    app.worker_main(args + list(argv if argv is not None else sys.argv[1:]))


if __name__ == "__main__":
    main()
