"""Things a fault test breaks on purpose, each private to the test that starts it (the machine's
shared Postgres and Redis are never restarted):

- ``TcpProxy``: a loopback TCP proxy in front of Postgres; ``cut()`` drops every connection and
  refuses new ones (a database outage as its clients see it), ``restore()`` listens again.
- ``PrivateRedis``: a ``redis-server`` of our own on a free port, killed and restarted empty.
- ``RestartableS3``: moto's S3 API on a fixed port, stopped and started again (its objects are kept
  in this process, as a real S3 keeps them while unreachable).
- ``FaultHooks``: a ``sitecustomize`` for the workers that, when the test arms it for one job, kills the
  job's process or pauses it between publishing the artifacts and flipping the row.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from pathlib import Path

from tests.service.stack import Proc, free_port, wait_until


class TcpProxy:
    """Forward 127.0.0.1:``port`` to ``upstream``; ``cut``/``restore`` an outage."""

    def __init__(self, upstream_host: str, upstream_port: int, port: int | None = None):
        self.upstream = (upstream_host, upstream_port)
        self.port = port or free_port()
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.accepted = 0

    def start(self) -> TcpProxy:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(128)
        self._listener = sock
        self._thread = threading.Thread(target=self._accept, args=(sock,), name="tcp-proxy", daemon=True)
        self._thread.start()
        return self

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by cut()
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:  # cut while connecting
                    client.close()
                    upstream.close()
                    return
                self._conns |= {client, upstream}
                self.accepted += 1
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                self._drop(s)

    def _drop(self, s: socket.socket) -> None:
        with self._lock:
            self._conns.discard(s)
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            s.close()

    def cut(self) -> None:
        """Refuse new connections (nothing listens: ECONNREFUSED) and reset every open one."""
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = list(self._conns), set()
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for s in conns:
            self._drop(s)

    def restore(self) -> None:
        wait_until(self._try_start, 10, what="the proxy port to be free again")

    def _try_start(self) -> bool:
        try:
            self.start()
            return True
        except OSError:
            return False

    def stop(self) -> None:
        self.cut()


class PrivateRedis:
    """A redis-server on a free loopback port, no persistence: a restart loses every queue."""

    def __init__(self, log_dir: Path, port: int | None = None):
        self.port = port or free_port()
        self.log_dir = log_dir
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: Proc | None = None
        self.generation = 0

    def start(self) -> PrivateRedis:
        import redis

        self.generation += 1
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--daemonize", "no"]
        self.proc = Proc(f"redis-{self.generation}", args, {"PATH": "/usr/bin:/bin:/usr/local/bin"}, self.log_dir)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)

        def up():
            self.proc.check()
            try:
                return client.ping()
            except redis.RedisError:
                return False

        wait_until(up, 20, what="the private redis-server")
        return self

    def kill(self) -> None:
        """SIGKILL: the queue and the unacknowledged messages are gone with it."""
        if self.proc is not None:
            self.proc.popen.kill()
            self.proc.popen.wait(10)
            self.proc.stop()
            self.proc = None

    def restart_empty(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None


class RestartableS3:
    """moto's S3 API on a fixed loopback port that can be stopped (refusing every request) and started."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server = None

    def start(self) -> RestartableS3:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)

        def try_start():
            try:
                server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
                server.start()
            except OSError:
                return False
            self._server = server
            return True

        wait_until(try_start, 20, what="the S3 port to be free")
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    @property
    def running(self) -> bool:
        return self._server is not None


HOOK = '''
"""Fault injection for test workers (written by tests/service/faultkit.py). Inert unless the test
drops a control file ``{job_id}.{action}`` into VDU_TEST_HOOK_DIR; each control file acts once.
SIGUSR2 prints every thread's stack to stderr (the process's log), in the worker's job child too."""
import os

_dir = os.environ.get("VDU_TEST_HOOK_DIR")


def _take(job_id, action):
    path = os.path.join(_dir, f"{job_id}.{action}")
    try:
        os.rename(path, path + ".taken")
    except OSError:
        return False
    return True


if _dir:
    import faulthandler
    import signal
    import time

    faulthandler.register(signal.SIGUSR2, all_threads=True)

    from jobs import ledger as _ledger

    _succeed = _ledger.succeed

    def succeed(session, job_id, worker_id, **kwargs):
        # the artifacts are published; the row has not flipped to succeeded yet
        if _take(job_id, "kill_before_succeed"):  # the job's process dies (the worker's main one lives)
            os.kill(os.getpid(), signal.SIGKILL)
        if _take(job_id, "pause_before_succeed"):
            open(os.path.join(_dir, f"{job_id}.at_succeed"), "w").close()
            go, deadline = os.path.join(_dir, f"{job_id}.go"), time.monotonic() + 300
            while not os.path.exists(go) and time.monotonic() < deadline:
                time.sleep(0.05)
        return _succeed(session, job_id, worker_id, **kwargs)

    _ledger.succeed = succeed
'''


class FaultHooks:
    """Control files read by the hook above: ``hooks.arm(job_id, "kill_before_succeed")``."""

    def __init__(self, root: Path):
        self.code_dir = root / "fault-hook"
        self.dir = root / "fault-control"
        self.code_dir.mkdir(parents=True, exist_ok=True)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.code_dir / "sitecustomize.py").write_text(HOOK)

    def env(self, pythonpath: str) -> dict[str, str]:
        return {"PYTHONPATH": f"{self.code_dir}:{pythonpath}", "VDU_TEST_HOOK_DIR": str(self.dir)}

    def arm(self, job_id: str, action: str) -> None:
        (self.dir / f"{job_id}.{action}").touch()

    def taken(self, job_id: str, action: str) -> bool:
        return (self.dir / f"{job_id}.{action}.taken").exists()

    def reached(self, job_id: str) -> bool:
        return (self.dir / f"{job_id}.at_succeed").exists()

    def go(self, job_id: str) -> None:
        (self.dir / f"{job_id}.go").touch()


def wait_port_closed(port: int, timeout: float = 10) -> None:
    def closed():
        with socket.socket() as s:
            s.settimeout(0.5)
            return s.connect_ex(("127.0.0.1", port)) != 0

    wait_until(closed, timeout, what=f"port {port} to close")
