"""``Client``: every operation of the VDU API v1, over httpx.

* Retries with exponential backoff and jitter on 429, 5xx and connection errors, honouring
  ``Retry-After``. Only what is safe to repeat is repeated: reads, cancel, delete, and job creation
  (which always carries an ``Idempotency-Key``); uploads are re-sent only when the server cannot have
  taken them (connection refused, 429, 503).
* Uploads stream from disk (nothing is read whole into memory); downloads stream to ``NAME.part``,
  are hashed while they arrive, resume with ``Range`` after a dropped connection, and are renamed into
  place only when the sha256 matches the ``ETag``.
* ``wait()`` follows the job's Server-Sent Events and falls back to polling its events.
"""

from __future__ import annotations

import email.utils
import hashlib
import json as jsonlib
import mimetypes
import os
import random
import secrets
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from vdu_client.errors import APIError, ChecksumMismatch, TransportError, VDUClientError, WaitTimeout
from vdu_client.sse import parse_sse
from vdu_client.types import (
    Artifact,
    Download,
    Event,
    ForgetSet,
    Job,
    Model,
    Page,
    WebhookDelivery,
    WebhookSecret,
)

Progress = Callable[[int, int | None], None]
"""``progress(done_bytes, total_bytes)``; total is None when unknown."""

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
UPLOAD_RETRY_STATUSES = frozenset({429, 503})
CHUNK = 1024 * 1024
USER_AGENT = "vdu-client/0.1"


@dataclass
class RetryPolicy:
    """``attempts`` tries in all; the n-th wait is ``base * 2**(n-1)`` capped at ``cap``, jittered to
    between half and all of it; a ``Retry-After`` from the server replaces it (up to ``max_retry_after``)."""

    attempts: int = 5
    base: float = 0.5
    cap: float = 20.0
    max_retry_after: float = 120.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_retry_after)
        full = min(self.cap, self.base * 2 ** (attempt - 1))
        return full / 2 + random.uniform(0, full / 2)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


# --- multipart uploads, streamed ----------------------------------------------------------------
@dataclass
class _FilePart:
    field: str
    path: Path
    filename: str
    content_type: str


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")


class MultipartBody:
    """A multipart/form-data body read from files as it is sent, with its exact length known
    up front (so the server can refuse an oversized upload at once) and a progress callback."""

    def __init__(self, files: Sequence[_FilePart], fields: Mapping[str, str], progress: Progress | None = None):
        self.boundary = uuid.uuid4().hex
        self.progress = progress
        self._parts: list[tuple[bytes, Path | None]] = []
        for name, value in fields.items():
            head = f'--{self.boundary}\r\nContent-Disposition: form-data; name="{_quote(name)}"\r\n\r\n'
            self._parts.append(((head + value + "\r\n").encode(), None))
        for f in files:
            head = (
                f"--{self.boundary}\r\n"
                f'Content-Disposition: form-data; name="{_quote(f.field)}"; filename="{_quote(f.filename)}"\r\n'
                f"Content-Type: {f.content_type}\r\n\r\n"
            )
            self._parts.append((head.encode(), f.path))
        self._tail = f"--{self.boundary}--\r\n".encode()
        self.length = len(self._tail) + sum(
            len(head) + (p.stat().st_size + 2 if p is not None else 0) for head, p in self._parts
        )

    @property
    def headers(self) -> dict[str, str]:
        return {
            "Content-Type": f"multipart/form-data; boundary={self.boundary}",
            "Content-Length": str(self.length),
        }

    def __iter__(self) -> Iterator[bytes]:
        sent = 0

        def report(n: int) -> None:
            nonlocal sent
            sent += n
            if self.progress is not None:
                self.progress(sent, self.length)

        for head, path in self._parts:
            yield head
            report(len(head))
            if path is not None:
                with open(path, "rb") as fh:
                    while chunk := fh.read(CHUNK):
                        yield chunk
                        report(len(chunk))
                yield b"\r\n"
                report(2)
        yield self._tail
        report(len(self._tail))


def _file_part(field: str, path: str | os.PathLike) -> _FilePart:
    p = Path(path)
    if not p.is_file():
        raise VDUClientError(f"{p} is not a file")
    ctype = mimetypes.guess_type(p.name)[0] or "application/octet-stream"
    return _FilePart(field, p, p.name, ctype)


# --- the client --------------------------------------------------------------------------------
class Client:
    """A client of one VDU service with one team's API key.

    >>> with Client("http://127.0.0.1:8000", api_key="vdu_...") as vdu:
    ...     job = vdu.wait(vdu.create_job(model=m.id, forget_set=fs.id).id)
    """

    def __init__(
        self,
        endpoint: str,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        retry: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
    ):
        if not endpoint:
            raise VDUClientError("no endpoint: pass one, or set VDU_ENDPOINT")
        self.endpoint = endpoint.rstrip("/")
        self.retry = retry or RetryPolicy()
        headers = {"User-Agent": USER_AGENT}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._http = httpx.Client(
            base_url=self.endpoint, headers=headers, timeout=timeout, transport=transport, follow_redirects=True
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- the one place requests are sent and retried ---------------------------------------------
    def _send(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        body: Callable[[], MultipartBody] | None = None,
        idempotent: bool = True,
        stream: bool = False,
        timeout: httpx.Timeout | float | None = None,
    ) -> httpx.Response:
        """Send with retries; a 2xx/3xx response (open if ``stream``), else ``APIError``."""
        statuses = RETRY_STATUSES if idempotent else UPLOAD_RETRY_STATUSES
        attempt = 0
        while True:
            attempt += 1
            kwargs: dict[str, Any] = {"params": params, "headers": dict(headers or {})}
            if json is not None:
                kwargs["json"] = json
            if body is not None:
                multipart = body()
                kwargs["headers"].update(multipart.headers)
                kwargs["content"] = iter(multipart)
            if timeout is not None:
                kwargs["timeout"] = timeout
            request = self._http.build_request(method, path, **kwargs)
            try:
                response = self._http.send(request, stream=True)
            except httpx.TransportError as exc:
                sent_maybe = not isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)
                if attempt >= self.retry.attempts or (sent_maybe and not idempotent):
                    raise TransportError(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
                time.sleep(self.retry.delay(attempt))
                continue
            if response.status_code < 400:
                if not stream:
                    response.read()
                    response.close()
                return response
            response.read()
            response.close()
            if response.status_code in statuses and attempt < self.retry.attempts:
                time.sleep(self.retry.delay(attempt, parse_retry_after(response.headers.get("retry-after"))))
                continue
            raise APIError.from_response(response)

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Any other route (JSON in, JSON out), with the same retries and errors."""
        response = self._send(method, path, **kwargs)
        return response.json() if response.content else None

    def _page(self, path: str, cls, params: Mapping[str, Any]) -> Page:
        data = self.request("GET", path, params={k: v for k, v in params.items() if v is not None})
        return Page([cls.from_dict(d) for d in data["data"]], data["has_more"], data.get("next_cursor"))

    def _iterate(self, path: str, cls, params: Mapping[str, Any]) -> Iterator:
        after = None
        while True:
            page = self._page(path, cls, {**params, "after": after})
            yield from page.data
            if not page.has_more:
                return
            after = page.next_cursor

    # --- health ----------------------------------------------------------------------------------
    def livez(self) -> dict:
        return self.request("GET", "/livez")

    def readyz(self) -> dict:
        """``{"status": "ready", "checks": {...}}``; a 503 (after the retries) raises ``APIError``."""
        return self.request("GET", "/readyz")

    # --- forget sets -----------------------------------------------------------------------------
    def upload_forget_set(
        self,
        paths: str | os.PathLike | Iterable[str | os.PathLike],
        *,
        name: str | None = None,
        progress: Progress | None = None,
    ) -> ForgetSet:
        """Upload one archive (zip/tar) or image, or several images, streamed from disk."""
        if isinstance(paths, str | os.PathLike):
            parts = [_file_part("file", paths)]
        else:
            parts = [_file_part("files", p) for p in paths]
            if not parts:
                raise VDUClientError("no files to upload")
        fields = {"name": name} if name is not None else {}
        data = self.request(
            "POST", "/v1/forget-sets", body=lambda: MultipartBody(parts, fields, progress), idempotent=False
        )
        return ForgetSet.from_dict(data)

    def get_forget_set(self, forget_set_id: str) -> ForgetSet:
        return ForgetSet.from_dict(self.request("GET", f"/v1/forget-sets/{forget_set_id}"))

    def list_forget_sets(self, *, limit: int = 20, after: str | None = None) -> Page[ForgetSet]:
        return self._page("/v1/forget-sets", ForgetSet, {"limit": limit, "after": after})

    def iter_forget_sets(self) -> Iterator[ForgetSet]:
        return self._iterate("/v1/forget-sets", ForgetSet, {"limit": 100})

    def delete_forget_set(self, forget_set_id: str) -> None:
        self._send("DELETE", f"/v1/forget-sets/{forget_set_id}")

    # --- models ----------------------------------------------------------------------------------
    def upload_model(
        self,
        path: str | os.PathLike,
        *,
        name: str | None = None,
        lineage: Sequence[str | os.PathLike] = (),
        progress: Progress | None = None,
    ) -> Model:
        """Upload a model: a ``.safetensors`` file or a zip/tar of a diffusers folder, with optional
        lineage checkpoints (same formats) for the posterior."""
        parts = [_file_part("file", path)] + [_file_part("lineage", p) for p in lineage]
        fields = {"name": name} if name is not None else {}
        data = self.request("POST", "/v1/models", body=lambda: MultipartBody(parts, fields, progress), idempotent=False)
        return Model.from_dict(data)

    def register_model(
        self,
        name: str,
        *,
        hub_id: str | None = None,
        revision: str | None = None,
        url: str | None = None,
        lineage: Sequence[Mapping[str, str]] = (),
    ) -> Model:
        """Register a model by reference: a hub id with a pinned ``revision``, or an https/s3 ``url``."""
        if (hub_id is None) == (url is None):
            raise VDUClientError("give either hub_id (with revision) or url")
        body: dict[str, Any] = {"name": name, "source": "hub" if hub_id else "url", "lineage": list(lineage)}
        body.update({"hub_id": hub_id, "revision": revision} if hub_id else {"url": url})
        return Model.from_dict(self.request("POST", "/v1/models", json=body, idempotent=False))

    def get_model(self, model_id: str) -> Model:
        return Model.from_dict(self.request("GET", f"/v1/models/{model_id}"))

    def list_models(self, *, limit: int = 20, after: str | None = None) -> Page[Model]:
        return self._page("/v1/models", Model, {"limit": limit, "after": after})

    def iter_models(self) -> Iterator[Model]:
        return self._iterate("/v1/models", Model, {"limit": 100})

    # --- jobs ------------------------------------------------------------------------------------
    def create_job(
        self,
        *,
        model: str,
        forget_set: str,
        method: str = "vdu",
        params: Mapping[str, Any] | None = None,
        evaluation: Mapping[str, Any] | None = None,
        webhook_url: str | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        """Start a job. An ``Idempotency-Key`` is always sent (one is made up when not given), so a
        retried request never starts a second job."""
        body: dict[str, Any] = {
            "model": model,
            "forget_set": forget_set,
            "method": method,
            "params": dict(params or {}),
            "evaluation": dict(evaluation or {}),
        }
        if webhook_url is not None:
            body["webhook_url"] = webhook_url
        key = idempotency_key or f"vdu-client-{secrets.token_hex(12)}"
        data = self.request("POST", "/v1/jobs", json=body, headers={"Idempotency-Key": key})
        return Job.from_dict(data)

    def get_job(self, job_id: str) -> Job:
        return Job.from_dict(self.request("GET", f"/v1/jobs/{job_id}"))

    def list_jobs(
        self, *, status: str | Sequence[str] | None = None, limit: int = 20, after: str | None = None
    ) -> Page[Job]:
        statuses = [status] if isinstance(status, str) else list(status or []) or None
        return self._page("/v1/jobs", Job, {"limit": limit, "after": after, "status": statuses})

    def iter_jobs(self, *, status: str | Sequence[str] | None = None) -> Iterator[Job]:
        statuses = [status] if isinstance(status, str) else list(status or []) or None
        return self._iterate("/v1/jobs", Job, {"limit": 100, "status": statuses})

    def cancel_job(self, job_id: str) -> Job:
        """Cancel (harmless to repeat); a job that already succeeded or failed raises a 409 ``APIError``."""
        return Job.from_dict(self.request("POST", f"/v1/jobs/{job_id}/cancel"))

    def events(self, job_id: str, *, after: int = 0, limit: int = 100) -> Page[Event]:
        data = self.request("GET", f"/v1/jobs/{job_id}/events", params={"after": after, "limit": limit})
        return Page([Event.from_dict(d) for d in data["data"]], data["has_more"], data.get("next_cursor"))

    def iter_events(self, job_id: str, *, after: int = 0) -> Iterator[Event]:
        """Every stored event after ``after`` (no waiting)."""
        while True:
            page = self.events(job_id, after=after, limit=1000)
            yield from page.data
            if not page.has_more or not page.data:
                return
            after = page.data[-1].seq

    def stream_events(self, job_id: str, *, after: int = 0, reconnect: bool = True) -> Iterator[Event]:
        """The job's events live (Server-Sent Events), from ``after`` until its final event.

        A dropped connection is resumed with ``Last-Event-ID`` (with the retry policy's backoff); an
        error answer (404, 401) raises ``APIError``."""
        last = after
        failures = 0
        while True:
            try:
                for event in self._stream_once(job_id, last):
                    failures = 0
                    last = event.seq
                    yield event
                    if event.final:
                        return
            except TransportError:
                failures += 1
                if not reconnect or failures >= self.retry.attempts:
                    raise
                time.sleep(self.retry.delay(failures))
                continue
            # The server closed the stream without a final event: it had ended before `last`
            # (nothing more will come), or the stream reached its time limit (reconnect).
            if not reconnect or self.get_job(job_id).done:
                return

    def _stream_once(self, job_id: str, after: int) -> Iterator[Event]:
        timeout = httpx.Timeout(30.0, read=60.0)  # the server sends a keepalive every 15 s
        response = self._send(
            "GET",
            f"/v1/jobs/{job_id}/events/stream",
            headers={"Accept": "text/event-stream", "Last-Event-ID": str(after)},
            stream=True,
            timeout=timeout,
        )
        try:
            for sse in parse_sse(response.iter_lines()):
                if sse is not None and sse.data:
                    yield Event.from_dict(jsonlib.loads(sse.data))
        except httpx.TransportError as exc:
            raise TransportError(f"event stream of {job_id}: {type(exc).__name__}: {exc}") from exc
        finally:
            response.close()

    def wait(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        on_event: Callable[[Event], None] | None = None,
        stream: bool = True,
        poll_interval: float = 2.0,
    ) -> Job:
        """Block until the job ends; return it (check ``job.ok``). ``on_event`` sees every event
        (progress with step/total/losses/eta_s, state changes) once, in order. Follows the SSE
        stream; if the stream is unavailable, polls the events every ``poll_interval`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        last = 0

        def deliver(event: Event) -> bool:
            nonlocal last
            if event.seq <= last:
                return False
            last = event.seq
            if on_event is not None:
                on_event(event)
            return event.final

        def expired() -> bool:
            return deadline is not None and time.monotonic() > deadline

        if stream:
            try:
                for event in self.stream_events(job_id, after=last):
                    if deliver(event):
                        return self.get_job(job_id)
                    if expired():
                        raise WaitTimeout(job_id, timeout or 0, self.get_job(job_id).status)
            except TransportError:
                pass  # the stream is unavailable: poll
            except APIError as exc:
                if exc.status in (401, 403):
                    raise
                if exc.status == 404:
                    self.get_job(job_id)  # raises if the job itself is unknown; else no stream route
        while True:
            job = self.get_job(job_id)  # status first: a final status means its event is stored
            for event in self.iter_events(job_id, after=last):
                if deliver(event):
                    return self.get_job(job_id)
            if job.done:
                return job
            if expired():
                raise WaitTimeout(job_id, timeout or 0, job.status)
            time.sleep(poll_interval)

    # --- webhooks --------------------------------------------------------------------------------
    def webhook_secret(self) -> WebhookSecret:
        """The team's signing secret for job webhooks (created on first request)."""
        return WebhookSecret.from_dict(self.request("GET", "/v1/webhook-secret"))

    def rotate_webhook_secret(self) -> WebhookSecret:
        return WebhookSecret.from_dict(self.request("POST", "/v1/webhook-secret/rotate", idempotent=False))

    def webhook_deliveries(self, job_id: str) -> list[WebhookDelivery]:
        """The job's webhook messages, each with its attempts."""
        data = self.request("GET", f"/v1/jobs/{job_id}/webhook-deliveries")
        return [WebhookDelivery.from_dict(d) for d in data["data"]]

    # --- artifacts -------------------------------------------------------------------------------
    def list_artifacts(self, job_id: str) -> list[Artifact]:
        return [Artifact.from_dict(a) for a in self.request("GET", f"/v1/jobs/{job_id}/artifacts")["data"]]

    def download(
        self,
        job_id: str,
        name: str = "checkpoint",
        dest: str | os.PathLike | None = None,
        *,
        progress: Progress | None = None,
        expected_sha256: str | None = None,
    ) -> Download:
        """Download an artifact (``checkpoint``: the sanitized pipeline as a tar) to ``dest`` (a file,
        or a folder; default: the current folder), streamed, checked against its sha256 (the
        ``ETag``, and ``expected_sha256`` when given) and resumed with ``Range`` if the connection
        drops. On a mismatch the file is removed and ``ChecksumMismatch`` raised."""
        target = Path(dest) if dest is not None else Path.cwd()
        if target.is_dir():
            target = target / f"{job_id}-{'checkpoint.tar' if name == 'checkpoint' else name.replace('/', '_')}"
        part = target.with_name(target.name + ".part")
        digest, written, etag, total = hashlib.sha256(), 0, None, None
        failures = 0
        path = f"/v1/jobs/{job_id}/artifacts/{name}"
        with open(part, "wb") as fh:
            while True:
                headers = {"Range": f"bytes={written}-", "If-Range": etag} if written and etag else {}
                try:
                    response = self._send("GET", path, headers=headers, stream=True)
                    try:
                        if response.status_code == 200 and written:  # changed under us: start over
                            fh.seek(0)
                            fh.truncate()
                            digest, written = hashlib.sha256(), 0
                        etag = response.headers.get("etag")
                        if response.status_code == 200:
                            length = response.headers.get("content-length")
                            total = int(length) if length and length.isdigit() else None
                        for chunk in response.iter_bytes():  # as they arrive: a drop loses nothing
                            fh.write(chunk)
                            digest.update(chunk)
                            written += len(chunk)
                            if progress is not None:
                                progress(written, total)
                    finally:
                        response.close()
                    break
                except (httpx.TransportError, TransportError) as exc:
                    failures += 1
                    if failures >= self.retry.attempts or not etag:
                        part.unlink(missing_ok=True)
                        raise TransportError(f"download of {name} failed: {exc}") from exc
                    time.sleep(self.retry.delay(failures))
                except BaseException:
                    part.unlink(missing_ok=True)
                    raise
        actual = digest.hexdigest()
        announced = (etag or "").strip('"') or None
        for expected in (expected_sha256, announced):
            if expected and expected.lower() != actual:
                part.unlink(missing_ok=True)
                raise ChecksumMismatch(name, expected.lower(), actual)
        os.replace(part, target)
        return Download(path=target, bytes=written, sha256=actual, verified=bool(announced or expected_sha256))

    def read_artifact(self, job_id: str, name: str) -> bytes:
        """A small artifact (``metrics.json``, ``samples/after.png``) in memory, sha256-checked."""
        response = self._send("GET", f"/v1/jobs/{job_id}/artifacts/{name}")
        announced = (response.headers.get("etag") or "").strip('"')
        actual = hashlib.sha256(response.content).hexdigest()
        if announced and announced != actual:
            raise ChecksumMismatch(name, announced, actual)
        return response.content
