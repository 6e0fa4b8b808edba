"""Real processes for end-to-end tests: the API under uvicorn and a Celery worker, as subprocesses.

Also the home of the real-process helpers of ``bench/bench_service.py`` (free ports, waiting,
process groups, /proc readings); this module imports nothing from the test suite.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


class Proc:
    """A subprocess in its own process group, its output in a log file; stopped by group."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            args, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def check(self) -> None:
        if not self.alive():
            raise RuntimeError(f"{self.name} exited ({self.popen.returncode}):\n{self.log()[-3000:]}")

    def stop(self, timeout: float = 15.0) -> None:
        if self.alive():
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.popen.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.popen.wait(5)
            except ProcessLookupError:
                pass
        else:  # the leader is gone: its group may not be
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self._log.close()


def start_api(env: dict[str, str], log_dir: Path) -> tuple[Proc, str]:
    port = free_port()
    proc = Proc(
        "api",
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "api.main:create_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-access-log",
            "--log-level",
            "warning",
        ],
        env,
        log_dir,
    )
    base = f"http://127.0.0.1:{port}"

    def up():
        if not proc.alive():
            raise RuntimeError(f"the API exited:\n{proc.log()[-3000:]}")
        try:
            return httpx.get(f"{base}/livez", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(up, 60, what="the API to start")
    return proc, base


def start_worker(env: dict[str, str], log_dir: Path, name: str = "worker") -> Proc:
    proc = Proc(name, [sys.executable, "-m", "worker.cli"], env, log_dir)

    def ready():
        if not proc.alive():
            raise RuntimeError(f"the worker exited:\n{proc.log()[-3000:]}")
        return " ready." in proc.log()

    wait_until(ready, 90, what="the Celery worker to be ready")
    return proc


def proc_status(pid: int, field: str) -> int:
    """A kB field of /proc/PID/status (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for {pid}")


def rss_kib(pid: int) -> int:
    return proc_status(pid, "VmRSS")


@dataclass
class Stack:
    """The API and one worker running as real processes, with the environment they share."""

    base: str
    env: dict[str, str]
    api: Proc
    worker: Proc
    root: Path

    def admin(self, *args: str) -> str:
        """Run the admin CLI (``python -m api.admin``) as an operator would; its stdout."""
        return subprocess.run(
            [sys.executable, "-m", "api.admin", *args],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout.strip()

    def api_key(self, team: str) -> str:
        """A new team and one key of it."""
        self.admin("create-team", team)
        return self.admin("create-key", team)

    def team(self, name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key(name)}"}

    def client(self, headers: dict[str, str]) -> httpx.Client:
        return httpx.Client(base_url=self.base, headers=headers, timeout=60)

    def stop(self) -> None:
        self.worker.stop()
        self.api.stop()


def stack_env(root: Path, **settings: str) -> dict[str, str]:
    """The processes' environment: ours, plus ``VDU_<NAME>`` for each setting, plus quick leases
    and maintenance so recovery happens within a test."""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OMP_WAIT_POLICY": "PASSIVE",
        "VDU_UPLOAD_TMP_DIR": str(root / "uploads"),
        "VDU_WORKER_TMP_DIR": str(root),
        "VDU_MODEL_CACHE_DIR": str(root / "cache"),
        "VDU_LEASE_SECONDS": "30",
        "VDU_LEASE_RENEW_INTERVAL_S": "5",
        "VDU_MAINTENANCE_INTERVAL_S": "5",
        "VDU_LOG_JSON": "false",
    }
    env.update({f"VDU_{k.upper()}": str(v) for k, v in settings.items()})
    return env


def start_stack(env: dict[str, str], root: Path) -> Stack:
    api, base = start_api(env, root)
    try:
        worker = start_worker(env, root)
    except BaseException:
        api.stop()
        raise
    return Stack(base, env, api, worker, root)
