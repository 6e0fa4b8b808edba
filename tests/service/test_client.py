"""The Python client (``vdu_client``) against the real service: the API under uvicorn, a Celery
worker, Postgres, Redis and an S3 API on loopback (the shared ``service_stack``). Every operation
is used at least once; the live event stream is resumed with ``Last-Event-ID``; a corrupted stored
artifact is caught by the client's sha256 check."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import httpx
import pytest

from tests.service.helpers import png_bytes, tar_bytes, tiny_model_archive
from tests.service.stack import free_port
from vdu_client import APIError, ChecksumMismatch, Client, RetryPolicy, TransportError
from worker.demo import forget_zip

pytestmark = pytest.mark.timeout(180)
TINY = Path(__file__).resolve().parents[2] / "reference" / "mnist-ddpm-tiny"
# the forget-image target, 'uniform' guidance weighting: no paths or anchors to sample (~30 s of CPU per
# job); the client is under test, not the method
QUICK_JOB = {
    "params": {
        "plasticity_target": "negative_guidance",
        "steps": 3,
        "batch_size": 4,
        "anchor_weight": 0,
        "self_forget_fraction": 0,
        "posterior": "lineage",
        "guidance_weighting": "uniform",
    },
    "evaluation": {"enabled": False},
}
LONG_JOB = {**QUICK_JOB, "params": {**QUICK_JOB["params"], "steps": 2000, "posterior": "isotropic"}}


def write_inputs(folder: Path) -> dict[str, Path]:
    """The tiny reference DDPM (with two lineage checkpoints) and a forget set of real zeros, as
    files a user would have on disk."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"model": folder / "mnist-ddpm-tiny.tar", "forget_set": folder / "zeros.zip"}
    paths["model"].write_bytes(tiny_model_archive())
    paths["forget_set"].write_bytes(forget_zip(0, 8))
    for i, step in enumerate(sorted((TINY / "lineage").iterdir())[:2]):
        members = {f"{step.name}/{f.name}": f.read_bytes() for f in sorted(step.iterdir())}
        paths[f"lineage{i}"] = folder / f"{step.name}.tar"
        paths[f"lineage{i}"].write_bytes(tar_bytes(members))
    return paths


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    return write_inputs(tmp_path_factory.mktemp("client-inputs"))


@pytest.fixture(scope="module")
def team_key(service_stack) -> str:
    return service_stack.api_key("client-team")


@pytest.fixture(scope="module")
def vdu(service_stack, team_key):
    with Client(service_stack.base, team_key) as client:
        yield client


@pytest.fixture(scope="module")
def inputs(vdu, files):
    model = vdu.upload_model(files["model"], name="tiny", lineage=[files["lineage0"], files["lineage1"]])
    forget_set = vdu.upload_forget_set(files["forget_set"], name="zeros")
    return model, forget_set


@pytest.fixture(scope="module")
def quick_job(vdu, inputs):
    """One quick job, created once for the module (the stream test follows it live)."""
    model, forget_set = inputs
    return vdu.create_job(model=model.id, forget_set=forget_set.id, idempotency_key="client-quick-1", **QUICK_JOB)


@pytest.fixture(scope="module")
def finished_job(vdu, quick_job):
    """The quick job waited for through ``wait`` (the SSE stream), with every event it saw."""
    seen = []
    done = vdu.wait(quick_job.id, timeout=150, on_event=seen.append)
    return quick_job, done, seen


def test_uploads_with_progress_and_resources_round_trip(vdu, files, inputs, tmp_path):
    assert vdu.livez() == {"status": "ok"}
    assert vdu.readyz()["status"] == "ready"
    model, forget_set = inputs
    assert model.format == "diffusers_pipeline" and len(model.lineage) == 2 and model.created_at is not None
    assert forget_set.image_count == 8
    assert forget_set.sha256 == hashlib.sha256(files["forget_set"].read_bytes()).hexdigest()

    ticks: list[tuple[int, int | None]] = []
    images = []
    for i in range(3):
        images.append(tmp_path / f"img{i}.png")
        images[-1].write_bytes(png_bytes(i))
    several = vdu.upload_forget_set(images, name="three images", progress=lambda d, t: ticks.append((d, t)))
    assert several.image_count == 3
    sent = [d for d, _ in ticks]
    assert ticks[-1][0] == ticks[-1][1] and sent == sorted(sent)

    assert vdu.get_forget_set(forget_set.id) == forget_set
    assert {fs.id for fs in vdu.iter_forget_sets()} == {forget_set.id, several.id}
    page = vdu.list_forget_sets(limit=1)
    assert len(page) == 1 and page.has_more and page.next_cursor
    vdu.delete_forget_set(several.id)
    with pytest.raises(APIError) as missing:
        vdu.get_forget_set(several.id)
    assert missing.value.status == 404 and missing.value.code == "not_found"

    hub = vdu.register_model("hub ref", hub_id="org/model", revision="0123abcd")
    assert hub.source == "hub" and vdu.get_model(hub.id).revision == "0123abcd"
    assert {m.id for m in vdu.iter_models()} >= {model.id, hub.id}
    assert vdu.list_models(limit=1).has_more


def test_errors_carry_the_problem_and_name_the_field(vdu, inputs, service_stack):
    model, forget_set = inputs
    with pytest.raises(APIError) as bad_param:
        vdu.create_job(model=model.id, forget_set=forget_set.id, params={"steps": -1})
    err = bad_param.value
    assert err.status == 422 and err.field == "params.steps" and err.problem["type"].startswith("/problems/")
    assert "params.steps" in str(err) and err.request_id
    with Client(service_stack.base, "vdu_nope_notakey") as stranger, pytest.raises(APIError) as unauthorized:
        stranger.list_jobs()
    assert unauthorized.value.status == 401 and unauthorized.value.field == "Authorization"
    with pytest.raises(APIError) as unknown:
        vdu.get_job("job_doesnotexist")
    assert unknown.value.status == 404
    with pytest.raises(APIError) as private:  # loopback receivers are refused unless the operator allows them
        vdu.create_job(model=model.id, forget_set=forget_set.id, webhook_url="http://127.0.0.1:9/hook")
    assert private.value.status == 422 and private.value.field == "webhook_url"


def read_sse(lines: Iterator[str], count: int | None = None, comments: list[str] | None = None) -> list[dict]:
    """Parse ``id``/``event``/``data`` frames off a stream's lines (stop after ``count``); comment
    lines go to ``comments``."""
    events, frame = [], {}
    for line in lines:
        if line == "":
            if "data" in frame:
                events.append(frame)
                if count is not None and len(events) == count:
                    break
            frame = {}
        elif line.startswith(":"):
            if comments is not None:
                comments.append(line)
        else:
            name, _, value = line.partition(": ")
            frame[name] = value
    return events


def test_the_event_stream_resumes_with_last_event_id_and_ends_with_the_final_state(
    vdu, inputs, quick_job, service_stack, team_key
):
    model, forget_set = inputs
    url = f"{service_stack.base}/v1/jobs/{quick_job.id}/events/stream"
    auth = {"Authorization": f"Bearer {team_key}"}
    with httpx.Client(headers=auth, timeout=60) as http:
        with http.stream("GET", url) as first:
            assert first.status_code == 200 and first.headers["content-type"].startswith("text/event-stream")
            head = read_sse(first.iter_lines(), count=2)  # queued, started: then the connection drops
        assert [(e["id"], e["event"]) for e in head] == [("1", "queued"), ("2", "started")]
        assert json.loads(head[0]["data"])["data"] == {"method": "vdu"}

        # Meanwhile a second job queues behind the running one: its stream idles (keepalive comments,
        # every 0.5 s in this stack) until it is cancelled, then ends with `cancelled`.
        queued = vdu.create_job(model=model.id, forget_set=forget_set.id, **LONG_JOB)
        with http.stream("GET", f"{service_stack.base}/v1/jobs/{queued.id}/events/stream") as idle:
            lines, comments = idle.iter_lines(), []
            first = read_sse(lines, count=1, comments=comments)
            for line in lines:  # until the first keepalive
                if line == ": keepalive":
                    break
            else:
                raise AssertionError("the stream ended without a keepalive")
            assert vdu.cancel_job(queued.id).status in ("cancelled", "cancelling")
            after_cancel = read_sse(lines)
        assert comments == [f": events of job {queued.id} after 0"] and first[0]["event"] == "queued"
        assert after_cancel[-1]["event"] == "cancelled"

        with http.stream("GET", url, headers={"Last-Event-ID": "2"}, params={"after": 0}) as resumed:
            rest = read_sse(resumed.iter_lines())  # the header wins over ?after=
        ids = [int(e["id"]) for e in rest]
        assert ids == list(range(3, 3 + len(ids))) and rest[0]["event"] == "progress"
        assert rest[-1]["event"] == "succeeded" and json.loads(rest[-1]["data"])["type"] == "succeeded"

        # A finished job: resuming from its last event closes at once; ?after= works like the header.
        last = ids[-1]
        with http.stream("GET", url, headers={"Last-Event-ID": str(last)}) as done:
            assert read_sse(done.iter_lines()) == []
        with http.stream("GET", url, params={"after": last - 1}) as tail:
            assert [e["event"] for e in read_sse(tail.iter_lines())] == ["succeeded"]

        bad = http.get(url, headers={"Last-Event-ID": "seven"})
        assert bad.status_code == 422 and bad.headers["content-type"].startswith("application/problem+json")
        assert bad.json()["field"] == "Last-Event-ID"
    with httpx.Client(headers={"Authorization": f"Bearer {service_stack.api_key('sse-stranger')}"}) as stranger:
        other = stranger.get(url)
        assert other.status_code == 404 and other.headers["content-type"].startswith("application/problem+json")
    assert httpx.get(url).status_code == 401

    # The client's own iterator over the same stream, resumed from the middle.
    assert [e.seq for e in vdu.stream_events(quick_job.id, after=3)] == list(range(4, last + 1))
    seen = []
    cancelled = vdu.wait(queued.id, timeout=60, on_event=seen.append)
    assert cancelled.status == "cancelled" and not cancelled.ok and seen[-1].type == "cancelled"


def test_a_job_is_waited_for_over_sse_and_its_checkpoint_downloads_verified(vdu, inputs, finished_job, tmp_path):
    model, forget_set = inputs
    job, done, seen = finished_job
    assert job.status in ("queued", "running") and done.id == job.id
    assert done.ok and done.done and done.checkpoint is not None, done.error
    assert [e.seq for e in seen] == list(range(1, len(seen) + 1))
    assert seen[0].type == "queued" and seen[-1].type == "succeeded"
    progress = [e.data for e in seen if e.type == "progress"]
    assert any(p["phase"] == "unlearn" and p["step"] == p["total"] == 3 for p in progress)
    assert all({"stability", "plasticity"} <= set(p["losses"]) for p in progress if p["phase"] == "unlearn")

    again = vdu.create_job(model=model.id, forget_set=forget_set.id, idempotency_key="client-quick-1", **QUICK_JOB)
    assert again.id == job.id  # the same key and body: the same job
    assert [e.seq for e in vdu.iter_events(job.id)] == [e.seq for e in seen]
    assert vdu.events(job.id, after=1, limit=1).data[0].seq == 2
    assert job.id in {j.id for j in vdu.list_jobs(status="succeeded")}
    assert job.id in {j.id for j in vdu.iter_jobs(status=["succeeded", "failed"])}
    assert vdu.get_job(job.id).metrics is not None

    artifacts = {a.name: a for a in vdu.list_artifacts(job.id)}
    assert artifacts["checkpoint.tar"].sha256 == done.checkpoint.sha256
    ticks = []
    result = vdu.download(job.id, dest=tmp_path, progress=lambda d, t: ticks.append((d, t)))
    assert result.verified and result.sha256 == done.checkpoint.sha256 and result.bytes == done.checkpoint.bytes
    assert hashlib.sha256(result.path.read_bytes()).hexdigest() == result.sha256
    assert ticks[-1] == (done.checkpoint.bytes, done.checkpoint.bytes)
    assert json.loads(vdu.read_artifact(job.id, "metrics.json"))

    with pytest.raises(ChecksumMismatch):
        vdu.download(job.id, "README.md", tmp_path / "card.md", expected_sha256="0" * 64)
    assert not (tmp_path / "card.md").exists() and not (tmp_path / "card.md.part").exists()
    with pytest.raises(APIError) as finished:
        vdu.cancel_job(job.id)
    assert finished.value.status == 409


def test_a_corrupted_stored_artifact_is_refused_by_the_sha256_check(vdu, finished_job, service_stack, tmp_path):
    """Bit rot in storage: the bytes served no longer hash to the recorded sha256 (the ETag)."""
    job = finished_job[1]
    env = service_stack.env
    bucket, _, prefix = env["VDU_STORAGE_URL"].removeprefix("s3://").partition("/")
    s3 = boto3.client("s3", endpoint_url=env["VDU_S3_ENDPOINT_URL"], region_name="us-east-1")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]]
    (key,) = [k for k in keys if job.id in k and k.endswith("/README.md")]
    body = bytearray(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    body[0] ^= 0xFF  # same length, one byte flipped
    s3.put_object(Bucket=bucket, Key=key, Body=bytes(body))
    with pytest.raises(ChecksumMismatch) as mismatch:
        vdu.download(job.id, "README.md", tmp_path)
    assert mismatch.value.expected == next(a.sha256 for a in vdu.list_artifacts(job.id) if a.name == "README.md")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ChecksumMismatch):
        vdu.read_artifact(job.id, "README.md")


class Flaky(http.server.BaseHTTPRequestHandler):
    """Answers 503 with ``Retry-After: 1``, then 429 with ``Retry-After: 0``, then 200."""

    answers: list[tuple[int, dict[str, str]]] = []
    seen: list[float] = []

    def do_GET(self):  # noqa: N802 - the http.server interface
        Flaky.seen.append(time.monotonic())
        status, headers = Flaky.answers.pop(0) if Flaky.answers else (200, {})
        body = json.dumps({"status": "ok"} if status == 200 else {"code": "busy", "detail": "busy"}).encode()
        self.send_response(status)
        for k, v in {**headers, "Content-Type": "application/json", "Content-Length": str(len(body))}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_retries_honour_retry_after_and_back_off_on_connection_errors():
    """A real loopback server that is busy twice; then a port nobody listens on."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Flaky.answers[:] = [(503, {"Retry-After": "1"}), (429, {"Retry-After": "0"})]
    Flaky.seen[:] = []
    try:
        with Client(f"http://127.0.0.1:{server.server_address[1]}", retry=RetryPolicy(base=0.01)) as c:
            assert c.livez() == {"status": "ok"}
        assert len(Flaky.seen) == 3 and Flaky.seen[1] - Flaky.seen[0] >= 0.95
        Flaky.answers[:] = [(503, {})] * 3
        with Client(f"http://127.0.0.1:{server.server_address[1]}", retry=RetryPolicy(attempts=2, base=0.01)) as c:
            with pytest.raises(APIError) as busy:
                c.livez()
        assert busy.value.status == 503 and busy.value.code == "busy"
    finally:
        server.shutdown()
    policy = RetryPolicy(attempts=3, base=0.05)
    t0 = time.monotonic()
    with Client(f"http://127.0.0.1:{free_port()}", retry=policy) as c, pytest.raises(TransportError):
        c.livez()
    assert time.monotonic() - t0 >= 0.05  # two jittered waits of 0.025-0.05 s and 0.05-0.1 s


def test_the_webhook_secret_rotates_and_deliveries_are_listed(vdu, finished_job):
    first = vdu.webhook_secret()
    assert first.secret.startswith("whsec_") and vdu.webhook_secret().secret == first.secret
    rotated = vdu.rotate_webhook_secret()
    assert rotated.secret != first.secret and rotated.rotated_at and rotated.previous_expires_at
    assert vdu.webhook_deliveries(finished_job[0].id) == []  # created without a webhook_url


class HalfThenRange(http.server.BaseHTTPRequestHandler):
    """Serves ``BODY``: the first full request breaks off halfway (the connection drops); a
    ``Range`` request with the right ``If-Range`` gets the rest (206)."""

    BODY = bytes(range(256)) * 4096
    ranges: list[str] = []

    def do_GET(self):  # noqa: N802 - the http.server interface
        etag = f'"{hashlib.sha256(self.BODY).hexdigest()}"'
        wanted = self.headers.get("Range")
        HalfThenRange.ranges.append(wanted or "")
        if wanted and self.headers.get("If-Range") == etag:
            start = int(wanted.removeprefix("bytes=").rstrip("-"))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(self.BODY) - 1}/{len(self.BODY)}")
            body = self.BODY[start:]
        else:
            self.send_response(200)
            body = self.BODY
        self.send_header("ETag", etag)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if wanted:
            self.wfile.write(body)
        else:
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)

    def log_message(self, *args):
        pass


def test_a_download_cut_off_halfway_resumes_with_range_and_is_verified(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HalfThenRange)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    HalfThenRange.ranges[:] = []
    try:
        with Client(f"http://127.0.0.1:{server.server_address[1]}", retry=RetryPolicy(base=0.01)) as c:
            result = c.download("job_x", dest=tmp_path / "ckpt.tar")
    finally:
        server.shutdown()
    half = len(HalfThenRange.BODY) // 2
    assert HalfThenRange.ranges == ["", f"bytes={half}-"]
    assert result.verified and (tmp_path / "ckpt.tar").read_bytes() == HalfThenRange.BODY
    assert list(tmp_path.iterdir()) == [tmp_path / "ckpt.tar"]
