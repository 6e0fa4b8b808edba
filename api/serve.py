"""``python -m api.serve [--host H] [--port P] [--migrate]``: run the API with uvicorn.

Tables come only from migrations: run ``python -m jobs.migrate`` (or pass ``--migrate``) first.
"""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(prog="vdu-api", description="run the VDU service API")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--migrate", action="store_true", help="run `alembic upgrade head` first")
    args = parser.parse_args(argv)
    if args.migrate:
        from jobs.migrate import upgrade_head

        upgrade_head()
    uvicorn.run(
        "api.main:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=30,
    )


if __name__ == "__main__":
    main()
