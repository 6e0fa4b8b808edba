"""The FastAPI application: ``uvicorn --factory api.main:create_app`` (or ``python -m api.serve``)."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from api import artifacts, dashboard, events, forget_sets, health, jobs, models, webhooks
from api.metrics import app_registry
from api.middleware import RequestContextMiddleware
from api.problems import PROBLEM_JSON, Problem, install_problem_handlers
from api.schemas import JobCreate, ModelCreate
from api.uploads import sweep_stale_uploads
from jobs.logs import configure_logging
from jobs.queue import Dispatcher, dispatcher_from_settings
from jobs.settings import Settings, get_settings
from jobs.storage import Storage, get_storage

log = logging.getLogger(__name__)
API_VERSION = "1.0.0"
DESCRIPTION = (
    "Upload a diffusion model and a forget set; get back a sanitized checkpoint with evidence. "
    "Errors are RFC 9457 problem+json. Authenticate with `Authorization: Bearer <key>`."
)
EXTRA_SCHEMAS = (Problem, JobCreate, ModelCreate)


def _problem_everywhere(schema: dict) -> None:
    """Document what the API really answers: every error is problem+json (FastAPI's default 422
    schema is replaced), and every /v1 operation needs a bearer key (401)."""
    problem = {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}}
    components = schema["components"]
    components.setdefault("securitySchemes", {})["bearer"] = {"type": "http", "scheme": "bearer"}
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            for status, response in responses.items():
                if status.startswith(("4", "5")):
                    response["content"] = problem
            if path.startswith("/v1/"):
                operation["security"] = [{"bearer": []}]
                responses.setdefault("401", {"description": "Unauthorized", "content": problem})
                # the database away (restart, outage): problem code database_unavailable, with Retry-After
                responses.setdefault("503", {"description": "Service Unavailable", "content": problem})
    for name in ("HTTPValidationError", "ValidationError"):
        components["schemas"].pop(name, None)


def create_app(
    settings: Settings | None = None,
    *,
    dispatcher: Dispatcher | None = None,
    storage: Storage | None = None,
    configure_logs: bool = True,
) -> FastAPI:
    """Build the API. ``dispatcher`` is how new jobs reach workers (Celery by default, an
    in-process queue in embedded mode); ``storage`` defaults to the one in settings."""
    settings = settings or get_settings()
    if configure_logs:
        configure_logging(settings.log_level, settings.log_json)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        tmp = settings.resolved_upload_tmp_dir()
        tmp.mkdir(parents=True, exist_ok=True)
        removed = sweep_stale_uploads(tmp)
        if removed:
            log.info("removed %d temporary upload folders left by dead processes", removed)
        yield

    app = FastAPI(
        title="VDU unlearning service",
        version=API_VERSION,
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.storage = storage or get_storage(settings)
    app.state.dispatcher = dispatcher or dispatcher_from_settings(settings)
    app.state.metrics_registry = app_registry(settings)
    app.add_middleware(RequestContextMiddleware)
    install_problem_handlers(app)
    for module in (forget_sets, models, jobs, events, artifacts, webhooks, health):
        app.include_router(module.router)
    dashboard.install(app)  # HTML pages under /dashboard (not in the OpenAPI schema)

    def openapi():
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in EXTRA_SCHEMAS:
            model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(model_schema.pop("$defs", {}))
            components[model.__name__] = model_schema
        _problem_everywhere(schema)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi
    return app
