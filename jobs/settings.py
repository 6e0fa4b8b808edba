"""One ``Settings`` object (prefix ``VDU_``), read from the environment.

The defaults give the embedded mode: SQLite and local disk under ``./var`` and an in-process
worker (``broker_url=embedded://``). The full stack points ``database_url`` at Postgres,
``broker_url`` at Redis and ``storage_url`` at ``s3://bucket/prefix``.
"""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path
from urllib.parse import urlparse

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from vdu_core.config import MAX_STEPS, Limits

MiB = 1024 * 1024
EMBEDDED_BROKER = "embedded://"


def local_path_from_storage_url(url: str) -> Path | None:
    """The directory of a local storage URL (a plain path or ``file:///path``); None for S3."""
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        return None
    if parsed.scheme == "file":
        return Path(parsed.path) if parsed.netloc in ("", "localhost") else Path(parsed.netloc + parsed.path)
    return Path(url)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VDU_", extra="ignore")

    # Where things live
    database_url: str = "sqlite:///./var/vdu.db"
    broker_url: str = EMBEDDED_BROKER
    broker_key_prefix: str = Field("", description="kombu global_keyprefix: share one Redis between deployments")
    storage_url: str = Field("./var/storage", description="a local path, file:///path or s3://bucket/prefix")
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
    upload_tmp_dir: Path | None = Field(None, description="default: beside local storage, else the system temp")
    worker_tmp_dir: Path | None = None
    model_cache_dir: Path | None = None

    # Upload and request limits (enforced while streaming)
    max_forget_set_upload_bytes: int = Field(256 * MiB, ge=1)
    max_model_upload_bytes: int = Field(8 * 1024 * MiB, ge=1)
    max_json_bytes: int = Field(1 * MiB, ge=1024)
    max_upload_files: int = Field(1000, ge=1)
    max_model_archive_members: int = Field(200, ge=1)
    max_model_unpacked_bytes: int = Field(16 * 1024 * MiB, ge=1)

    # Forget-set limits handed to vdu_core (see vdu_core.config.Limits)
    forget_max_files: int = Field(1000, ge=1)
    forget_max_total_bytes: int = Field(200 * MiB, ge=1)
    forget_max_file_bytes: int = Field(20 * MiB, ge=1)
    forget_max_pixels: int = Field(4096 * 4096, ge=1)
    forget_max_compression_ratio: float = Field(200.0, gt=1.0)
    forget_min_side: int = Field(8, ge=1)

    # Jobs
    max_steps: int = Field(5000, ge=1, le=MAX_STEPS)
    max_trajectory_bytes: int = Field(
        8 * 1024 * MiB, ge=1, description="memory a job's recorded sampler paths may take (vdu_core.trajectory)")
    max_attempts: int = Field(3, ge=1, le=20)
    lease_seconds: float = Field(60.0, gt=0)
    lease_renew_interval_s: float = Field(10.0, gt=0, description="how often a live worker extends its lease")
    progress_interval_s: float = Field(1.0, ge=0, description="at most one progress event per interval")
    cancel_poll_interval_s: float = Field(0.5, ge=0)
    events_poll_interval_s: float = Field(0.5, gt=0, le=60, description="how often an event stream (SSE) looks")
    events_keepalive_s: float = Field(15.0, gt=0, le=300, description="an idle event stream sends a comment this often")
    job_soft_time_limit_s: int = Field(6 * 3600, ge=1)
    job_hard_time_limit_s: int = Field(6 * 3600 + 300, ge=1)
    queue_name: str = "training"
    maintenance_interval_s: float = Field(15.0, gt=0, description="reaper + reconciler period")
    reconcile_grace_s: float = Field(60.0, ge=0, description="a queued job unseen by the broker this long is re-sent")
    db_retry_max_s: float = Field(120.0, ge=0, description="how long a worker retries a lost database")
    worker_preload: bool = Field(
        False,
        description="import torch and diffusers once in the worker's main process, so that each job's fresh "
        "child process starts warm (CUDA is first touched in the child, after the fork)",
    )

    # Security
    allow_private_urls: bool = False
    allowed_classifiers: list[str] = Field(default_factory=lambda: ["builtin:mnist"])

    # Webhooks (jobs.webhook_delivery) and the dashboard (api.dashboard)
    webhook_max_attempts: int = Field(8, ge=1, le=30)
    webhook_retry_base_s: float = Field(5.0, gt=0, description="first retry delay; each next one 4x longer")
    webhook_retry_max_s: float = Field(10 * 3600.0, gt=0)
    webhook_timeout_s: float = Field(5.0, gt=0, le=60, description="per attempt: connect + send + status line")
    webhook_poll_interval_s: float = Field(1.0, gt=0, description="how often workers look for due deliveries")
    webhook_secret_grace_s: float = Field(86400.0, ge=0, description="a rotated-out secret still signs this long")
    dashboard_session_ttl_s: float = Field(8 * 3600.0, gt=0)

    # Observability
    log_level: str = "INFO"
    log_json: bool = True

    @field_validator("storage_url")
    @classmethod
    def _storage_scheme(cls, v: str) -> str:
        scheme = urlparse(v).scheme
        if scheme not in ("", "file", "s3") and not (len(scheme) == 1 and os.name == "nt"):
            raise ValueError("storage_url must be a path, file:///path or s3://bucket/prefix")
        return v

    @model_validator(mode="after")
    def _time_limits(self):
        if self.job_hard_time_limit_s <= self.job_soft_time_limit_s:
            raise ValueError("job_hard_time_limit_s must exceed job_soft_time_limit_s")
        return self

    # Derived values -------------------------------------------------------------------------
    @property
    def embedded_broker(self) -> bool:
        return self.broker_url.startswith(EMBEDDED_BROKER)

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    def local_storage_root(self) -> Path | None:
        return local_path_from_storage_url(self.storage_url)

    def resolved_upload_tmp_dir(self) -> Path:
        """Uploads stream here first; beside local storage so that moving them in is a rename."""
        if self.upload_tmp_dir is not None:
            return Path(self.upload_tmp_dir)
        root = self.local_storage_root()
        if root is not None:
            return root / ".uploads"
        return Path(tempfile.gettempdir()) / "vdu-uploads"

    def forget_set_limits(self) -> Limits:
        return Limits(
            max_files=self.forget_max_files,
            max_total_bytes=self.forget_max_total_bytes,
            max_file_bytes=self.forget_max_file_bytes,
            max_pixels=self.forget_max_pixels,
            max_compression_ratio=self.forget_max_compression_ratio,
            min_side=self.forget_min_side,
        )


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (read once from the environment)."""
    return Settings()
