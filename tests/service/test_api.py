"""The API's contract, in process (TestClient) on real Postgres, Redis and local storage.

Happy paths first, then every bad input: each answers a 4xx RFC 9457 problem naming the field,
and leaves no row, stored file or temporary upload behind.
"""

from __future__ import annotations

import hashlib
import json

import pytest
from sqlalchemy import select

from api.keys import revoke_key
from jobs import ledger
from jobs.db import session_scope
from jobs.queue import CeleryDispatcher
from jobs.tables import ApiKey, Job
from tests.service.helpers import (
    PICKLE_PAYLOAD,
    TINY,
    assert_problem,
    png_bytes,
    safetensors_bytes,
    snapshot,
    tar_bytes,
    tiny_model_archive,
    zip_bytes,
)

pytestmark = pytest.mark.timeout(60)
#: the default (trajectory) target with few paths and Laplace points: the real method, small
JOB_PARAMS = {"steps": 3, "batch_size": 4, "anchor_samples": 32, "laplace_points": 32}
EVALUATION = {"num_samples": 8, "grid_samples": 8, "sample_steps": 4, "forget_class": 0}


# --- helpers -----------------------------------------------------------------------------------
def upload_forget_set(api, headers, files=None, name="digits") -> dict:
    files = files or [
        ("file", ("digits.zip", zip_bytes({f"{i}.png": png_bytes(i) for i in range(6)}), "application/zip"))
    ]
    resp = api.client.post("/v1/forget-sets", headers=headers, files=files, data={"name": name})
    assert resp.status_code == 201, resp.text
    return resp.json()


def register_model(api, headers) -> dict:
    resp = api.client.post(
        "/v1/models",
        headers=headers,
        json={"name": "tiny", "source": "hub", "hub_id": "org/tiny-ddpm", "revision": "abc123"},
    )
    assert resp.status_code == 201, resp.text
    return resp.json()


@pytest.fixture
def team(api):
    team_id, headers = api.new_team()
    return team_id, headers


@pytest.fixture
def ready(api, team):
    """A team with a model and a forget set."""
    team_id, headers = team
    return team_id, headers, register_model(api, headers)["id"], upload_forget_set(api, headers)["id"]


def job_body(model_id, fs_id, **over) -> dict:
    body = {
        "model": model_id,
        "forget_set": fs_id,
        "method": "vdu",
        "params": dict(JOB_PARAMS),
        "evaluation": dict(EVALUATION),
    }
    body.update(over)
    return body


# --- happy paths -------------------------------------------------------------------------------
def test_forget_set_upload_get_list_delete(api, team):
    team_id, headers = team
    archive = zip_bytes({f"{i}.png": png_bytes(i) for i in range(5)})
    resp = api.client.post("/v1/forget-sets", headers=headers, files={"file": ("d.zip", archive)})
    assert resp.status_code == 201, resp.text
    fs = resp.json()
    assert fs["image_count"] == 5 and fs["sizes"] == [{"width": 28, "height": 28, "count": 5}]
    assert fs["sha256"] == hashlib.sha256(archive).hexdigest() and fs["bytes"] == len(archive)
    assert fs["name"] == "d.zip"
    assert api.client.get(f"/v1/forget-sets/{fs['id']}", headers=headers).json() == fs
    listing = api.client.get("/v1/forget-sets", headers=headers).json()
    assert [x["id"] for x in listing["data"]] == [fs["id"]] and listing["has_more"] is False
    assert snapshot(api, team_id)["files"] == [f"teams/{team_id}/forget-sets/{fs['id']}/d.zip"]
    assert api.client.delete(f"/v1/forget-sets/{fs['id']}", headers=headers).status_code == 204
    assert snapshot(api, team_id) == {
        "rows": {"forget_sets": 0, "models": 0, "jobs": 0},
        "files": [],
        "tmp": [],
    }


def test_several_images_are_packed_into_one_archive(api, team):
    _, headers = team
    files = [("files", (f"img{i}.png", png_bytes(i), "image/png")) for i in range(3)]
    fs = upload_forget_set(api, headers, files=files)
    assert fs["image_count"] == 3 and fs["filename"] == "forget-set.zip"


def test_model_upload_of_a_pipeline_archive_with_lineage(api, team):
    team_id, headers = team
    unet_folder = tar_bytes(
        {
            f"step-900/{n}": (TINY / "unet" / n).read_bytes()
            for n in ("config.json", "diffusion_pytorch_model.safetensors")
        }
    )
    resp = api.client.post(
        "/v1/models",
        headers=headers,
        data={"name": "tiny"},
        files=[
            ("file", ("pipe.tar", tiny_model_archive(), "application/x-tar")),
            ("lineage", ("step-900.tar", unet_folder, "application/x-tar")),
            ("lineage", ("step-950.safetensors", safetensors_bytes(), "application/octet-stream")),
        ],
    )
    assert resp.status_code == 201, resp.text
    model = resp.json()
    assert model["source"] == "upload" and model["format"] == "diffusers_pipeline"
    assert [x["filename"] for x in model["lineage"]] == ["step-900.tar", "step-950.safetensors"]
    assert model["description"]["pipeline_class"] == "DDPMPipeline" and model["description"]["sample_size"] == 28
    assert "/tmp" not in json.dumps(model)
    zipped = api.client.post("/v1/models", headers=headers, files={"file": ("pipe.zip", tiny_model_archive("zip"))})
    assert zipped.status_code == 201, zipped.text
    assert len(api.client.get("/v1/models", headers=headers).json()["data"]) == 2
    assert len(snapshot(api, team_id)["files"]) == 4


def test_create_job_commits_then_publishes_to_redis(api, ready):
    team_id, headers, model_id, fs_id = ready
    seen_at_publish = {}
    original = api.client.app.state.dispatcher

    class Probe:
        def publish(self, job_id):  # the job must already be committed: read it from another session
            with session_scope(api.settings) as s:
                seen_at_publish[job_id] = s.get(Job, job_id).status
            original.publish(job_id)

        def __getattr__(self, name):
            return getattr(original, name)

    api.client.app.state.dispatcher = Probe()
    try:
        resp = api.client.post("/v1/jobs", headers=headers, json=job_body(model_id, fs_id))
    finally:
        api.client.app.state.dispatcher = original
    assert resp.status_code == 201, resp.text
    job = resp.json()
    assert resp.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["attempt"] == 0 and job["params"]["plasticity_target"] == "trajectory"
    assert job["params"]["steps"] == 3 and job["evaluation"]["forget_class"] == 0
    assert seen_at_publish == {job["id"]: "queued"}
    assert job["id"] in CeleryDispatcher(api.settings).pending_job_ids()  # really in Redis


def test_idempotency_key_returns_the_same_job_and_refuses_a_different_body(api, ready):
    team_id, headers, model_id, fs_id = ready
    h = {**headers, "Idempotency-Key": "retry-1"}
    first = api.client.post("/v1/jobs", headers=h, json=job_body(model_id, fs_id))
    again = api.client.post("/v1/jobs", headers=h, json=job_body(model_id, fs_id))
    assert first.status_code == 201 and again.status_code == 200
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    other = api.client.post("/v1/jobs", headers=h, json=job_body(model_id, fs_id, params={"steps": 4}))
    assert_problem(other, 422, "Idempotency-Key", "idempotency_key_reused")
    assert snapshot(api, team_id)["rows"]["jobs"] == 1


def test_list_jobs_paginates_and_filters(api, ready):
    _, headers, model_id, fs_id = ready
    ids = [api.client.post("/v1/jobs", headers=headers, json=job_body(model_id, fs_id)).json()["id"] for _ in range(5)]
    api.client.post(f"/v1/jobs/{ids[0]}/cancel", headers=headers)
    seen, after = [], None
    while True:
        page = api.client.get("/v1/jobs", headers=headers, params={"limit": 2, **({"after": after} if after else {})})
        body = page.json()
        seen += [j["id"] for j in body["data"]]
        if not body["has_more"]:
            break
        after = body["next_cursor"]
    assert seen == ids[::-1]
    cancelled = api.client.get("/v1/jobs", headers=headers, params={"status": "cancelled"}).json()["data"]
    assert [j["id"] for j in cancelled] == [ids[0]]
    both = api.client.get("/v1/jobs", headers=headers, params=[("status", "cancelled"), ("status", "queued")])
    assert len(both.json()["data"]) == 5


def test_cancel_and_events(api, ready):
    _, headers, model_id, fs_id = ready
    job_id = api.client.post("/v1/jobs", headers=headers, json=job_body(model_id, fs_id)).json()["id"]
    resp = api.client.post(f"/v1/jobs/{job_id}/cancel", headers=headers)
    assert resp.status_code == 200 and resp.json()["status"] == "cancelled"
    assert api.client.post(f"/v1/jobs/{job_id}/cancel", headers=headers).json()["status"] == "cancelled"
    events = api.client.get(f"/v1/jobs/{job_id}/events", headers=headers).json()
    assert [(e["seq"], e["type"]) for e in events["data"]] == [(1, "queued"), (2, "cancelled")]
    assert (
        api.client.get(f"/v1/jobs/{job_id}/events", headers=headers, params={"after": 1}).json()["data"][0]["seq"] == 2
    )
    assert_problem(api.client.get(f"/v1/jobs/{job_id}/artifacts", headers=headers), 409, "status")


def _claimed_job_with_published(api, team_id, model_id, fs_id, out) -> tuple[str, dict]:
    """A job created and claimed in the ledger by hand (no worker), ``out`` published under its prefix
    like the worker does; returns the job id and the ``files`` of its artifacts record."""
    with session_scope(api.settings) as s:
        job = ledger.create_job(
            s,
            team_id=team_id,
            model_id=model_id,
            forget_set_id=fs_id,
            method="vdu",
            params={},
            evaluation={},
            max_attempts=1,
        )
        ledger.claim(s, job.id, "w", 30)
        job_id = job.id
    keys = api.storage.publish_dir(out, f"teams/{team_id}/jobs/{job_id}")
    files = {
        rel: {
            "key": key,
            "size": (out / rel).stat().st_size,
            "sha256": hashlib.sha256((out / rel).read_bytes()).hexdigest(),
        }
        for rel, key in keys.items()
    }
    return job_id, files


def _succeeded_job_with_artifacts(api, team_id, model_id, fs_id, tmp_path) -> tuple[str, bytes]:
    """Drive a job through the ledger by hand (no worker) and publish artifacts like the worker does."""
    out = tmp_path / "out"
    (out / "samples").mkdir(parents=True)
    (out / "samples" / "before.png").write_bytes(png_bytes(1))
    (out / "metrics.json").write_text('{"pul": 0.1}')
    payload = bytes(range(256)) * 40
    (out / "checkpoint.tar").write_bytes(payload)
    job_id, files = _claimed_job_with_published(api, team_id, model_id, fs_id, out)
    with session_scope(api.settings) as s:
        ledger.succeed(s, job_id, "w", metrics={"pul": 0.1}, artifacts={"files": files, "checkpoint": "checkpoint.tar"})
    return job_id, payload


def test_artifact_downloads_stream_with_etag_and_ranges(api, ready, tmp_path):
    team_id, headers, model_id, fs_id = ready
    job_id, payload = _succeeded_job_with_artifacts(api, team_id, model_id, fs_id, tmp_path)
    sha = hashlib.sha256(payload).hexdigest()
    job = api.client.get(f"/v1/jobs/{job_id}", headers=headers).json()
    assert job["checkpoint"]["sha256"] == sha and job["checkpoint"]["bytes"] == len(payload)
    names = [a["name"] for a in api.client.get(f"/v1/jobs/{job_id}/artifacts", headers=headers).json()["data"]]
    assert names == ["checkpoint.tar", "metrics.json", "samples/before.png"]

    url = f"/v1/jobs/{job_id}/artifacts/checkpoint"
    full = api.client.get(url, headers=headers)
    assert full.status_code == 200 and full.content == payload
    assert full.headers["content-length"] == str(len(payload)) and full.headers["etag"] == f'"{sha}"'
    assert full.headers["accept-ranges"] == "bytes" and full.headers["content-type"] == "application/x-tar"
    part = api.client.get(url, headers={**headers, "Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == payload[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(payload)}"
    tail = api.client.get(url, headers={**headers, "Range": "bytes=-10"})
    assert tail.status_code == 206 and tail.content == payload[-10:]
    stale = api.client.get(url, headers={**headers, "Range": "bytes=0-9", "If-Range": '"other"'})
    assert stale.status_code == 200 and stale.content == payload
    assert api.client.get(url, headers={**headers, "If-None-Match": f'"{sha}"'}).status_code == 304
    head = api.client.head(url, headers=headers)
    assert head.status_code == 200 and head.headers["content-length"] == str(len(payload)) and head.content == b""
    assert_problem(api.client.get(url, headers={**headers, "Range": f"bytes={len(payload)}-"}), 416, "Range")
    png = api.client.get(f"/v1/jobs/{job_id}/artifacts/samples/before.png", headers=headers)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png" and png.content == png_bytes(1)
    assert_problem(api.client.get(f"/v1/jobs/{job_id}/artifacts/unet/x.bin", headers=headers), 404, "name")
    _, stranger = api.new_team()
    assert_problem(api.client.get(url, headers=stranger), 404)


def test_health_and_metrics(api):
    assert api.client.get("/livez").json() == {"status": "ok"}
    ready = api.client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"database": "ok", "broker": "ok", "storage": "ok"}
    metrics = api.client.get("/metrics").text
    assert 'vdu_jobs{status="queued"}' in metrics and "vdu_http_requests_total" in metrics


def test_readyz_names_the_broken_dependency(api):
    from jobs.queue import CeleryDispatcher
    from jobs.settings import Settings

    original = api.client.app.state.dispatcher
    api.client.app.state.dispatcher = CeleryDispatcher(Settings(broker_url="redis://127.0.0.1:1/0"))
    try:
        body = assert_problem(api.client.get("/readyz"), 503, code="not_ready")
    finally:
        api.client.app.state.dispatcher = original
    assert body["checks"]["database"] == "ok" and body["checks"]["broker"] != "ok"


def test_openapi_documents_every_error_as_problem_json(api):
    schema = api.client.get("/openapi.json").json()
    assert "Problem" in schema["components"]["schemas"] and "HTTPValidationError" not in schema["components"]["schemas"]
    for path, ops in schema["paths"].items():
        for op in ops.values():
            for status, response in op["responses"].items():
                if status.startswith("4"):
                    assert "application/problem+json" in response["content"], (path, status)


# --- authentication ----------------------------------------------------------------------------
@pytest.mark.parametrize("value", [None, "Basic abc", "Bearer ", "Bearer not-a-key", "Bearer vdu_0000_unknown"])
def test_missing_or_invalid_keys_are_401(api, value):
    headers = {"Authorization": value} if value else {}
    body = assert_problem(api.client.get("/v1/jobs", headers=headers), 401, "Authorization", "unauthorized")
    assert "vdu_0000" not in json.dumps(body)


def test_a_revoked_key_is_refused(api, team):
    team_id, headers = team
    assert api.client.get("/v1/jobs", headers=headers).status_code == 200
    with session_scope(api.settings) as s:
        prefix = s.scalar(select(ApiKey.prefix).where(ApiKey.team_id == team_id))
        assert revoke_key(s, prefix)
    assert_problem(api.client.get("/v1/jobs", headers=headers), 401, "Authorization")


def test_auth_is_checked_before_the_body_is_read(api):
    resp = api.client.post("/v1/jobs", content=b"{not json", headers={"Content-Type": "application/json"})
    assert_problem(resp, 401, "Authorization")


def test_another_teams_resources_are_404(api, ready):
    _, headers, model_id, fs_id = ready
    job_id = api.client.post("/v1/jobs", headers=headers, json=job_body(model_id, fs_id)).json()["id"]
    _, stranger = api.new_team()
    for path in (
        f"/v1/jobs/{job_id}",
        f"/v1/forget-sets/{fs_id}",
        f"/v1/models/{model_id}",
        f"/v1/jobs/{job_id}/events",
    ):
        assert_problem(api.client.get(path, headers=stranger), 404, code="not_found")
    assert_problem(api.client.post(f"/v1/jobs/{job_id}/cancel", headers=stranger), 404)
    assert_problem(api.client.delete(f"/v1/forget-sets/{fs_id}", headers=stranger), 404)
    # nor can a stranger start a job on them
    assert_problem(api.client.post("/v1/jobs", headers=stranger, json=job_body(model_id, fs_id)), 422, "model")
    assert api.client.get(f"/v1/jobs/{job_id}", headers=headers).json()["status"] == "queued"


# --- bad job requests --------------------------------------------------------------------------
BAD_JOBS = [
    ("gamma above 1", {"params": {"gamma": 1.5}}, "params.gamma"),
    ("gamma below 0", {"params": {"gamma": -0.1}}, "params.gamma"),
    ("gamma wrong type", {"params": {"gamma": "high"}}, "params.gamma"),
    ("steps beyond the service maximum", {"params": {"steps": 1001}}, "params.steps"),
    ("steps beyond the library maximum", {"params": {"steps": 10**9}}, "params.steps"),
    ("steps not an integer", {"params": {"steps": 2.5}}, "params.steps"),
    ("unknown parameter", {"params": {"gamma_typo": 1}}, "params.gamma_typo"),
    ("push band reversed", {"params": {"push_band": [0.7, 0.3]}}, "params.push_band"),
    ("push band outside [0, 1]", {"params": {"push_band": [0.3, 2]}}, "params.push_band[1]"),
    ("anchor margin negative", {"params": {"anchor_margin": -1}}, "params.anchor_margin"),
    ("vote spread beyond 10", {"params": {"vote_spread": 11}}, "params.vote_spread"),
    ("vote spread not an integer", {"params": {"vote_spread": "wide"}}, "params.vote_spread"),
    ("unknown lr schedule", {"params": {"lr_schedule": "linear"}}, "params.lr_schedule"),
    ("trajectory target with a self-forget share", {"params": {"self_forget_fraction": 0.1}},
     "params.self_forget_fraction"),
    ("params not an object", {"params": [1, 2]}, "params"),
    ("unknown method", {"method": "magic"}, "method"),
    ("evaluation out of range", {"evaluation": {"num_samples": 1}}, "evaluation.num_samples"),
    ("classifier from disk", {"evaluation": {"classifier": "/etc"}}, "evaluation.classifier"),
    ("null yardstick not a boolean", {"evaluation": {"null_yardstick": "yes"}}, "evaluation.null_yardstick"),
    ("natural step without the Laplace term", {"params": {"step_direction": "natural", "laplace_weight": 0}},
     "params.step_direction"),
    ("lineage posterior without lineage", {"params": {"posterior": "lineage"}}, "params.posterior"),
    ("unknown model", {"model": "mdl_00000000000000000000000000"}, "model"),
    ("unknown forget set", {"forget_set": "fs_nope"}, "forget_set"),
    ("model of the wrong type", {"model": 42}, "model"),
    ("unknown top-level field", {"priority": 1}, "priority"),
    ("webhook to loopback", {"webhook_url": "http://127.0.0.1:9/hook"}, "webhook_url"),
    ("webhook to metadata service", {"webhook_url": "https://169.254.169.254/x"}, "webhook_url"),
    ("webhook file url", {"webhook_url": "file:///etc/passwd"}, "webhook_url"),
]


@pytest.mark.parametrize(("case", "override", "field"), BAD_JOBS, ids=[c[0] for c in BAD_JOBS])
def test_bad_job_requests_are_422_naming_the_field(api, ready, case, override, field):
    team_id, headers, model_id, fs_id = ready
    before = snapshot(api, team_id)
    body = job_body(model_id, fs_id)
    for key, value in override.items():
        if key in ("params", "evaluation") and isinstance(value, dict):
            body[key] = {**body[key], **value}
        else:
            body[key] = value
    assert_problem(api.client.post("/v1/jobs", headers=headers, json=body), 422, field)
    assert snapshot(api, team_id) == before


def test_missing_fields_are_listed(api, team):
    _, headers = team
    body = assert_problem(api.client.post("/v1/jobs", headers=headers, json={}), 422, "model", "validation_error")
    assert {e["field"] for e in body["errors"]} == {"model", "forget_set"}


@pytest.mark.parametrize(
    ("content", "ctype", "status", "field"),
    [
        (b"{not json", "application/json", 400, "body"),
        (b'{"model": NaN}', "application/json", 400, "body"),
        (b"model=1", "application/x-www-form-urlencoded", 415, "Content-Type"),
        (b"{}", "text/plain", 415, "Content-Type"),
        (b'{"model": "' + b"x" * 70000 + b'"}', "application/json", 413, "body"),
    ],
)
def test_malformed_or_oversized_json_bodies(api, ready, content, ctype, status, field):
    team_id, headers, _, _ = ready
    before = snapshot(api, team_id)
    assert_problem(
        api.client.post("/v1/jobs", headers={**headers, "Content-Type": ctype}, content=content),
        status,
        field,
    )
    assert snapshot(api, team_id) == before


@pytest.mark.parametrize("key", ["x" * 256, "has space", "tab\there"])
def test_bad_idempotency_keys(api, ready, key):
    _, headers, model_id, fs_id = ready
    resp = api.client.post("/v1/jobs", headers={**headers, "Idempotency-Key": key}, json=job_body(model_id, fs_id))
    assert_problem(resp, 422, "Idempotency-Key")


def test_unknown_ids_routes_and_methods(api, team):
    _, headers = team
    assert_problem(api.client.get("/v1/jobs/job_doesnotexist", headers=headers), 404, code="not_found")
    assert_problem(api.client.get("/v1/nothing-here", headers=headers), 404, code="not_found")
    resp = api.client.delete("/v1/jobs", headers=headers)
    assert_problem(resp, 405, code="method_not_allowed")
    assert "GET" in resp.headers["allow"]
    assert_problem(api.client.get("/v1/jobs", headers=headers, params={"limit": 0}), 422, "limit")
    assert_problem(api.client.get("/v1/jobs", headers=headers, params={"limit": "ten"}), 422, "limit")
    assert_problem(api.client.get("/v1/jobs", headers=headers, params={"status": "done"}), 422, "status[0]")
    assert_problem(api.client.get("/v1/jobs", headers=headers, params={"after": "'; drop"}), 422, "after")
    assert_problem(api.client.get("/v1/jobs/job_x/events", headers=headers, params={"after": -1}), 422, "after")


def test_cancelling_a_finished_job_is_409(api, ready, tmp_path):
    team_id, headers, model_id, fs_id = ready
    job_id, _ = _succeeded_job_with_artifacts(api, team_id, model_id, fs_id, tmp_path)
    assert_problem(api.client.post(f"/v1/jobs/{job_id}/cancel", headers=headers), 409, "status")


def test_deleting_a_forget_set_in_use_is_409(api, ready):
    team_id, headers, model_id, fs_id = ready
    api.client.post("/v1/jobs", headers=headers, json=job_body(model_id, fs_id))
    assert_problem(api.client.delete(f"/v1/forget-sets/{fs_id}", headers=headers), 409)
    assert snapshot(api, team_id)["rows"]["forget_sets"] == 1


# --- bad uploads -------------------------------------------------------------------------------
BAD_FORGET_SETS = [
    ("archive with no images", [("file", ("empty.zip", zip_bytes({".DS_Store": b"x"})))], "file", "empty"),
    ("empty zip", [("file", ("empty.zip", zip_bytes({})))], "file", "empty"),
    ("text named png", [("file", ("x.png", b"hello, not an image"))], "file", "not_an_image"),
    (
        "text in an archive",
        [("file", ("a.tar", tar_bytes({"a.png": png_bytes(), "b.png": b"text"})))],
        "file",
        "not_an_image",
    ),
    (
        "path traversal",
        [("file", ("a.tar", tar_bytes({"../evil.png": png_bytes()})))],
        "file",
        "path_traversal",
    ),
    ("zip extension, no zip", [("file", ("a.zip", b"plain bytes"))], "file", "not_an_archive"),
    (
        "one bad among several",
        [("files", ("a.png", png_bytes())), ("files", ("b.png", b"no"))],
        "files",
        "not_an_image",
    ),
]


@pytest.mark.parametrize(("case", "files", "field", "rule"), BAD_FORGET_SETS, ids=[c[0] for c in BAD_FORGET_SETS])
def test_bad_forget_sets_are_422_and_leave_nothing(api, team, case, files, field, rule):
    team_id, headers = team
    body = assert_problem(
        api.client.post("/v1/forget-sets", headers=headers, files=files), 422, field, "invalid_forget_set"
    )
    assert body["rule"] == rule
    assert snapshot(api, team_id) == {
        "rows": {"forget_sets": 0, "models": 0, "jobs": 0},
        "files": [],
        "tmp": [],
    }


@pytest.mark.parametrize(
    ("case", "kwargs", "status", "field"),
    [
        ("no file", {"files": {"name": (None, "x")}}, 422, "file"),
        ("form-urlencoded", {"data": {"name": "x"}}, 415, "Content-Type"),
        (
            "unknown field",
            {"data": {"color": "red"}, "files": {"file": ("a.png", png_bytes())}},
            422,
            "color",
        ),
        ("unknown file field", {"files": {"upload": ("a.png", png_bytes())}}, 422, "upload"),
        (
            "control characters in the name",
            {"data": {"name": "a\x00b"}, "files": {"file": ("a.png", png_bytes())}},
            422,
            "name",
        ),
        ("json instead of multipart", {"json": {"file": "x"}}, 415, "Content-Type"),
    ],
)
def test_bad_forget_set_requests(api, team, case, kwargs, status, field):
    team_id, headers = team
    assert_problem(api.client.post("/v1/forget-sets", headers=headers, **kwargs), status, field)
    assert snapshot(api, team_id) == {
        "rows": {"forget_sets": 0, "models": 0, "jobs": 0},
        "files": [],
        "tmp": [],
    }


def test_truncated_multipart_is_400(api, team):
    team_id, headers = team
    body = b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n' + png_bytes()
    resp = api.client.post(
        "/v1/forget-sets",
        headers={**headers, "Content-Type": "multipart/form-data; boundary=XyZ"},
        content=body,
    )
    assert_problem(resp, 400, "body", "malformed_multipart")
    assert snapshot(api, team_id)["tmp"] == []


def test_oversized_upload_is_413_while_streaming(api, team):
    team_id, headers = team
    limit = api.settings.max_forget_set_upload_bytes
    sent = []

    def body():  # chunked: no Content-Length, so the limit must be enforced on the stream itself
        yield b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="big.zip"\r\n\r\n'
        for _ in range(limit // 65536 + 64):
            sent.append(65536)
            yield b"\0" * 65536
        yield b"\r\n--XyZ--\r\n"

    resp = api.client.post(
        "/v1/forget-sets",
        headers={**headers, "Content-Type": "multipart/form-data; boundary=XyZ"},
        content=body(),
    )
    problem = assert_problem(resp, 413, "file", "payload_too_large")
    assert problem["limit"] == limit
    assert snapshot(api, team_id) == {
        "rows": {"forget_sets": 0, "models": 0, "jobs": 0},
        "files": [],
        "tmp": [],
    }
    declared = api.client.post(
        "/v1/forget-sets",
        headers={
            **headers,
            "Content-Length": str(limit * 10),
            "Content-Type": "multipart/form-data; boundary=XyZ",
        },
        content=b"x" * 10,
    )
    assert declared.status_code in (400, 413)


BAD_MODELS = [
    ("pickle checkpoint", {"file": ("model.ckpt", PICKLE_PAYLOAD)}, "file", "pickle"),
    ("pickle named safetensors", {"file": ("model.safetensors", PICKLE_PAYLOAD)}, "file", "pickle"),
    (
        "pickle inside an archive",
        {
            "file": (
                "m.tar",
                tar_bytes({"pipe/model_index.json": b"{}", "pipe/unet/diffusion_pytorch_model.bin": PICKLE_PAYLOAD}),
            )
        },
        "file",
        "pickle",
    ),
    (
        "safetensors lying about sizes",
        {"file": ("m.safetensors", safetensors_bytes()[:-8])},
        "file",
        "bad_safetensors",
    ),
    (
        "code in an archive",
        {"file": ("m.zip", zip_bytes({"model_index.json": b"{}", "pipeline.py": b"import os"}))},
        "file",
        "code",
    ),
    ("archive without a model", {"file": ("m.zip", zip_bytes({"notes.txt": b"hi"}))}, "file", "no_model"),
    (
        "bare safetensors without a config",
        {"file": ("unet.safetensors", safetensors_bytes())},
        "file",
        "missing_config",
    ),
    (
        "config of the wrong architecture",
        {"file": ("m.tar", tiny_model_archive(unet_config={"_class_name": "UNet2DConditionModel"}))},
        "file",
        "unsupported_architecture",
    ),
    (
        "absurd config",
        {"file": ("m.tar", tiny_model_archive(unet_config={"sample_size": 10**9}))},
        "file",
        "invalid_config",
    ),
    ("random bytes", {"file": ("m.bin2", b"\x00" * 100)}, "file", "unknown_format"),
]


@pytest.mark.parametrize(("case", "files", "field", "rule"), BAD_MODELS, ids=[c[0] for c in BAD_MODELS])
def test_bad_model_uploads_are_422_and_leave_nothing(api, team, case, files, field, rule):
    team_id, headers = team
    body = assert_problem(api.client.post("/v1/models", headers=headers, files=files), 422, field, "invalid_model")
    assert body["rule"] == rule
    assert "/tmp" not in body["detail"] and "upl-" not in body["detail"]
    assert snapshot(api, team_id) == {
        "rows": {"forget_sets": 0, "models": 0, "jobs": 0},
        "files": [],
        "tmp": [],
    }


@pytest.mark.parametrize(
    ("case", "body", "field"),
    [
        ("hub without revision", {"name": "m", "source": "hub", "hub_id": "org/m"}, "revision"),
        ("bad hub id", {"name": "m", "source": "hub", "hub_id": "../../etc", "revision": "main"}, "hub_id"),
        ("url to loopback", {"name": "m", "source": "url", "url": "https://127.0.0.1/m.safetensors"}, "url"),
        ("url to link-local", {"name": "m", "source": "url", "url": "https://169.254.169.254/latest"}, "url"),
        (
            "url to a private range",
            {"name": "m", "source": "url", "url": "https://10.1.2.3/m.safetensors"},
            "url",
        ),
        (
            "localhost by name",
            {"name": "m", "source": "url", "url": "https://localhost/m.safetensors"},
            "url",
        ),
        ("file url", {"name": "m", "source": "url", "url": "file:///etc/passwd"}, "url"),
        (
            "lineage to loopback",
            {
                "name": "m",
                "source": "hub",
                "hub_id": "o/m",
                "revision": "r",
                "lineage": [{"source": "url", "url": "https://[::1]/x"}],
            },
            "lineage[0].url",
        ),
        ("unknown source", {"name": "m", "source": "ftp"}, "source"),
        ("name too long", {"name": "m" * 201, "source": "hub", "hub_id": "o/m", "revision": "r"}, "name"),
    ],
)
def test_bad_model_references_are_422(api, team, case, body, field):
    team_id, headers = team
    assert_problem(api.client.post("/v1/models", headers=headers, json=body), 422, field)
    assert snapshot(api, team_id)["rows"]["models"] == 0


def test_a_failed_job_serves_its_evidence_but_no_checkpoint(api, ready, tmp_path):
    team_id, headers, model_id, fs_id = ready
    out = tmp_path / "evidence"
    (out / "samples").mkdir(parents=True)
    (out / "samples" / "after.png").write_bytes(png_bytes(2))
    job_id, files = _claimed_job_with_published(api, team_id, model_id, fs_id, out)
    with session_scope(api.settings) as s:
        ledger.fail(
            s, job_id, "w", code="model_collapsed", message="collapsed", artifacts={"files": files, "checkpoint": None}
        )
    job = api.client.get(f"/v1/jobs/{job_id}", headers=headers).json()
    assert job["status"] == "failed" and job["error"]["code"] == "model_collapsed" and job["checkpoint"] is None
    assert api.client.get(f"/v1/jobs/{job_id}/artifacts/samples/after.png", headers=headers).content == png_bytes(2)
    assert_problem(api.client.get(f"/v1/jobs/{job_id}/artifacts/checkpoint", headers=headers), 404, "name")
