"""The ``vdu`` command, run as a subprocess against the real service (the shared ``service_stack``):
configure, upload, create, watch to the end (SSE, and polling), download with its checksum checked,
list, cancel, and the error paths a user meets (a wrong checksum, a bad key)."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys

import pytest

from tests.service.test_client import LONG_JOB, QUICK_JOB, write_inputs

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def vdu(service_stack, tmp_path_factory):
    """``vdu(*args)``: the installed ``vdu`` console script with a private config folder and no
    VDU_* variables of the service in its environment."""
    home = tmp_path_factory.mktemp("vdu-home")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VDU_")}
    env.update({"HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"), "COLUMNS": "120"})
    exe = os.path.join(os.path.dirname(sys.executable), "vdu")
    command = [exe] if os.path.exists(exe) else [sys.executable, "-m", "vdu_client.cli"]

    def run(*args: str, check: int | None = 0, extra_env: dict[str, str] | None = None, timeout: float = 120):
        proc = subprocess.run(
            [*command, *args],
            cwd=home,
            env={**env, **(extra_env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check is not None:
            assert proc.returncode == check, (args, proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
        return proc

    run.home = home
    return run


@pytest.fixture(scope="module")
def configured(vdu, service_stack):
    key = service_stack.api_key("cli-team")
    out = vdu("configure", "--endpoint", service_stack.base, "--api-key", key)
    path = vdu.home / ".config" / "vdu" / "config.json"
    assert str(path) in out.stdout
    return key, path


def as_json(proc: subprocess.CompletedProcess):
    return json.loads(proc.stdout)


def test_configure_stores_the_key_readable_by_its_owner_only(vdu, configured, service_stack):
    key, path = configured
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert json.loads(path.read_text()) == {"endpoint": service_stack.base, "api_key": key}
    assert "ready" in vdu("health", "--json").stdout
    bad = vdu("jobs", "list", check=1, extra_env={"VDU_API_KEY": "vdu_revoked_or_wrong"})  # env beats the file
    assert "401 unauthorized" in bad.stderr and "Authorization" in bad.stderr and bad.stdout == ""
    nowhere = vdu("jobs", "list", "--endpoint", "http://127.0.0.1:9", "--retries", "1", check=5)
    assert "cannot reach the service" in nowhere.stderr


@pytest.fixture(scope="module")
def two_jobs(vdu, configured, tmp_path_factory):
    """Uploads and two jobs made with the CLI: a quick one, and a long one queued behind it and
    cancelled before it starts."""
    files = write_inputs(tmp_path_factory.mktemp("cli-inputs"))
    model = as_json(
        vdu("models", "upload", str(files["model"]), "--name", "tiny", "--lineage", str(files["lineage0"]),
            "--lineage", str(files["lineage1"]), "--json")
    )
    forget_set = as_json(vdu("forget-sets", "upload", str(files["forget_set"]), "--name", "zeros", "--json"))
    quick = as_json(
        vdu("jobs", "create", "--model", model["id"], "--forget-set", forget_set["id"], "--json",
            "--params", json.dumps(QUICK_JOB["params"]), "--param", "steps=4", "--eval", "enabled=false")
    )
    long = as_json(
        vdu("jobs", "create", "--model", model["id"], "--forget-set", forget_set["id"], "--json",
            "--params", json.dumps(LONG_JOB["params"]), "--evaluation", json.dumps(LONG_JOB["evaluation"]))
    )
    cancelled = as_json(vdu("jobs", "cancel", long["id"], "--json"))
    assert cancelled["status"] in ("cancelled", "cancelling")
    return model, forget_set, quick, long


def test_upload_create_watch_and_download_a_verified_checkpoint(vdu, two_jobs, tmp_path):
    model, forget_set, job, _ = two_jobs
    assert model["format"] == "diffusers_pipeline" and forget_set["image_count"] == 8
    assert forget_set["id"] in vdu("forget-sets", "list").stdout and model["id"] in vdu("models", "list").stdout
    assert job["params"]["steps"] == 4 and job["evaluation"]["enabled"] is False

    watched = vdu("jobs", "watch", job["id"])
    assert "[1] queued" in watched.stderr and "succeeded" in watched.stderr
    assert "4/4" in watched.stderr and "stability=" in watched.stderr and "plasticity=" in watched.stderr
    assert "eta=" in watched.stderr
    assert "succeeded" in watched.stdout and "checkpoint:" in watched.stdout

    listed = vdu("jobs", "list", "--status", "succeeded")
    assert job["id"] in listed.stdout and listed.stdout.splitlines()[0].split()[:2] == ["ID", "STATUS"]
    artifacts = {a["name"]: a for a in as_json(vdu("jobs", "artifacts", job["id"], "--json"))}
    expected = artifacts["checkpoint.tar"]["sha256"]

    out = tmp_path / "download"
    out.mkdir()
    done = vdu("download", job["id"], "-o", str(out))
    path = out / f"{job['id']}-checkpoint.tar"
    assert f"sha256 {expected} (verified)" in done.stdout and "checkpoint" in done.stderr  # the bar
    assert hashlib.sha256(path.read_bytes()).hexdigest() == expected

    wrong = vdu("download", job["id"], "metrics.json", "-o", str(out / "m.json"), "--sha256", "ab" * 32, check=3)
    assert "checksum mismatch" in wrong.stderr and not (out / "m.json").exists()
    gone = vdu("jobs", "get", "job_00000000000000000000000000", check=1)
    assert "404 not_found" in gone.stderr
    finished = vdu("jobs", "cancel", job["id"], check=1)
    assert "409 conflict" in finished.stderr


def test_a_cancelled_job_is_watched_to_its_end_by_polling(vdu, two_jobs):
    job = two_jobs[3]
    watched = vdu("jobs", "watch", job["id"], "--no-stream", "--interval", "0.5", "--json", check=4)
    lines = [json.loads(line) for line in watched.stdout.splitlines()]
    assert lines[-2]["type"] == "cancelled" and lines[-1]["status"] == "cancelled"
    assert [e["seq"] for e in lines[:-1]] == list(range(1, len(lines)))
    events = as_json(vdu("jobs", "events", job["id"], "--json"))
    assert [e["seq"] for e in events] == [e["seq"] for e in lines[:-1]]
    assert "cancelled" in vdu("jobs", "get", job["id"]).stdout
    secret = as_json(vdu("webhooks", "secret", "--json"))["secret"]
    assert secret.startswith("whsec_") and secret in vdu("webhooks", "secret").stdout
    assert as_json(vdu("webhooks", "secret", "--rotate", "--json"))["secret"] != secret
    assert as_json(vdu("webhooks", "deliveries", job["id"], "--json")) == []
