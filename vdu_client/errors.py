"""What the client raises. Every error the API answers is an ``APIError`` carrying its RFC 9457
problem+json body (``code``, ``detail``, ``field`` naming the input at fault)."""

from __future__ import annotations

import json
from typing import Any

import httpx


class VDUClientError(Exception):
    """Base of everything this package raises."""


class APIError(VDUClientError):
    """The API answered 4xx/5xx. ``problem`` is the problem+json body (or ``{"detail": text}``)."""

    def __init__(self, status: int, problem: dict[str, Any], *, method: str = "", url: str = "", headers=None):
        self.status = status
        self.problem = problem
        self.method = method
        self.url = url
        self.headers = dict(headers or {})
        super().__init__(str(self))

    @classmethod
    def from_response(cls, response: httpx.Response) -> APIError:
        try:
            body = response.json()
            problem = body if isinstance(body, dict) else {"detail": body}
        except (json.JSONDecodeError, UnicodeDecodeError, httpx.ResponseNotRead):
            text = response.text if response.is_closed else ""
            problem = {"detail": text[:500] or response.reason_phrase}
        return cls(
            response.status_code,
            problem,
            method=response.request.method,
            url=str(response.request.url),
            headers=response.headers,
        )

    @property
    def code(self) -> str:
        return str(self.problem.get("code") or f"http_{self.status}")

    @property
    def title(self) -> str | None:
        return self.problem.get("title")

    @property
    def detail(self) -> str:
        return str(self.problem.get("detail") or self.problem.get("title") or "")

    @property
    def field(self) -> str | None:
        return self.problem.get("field")

    @property
    def errors(self) -> list[dict[str, Any]]:
        return list(self.problem.get("errors") or [])

    @property
    def request_id(self) -> str | None:
        return self.problem.get("request_id") or self.headers.get("x-request-id")

    def __str__(self) -> str:
        where = f" (field: {self.field})" if self.field else ""
        return f"{self.status} {self.code}: {self.detail}{where}"


class TransportError(VDUClientError):
    """The API could not be reached (after the retries)."""


class ChecksumMismatch(VDUClientError):
    """A download's sha256 is not the one announced (or expected); the partial file is removed."""

    def __init__(self, name: str, expected: str, actual: str):
        self.name, self.expected, self.actual = name, expected, actual
        super().__init__(f"sha256 of {name} is {actual}, expected {expected}; the download was discarded")


class WaitTimeout(VDUClientError):
    """``wait()`` gave up before the job reached a final state."""

    def __init__(self, job_id: str, timeout: float, status: str | None):
        self.job_id, self.timeout, self.status = job_id, timeout, status
        super().__init__(f"job {job_id} still {status or 'unknown'} after {timeout:.0f}s")
