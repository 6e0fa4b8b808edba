"""The API process must never import torch, vdu_core.run or the worker (checked in a fresh interpreter,
after it has served uploads and job creation)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.service.conftest import REDIS_URL, REPO

pytestmark = pytest.mark.timeout(120)

SCRIPT = r"""
import json, sys
from fastapi.testclient import TestClient
import api.main
from api.keys import create_key
from jobs.db import session_scope
from jobs.settings import Settings
from tests.service.helpers import make_team, zip_bytes, png_bytes, tiny_model_archive

settings = Settings()
with TestClient(api.main.create_app(settings, configure_logs=False)) as client:
    with session_scope(settings) as s:
        key = create_key(s, make_team(s)).key
    h = {"Authorization": f"Bearer {key}"}
    archive = zip_bytes({"a.png": png_bytes()})
    fs = client.post("/v1/forget-sets", headers=h, files={"file": ("a.zip", archive)})
    model = client.post("/v1/models", headers=h, files={"file": ("m.tar", tiny_model_archive())})
    job = client.post("/v1/jobs", headers=h, json={"model": model.json()["id"], "forget_set": fs.json()["id"],
                                                   "params": {"steps": 2}})
    statuses = [fs.status_code, model.status_code, job.status_code]
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "worker", "diffusers", "torchvision",
                                                            "transformers", "peft")
               or m == "vdu_core.run")
print(json.dumps({"statuses": statuses, "heavy": heavy}))
"""


def test_the_api_process_never_imports_torch_or_the_worker(pg_url, redis_prefix, tmp_path):
    env = {
        **os.environ,
        "VDU_DATABASE_URL": pg_url,
        "VDU_BROKER_URL": REDIS_URL,
        "VDU_BROKER_KEY_PREFIX": redis_prefix,
        "VDU_STORAGE_URL": str(tmp_path / "storage"),
        "PYTHONPATH": str(REPO),
    }
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=100)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["statuses"] == [201, 201, 201]
    assert result["heavy"] == []
