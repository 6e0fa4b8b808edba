"""The embedded mode: one command, SQLite and local disk, an in-process worker thread running the
same job function as the Celery task, behind the same API."""

from __future__ import annotations

import hashlib
import os
import sys

import httpx
import pytest

from tests.service.conftest import REPO
from tests.service.helpers import tiny_model_archive
from tests.service.stack import Proc, free_port, wait_until
from tests.service.test_e2e import EVALUATION, FAST_PARAMS
from worker.demo import forget_zip

pytestmark = pytest.mark.timeout(240)


def test_one_command_serves_the_api_and_runs_a_job_in_process(tmp_path):
    data = tmp_path / "var"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VDU_")}
    env.update(
        {
            "OMP_WAIT_POLICY": "PASSIVE",
            "PYTHONPATH": str(REPO),
            "VDU_LOG_JSON": "false",
            "VDU_MODEL_CACHE_DIR": str(tmp_path / "cache"),
            "VDU_WORKER_TMP_DIR": str(tmp_path),
        }
    )
    proc = Proc(
        "embedded",
        [sys.executable, "-m", "worker.embedded", "serve", "--port", str(port), "--data-dir", str(data)],
        env,
        tmp_path,
    )
    base = f"http://127.0.0.1:{port}"
    try:

        def ready():
            assert proc.alive(), proc.log()[-3000:]
            try:
                return httpx.get(f"{base}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, 90, what="the embedded service")
        assert (data / "vdu.db").is_file() and (data / "storage").is_dir()
        key_file = data / "api-key"
        assert oct(key_file.stat().st_mode & 0o777) == "0o600"
        key = key_file.read_text().strip()
        assert key in proc.log()  # shown once, at first start
        checks = httpx.get(f"{base}/readyz").json()["checks"]
        assert checks == {"database": "ok", "broker": "ok", "storage": "ok"}

        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=60) as c:
            model = c.post("/v1/models", files={"file": ("tiny.tar", tiny_model_archive())}).json()
            fs = c.post("/v1/forget-sets", files={"file": ("zeros.zip", forget_zip(0, 8))}).json()
            job = c.post(
                "/v1/jobs",
                json={
                    "model": model["id"],
                    "forget_set": fs["id"],
                    "params": {**FAST_PARAMS, "posterior": "isotropic"},
                    "evaluation": EVALUATION,
                },
            )
            assert job.status_code == 201, job.text
            job_id = job.json()["id"]
            done = wait_until(
                lambda: (
                    (j := c.get(f"/v1/jobs/{job_id}").json())["status"] in ("succeeded", "failed", "cancelled") and j
                ),
                180,
                interval=0.5,
                what="the job",
            )
            assert done["status"] == "succeeded", (done["error"], proc.log()[-3000:])
            resp = c.get(f"/v1/jobs/{job_id}/artifacts/checkpoint")
            assert hashlib.sha256(resp.content).hexdigest() == done["checkpoint"]["sha256"]
            # the artifacts live on local disk, under the team's prefix
            assert list((data / "storage" / "teams").glob(f"*/jobs/{job_id}/checkpoint.tar"))
        assert "attempt 1 started" in proc.log() and "worker.runner" in proc.log()
    finally:
        proc.stop()
    # a restart reuses the database: no new key is created
    proc = Proc(
        "embedded2",
        [sys.executable, "-m", "worker.embedded", "serve", "--port", str(port), "--data-dir", str(data)],
        env,
        tmp_path,
    )
    try:

        def up():
            assert proc.alive(), proc.log()[-3000:]
            try:
                return httpx.get(f"{base}/livez", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, 90, what="the restart")
        assert "created team" not in proc.log()
    finally:
        proc.stop()
