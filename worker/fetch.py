"""Bring a job's inputs from storage (or a checked URL) into the job's temporary folder."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urljoin, urlparse

from jobs.errors import InvalidInput
from jobs.model_files import ModelLimits, copy_limited, extract_model_archive, sniff
from jobs.settings import Settings
from jobs.storage import Storage
from jobs.urls import check_url
from vdu_core.errors import ModelLoadError

log = logging.getLogger(__name__)
MAX_REDIRECTS = 5


@dataclass
class ModelInputs:
    ref: str  # a local folder or file, or a hub id
    revision: str | None = None
    lineage: list[str] = field(default_factory=list)


def _open_file_ref(path: Path, dest: Path, limits: ModelLimits) -> str:
    """A downloaded/stored model file: extract archives, keep safetensors as they are."""
    with open(path, "rb") as fh:
        kind = sniff(fh.read(512))
    if kind in ("zip", "tar", "gzip", "bzip2", "xz"):
        return str(extract_model_archive(path, dest, limits))
    if kind == "pickle":
        raise ModelLoadError("pickle checkpoints are refused", rule="pickle")
    if path.suffix != ".safetensors":
        renamed = path.with_suffix(".safetensors")
        path.rename(renamed)
        path = renamed
    return str(path)


def download_url(url: str, dest: Path, settings: Settings) -> Path:
    """Download ``url`` to ``dest`` (https with every redirect re-checked, or s3 via our S3 endpoint)."""
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        import boto3

        secret = settings.s3_secret_access_key.get_secret_value() if settings.s3_secret_access_key else None
        client = boto3.client(
            "s3",
            endpoint_url=settings.s3_endpoint_url,
            region_name=settings.s3_region,
            aws_access_key_id=settings.s3_access_key_id,
            aws_secret_access_key=secret,
        )
        body = client.get_object(Bucket=parsed.netloc, Key=parsed.path.lstrip("/"))["Body"]
        try:
            copy_limited(body, dest, settings.max_model_upload_bytes)
        finally:
            body.close()
        return dest
    import httpx

    current = url
    with httpx.Client(follow_redirects=False, timeout=httpx.Timeout(30.0, read=120.0)) as client:
        for _ in range(MAX_REDIRECTS + 1):
            try:
                check_url(current, field="url", allow_private=settings.allow_private_urls, schemes=("https", "http"))
            except InvalidInput as exc:
                raise ModelLoadError(
                    f"refused to fetch the model: {exc.message}", rule="url_refused", field="url"
                ) from exc
            with client.stream("GET", current) as resp:
                if resp.is_redirect:
                    current = urljoin(current, resp.headers.get("location", ""))
                    continue
                if resp.status_code != 200:
                    raise ModelLoadError(
                        f"fetching the model answered HTTP {resp.status_code}", rule="not_found", field="url"
                    )

                class _Reader:
                    def __init__(self, it):
                        self.it = it

                    def read(self, _n=-1):
                        return next(self.it, b"")

                copy_limited(_Reader(resp.iter_bytes(1024 * 1024)), dest, settings.max_model_upload_bytes)
                return dest
    raise ModelLoadError("too many redirects", rule="url_refused", field="url")


def _fetch_ref(
    ref: dict, storage: Storage, settings: Settings, dest: Path, limits: ModelLimits
) -> tuple[str, str | None]:
    source = ref.get("source")
    dest.mkdir(parents=True, exist_ok=True)
    if source == "hub":
        return ref["hub_id"], ref.get("revision")
    if source == "upload":
        local = dest / Path(ref["storage_key"]).name
        storage.get_file(ref["storage_key"], local)
        return _open_file_ref(local, dest / "unpacked", limits), None
    if source == "url":
        name = Path(urlparse(ref["url"]).path).name or "model"
        local = download_url(ref["url"], dest / name, settings)
        return _open_file_ref(local, dest / "unpacked", limits), None
    raise ModelLoadError(f"unknown model source {source!r}", rule="unsupported_format")


def fetch_model(model, storage: Storage, settings: Settings, workdir: Path) -> ModelInputs:
    """The model and its lineage as references ``run_unlearning`` accepts."""
    limits = ModelLimits.from_settings(settings)
    main = {
        "source": model.source,
        "hub_id": model.hub_id,
        "revision": model.revision,
        "url": model.url,
        "storage_key": model.storage_key,
    }
    ref, revision = _fetch_ref(main, storage, settings, workdir / "model", limits)
    lineage = []
    for i, item in enumerate(model.lineage or []):
        lref, _ = _fetch_ref(item, storage, settings, workdir / f"lineage-{i:02d}", limits)
        lineage.append(lref)
    return ModelInputs(ref=ref, revision=revision, lineage=lineage)


def fetch_forget_set(storage_key: str, filename: str, storage: Storage, workdir: Path) -> Path:
    dest = workdir / "forget" / filename
    dest.parent.mkdir(parents=True, exist_ok=True)
    storage.get_file(storage_key, dest)
    return dest
