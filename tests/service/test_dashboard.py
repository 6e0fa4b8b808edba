"""The dashboard's rules, in process (the browser story is test_dashboard_browser.py): the session
cookie holds no key and is HttpOnly/SameSite=Strict (Secure over https), forms need their CSRF token
and the same origin, pages are team-scoped and escaped, and bad input gets a page, never a 500."""

from __future__ import annotations

import re
import secrets

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.keys import create_key, revoke_key
from jobs import ledger
from jobs.db import session_scope
from jobs.tables import ApiKey, DashboardSession, Job
from tests.service.helpers import PICKLE_PAYLOAD, make_forget_set_row, make_model_row, make_team, png_bytes

pytestmark = pytest.mark.timeout(60)
EVIL = '<script>alert("x")</script>'


def hidden(html: str, name: str) -> str:
    return re.search(rf'name="{name}" value="([^"]*)"', html).group(1)


def sign_in(client: TestClient, key: str):
    page = client.get("/dashboard/login")
    return client.post(
        "/dashboard/login",
        data={"csrf": hidden(page.text, "csrf"), "api_key": key, "next": "/dashboard"},
        follow_redirects=False,
    )


@pytest.fixture
def team(api):
    """A team (with markup in its name) owning a model and a forget set, and a key of it."""
    with session_scope(api.settings) as s:
        team = make_team(s, f"team {secrets.token_hex(3)} {EVIL}")
        model, fs = make_model_row(s, team.id), make_forget_set_row(s, team.id)
        fs.name = f"zeros {EVIL}"
        return {"id": team.id, "key": create_key(s, team).key, "model": model.id, "forget_set": fs.id}


@pytest.fixture
def browser(api):
    with TestClient(api.client.app, raise_server_exceptions=False) as client:
        yield client


def test_signing_in_keeps_only_an_opaque_http_only_strict_cookie(api, team, browser):
    assert browser.get("/dashboard", follow_redirects=False).headers["location"] == "/dashboard/login?next=/dashboard"
    wrong = sign_in(browser, "vdu_00000000_nope")
    assert wrong.status_code == 401 and "invalid or revoked API key" in wrong.text
    forged = browser.post("/dashboard/login", data={"csrf": "x", "api_key": team["key"]}, follow_redirects=False)
    assert forged.status_code == 403

    ok = sign_in(browser, team["key"])
    assert ok.status_code == 303 and ok.headers["location"] == "/dashboard"
    cookie = next(c for c in ok.headers.get_list("set-cookie") if c.startswith("vdu_dashboard="))
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Secure" not in cookie
    token = browser.cookies.get("vdu_dashboard")
    assert team["key"] not in token and len(token) >= 40
    with session_scope(api.settings) as s:
        stored = s.scalars(select(DashboardSession.token_hash).where(DashboardSession.team_id == team["id"])).all()
    assert len(stored) == 1 and token not in stored[0]

    page = browser.get("/dashboard")
    assert page.status_code == 200 and "default-src 'none'" in page.headers["content-security-policy"]
    assert EVIL not in page.text and "&lt;script&gt;" in page.text  # the team name, escaped

    with TestClient(api.client.app, base_url="https://testserver") as secure:
        cookie = next(c for c in sign_in(secure, team["key"]).headers.get_list("set-cookie") if "vdu_dashboard=" in c)
        assert "Secure" in cookie


def test_forms_need_the_csrf_token_and_the_same_origin(api, team, browser):
    sign_in(browser, team["key"])
    form = browser.get("/dashboard/jobs/new").text
    assert EVIL not in form and "zeros &lt;script&gt;" in form
    body = {"model": team["model"], "forget_set": team["forget_set"], "method": "vdu", "steps": "5"}
    missing = browser.post("/dashboard/jobs", data=body)
    assert missing.status_code == 403 and "CSRF" in missing.text
    csrf = hidden(form, "csrf")
    foreign = browser.post("/dashboard/jobs", data={**body, "csrf": csrf}, headers={"Origin": "https://evil.example"})
    assert foreign.status_code == 403
    assert browser.post("/dashboard/logout", data={"csrf": "nope"}).status_code == 403
    with session_scope(api.settings) as s:
        assert s.scalar(select(Job.id).where(Job.team_id == team["id"])) is None

    created = browser.post(
        "/dashboard/jobs",
        data={**body, "csrf": csrf, "idempotency_key": hidden(form, "idempotency_key")},
        follow_redirects=False,
    )
    assert created.status_code == 303 and created.headers["location"].startswith("/dashboard/jobs/job_")
    again = browser.post(
        "/dashboard/jobs",
        data={**body, "csrf": csrf, "idempotency_key": hidden(form, "idempotency_key")},
        follow_redirects=False,
    )
    assert again.headers["location"] == created.headers["location"]  # a double submit is one job


@pytest.mark.parametrize(
    "change, message",
    [
        ({"params": "{not json"}, "params: not valid JSON"),
        ({"params": "[1]"}, "params: a JSON object is required"),
        ({"gamma": "abc"}, "gamma: 'abc' is not a number"),
        ({"gamma": "5"}, "params.gamma"),
        ({"model": "mdl_unknown"}, "model"),
        ({"method": "magic"}, "method"),
        ({"evaluation": '{"num_samples": 1}'}, "evaluation.num_samples"),
        ({"webhook_url": "http://169.254.169.254/latest"}, "webhook_url"),
    ],
)
def test_bad_job_input_is_shown_on_the_form_never_a_500(api, team, browser, change, message):
    sign_in(browser, team["key"])
    form = browser.get("/dashboard/jobs/new").text
    data = {"model": team["model"], "forget_set": team["forget_set"], "method": "vdu", "csrf": hidden(form, "csrf")}
    page = browser.post("/dashboard/jobs", data={**data, **change})
    assert page.status_code == 422, page.text[:500]
    assert message in re.search(r'id="form-error"[^>]*>([^<]*)<', page.text).group(1).replace("&#39;", "'")


def test_another_teams_job_is_not_found_and_a_revoked_key_signs_out(api, team, browser):
    with session_scope(api.settings) as s:
        other = make_team(s)
        job = ledger.create_job(
            s,
            team_id=other.id,
            model_id=make_model_row(s, other.id).id,
            forget_set_id=make_forget_set_row(s, other.id).id,
            method="vdu",
            params={},
            evaluation={},
            max_attempts=1,
        )
    sign_in(browser, team["key"])
    for path in (f"/dashboard/jobs/{job.id}", f"/dashboard/jobs/{job.id}/files/checkpoint"):
        page = browser.get(path)
        assert page.status_code == 404 and page.headers["content-type"].startswith("text/html")
    assert browser.get(f"/dashboard/compare?a={job.id}&b={job.id}").status_code == 404
    live = browser.get(f"/dashboard/jobs/{job.id}/live")
    assert live.status_code == 404 and live.headers["content-type"].startswith("application/problem+json")
    assert browser.get("/dashboard/static/..%2F..%2Fmain.py").status_code == 404

    with session_scope(api.settings) as s:
        assert revoke_key(s, s.scalar(select(ApiKey.prefix).where(ApiKey.team_id == team["id"])))
    assert browser.get("/dashboard", follow_redirects=False).headers["location"].startswith("/dashboard/login")
    anonymous = browser.get(f"/dashboard/jobs/{job.id}/live")
    assert anonymous.status_code == 401 and anonymous.json()["field"] == "cookie"


def test_uploads_from_the_pages_are_checked_like_the_api(api, team, browser):
    sign_in(browser, team["key"])
    csrf = hidden(browser.get("/dashboard/forget-sets/new").text, "csrf")
    image = {"file": ("a.png", png_bytes(), "image/png")}
    assert browser.post("/dashboard/forget-sets", data={"name": "x"}, files=image).status_code == 403
    bad = browser.post("/dashboard/forget-sets", data={"csrf": csrf}, files={"file": ("x.zip", b"no zip", "x/y")})
    assert bad.status_code == 422 and 'id="form-error"' in bad.text
    ok = browser.post("/dashboard/forget-sets", data={"csrf": csrf, "name": "one"}, files=image, follow_redirects=False)
    assert ok.status_code == 303 and ok.headers["location"].startswith("/dashboard/jobs/new?forget_set=fs_")

    pickle = browser.post("/dashboard/models", data={"csrf": csrf}, files={"file": ("m.ckpt", PICKLE_PAYLOAD, "x/y")})
    assert pickle.status_code == 422 and 'id="form-error"' in pickle.text
    unpinned = browser.post("/dashboard/models/reference", data={"csrf": csrf, "name": "m", "hub_id": "org/m"})
    assert unpinned.status_code == 422 and "revision" in unpinned.text
    pinned = browser.post(
        "/dashboard/models/reference",
        data={"csrf": csrf, "name": "m", "hub_id": "org/m", "revision": "abc123"},
        follow_redirects=False,
    )
    assert pinned.status_code == 303 and pinned.headers["location"].startswith("/dashboard/jobs/new?model=mdl_")


def test_two_jobs_compare_side_by_side_with_how_each_metric_was_computed(api, team, browser):
    pul = {"value": 92.5, "computed": True, "unit": "%", "implementation": f"builtin classifier {EVIL}"}
    ids = []
    with session_scope(api.settings) as s:
        for method, gamma, model in (("vdu", 0.5, team["model"]), ("gradient_ascent", 0.0, None)):
            job = ledger.create_job(
                s,
                team_id=team["id"],
                model_id=model or make_model_row(s, team["id"]).id,
                forget_set_id=team["forget_set"],
                method=method,
                params={"gamma": gamma, "steps": 5},
                evaluation={},
                max_attempts=1,
            )
            ledger.claim(s, job.id, "w", 30)
            ledger.succeed(s, job.id, "w", metrics={"pul": pul}, artifacts={"files": {}})
            ids.append(job.id)
    sign_in(browser, team["key"])
    page = browser.get(f"/dashboard/compare?a={ids[0]}&b={ids[1]}")
    assert page.status_code == 200
    row = re.search(r'<tr data-metric="pul">(.*?)</tr>', page.text, re.S).group(1)
    assert row.count("92.5 %") == 2 and "builtin classifier &lt;script&gt;" in row
    assert 'id="compare-warning"' in page.text  # the second job used another model
    assert "no sample grids (succeeded)" in page.text
    live = browser.get(f"/dashboard/jobs/{ids[0]}/live").json()
    assert live["status"] == "succeeded" and live["final"] and live["percent"] == 100
    assert live["plot_svg"].startswith("<svg") and "no training step yet" in live["plot_svg"]
    assert browser.get(f"/dashboard/jobs/{ids[0]}/live", params={"seq": live["event_seq"]}).json()["plot_svg"] is None
    bad = browser.get(f"/dashboard/jobs/{ids[0]}/live", params={"seq": "-1"})
    assert bad.status_code == 422 and bad.json()["field"] == "seq"
