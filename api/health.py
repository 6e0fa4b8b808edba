"""``/livez`` (the process answers), ``/readyz`` (database, broker and storage answer), ``/metrics``."""

from __future__ import annotations

import concurrent.futures
import time

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from api.problems import error_responses, problem_response
from jobs.db import ping as db_ping

router = APIRouter(tags=["health"])
CHECK_TIMEOUT_S = 3.0
_pool = concurrent.futures.ThreadPoolExecutor(max_workers=6, thread_name_prefix="readyz")


@router.get("/livez")
def livez() -> dict:
    return {"status": "ok"}


def _run_checks(request: Request) -> dict[str, str]:
    state = request.app.state
    checks = {
        "database": lambda: db_ping(state.settings.database_url),
        "broker": state.dispatcher.ping,
        "storage": state.storage.ping,
    }
    futures = {name: _pool.submit(fn) for name, fn in checks.items()}
    deadline = time.monotonic() + CHECK_TIMEOUT_S
    results = {}
    for name, fut in futures.items():
        try:
            fut.result(timeout=max(0.0, deadline - time.monotonic()))
            results[name] = "ok"
        except concurrent.futures.TimeoutError:
            results[name] = f"timed out after {CHECK_TIMEOUT_S:.0f}s"
        except Exception as exc:
            results[name] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return results


@router.get("/readyz", responses=error_responses(503))
def readyz(request: Request):
    results = _run_checks(request)
    failed = [name for name, r in results.items() if r != "ok"]
    if failed:
        return problem_response(
            503,
            f"not ready: {', '.join(failed)} unavailable",
            code="not_ready",
            request=request,
            checks=results,
        )
    return {"status": "ready", "checks": results}


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    body = generate_latest(REGISTRY) + generate_latest(request.app.state.metrics_registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
