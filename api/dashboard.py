"""The dashboard: server-rendered pages under ``/dashboard`` for people (scripts use ``/v1``).

Sign-in takes an API key once; the browser then holds only an opaque random token in an HttpOnly,
SameSite=Strict cookie (Secure over https) whose sha256 is a ``dashboard_sessions`` row tied to that
key (revoking the key signs the browser out). Every POST form carries a CSRF token derived from the
session token, and a cross-origin ``Origin`` is refused. Every query is team-scoped like the API's.
Templates autoescape; scripts and styles are files of this package (no CDN), and the pages are
served with a Content-Security-Policy that allows nothing else.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import math
import re
import secrets
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, get_args, get_type_hints
from urllib.parse import quote

import jinja2
from fastapi import APIRouter, FastAPI, Query, Request, Response
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse
from markupsafe import Markup
from pydantic import ValidationError
from sqlalchemy import delete, select
from starlette.concurrency import run_in_threadpool

from api import artifacts as artifacts_api
from api import forget_sets as forget_sets_api
from api import jobs as jobs_api
from api import models as models_api
from api.deps import DispatcherDep, SessionDep, SettingsDep, StorageDep
from api.keys import KEY_PREFIX, hash_key
from api.problems import problem_response
from api.schemas import JobCreate, ModelCreate
from api.uploads import receive_upload
from jobs.errors import ServiceError
from jobs.ids import new_id
from jobs.scoping import get_owned, scoped
from jobs.tables import (
    ACTIVE_STATUSES,
    ApiKey,
    DashboardSession,
    ForgetSet,
    Job,
    JobEvent,
    Model,
    Team,
    WebhookDelivery,
    utcnow,
)
from vdu_core.errors import VDUError

HERE = Path(__file__).resolve().parent
STATIC = HERE / "static" / "dashboard"
STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}
SESSION_COOKIE = "vdu_dashboard"
LOGIN_CSRF_COOKIE = "vdu_dashboard_login"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
POSTERIORS = ("auto", "lineage", "fisher", "self_snapshots", "isotropic")
PLOT_TERMS = ("stability", "plasticity")
MAX_PLOT_POINTS = 400
IDEMPOTENCY_RE = re.compile(r"^[0-9a-f]{32}$")

router = APIRouter(prefix="/dashboard", include_in_schema=False)
templates = jinja2.Environment(
    loader=jinja2.FileSystemLoader(HERE / "templates" / "dashboard"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)


class DashboardError(Exception):
    """Shown as an HTML page with ``status`` (never a traceback)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class SignInRequired(Exception):
    pass


@dataclass
class Signed:
    team: Team
    token: str

    @property
    def csrf(self) -> str:
        return hmac.new(self.token.encode(), b"dashboard-csrf", hashlib.sha256).hexdigest()


# --- sessions ----------------------------------------------------------------------------------
def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def signed_in(request: Request, session) -> Signed | None:
    token = request.cookies.get(SESSION_COOKIE)
    if not token or len(token) > 100:
        return None
    team = session.scalar(
        select(Team)
        .join(DashboardSession, DashboardSession.team_id == Team.id)
        .join(ApiKey, ApiKey.id == DashboardSession.api_key_id)
        .where(
            DashboardSession.token_hash == _token_hash(token),
            DashboardSession.expires_at > utcnow(),
            ApiKey.revoked_at.is_(None),
        )
    )
    return Signed(team, token) if team is not None else None


def require_signed(request: Request, session) -> Signed:
    signed = signed_in(request, session)
    if signed is None:
        raise SignInRequired()
    request.state.team_id = signed.team.id
    return signed


def _same_origin(request: Request) -> None:
    origin = request.headers.get("origin")
    if origin and origin != "null" and origin.rstrip("/") != str(request.base_url).rstrip("/"):
        raise DashboardError(403, "cross-origin form submissions are refused")


def check_csrf(request: Request, signed: Signed, token: str | None) -> None:
    _same_origin(request)
    if not token or not hmac.compare_digest(str(token), signed.csrf):
        raise DashboardError(403, "the form's CSRF token is missing or wrong; reload the page and try again")


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


# --- rendering ---------------------------------------------------------------------------------
def render(request: Request, name: str, status: int = 200, signed: Signed | None = None, **context) -> HTMLResponse:
    context.setdefault("error", None)
    html = templates.get_template(name).render(
        request=request, signed=signed, csrf=signed.csrf if signed else "", nav=name, **context
    )
    return HTMLResponse(html, status_code=status, headers=page_headers())


def page_headers() -> dict[str, str]:
    return {
        "Content-Security-Policy": CSP,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "same-origin",
        "Cache-Control": "no-store",
    }


def redirect(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


def fmt_number(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def metric_rows(metrics: dict[str, Any] | None) -> list[dict[str, str]]:
    """Each metric with its value and how it was computed (its ``implementation`` record)."""
    rows = []
    for key, rec in sorted((metrics or {}).items()):
        if not isinstance(rec, dict) or "value" not in rec:
            continue
        if rec.get("computed") is False:
            value, how = "not computed", str(rec.get("reason", ""))
        else:
            value = fmt_number(rec.get("value"))
            if rec.get("unit") not in (None, "", "fraction") and rec.get("value") is not None:
                value += f" {rec['unit']}"
            how = str(rec.get("implementation", ""))
        details = ", ".join(
            f"{k.replace('_', ' ')} {fmt_number(rec[k])}" for k in ("num_samples", "seed") if rec.get(k) is not None
        )
        rows.append({"key": key, "label": key.replace("_", " "), "value": value, "how": how, "details": details})
    return rows


def loss_series(session, job_id: str) -> dict[str, list[tuple[int, float]]]:
    """The two VDU terms per reported training step (from the job's progress events)."""
    series: dict[str, list[tuple[int, float]]] = {t: [] for t in PLOT_TERMS}
    rows = session.scalars(
        select(JobEvent.data).where(JobEvent.job_id == job_id, JobEvent.type == "progress").order_by(JobEvent.seq)
    )
    for data in rows:
        if data.get("phase") != "unlearn":
            continue
        losses = data.get("losses") or {}
        for term in PLOT_TERMS:
            value = losses.get(term)
            if isinstance(value, int | float) and math.isfinite(value):
                series[term].append((int(data.get("step") or 0), float(value)))
    for term, points in series.items():
        if len(points) > MAX_PLOT_POINTS:
            stride = math.ceil(len(points) / MAX_PLOT_POINTS)
            series[term] = points[::stride] + ([points[-1]] if (len(points) - 1) % stride else [])
    return series


def loss_plot_svg(series: dict[str, list[tuple[int, float]]], total_steps: int | None) -> Markup:
    """Both VDU terms, each in its own panel with its own scale (they differ by orders of
    magnitude), as inline SVG: numbers and fixed labels only."""
    width, panel_h, left, right, top = 640, 110, 70, 12, 18
    steps = [s for pts in series.values() for s, _ in pts]
    x_max = max([total_steps or 0, *steps, 1])
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="lossplot" viewBox="0 0 {width} {2 * (panel_h + top) + 24}" '
        'role="img" aria-label="loss curves of the stability and plasticity terms">'
    ]
    for i, term in enumerate(PLOT_TERMS):
        pts = series.get(term, [])
        y0 = i * (panel_h + top) + top
        parts.append(f'<text x="4" y="{y0 - 5}" class="term">{term}</text>')
        parts.append(
            f'<rect x="{left}" y="{y0}" width="{width - left - right}" height="{panel_h}" class="frame"></rect>'
        )
        if not pts:
            parts.append(f'<text x="{left + 8}" y="{y0 + panel_h / 2}" class="empty">no training step yet</text>')
            continue
        lo, hi = min(v for _, v in pts), max(v for _, v in pts)
        span = (hi - lo) or (abs(hi) or 1.0)

        def xy(step: int, value: float, y0=y0, lo=lo, span=span) -> str:
            x = left + (width - left - right) * step / x_max
            y = y0 + panel_h - (panel_h - 8) * (value - lo) / span - 4
            return f"{x:.1f},{y:.1f}"

        points = " ".join(xy(s, v) for s, v in pts)
        parts.append(f'<polyline points="{points}" class="line line-{i}"></polyline>')
        parts.append(f'<text x="{left - 4}" y="{y0 + 10}" class="tick" text-anchor="end">{hi:.3g}</text>')
        parts.append(f'<text x="{left - 4}" y="{y0 + panel_h}" class="tick" text-anchor="end">{lo:.3g}</text>')
        parts.append(
            f'<text x="{width - right}" y="{y0 - 5}" class="tick" text-anchor="end">'
            f"last {pts[-1][1]:.4g} at step {pts[-1][0]}</text>"
        )
    bottom = 2 * (panel_h + top) + 14
    parts.append(f'<text x="{left}" y="{bottom}" class="tick">step 0</text>')
    parts.append(f'<text x="{width - right}" y="{bottom}" class="tick" text-anchor="end">step {x_max}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))  # noqa: S704 - built from numbers and fixed strings only


def live_state(session, job: Job, known_seq: int | None = None) -> dict[str, Any]:
    """What the job page shows live; the plot is left out (None) when no event came since ``known_seq``."""
    progress = job.progress or {}
    total, step = progress.get("total") or 0, progress.get("step") or 0
    percent = 100 if job.status == "succeeded" else (round(100 * step / total) if total else 0)
    return {
        "id": job.id,
        "status": job.status,
        "final": job.status in ("succeeded", "failed", "cancelled"),
        "phase": progress.get("phase"),
        "step": step,
        "total": total,
        "percent": percent,
        "eta_s": progress.get("eta_s"),
        "losses": progress.get("losses") or {},
        "error": job.error,
        "event_seq": job.event_seq,
        "plot_svg": None
        if known_seq == job.event_seq
        else str(loss_plot_svg(loss_series(session, job.id), job.params.get("steps"))),
    }


def has_grids(job: Job) -> bool:
    files = (job.artifacts or {}).get("files", {})
    return "samples/before.png" in files and "samples/after.png" in files


def _owned(session, table, resource_id: str, team_id: str):
    try:
        return get_owned(session, table, resource_id, team_id)
    except ServiceError as exc:
        raise DashboardError(exc.status, exc.message) from exc


def _team_rows(session, table, team_id: str, limit: int = 200) -> list:
    return list(session.scalars(scoped(table, team_id).order_by(table.id.desc()).limit(limit)))


def _problem_text(exc: Exception) -> str:
    if isinstance(exc, ServiceError | VDUError):
        field = getattr(exc, "field", None)
        return f"{field}: {exc.message}" if field else exc.message
    if isinstance(exc, ValidationError):
        first = exc.errors(include_url=False)[0]
        return f"{'.'.join(str(p) for p in first.get('loc', ())) or 'form'}: {first.get('msg')}"
    return str(exc)


# --- sign-in -----------------------------------------------------------------------------------
def _next_page(value: str | None) -> str:
    """Where to go after signing in: only a dashboard path of this site."""
    if value and value.startswith("/dashboard") and not value.startswith("//") and "\\" not in value:
        return value
    return "/dashboard"


@router.get("/login")
def login_page(request: Request, session: SessionDep, next: str | None = None) -> HTMLResponse:  # noqa: A002
    if signed_in(request, session) is not None:
        return redirect(_next_page(next))
    return _login_form(request, _next_page(next))


def _login_form(request: Request, next_page: str, error: str | None = None, status: int = 200) -> HTMLResponse:
    token = request.cookies.get(LOGIN_CSRF_COOKIE) or secrets.token_urlsafe(24)
    response = render(request, "login.html", status=status, login_csrf=token, error=error, next_page=next_page)
    response.set_cookie(
        LOGIN_CSRF_COOKIE, token, httponly=True, samesite="strict", secure=_secure(request), path="/dashboard"
    )
    return response


@router.post("/login")
async def login(request: Request, session: SessionDep, settings: SettingsDep) -> Response:
    _same_origin(request)
    form = await request.form(max_files=0, max_fields=10)
    expected = request.cookies.get(LOGIN_CSRF_COOKIE)
    next_page = _next_page(str(form.get("next", "")))
    if not expected or not hmac.compare_digest(str(form.get("csrf", "")), expected):
        return _login_form(request, next_page, error="the sign-in form expired; try again", status=403)
    key = str(form.get("api_key", "")).strip()
    row = None
    if key.startswith(KEY_PREFIX) and len(key) <= 200:
        row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None)))
    if row is None:
        return _login_form(request, next_page, error="invalid or revoked API key", status=401)
    token = secrets.token_urlsafe(32)
    now = utcnow()
    session.execute(delete(DashboardSession).where(DashboardSession.expires_at < now))  # tidy expired sign-ins
    session.add(
        DashboardSession(
            id=new_id("dashboard_session"),
            token_hash=_token_hash(token),
            team_id=row.team_id,
            api_key_id=row.id,
            created_at=now,
            expires_at=now + timedelta(seconds=settings.dashboard_session_ttl_s),
        )
    )
    session.commit()
    response = redirect(next_page)
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=int(settings.dashboard_session_ttl_s),
        httponly=True,
        samesite="strict",
        secure=_secure(request),
        path="/dashboard",
    )
    response.delete_cookie(LOGIN_CSRF_COOKIE, path="/dashboard")
    return response


@router.post("/logout")
async def logout(request: Request, session: SessionDep) -> Response:
    signed = require_signed(request, session)
    form = await request.form(max_files=0, max_fields=5)
    check_csrf(request, signed, form.get("csrf"))
    row = session.scalar(select(DashboardSession).where(DashboardSession.token_hash == _token_hash(signed.token)))
    if row is not None:
        session.delete(row)
        session.commit()
    response = redirect("/dashboard/login")
    response.delete_cookie(SESSION_COOKIE, path="/dashboard")
    return response


# --- pages -------------------------------------------------------------------------------------
@router.get("")
def job_list(request: Request, session: SessionDep) -> HTMLResponse:
    signed = require_signed(request, session)
    jobs = _team_rows(session, Job, signed.team.id, limit=100)
    models = {m.id: m for m in _team_rows(session, Model, signed.team.id)}
    forget_sets = {f.id: f for f in _team_rows(session, ForgetSet, signed.team.id)}
    rows = [{"job": j, "live": live_summary(j)} for j in jobs]
    return render(request, "jobs.html", signed=signed, rows=rows, models=models, forget_sets=forget_sets)


def live_summary(job: Job) -> dict[str, Any]:
    progress = job.progress or {}
    total, step = progress.get("total") or 0, progress.get("step") or 0
    percent = 100 if job.status == "succeeded" else (round(100 * step / total) if total else 0)
    return {"percent": percent, "step": step, "total": total, "phase": progress.get("phase")}


@router.get("/jobs/new")
def new_job_page(
    request: Request, session: SessionDep, model: str | None = None, forget_set: str | None = None
) -> HTMLResponse:
    signed = require_signed(request, session)
    return _job_form(request, session, signed, {"model": model, "forget_set": forget_set})


@functools.cache
def method_names() -> tuple[str, ...]:
    """Every method a job may name, as the library's configs declare them (DDPM, then SD-only)."""
    from vdu_core.config import UnlearnConfig
    from vdu_core.sd.config import SDUnlearnConfig

    names: dict[str, None] = {}
    for config in (UnlearnConfig, SDUnlearnConfig):
        names.update(dict.fromkeys(get_args(get_type_hints(config)["method"])))
    return tuple(names)


def _job_form(request: Request, session, signed: Signed, values: dict, error: str | None = None, status: int = 200):
    return render(
        request,
        "new_job.html",
        status=status,
        signed=signed,
        models=_team_rows(session, Model, signed.team.id),
        forget_sets=_team_rows(session, ForgetSet, signed.team.id),
        methods=method_names(),
        posteriors=POSTERIORS,
        values=values,
        idempotency_key=values.get("idempotency_key") or secrets.token_hex(16),
        error=error,
    )


def _json_field(form: dict, name: str) -> dict:
    raw = (form.get(name) or "").strip()
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise DashboardFormError(f"{name}: not valid JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise DashboardFormError(f"{name}: a JSON object is required")
    return value


class DashboardFormError(Exception):
    pass


def job_body_from_form(form: dict) -> JobCreate:
    params = _json_field(form, "params")
    for name, cast in (("steps", int), ("gamma", float)):
        raw = (form.get(name) or "").strip()
        if raw:
            try:
                params[name] = cast(raw)
            except ValueError as exc:
                raise DashboardFormError(f"{name}: {raw!r} is not a number") from exc
    if form.get("posterior"):
        params["posterior"] = form["posterior"]
    return JobCreate.model_validate(
        {
            "model": form.get("model") or "",
            "forget_set": form.get("forget_set") or "",
            "method": form.get("method") or "vdu",
            "params": params,
            "evaluation": _json_field(form, "evaluation"),
            "webhook_url": (form.get("webhook_url") or "").strip() or None,
        }
    )


@router.post("/jobs")
async def create_job(
    request: Request, session: SessionDep, settings: SettingsDep, dispatcher: DispatcherDep
) -> Response:
    signed = require_signed(request, session)
    form = {k: str(v) for k, v in (await request.form(max_files=0, max_fields=30)).items()}
    check_csrf(request, signed, form.get("csrf"))
    key = form.get("idempotency_key", "")
    try:
        body = job_body_from_form(form)
        job = jobs_api.create_job(
            request=request,
            response=Response(),
            team=signed.team,
            session=session,
            settings=settings,
            dispatcher=dispatcher,
            body=body,
            idempotency_key=key if IDEMPOTENCY_RE.match(key) else None,
        )
    except (DashboardFormError, ServiceError, VDUError, ValidationError) as exc:
        session.rollback()
        return _job_form(request, session, signed, form, error=_problem_text(exc), status=422)
    return redirect(f"/dashboard/jobs/{quote(job.id)}")


@router.get("/jobs/{job_id}")
def job_page(request: Request, job_id: str, session: SessionDep) -> HTMLResponse:
    signed = require_signed(request, session)
    job = _owned(session, Job, job_id, signed.team.id)
    files = (job.artifacts or {}).get("files", {})
    deliveries = session.scalars(
        select(WebhookDelivery)
        .where(WebhookDelivery.team_id == signed.team.id, WebhookDelivery.job_id == job.id)
        .order_by(WebhookDelivery.created_at)
    ).all()
    others = [
        j for j in _team_rows(session, Job, signed.team.id) if j.id != job.id and j.status in ("succeeded", "failed")
    ]
    return render(
        request,
        "job.html",
        signed=signed,
        job=job,
        model=session.get(Model, job.model_id),
        forget_set=session.get(ForgetSet, job.forget_set_id) if job.forget_set_id else None,
        live=live_state(session, job),
        metrics=metric_rows(job.metrics),
        has_grids=has_grids(job),
        checkpoint=files.get((job.artifacts or {}).get("checkpoint") or ""),
        active=job.status in {s.value for s in ACTIVE_STATUSES},
        deliveries=deliveries,
        others=others,
    )


@router.get("/jobs/{job_id}/live")
def job_live(
    request: Request, job_id: str, session: SessionDep, seq: Annotated[int | None, Query(ge=0, le=2**31 - 1)] = None
) -> Response:
    """The job's state for the page's polling script (cookie auth; JSON; problem+json errors);
    ``seq``: the last ``event_seq`` seen (the loss plot is rebuilt only when events came since)."""
    signed = signed_in(request, session)
    if signed is None:
        return problem_response(401, "sign in to the dashboard first", code="unauthorized", field="cookie")
    job = get_owned(session, Job, job_id, signed.team.id)
    return JSONResponse(live_state(session, job, seq), headers={"Cache-Control": "no-store"})


@router.post("/jobs/{job_id}/cancel")
async def cancel_job(request: Request, job_id: str, session: SessionDep) -> Response:
    signed = require_signed(request, session)
    form = await request.form(max_files=0, max_fields=5)
    check_csrf(request, signed, form.get("csrf"))
    try:
        jobs_api.cancel_job(job_id=job_id, request=request, team=signed.team, session=session)
    except ServiceError as exc:
        raise DashboardError(exc.status, exc.message) from exc
    return redirect(f"/dashboard/jobs/{quote(job_id)}")


@router.get("/jobs/{job_id}/files/{name:path}")
def job_file(request: Request, job_id: str, name: str, session: SessionDep, storage: StorageDep) -> Response:
    """An artifact (grids, metrics, the checkpoint) through the API's streamed, checksummed download."""
    signed = require_signed(request, session)
    try:
        return artifacts_api.download_artifact(
            job_id=job_id,
            name=name,
            request=request,
            team=signed.team,
            session=session,
            storage=storage,
            range_=request.headers.get("range"),
            if_range=request.headers.get("if-range"),
            if_none_match=request.headers.get("if-none-match"),
        )
    except ServiceError as exc:
        raise DashboardError(exc.status, exc.message) from exc


@router.get("/compare")
def compare_page(request: Request, session: SessionDep, a: str | None = None, b: str | None = None) -> HTMLResponse:
    signed = require_signed(request, session)
    candidates = _team_rows(session, Job, signed.team.id)
    pair = []
    if a and b:
        pair = [_owned(session, Job, job_id, signed.team.id) for job_id in (a, b)]
    keys = sorted({r["key"] for j in pair for r in metric_rows(j.metrics)})
    table = []
    for k in keys:
        cells = [next((r for r in metric_rows(j.metrics) if r["key"] == k), None) for j in pair]
        table.append({"key": k, "cells": cells, "how": next((c["how"] for c in cells if c), "")})
    warning = None
    if pair and (pair[0].model_id != pair[1].model_id or pair[0].forget_set_id != pair[1].forget_set_id):
        warning = "these jobs differ in model or forget set, not only in method or parameters"
    return render(
        request,
        "compare.html",
        signed=signed,
        candidates=candidates,
        pair=pair,
        table=table,
        warning=warning,
        a=a or "",
        b=b or "",
        grids=[has_grids(j) for j in pair],
    )


@router.get("/forget-sets/new")
def new_forget_set_page(request: Request, session: SessionDep) -> HTMLResponse:
    signed = require_signed(request, session)
    return render(
        request, "new_forget_set.html", signed=signed, forget_sets=_team_rows(session, ForgetSet, signed.team.id)
    )


async def _store_upload(request: Request, signed: Signed, settings, store, *, max_bytes, max_files, file_fields):
    """Receive a multipart form (streamed, limited like the API's), check its CSRF token, and hand
    it to ``store`` (the API's own create function) in the thread pool."""
    _same_origin(request)
    upload = await receive_upload(
        request,
        tmp_root=settings.resolved_upload_tmp_dir(),
        max_bytes=max_bytes,
        max_files=max_files,
        file_fields=file_fields,
        text_fields={"name", "csrf"},
    )
    try:
        check_csrf(request, signed, upload.fields.pop("csrf", None))
        upload.files = [f for f in upload.files if f.size > 0]  # a file input left empty sends an empty part
        return await run_in_threadpool(store, upload)
    finally:
        upload.cleanup()


@router.post("/forget-sets")
async def upload_forget_set(
    request: Request, session: SessionDep, settings: SettingsDep, storage: StorageDep
) -> Response:
    signed = require_signed(request, session)
    try:
        row = await _store_upload(
            request,
            signed,
            settings,
            lambda upload: forget_sets_api._create(session, settings, storage, signed.team.id, upload),
            max_bytes=settings.max_forget_set_upload_bytes,
            max_files=settings.max_upload_files,
            file_fields={"file", "files"},
        )
    except (ServiceError, VDUError) as exc:
        return _form_error(request, session, signed, exc, "new_forget_set.html", ForgetSet)
    return redirect(f"/dashboard/jobs/new?forget_set={quote(row.id)}")


@router.get("/models/new")
def new_model_page(request: Request, session: SessionDep) -> HTMLResponse:
    signed = require_signed(request, session)
    return render(request, "new_model.html", signed=signed, models=_team_rows(session, Model, signed.team.id))


def _form_error(request: Request, session, signed: Signed, exc: Exception, template: str, table) -> HTMLResponse:
    """The upload form again, with what was wrong (the status of the API's problem, or 422)."""
    session.rollback()
    listing = {ForgetSet: "forget_sets", Model: "models"}[table]
    return render(
        request,
        template,
        status=exc.status if isinstance(exc, ServiceError) else 422,
        signed=signed,
        error=_problem_text(exc),
        **{listing: _team_rows(session, table, signed.team.id)},
    )


@router.post("/models")
async def upload_model(request: Request, session: SessionDep, settings: SettingsDep, storage: StorageDep) -> Response:
    """A model upload (multipart: a diffusers folder archive or a .safetensors file, lineage files)."""
    signed = require_signed(request, session)
    try:
        row = await _store_upload(
            request,
            signed,
            settings,
            lambda upload: models_api._register_upload(session, settings, storage, signed.team.id, upload),
            max_bytes=settings.max_model_upload_bytes,
            max_files=1 + models_api.MAX_LINEAGE,
            file_fields={"file", "lineage"},
        )
    except (ServiceError, VDUError) as exc:
        return _form_error(request, session, signed, exc, "new_model.html", Model)
    return redirect(f"/dashboard/jobs/new?model={quote(row.id)}")


@router.post("/models/reference")
async def register_model_reference(request: Request, session: SessionDep, settings: SettingsDep) -> Response:
    """A model by reference: a hub id with a pinned revision, or an https/s3 URL."""
    signed = require_signed(request, session)
    form = {k: str(v).strip() for k, v in (await request.form(max_files=0, max_fields=10)).items()}
    check_csrf(request, signed, form.get("csrf"))
    try:
        source = "url" if form.get("url") else "hub"
        fields = ("hub_id", "revision") if source == "hub" else ("url",)
        body = ModelCreate.model_validate(
            {"name": form.get("name") or "", "source": source, **{f: form.get(f) or None for f in fields}}
        )
        row = await run_in_threadpool(models_api._register_ref, session, settings, signed.team.id, body)
    except (ServiceError, VDUError, ValidationError) as exc:
        return _form_error(request, session, signed, exc, "new_model.html", Model)
    return redirect(f"/dashboard/jobs/new?model={quote(row.id)}")


@router.get("/static/{name}")
def static_file(name: str) -> Response:
    path = STATIC / name
    if "/" in name or name.startswith(".") or path.suffix not in STATIC_TYPES or not path.is_file():
        raise DashboardError(404, f"no static file {name!r}")
    return FileResponse(path, media_type=STATIC_TYPES[path.suffix], headers={"Cache-Control": "no-cache"})


def install(app: FastAPI) -> None:
    """Add the dashboard's routes and its two HTML answers (sign in; an error page)."""
    app.include_router(router)

    @app.exception_handler(SignInRequired)
    async def _sign_in(request: Request, exc: SignInRequired):
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        response = redirect(f"/dashboard/login?next={quote(target)}")
        if request.cookies.get(SESSION_COOKIE):
            response.delete_cookie(SESSION_COOKIE, path="/dashboard")
        return response

    @app.exception_handler(DashboardError)
    async def _error_page(request: Request, exc: DashboardError):
        return render(request, "error.html", status=exc.status, message=exc.message)
