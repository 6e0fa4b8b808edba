"""The job service under load, with real processes on loopback.

    python bench/bench_service.py [--jobs 3] [--clients 50] [--requests 3000] [--load-seconds 20]
                                  [--upload-mib 200] [--json out.json]

Starts, on 127.0.0.1 only: a fresh Postgres database (in the running server), a private Redis
(``redis-server`` on a free port; else the shared one under a key prefix), moto's S3 server, the
migration (``python -m jobs.migrate``), the API (``python -m api.serve``) and a Celery worker
(``python -m worker.cli``). A team and key come from ``python -m api.admin``; the reference model
``reference/mnist-ddpm-tiny`` is uploaded as an archive and a forget set of 20 real MNIST zeros
(``scripts/make_forget_set.py``) as a zip. Then it measures:

(a) time from ``POST /v1/jobs`` to status ``running`` with an idle worker (median of ``--jobs`` jobs,
    each cancelled once running), seen by a client polling every 10 ms and in the ledger
    (``started_at - created_at``);
(b) with a job training in the background: latency p50/p99 and requests per second of
    ``GET /v1/jobs/{id}`` from ``--clients`` concurrent clients (a fixed number of requests, bounded in
    time), and how far the training got meanwhile; then the job is cancelled;
(c) the API process's resident memory while a ``--upload-mib`` MiB zip streams into
    ``POST /v1/forget-sets``: peak over the baseline just before (the kernel's high-water mark,
    reset before the upload, and 5 ms samples). It must stream to disk, not buffer.

The worker trains on the CPU here (torch limited to ``--worker-threads`` threads, standing in for a
GPU job that leaves the CPUs to the API). Everything stops by itself (``--max-seconds``) and is
removed at the end: processes, the database, the Redis keys, the temporary folder.
"""

from __future__ import annotations

import _thread
import argparse
import asyncio
import io
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import zipfile
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

from tests.service.stack import Proc, free_port, proc_status, wait_until  # noqa: E402

TINY = REPO / "reference" / "mnist-ddpm-tiny"
MODEL_FILES = (
    "model_index.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "scheduler/scheduler_config.json",
)
MiB = 1024 * 1024
FINAL = ("succeeded", "failed", "cancelled")
# Jobs that start training at once (no posterior estimation, no anchor sampling) and are cancelled.
SHORT_JOB = {"steps": 2000, "batch_size": 4, "posterior": "isotropic", "anchor_weight": 0}


def short_job() -> dict:
    """SHORT_JOB, with self-forget sampling off where the library has it (it samples anchors)."""
    import dataclasses

    from vdu_core.config import UnlearnConfig

    names = {f.name for f in dataclasses.fields(UnlearnConfig)}
    return {**SHORT_JOB, **({"self_forget_fraction": 0.0} if "self_forget_fraction" in names else {})}


NO_EVAL = {"enabled": False}


# --- processes (free_port, wait_until, Proc, proc_status: tests/service/stack.py) -------------
def reset_peak_rss(pid: int) -> bool:
    """Reset the kernel's high-water mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return proc_status(pid, "VmHWM") <= proc_status(pid, "VmRSS") + 1024


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def group_cpu_seconds(pid: int) -> float:
    return sum(cpu_seconds(p) for p in [pid, *descendants(pid)])


# --- the stack ---------------------------------------------------------------------------------
class Stack:
    def __init__(self, args):
        self.args = args
        self.root = Path(tempfile.mkdtemp(prefix="vdu-bench-"))
        self.procs: list[Proc] = []
        self.database: str | None = None
        self.redis_url = args.redis_url
        self.redis_prefix = f"vdu_bench_{secrets.token_hex(4)}:"
        self.private_redis = False
        self.env: dict[str, str] = {}
        self.base = ""
        self.api: Proc | None = None
        self.worker: Proc | None = None
        self.info: dict[str, str] = {}
        self.timings: dict[str, float] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        proc = Proc(name, argv, env or self.env, self.root)
        self.procs.append(proc)
        return proc

    def up(self) -> None:
        import psycopg

        t0 = time.perf_counter()
        name = f"vdu_bench_{secrets.token_hex(4)}"
        with psycopg.connect(self.args.pg_admin, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
            self.info["postgres"] = conn.execute("SHOW server_version").fetchone()[0]
        self.database = name
        pg_url = self.args.pg_url.format(db=name)

        base_env = {k: v for k, v in os.environ.items() if not k.startswith("VDU_")}
        base_env.update({"OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"})
        if shutil.which("redis-server") and not self.args.shared_redis:
            port = free_port()
            redis_proc = self.start(
                "redis",
                [
                    "redis-server",
                    "--bind",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.root),
                ],
                base_env,
            )
            self.redis_url = f"redis://127.0.0.1:{port}/0"
            self.private_redis = True
            wait_until(lambda: redis_proc.check() or _redis_ping(self.redis_url), 20, interval=0.1, what="redis-server")
        else:
            assert _redis_ping(self.redis_url), f"no Redis at {self.redis_url}"

        s3_port = free_port()
        s3 = self.start("s3", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)], base_env)
        endpoint = f"http://127.0.0.1:{s3_port}"
        wait_until(lambda: s3.check() or _http_ok(endpoint + "/moto-api/"), 60, interval=0.1, what="the S3 server")
        bucket = "vdu-bench"
        _s3_client(endpoint).create_bucket(Bucket=bucket)

        self.env = {
            **base_env,
            "VDU_DATABASE_URL": pg_url,
            "VDU_BROKER_URL": self.redis_url,
            "VDU_BROKER_KEY_PREFIX": self.redis_prefix,
            "VDU_STORAGE_URL": f"s3://{bucket}/vdu",
            "VDU_S3_ENDPOINT_URL": endpoint,
            "VDU_S3_ACCESS_KEY_ID": "testing",
            "VDU_S3_SECRET_ACCESS_KEY": "testing",
            "VDU_UPLOAD_TMP_DIR": str(self.root / "uploads"),
            "VDU_WORKER_TMP_DIR": str(self.root / "work"),
            "VDU_MODEL_CACHE_DIR": str(self.root / "cache"),
            "VDU_CACHE_DIR": str(self.root / "cache" / "vdu-core"),
            "VDU_MAX_STEPS": "20000",
            # (c) streams the whole body: a limit above the upload (the default, 256 MiB, may change)
            "VDU_MAX_FORGET_SET_UPLOAD_BYTES": str((self.args.upload_mib + 16) * MiB),
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
        }
        (self.root / "work").mkdir()
        self.timings["services (db, redis, s3)"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "jobs.migrate"],
            cwd=REPO,
            env=self.env,
            check=True,
            capture_output=True,
            timeout=120,
        )
        self.timings["python -m jobs.migrate"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        port = free_port()
        self.api = self.start(
            "api", [self.args.api_python, "-m", "api.serve", "--host", "127.0.0.1", "--port", str(port)]
        )
        self.base = f"http://127.0.0.1:{port}"
        wait_until(lambda: self.api.check() or _http_ok(self.base + "/livez"), 90, interval=0.1, what="the API")
        self.timings["API up (/livez)"] = time.perf_counter() - t0
        probe = "import importlib.util as u; print(*(m for m in ('httptools', 'uvloop') if u.find_spec(m)))"
        extras = subprocess.run([self.args.api_python, "-c", probe], capture_output=True, text=True, timeout=30)
        self.info["uvicorn"] = " + ".join(extras.stdout.split()) or "h11 + asyncio"

        t0 = time.perf_counter()
        worker_env = {**self.env, "OMP_NUM_THREADS": str(self.args.worker_threads)}
        self.worker = self.start("worker", [sys.executable, "-m", "worker.cli"], worker_env)
        wait_until(
            lambda: self.worker.check() or " ready." in self.worker.log(), 120, interval=0.1, what="the Celery worker"
        )
        self.timings["worker ready"] = time.perf_counter() - t0
        wait_until(lambda: _http_ok(self.base + "/readyz"), 30, interval=0.1, what="/readyz")

    def admin(self, *argv: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "api.admin", *argv],
            cwd=REPO,
            env=self.env,
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return out.stdout.strip()

    def down(self) -> None:
        for proc in reversed(self.procs):
            try:
                proc.stop(20.0)
            except Exception as exc:  # keep cleaning
                print(f"warning: stopping {proc.name}: {exc}", file=sys.stderr)
        if self.args.keep_logs:
            print(f"logs kept in {self.root}", file=sys.stderr)
        if self.database:
            try:
                import psycopg

                with psycopg.connect(self.args.pg_admin, autocommit=True, connect_timeout=10) as conn:
                    conn.execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
            except Exception as exc:
                print(f"warning: could not drop database {self.database}: {exc}", file=sys.stderr)
        if not self.private_redis:
            try:
                import redis

                r = redis.Redis.from_url(self.redis_url)
                keys = list(r.scan_iter(match=self.redis_prefix + "*", count=1000))
                if keys:
                    r.delete(*keys)
            except Exception as exc:
                print(f"warning: could not delete Redis keys {self.redis_prefix}*: {exc}", file=sys.stderr)
        if not self.args.keep_logs:
            shutil.rmtree(self.root, ignore_errors=True)


def _redis_ping(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2).ping())
    except redis.RedisError:
        return False


def _http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _s3_client(endpoint: str):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


# --- inputs ------------------------------------------------------------------------------------
def model_archive() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for rel in MODEL_FILES:
            tf.add(TINY / rel, arcname=f"mnist-ddpm-tiny/{rel}")
    return buf.getvalue()


def forget_zip(path: Path, count: int = 20) -> Path:
    from scripts.make_forget_set import write_forget_zip

    n = write_forget_zip(0, count, str(path))
    assert n == count, f"only {n} images"
    return path


def big_zip(path: Path, small: Path, size: int) -> Path:
    """A stored zip of about ``size`` bytes: the small forget set's PNGs and one large member."""
    block = os.urandom(MiB)
    with zipfile.ZipFile(small) as src, zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for info in src.infolist():
            zf.writestr(info.filename, src.read(info))
        remaining = size - path.stat().st_size - 4096
        with zf.open("zz_large.png", "w", force_zip64=True) as fh:
            while remaining > 0:
                fh.write(block[: min(remaining, MiB)])
                remaining -= MiB
    return path


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


# --- measurements ------------------------------------------------------------------------------
class Bench:
    def __init__(self, stack: Stack, args):
        self.stack = stack
        self.args = args
        self.client: httpx.Client | None = None
        self.model_id = ""
        self.forget_set_id = ""
        self.results: dict = {}

    def setup_inputs(self) -> None:
        self.stack.admin("create-team", "bench")
        key = self.stack.admin("create-key", "bench")
        self.headers = {"Authorization": f"Bearer {key}"}
        self.client = httpx.Client(base_url=self.stack.base, headers=self.headers, timeout=60)
        t0 = time.perf_counter()
        r = self.client.post(
            "/v1/models",
            files={"file": ("mnist-ddpm-tiny.tar", model_archive(), "application/x-tar")},
            data={"name": "mnist-ddpm-tiny"},
        )
        assert r.status_code == 201, r.text
        self.model_id = r.json()["id"]
        self.stack.timings["POST /v1/models (tar upload)"] = time.perf_counter() - t0
        self.small_zip = forget_zip(self.stack.root / "zeros.zip")
        t0 = time.perf_counter()
        with open(self.small_zip, "rb") as fh:
            r = self.client.post(
                "/v1/forget-sets",
                files={"file": ("zeros.zip", fh, "application/zip")},
                data={"name": "zeros"},
            )
        assert r.status_code == 201, r.text
        assert r.json()["image_count"] == 20
        self.forget_set_id = r.json()["id"]
        self.stack.timings["POST /v1/forget-sets (20 PNGs)"] = time.perf_counter() - t0

    def job_body(self, params: dict) -> dict:
        return {
            "model": self.model_id,
            "forget_set": self.forget_set_id,
            "params": params,
            "evaluation": NO_EVAL,
        }

    def get_job(self, job_id: str) -> dict:
        r = self.client.get(f"/v1/jobs/{job_id}")
        assert r.status_code == 200, r.text
        return r.json()

    def wait_status(self, job_id: str, until, timeout: float, what: str) -> dict:
        def check():
            self.stack.worker.check()
            job = self.get_job(job_id)
            if job["status"] == "failed" and not until(job):
                raise RuntimeError(f"job {job_id} failed: {job['error']}\n{self.stack.worker.log()[-3000:]}")
            return job if until(job) else None

        return wait_until(check, timeout, interval=0.25, what=what)

    def cancel(self, job_id: str, timeout: float = 180) -> tuple[dict, float]:
        t0 = time.perf_counter()
        r = self.client.post(f"/v1/jobs/{job_id}/cancel")
        assert r.status_code == 200, r.text
        job = self.wait_status(job_id, lambda j: j["status"] in FINAL, timeout, f"job {job_id} to end")
        assert job["status"] == "cancelled", job
        return job, time.perf_counter() - t0

    def idle_worker(self) -> None:
        """No job running, and the pool's fresh child (one per job) is in place."""
        r = self.client.get("/v1/jobs", params={"status": ["queued", "running", "cancelling"]})
        assert r.status_code == 200 and r.json()["data"] == [], r.text
        time.sleep(self.args.settle)

    # (a) ------------------------------------------------------------------------------------
    def time_to_running(self) -> None:
        seen, ledger, post, cancel = [], [], [], []
        for i in range(self.args.jobs):
            self.idle_worker()
            t0 = time.perf_counter()
            r = self.client.post("/v1/jobs", json=self.job_body(short_job()))
            post.append(time.perf_counter() - t0)
            assert r.status_code == 201, r.text
            job_id = r.json()["id"]
            deadline = time.monotonic() + 120
            while True:
                job = self.get_job(job_id)
                if job["status"] != "queued":
                    seen.append(time.perf_counter() - t0)
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"job {i} still queued after 120 s:\n{self.stack.worker.log()[-3000:]}")
                self.stack.worker.check()
                time.sleep(0.01)
            assert job["status"] in ("running", "cancelling", "cancelled", "succeeded"), job
            ledger.append((parse_time(job["started_at"]) - parse_time(job["created_at"])).total_seconds())
            _, took = self.cancel(job_id)
            cancel.append(took)
        self.results["a"] = {"client_s": seen, "ledger_s": ledger, "post_s": post, "cancel_s": cancel}

    # (b) ------------------------------------------------------------------------------------
    def poll_load(self) -> None:
        steps = 20000
        r = self.client.post("/v1/jobs", json=self.job_body({**short_job(), "steps": steps}))
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        job = self.wait_status(
            job_id,
            lambda j: j["status"] == "running" and (j["progress"] or {}).get("phase") == "unlearn",
            240,
            "the background job to train",
        )
        step0, t_step0 = job["progress"]["step"], time.perf_counter()
        api_cpu0, worker_cpu0, me0 = (
            cpu_seconds(self.stack.api.pid),
            group_cpu_seconds(self.stack.worker.pid),
            time.process_time(),
        )
        latencies, errors, elapsed = asyncio.run(self._load(f"/v1/jobs/{job_id}"))
        api_cpu = cpu_seconds(self.stack.api.pid) - api_cpu0
        worker_cpu = group_cpu_seconds(self.stack.worker.pid) - worker_cpu0
        client_cpu = time.process_time() - me0
        job = self.get_job(job_id)
        assert job["status"] == "running", f"the background job did not last through the load: {job['status']}"
        step1, t_step1 = job["progress"]["step"], time.perf_counter()
        _, cancel_s = self.cancel(job_id)
        latencies.sort()
        self.results["b"] = {
            "clients": self.args.clients,
            "requests": len(latencies),
            "errors": errors,
            "elapsed_s": elapsed,
            "rps": len(latencies) / elapsed,
            "p50_ms": 1000 * _percentile(latencies, 50),
            "p99_ms": 1000 * _percentile(latencies, 99),
            "max_ms": 1000 * latencies[-1],
            "cpu_s": {"api": api_cpu, "worker": worker_cpu, "clients": client_cpu},
            "training_steps": [step0, step1],
            "training_steps_per_s": (step1 - step0) / (t_step1 - t_step0),
            "steps_total": steps,
            "cancel_s": cancel_s,
        }

    async def _load(self, path: str) -> tuple[list[float], int, float]:
        n_clients, total = self.args.clients, self.args.requests
        latencies: list[float] = []
        errors = 0
        issued = 0
        limits = httpx.Limits(max_connections=n_clients, max_keepalive_connections=n_clients)
        async with httpx.AsyncClient(
            base_url=self.stack.base, headers=self.headers, limits=limits, timeout=httpx.Timeout(10.0)
        ) as client:
            await asyncio.gather(*(client.get("/livez") for _ in range(n_clients)))  # open the connections
            start = time.perf_counter()
            deadline = start + self.args.load_seconds

            async def one_client():
                nonlocal issued, errors
                while issued < total and time.perf_counter() < deadline:
                    issued += 1
                    t0 = time.perf_counter()
                    try:
                        resp = await client.get(path)
                        ok = resp.status_code == 200 and resp.json()["status"] == "running"
                    except httpx.HTTPError:
                        ok = False
                    if ok:
                        latencies.append(time.perf_counter() - t0)
                    else:
                        errors += 1

            await asyncio.gather(*(one_client() for _ in range(n_clients)))
            elapsed = time.perf_counter() - start
        return latencies, errors, elapsed

    # (c) ------------------------------------------------------------------------------------
    def upload_memory(self) -> None:
        """Two uploads of the same size: bytes that are no archive (refused at a glance once stored:
        the pure streaming cost), then a real zip with one oversized member (validation included)."""
        size = self.args.upload_mib * MiB
        junk = self.stack.root / "big.zip"
        block = os.urandom(MiB)
        with open(junk, "wb") as fh:
            for i in range(0, size, MiB):
                fh.write(block[: min(MiB, size - i)])
        self.results["c_stream"] = self._upload(junk, "big.zip")
        junk.unlink()
        archive = big_zip(self.stack.root / "big-real.zip", self.small_zip, size)
        self.results["c_zip"] = self._upload(archive, "big-real.zip")
        archive.unlink()

    def _upload(self, path: Path, filename: str) -> dict:
        size = path.stat().st_size
        pid = self.stack.api.pid
        boundary = secrets.token_hex(16)
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
            "Content-Type: application/zip\r\n\r\n"
        ).encode()
        tail = f"\r\n--{boundary}--\r\n".encode()
        sent_at = [0.0]

        def body():
            yield head
            with open(path, "rb") as fh:
                while chunk := fh.read(MiB):
                    yield chunk
            yield tail
            sent_at[0] = time.perf_counter()

        time.sleep(1.0)
        baseline = proc_status(pid, "VmRSS")
        hwm_reset = reset_peak_rss(pid)
        samples: list[tuple[float, int]] = []
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                try:
                    samples.append((time.perf_counter(), proc_status(pid, "VmRSS")))
                except (OSError, RuntimeError):
                    return
                time.sleep(0.005)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        try:
            resp = self.client.post(
                "/v1/forget-sets",
                content=body(),
                headers={
                    "Content-Type": f"multipart/form-data; boundary={boundary}",
                    "Content-Length": str(len(head) + size + len(tail)),
                },
                timeout=300,
            )
        finally:
            answered = time.perf_counter()
            stop.set()
            sampler.join()
        hwm = proc_status(pid, "VmHWM")
        streaming = max([baseline] + [rss for t, rss in samples if t <= sent_at[0]])
        peak = max([baseline] + [rss for _, rss in samples] + ([hwm] if hwm_reset else []))
        try:
            problem = resp.json()
        except ValueError:
            problem = {}
        uploads = Path(self.stack.env["VDU_UPLOAD_TMP_DIR"])
        left = sorted(p.name for p in uploads.iterdir()) if uploads.is_dir() else []
        return {
            "upload_bytes": size,
            "status": resp.status_code,
            "code": problem.get("code"),
            "detail": problem.get("detail"),
            "send_s": (sent_at[0] or answered) - t0,
            "answer_s": answered - t0,
            "baseline_kib": baseline,
            "streaming_peak_kib": streaming,
            "peak_kib": peak,
            "hwm_reset": hwm_reset,
            "leftover_upload_dirs": left,
        }


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = (len(sorted_values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


# --- report ------------------------------------------------------------------------------------
def report(stack: Stack, results: dict, args) -> str:
    lines = []
    load = os.getloadavg()
    lines.append(
        f"VDU service bench, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {os.cpu_count()} CPUs, "
        f"load average {load[0]:.1f} at the end (shared machine)"
    )
    redis_kind = "private redis-server"
    if not stack.private_redis:
        redis_kind = f"shared Redis, prefix {stack.redis_prefix}"
    lines.append(
        f"stack: Postgres {stack.info.get('postgres', '?')} (fresh database), {redis_kind}, moto S3 server, "
        f"API = python -m api.serve (1 process, uvicorn on {stack.info.get('uvicorn', '?')}), "
        "worker = python -m worker.cli (concurrency 1, "
        f"torch on {args.worker_threads} CPU thread(s))"
    )
    lines.append("setup: " + ", ".join(f"{k} {v:.1f} s" for k, v in stack.timings.items()))
    lines.append("")
    w = 64
    lines.append(f"{'measure':<{w}}value")
    lines.append("-" * (w + 50))
    if "a" in results:
        a = results["a"]
        lines.append(
            f"{'(a) POST /v1/jobs -> running, idle worker (client, 10 ms poll)':<{w}}"
            f"median {statistics.median(a['client_s']):.3f} s   runs: {_fmt(a['client_s'])}"
        )
        lines.append(
            f"{'    same, in the ledger (started_at - created_at)':<{w}}"
            f"median {statistics.median(a['ledger_s']):.3f} s   runs: {_fmt(a['ledger_s'])}"
        )
        lines.append(f"{'    POST /v1/jobs response time':<{w}}median {statistics.median(a['post_s']):.3f} s")
        label = "    cancel right after the claim -> cancelled"
        lines.append(
            f"{label:<{w}}median {statistics.median(a['cancel_s']):.2f} s   (includes the job process importing torch)"
        )
    if "b" in results:
        b = results["b"]
        label = "(b) GET /v1/jobs/{id}, " + f"{b['clients']} clients, a job training"
        lines.append(f"{label:<{w}}p50 {b['p50_ms']:.1f} ms   p99 {b['p99_ms']:.1f} ms   max {b['max_ms']:.0f} ms")
        lines.append(
            f"{'    throughput':<{w}}{b['rps']:.0f} requests/s   ({b['requests']} ok, {b['errors']} errors, "
            f"{b['elapsed_s']:.1f} s)"
        )
        cpu = b["cpu_s"]
        lines.append(
            f"{'    CPU seconds during the load':<{w}}API {cpu['api']:.1f}, worker {cpu['worker']:.1f}, "
            f"clients {cpu['clients']:.1f}   (in {b['elapsed_s']:.1f} s on {os.cpu_count()} CPUs); "
            f"API {1000 * cpu['api'] / max(1, b['requests'] + b['errors']):.1f} ms CPU per request"
        )
        step0, step1 = b["training_steps"]
        lines.append(
            f"{'    the background job meanwhile':<{w}}steps {step0} -> {step1} of {b['steps_total']} "
            f"({b['training_steps_per_s']:.1f} steps/s); cancelled in {b['cancel_s']:.2f} s"
        )
    for key, what in (("c_stream", "bytes that are no archive"), ("c_zip", "a real zip")):
        if key not in results:
            continue
        c = results[key]
        mib = c["upload_bytes"] / MiB
        base_mib = c["baseline_kib"] / 1024
        label = f"(c) API RSS, {mib:.0f} MiB upload of {what}"
        streaming = c["streaming_peak_kib"] / 1024 - base_mib
        peak = c["peak_kib"] / 1024 - base_mib
        lines.append(f"{label:<{w}}baseline {base_mib:.1f} MiB; streaming +{streaming:.1f} MiB; peak +{peak:.1f} MiB")
        lines.append(
            f"{'    answer':<{w}}{c['status']} {c['code']}: body sent in {c['send_s']:.1f} s "
            f"({mib / c['send_s']:.0f} MiB/s), answered after {c['answer_s']:.1f} s; "
            f"upload folders left: {len(c['leftover_upload_dirs'])}"
        )
        lines.append(f"{'    detail':<{w}}{(c['detail'] or '')[:110]}")
    if any(k in results for k in ("c_stream", "c_zip")):
        limit = int(stack.env.get("VDU_MAX_FORGET_SET_UPLOAD_BYTES", "0")) // MiB
        lines.append(f"{'    (upload limit, VDU_MAX_FORGET_SET_UPLOAD_BYTES)':<{w}}{limit} MiB: the body streams in")
        how = "kernel high-water mark reset before each upload + 5 ms samples"
        if not all(results[k]["hwm_reset"] for k in ("c_stream", "c_zip") if k in results):
            how = "5 ms samples (the high-water mark could not be reset)"
        lines.append(f"{'    (peak RSS measured by)':<{w}}{how}")
    ratios = []
    if "b" in results:
        ratios.append(("p99 / p50 poll latency", results["b"]["p99_ms"] / results["b"]["p50_ms"]))
    if "a" in results:
        a = results["a"]
        ratios.append(
            (
                "POST->running (client) / POST response",
                statistics.median(a["client_s"]) / statistics.median(a["post_s"]),
            )
        )
    for key, what in (("c_stream", "streaming"), ("c_zip", "real zip, validated")):
        if key in results:
            c = results[key]
            growth = (c["peak_kib"] - c["baseline_kib"]) * 1024
            ratios.append((f"API RSS growth / upload size ({what})", growth / c["upload_bytes"]))
            ratios.append((f"API peak / baseline RSS ({what})", c["peak_kib"] / c["baseline_kib"]))
    lines.append("")
    lines.append("ratios")
    lines += [f"    {name:<{w - 4}}{value:.4f}" for name, value in ratios]
    return "\n".join(lines)


def _fmt(values: list[float]) -> str:
    return ", ".join(f"{v:.3f}" for v in values)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=3, help="jobs timed to `running` (median)")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--requests", type=int, default=3000, help="GET requests in the load (fixed count)")
    ap.add_argument("--load-seconds", type=float, default=20.0, help="upper bound on the load's duration")
    ap.add_argument("--upload-mib", type=int, default=200)
    ap.add_argument("--worker-threads", type=int, default=1, help="OMP_NUM_THREADS of the worker (torch)")
    ap.add_argument("--settle", type=float, default=3.0, help="seconds an idle worker rests before a job")
    ap.add_argument("--max-seconds", type=float, default=900.0, help="the whole run stops after this")
    ap.add_argument("--pg-admin", default="host=127.0.0.1 port=5432 user=postgres dbname=postgres")
    ap.add_argument("--pg-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/{db}")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="used only with --shared-redis")
    ap.add_argument("--shared-redis", action="store_true", help="use --redis-url instead of a private one")
    ap.add_argument("--only", default="abc", help="which measurements to run (a, b, c)")
    ap.add_argument("--api-python", default=sys.executable, help="the interpreter that runs the API")
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument("--keep-logs", action="store_true", help="keep the temporary folder with process logs")
    args = ap.parse_args(argv)

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    watchdog = threading.Timer(args.max_seconds, _thread.interrupt_main)
    watchdog.daemon = True
    watchdog.start()

    stack = Stack(args)
    bench = Bench(stack, args)
    started = time.perf_counter()
    failed = None
    try:
        stack.up()
        bench.setup_inputs()
        if "a" in args.only:
            bench.time_to_running()
        if "b" in args.only:
            bench.poll_load()
        if "c" in args.only:
            bench.upload_memory()
    except KeyboardInterrupt:
        failed = f"stopped after {time.perf_counter() - started:.0f} s (--max-seconds {args.max_seconds:.0f})"
    except Exception as exc:
        failed = f"{type(exc).__name__}: {exc}"
        for proc in (stack.api, stack.worker):
            if proc is not None:
                print(f"---- {proc.name} log (tail) ----\n{proc.log()[-3000:]}", file=sys.stderr)
    finally:
        watchdog.cancel()
        if bench.client is not None:
            bench.client.close()
        stack.down()
    print(report(stack, bench.results, args))
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": bench.results, "setup_s": stack.timings}, indent=2))
    if failed:
        print(f"\nINCOMPLETE: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
