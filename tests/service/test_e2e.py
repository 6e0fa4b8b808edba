"""End to end with real processes: uvicorn (the API), a Celery worker, Redis, Postgres and an S3 API
(moto on loopback). A team registers the tiny reference model, uploads a forget set of real MNIST
zeros, runs a job, downloads and verifies the sanitized checkpoint and loads it with diffusers."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import REPO, SERVICE_UPLOAD_LIMIT
from tests.service.helpers import tiny_model_archive
from tests.service.stack import Stack, rss_kib, wait_until
from worker.demo import forget_zip

pytestmark = pytest.mark.timeout(300)
TINY = REPO / "reference" / "mnist-ddpm-tiny"
UPLOAD_LIMIT = SERVICE_UPLOAD_LIMIT
# Service behaviour, not the method: the forget-image target with 'uniform' guidance weighting needs no
# anchors and no recorded paths (the default trajectory target records 1,024 of the model's own paths).
# The first test runs the real defaults.
FAST_PARAMS = {
    "plasticity_target": "negative_guidance",
    "steps": 3,
    "batch_size": 4,
    "anchor_weight": 0,
    "self_forget_fraction": 0,
    "guidance_weighting": "uniform",
}
#: The library's default parameters (anchors, posterior-weighted guidance, auto posterior) but for steps.
DEFAULT_PARAMS = {"steps": 3}
EVALUATION = {"num_samples": 8, "grid_samples": 8, "sample_steps": 4, "forget_class": 0}
FINAL = ("succeeded", "failed", "cancelled")


@pytest.fixture(scope="module")
def stack(service_stack) -> Stack:
    return service_stack


def lineage_archive(step_dir: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for f in sorted(step_dir.iterdir()):
            tf.add(f, arcname=f"{step_dir.name}/{f.name}")
    return buf.getvalue()


def poll(client: httpx.Client, job_id: str, until, timeout: float) -> tuple[dict, list[str]]:
    seen: list[str] = []

    def check():
        job = client.get(f"/v1/jobs/{job_id}").json()
        if not seen or seen[-1] != job["status"]:
            seen.append(job["status"])
        return job if until(job) else None

    return wait_until(check, timeout, interval=0.25, what=f"job {job_id}"), seen


@pytest.fixture(scope="module")
def team_inputs(stack):
    headers = stack.team("moderation-a")
    with stack.client(headers) as c:
        lineage = sorted((TINY / "lineage").iterdir())
        files = [("file", ("mnist-ddpm-tiny.tar", tiny_model_archive(), "application/x-tar"))]
        files += [("lineage", (f"{d.name}.tar", lineage_archive(d), "application/x-tar")) for d in lineage]
        model = c.post("/v1/models", files=files, data={"name": "mnist-ddpm-tiny"})
        assert model.status_code == 201, model.text
        fs = c.post(
            "/v1/forget-sets",
            files={"file": ("zeros.zip", forget_zip(0, 8), "application/zip")},
            data={"name": "the digit zero"},
        )
        assert fs.status_code == 201, fs.text
    assert model.json()["format"] == "diffusers_pipeline" and len(model.json()["lineage"]) == len(lineage)
    assert fs.json()["image_count"] == 8
    return headers, model.json()["id"], fs.json()["id"]


@pytest.mark.timeout(540)  # the default job records 2,048 paths even on the tiny model: ~2.5 min here
def test_a_team_unlearns_a_digit_and_downloads_a_loadable_checkpoint(stack, team_inputs, tmp_path):
    headers, model_id, fs_id = team_inputs
    body = {
        "model": model_id,
        "forget_set": fs_id,
        "method": "vdu",
        "params": DEFAULT_PARAMS,  # the default path end to end (posterior "auto": the lineage uploaded)
        "evaluation": EVALUATION,
    }
    with stack.client(headers) as c:
        first = c.post("/v1/jobs", json=body, headers={"Idempotency-Key": "e2e-run-1"})
        assert first.status_code == 201, first.text
        job_id = first.json()["id"]
        retry = c.post("/v1/jobs", json=body, headers={"Idempotency-Key": "e2e-run-1"})
        assert retry.status_code == 200 and retry.json()["id"] == job_id

        with stack.client(stack.team("moderation-b")) as stranger:
            for path in (
                f"/v1/jobs/{job_id}",
                f"/v1/jobs/{job_id}/events",
                f"/v1/forget-sets/{fs_id}",
                f"/v1/models/{model_id}",
            ):
                r = stranger.get(path)
                assert r.status_code == 404 and r.headers["content-type"].startswith("application/problem+json")
            assert stranger.post(f"/v1/jobs/{job_id}/cancel").status_code == 404

        job, seen = poll(c, job_id, lambda j: j["status"] in FINAL, timeout=420)
        assert job["status"] == "succeeded", (job["error"], stack.worker.log()[-3000:])
        assert seen[-1] == "succeeded" and "queued" not in seen[1:]
        assert job["attempt"] == 1 and job["started_at"] and job["finished_at"]
        assert {"pul", "forget_loss_ratio", "u_fid_ratio"} <= set(job["metrics"])
        events = c.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
        types = [e["type"] for e in events]
        assert types[:2] == ["queued", "started"] and types[-1] == "succeeded"
        phases = {e["data"].get("phase") for e in events if e["type"] == "progress"}
        assert "unlearn" in phases and "anchors" in phases  # the defaults sample anchors
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))

        # the checkpoint: streamed, its sha256 announced three ways and true
        checkpoint = job["checkpoint"]
        archive = tmp_path / "checkpoint.tar"
        digest = hashlib.sha256()
        with c.stream("GET", f"/v1/jobs/{job_id}/artifacts/checkpoint") as resp:
            assert resp.status_code == 200
            assert int(resp.headers["content-length"]) == checkpoint["bytes"]
            assert resp.headers["etag"] == f'"{checkpoint["sha256"]}"'
            with open(archive, "wb") as fh:
                for chunk in resp.iter_bytes():
                    digest.update(chunk)
                    fh.write(chunk)
        assert digest.hexdigest() == checkpoint["sha256"]
        part = c.get(f"/v1/jobs/{job_id}/artifacts/checkpoint", headers={"Range": "bytes=0-511"})
        assert part.status_code == 206 and part.content == archive.read_bytes()[:512]
        after = c.get(f"/v1/jobs/{job_id}/artifacts/samples/after.png")
        assert after.status_code == 200 and after.content[:8] == b"\x89PNG\r\n\x1a\n"
        assert c.get(f"/v1/jobs/{job_id}/artifacts/samples/before.png").status_code == 200
        assert "pul" in c.get(f"/v1/jobs/{job_id}/artifacts/metrics.json").json()["metrics"]
        assert c.get(f"/v1/jobs/{job_id}/artifacts/README.md").status_code == 200

    folder = tmp_path / "pipeline"
    with tarfile.open(archive) as tf:
        tf.extractall(folder, filter="data")
    import torch
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(folder)
    assert pipe.unet.config.sample_size == 28
    with torch.no_grad():
        image = pipe(batch_size=1, num_inference_steps=2, output_type="np", generator=torch.manual_seed(0)).images
    assert image.shape == (1, 28, 28, 1)


def test_cancelling_a_running_job_stops_it_within_seconds(stack, team_inputs):
    headers, model_id, fs_id = team_inputs
    body = {
        "model": model_id,
        "forget_set": fs_id,
        "params": {**FAST_PARAMS, "steps": 2000, "posterior": "isotropic"},
        "evaluation": {**EVALUATION, "enabled": False},
    }
    with stack.client(headers) as c:
        job_id = c.post("/v1/jobs", json=body).json()["id"]
        job, _ = poll(
            c,
            job_id,
            lambda j: j["status"] == "running" and (j["progress"] or {}).get("phase") == "unlearn",
            timeout=120,
        )
        assert job["progress"]["total"] == 2000
        t0 = time.monotonic()
        resp = c.post(f"/v1/jobs/{job_id}/cancel")
        assert resp.status_code == 200 and resp.json()["status"] in ("cancelling", "cancelled")
        job, seen = poll(c, job_id, lambda j: j["status"] in FINAL, timeout=30)
        elapsed = time.monotonic() - t0
        assert job["status"] == "cancelled" and elapsed < 10, (elapsed, seen)
        assert job["progress"]["step"] < 2000
        types = [e["type"] for e in c.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]]
        assert "cancel_requested" in types and types[-1] == "cancelled"
        assert c.get(f"/v1/jobs/{job_id}/artifacts").status_code == 409


def test_an_oversized_upload_is_refused_while_streaming_with_bounded_memory(stack):
    headers = stack.team("moderation-big")
    pid = stack.api.pid
    baseline = rss_kib(pid)
    peak = [baseline]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_kib(pid))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    chunk = os.urandom(1024 * 1024)

    def body():
        yield b'--B0undary\r\nContent-Disposition: form-data; name="file"; filename="huge.zip"\r\n\r\n'
        for _ in range(3 * UPLOAD_LIMIT // len(chunk)):
            yield chunk
        yield b"\r\n--B0undary--\r\n"

    try:
        with stack.client(headers) as c:
            resp = c.post(
                "/v1/forget-sets", content=body(), headers={"Content-Type": "multipart/form-data; boundary=B0undary"}
            )
    finally:
        stop.set()
        sampler.join()
    assert resp.status_code == 413, resp.text
    assert resp.json()["field"] == "file" and resp.headers["content-type"].startswith("application/problem+json")
    growth_mib = (peak[0] - baseline) / 1024
    assert growth_mib < 24, f"API memory grew by {growth_mib:.0f} MiB during a {3 * UPLOAD_LIMIT >> 20} MiB upload"
    uploads = Path(stack.env["VDU_UPLOAD_TMP_DIR"])
    assert not uploads.exists() or list(uploads.iterdir()) == []
    with stack.client(headers) as c:
        assert c.get("/v1/forget-sets").json()["data"] == []
