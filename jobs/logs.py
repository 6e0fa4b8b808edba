"""JSON logs carrying the request id and the job id (from context variables or ``extra=``)."""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
from datetime import UTC, datetime

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
job_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("job_id", default=None)

# An API key is ``vdu_<8 hex>_<secret>`` (api/keys.py); the public part may be shown, the secret never.
_API_KEY = re.compile(r"\b(vdu_[0-9a-f]{8})_[A-Za-z0-9_-]{8,}")


def redact(text: str) -> str:
    """``text`` with the secret part of every API key in it replaced (a client that pastes its key
    into a URL or a field must not find it in our logs or error bodies)."""
    return _API_KEY.sub(r"\1_[redacted]", text) if "vdu_" in text else text


_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid, jid = request_id_var.get(), job_id_var.get()
        if rid:
            out["request_id"] = rid
        if jid:
            out["job_id"] = jid
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value if isinstance(value, str | int | float | bool | type(None)) else str(value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return redact(json.dumps(out, ensure_ascii=False))


class ContextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        pairs = (("request_id", request_id_var.get()), ("job_id", job_id_var.get()))
        ctx = [f"{k}={v}" for k, v in pairs if v]
        return redact(f"{base} [{' '.join(ctx)}]" if ctx else base)


def configure_logging(level: str = "INFO", json_logs: bool = True) -> None:
    """Send our loggers (and uvicorn's, celery's) to stderr in one format. Idempotent."""
    root = logging.getLogger()
    handler = next((h for h in root.handlers if getattr(h, "_vdu", False)), None)
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler._vdu = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    text_format = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler.setFormatter(JsonFormatter() if json_logs else ContextFormatter(text_format))
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers = []
        lg.propagate = True
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)  # our middleware logs each request
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3", "python_multipart", "multipart"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
