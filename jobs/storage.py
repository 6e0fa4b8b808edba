"""Artifact storage behind one interface: local disk (default) or any S3 API (boto3 + endpoint URL).

Keys are ``/``-separated relative paths (``teams/{team}/jobs/{job}/metrics.json``). Every write is
all-or-nothing per object (a temporary name then a rename on disk; a single PUT or a completed
multipart upload on S3), and ``publish_dir`` writes a whole folder under a temporary prefix before
moving it into place, so a reader never sees half an artifact set.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlparse

from jobs.errors import StorageError
from jobs.settings import Settings, get_settings, local_path_from_storage_url

log = logging.getLogger(__name__)
CHUNK = 1024 * 1024
TMP_PREFIX = ".tmp"


class ObjectMissing(StorageError):
    status = 404
    code = "artifact_missing"
    title = "Artifact missing"


def check_key(key: str) -> str:
    """Refuse keys that could escape the storage root."""
    if (
        not key
        or key.startswith("/")
        or "\\" in key
        or "\x00" in key
        or any(part in ("", ".", "..") for part in key.split("/"))
    ):
        raise ValueError(f"invalid storage key {key!r}")
    return key


def iter_local_files(local_dir: Path) -> list[str]:
    """Relative POSIX paths of the regular files under ``local_dir`` (links refused)."""
    out = []
    for dirpath, _dirs, files in os.walk(local_dir):
        for name in files:
            full = Path(dirpath) / name
            if full.is_symlink() or not full.is_file():
                raise StorageError(f"refusing to publish a non-regular file: {full}")
            out.append(full.relative_to(local_dir).as_posix())
    return sorted(out)


class Storage(ABC):
    """What the API and the worker need from storage, and nothing more."""

    url: str

    @abstractmethod
    def put_file(self, key: str, path: Path, *, move: bool = False) -> None:
        """Store the local file ``path`` at ``key`` (``move``: the source may be consumed)."""

    @abstractmethod
    def put_stream(self, key: str, stream: BinaryIO) -> None: ...

    @abstractmethod
    def get_file(self, key: str, dest: Path) -> None:
        """Copy ``key`` to the local path ``dest``."""

    @abstractmethod
    def iter_range(self, key: str, start: int = 0, stop: int | None = None) -> Iterator[bytes]:
        """Yield the bytes ``[start, stop)`` of ``key`` in chunks (the whole object by default)."""

    @abstractmethod
    def size(self, key: str) -> int: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete ``key``; a missing key is not an error."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int: ...

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]: ...

    @abstractmethod
    def publish_dir(self, local_dir: Path, prefix: str) -> dict[str, str]:
        """Upload every file under ``local_dir`` to a temporary prefix, then move the set to
        ``prefix`` (replacing what a previous attempt left there). Returns {relative path: key}."""

    @abstractmethod
    def ping(self) -> None:
        """Raise if storage cannot be read and written (readiness)."""

    def presigned_url(self, key: str, *, expires_s: int = 300, filename: str | None = None) -> str | None:
        return None


class LocalStorage(Storage):
    def __init__(self, root: Path | str):
        self.root = Path(root).resolve()
        self.url = f"file://{self.root}"
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _tmp_sibling(self, dest: Path) -> Path:
        return dest.with_name(f".{dest.name}.part-{uuid.uuid4().hex[:12]}")

    def put_file(self, key: str, path: Path, *, move: bool = False) -> None:
        dest = self.path(key)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            if move:
                try:
                    os.replace(path, dest)
                    return
                except OSError:
                    pass  # another filesystem: copy below
            tmp = self._tmp_sibling(dest)
            try:
                shutil.copyfile(path, tmp)
                os.replace(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)
            if move:
                Path(path).unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot write {key}: {exc.strerror or exc}") from exc

    def put_stream(self, key: str, stream: BinaryIO) -> None:
        dest = self.path(key)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._tmp_sibling(dest)
            try:
                with open(tmp, "wb") as fh:
                    shutil.copyfileobj(stream, fh, CHUNK)
                os.replace(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot write {key}: {exc.strerror or exc}") from exc

    def get_file(self, key: str, dest: Path) -> None:
        src = self.path(key)
        if not src.is_file():
            raise ObjectMissing(f"{key} is missing from storage")
        try:
            shutil.copyfile(src, dest)
        except OSError as exc:
            raise StorageError(f"cannot read {key}: {exc.strerror or exc}") from exc

    def iter_range(self, key: str, start: int = 0, stop: int | None = None) -> Iterator[bytes]:
        path = self.path(key)
        try:
            fh = open(path, "rb")
        except FileNotFoundError as exc:
            raise ObjectMissing(f"{key} is missing from storage") from exc

        def gen() -> Iterator[bytes]:
            with fh:
                fh.seek(start)
                remaining = None if stop is None else stop - start
                while remaining is None or remaining > 0:
                    chunk = fh.read(CHUNK if remaining is None else min(CHUNK, remaining))
                    if not chunk:
                        break
                    if remaining is not None:
                        remaining -= len(chunk)
                    yield chunk

        return gen()

    def size(self, key: str) -> int:
        try:
            return self.path(key).stat().st_size
        except FileNotFoundError as exc:
            raise ObjectMissing(f"{key} is missing from storage") from exc

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def delete(self, key: str) -> None:
        try:
            self.path(key).unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot delete {key}: {exc.strerror or exc}") from exc

    def delete_prefix(self, prefix: str) -> int:
        target = self.path(prefix.rstrip("/"))
        if target.is_dir():
            n = sum(len(files) for _d, _s, files in os.walk(target))
            shutil.rmtree(target)
            return n
        if target.is_file():
            target.unlink()
            return 1
        return 0

    def list(self, prefix: str = "") -> list[str]:
        base = self.path(prefix.rstrip("/")) if prefix else self.root
        if not base.is_dir():
            return []
        return [
            f"{prefix.rstrip('/')}/{rel}" if prefix else rel
            for rel in iter_local_files(base)
            if not rel.startswith(TMP_PREFIX + "/")
        ]

    def publish_dir(self, local_dir: Path, prefix: str) -> dict[str, str]:
        prefix = check_key(prefix.rstrip("/"))
        rels = iter_local_files(Path(local_dir))
        staging = self.root / TMP_PREFIX / uuid.uuid4().hex
        final = self.path(prefix)
        trash = self.root / TMP_PREFIX / f"trash-{uuid.uuid4().hex}"
        try:
            shutil.copytree(local_dir, staging)
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists():
                os.replace(final, trash)  # a previous attempt's set: replaced whole
            os.replace(staging, final)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise StorageError(f"cannot publish artifacts to {prefix}: {exc.strerror or exc}") from exc
        finally:
            shutil.rmtree(trash, ignore_errors=True)
        return {rel: f"{prefix}/{rel}" for rel in rels}

    def ping(self) -> None:
        probe = self.root / TMP_PREFIX / f"ping-{uuid.uuid4().hex}"
        try:
            probe.parent.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as exc:
            raise StorageError(f"local storage at {self.root} is not writable: {exc.strerror or exc}") from exc


class S3Storage(Storage):
    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
    ):
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.url = f"s3://{bucket}/{self.prefix}"
        config = Config(
            retries={"max_attempts": 4, "mode": "standard"},
            connect_timeout=5,
            read_timeout=60,
            s3={"addressing_style": "path"} if endpoint_url else None,
        )
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            config=config,
        )

    def _k(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _wrap(self, exc: Exception, what: str, key: str) -> StorageError:
        from botocore.exceptions import ClientError

        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchKey", "NotFound"):
                return ObjectMissing(f"{key} is missing from storage")
            return StorageError(f"cannot {what} {key}: S3 said {code or 'error'}")
        return StorageError(f"cannot {what} {key}: {type(exc).__name__}: {exc}")

    def put_file(self, key: str, path: Path, *, move: bool = False) -> None:
        try:
            self.client.upload_file(str(path), self.bucket, self._k(key))
        except Exception as exc:
            raise self._wrap(exc, "write", key) from exc
        if move:
            Path(path).unlink(missing_ok=True)

    def put_stream(self, key: str, stream: BinaryIO) -> None:
        try:
            self.client.upload_fileobj(stream, self.bucket, self._k(key))
        except Exception as exc:
            raise self._wrap(exc, "write", key) from exc

    def get_file(self, key: str, dest: Path) -> None:
        try:
            self.client.download_file(self.bucket, self._k(key), str(dest))
        except Exception as exc:
            raise self._wrap(exc, "read", key) from exc

    def iter_range(self, key: str, start: int = 0, stop: int | None = None) -> Iterator[bytes]:
        kwargs = {"Bucket": self.bucket, "Key": self._k(key)}
        if start or stop is not None:
            kwargs["Range"] = f"bytes={start}-{'' if stop is None else stop - 1}"
        try:
            body = self.client.get_object(**kwargs)["Body"]
        except Exception as exc:
            raise self._wrap(exc, "read", key) from exc

        def gen() -> Iterator[bytes]:
            try:
                yield from body.iter_chunks(CHUNK)
            finally:
                body.close()

        return gen()

    def size(self, key: str) -> int:
        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=self._k(key))["ContentLength"])
        except Exception as exc:
            raise self._wrap(exc, "stat", key) from exc

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
            return True
        except ObjectMissing:
            return False

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._k(key))
        except Exception as exc:
            raise self._wrap(exc, "delete", key) from exc

    def _list_raw(self, raw_prefix: str) -> list[str]:
        keys: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=raw_prefix):
            keys.extend(obj["Key"] for obj in page.get("Contents", []))
        return keys

    def _delete_raw(self, raw_keys: list[str]) -> None:
        for i in range(0, len(raw_keys), 1000):
            batch = [{"Key": k} for k in raw_keys[i : i + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})

    def delete_prefix(self, prefix: str) -> int:
        raw = self.prefix + check_key(prefix.rstrip("/")) + "/"
        try:
            keys = self._list_raw(raw)
            self._delete_raw(keys)
        except Exception as exc:
            raise self._wrap(exc, "delete", prefix) from exc
        return len(keys)

    def list(self, prefix: str = "") -> list[str]:
        raw = self.prefix + (check_key(prefix.rstrip("/")) + "/" if prefix else "")
        try:
            keys = self._list_raw(raw)
        except Exception as exc:
            raise self._wrap(exc, "list", prefix) from exc
        return sorted(k[len(self.prefix) :] for k in keys if not k[len(self.prefix) :].startswith(TMP_PREFIX + "/"))

    def publish_dir(self, local_dir: Path, prefix: str) -> dict[str, str]:
        prefix = check_key(prefix.rstrip("/"))
        rels = iter_local_files(Path(local_dir))
        staging = f"{TMP_PREFIX}/{uuid.uuid4().hex}"
        staged: list[str] = []
        try:
            for rel in rels:
                self.client.upload_file(str(Path(local_dir) / rel), self.bucket, self._k(f"{staging}/{rel}"))
                staged.append(self._k(f"{staging}/{rel}"))
            old = set(self._list_raw(self._k(prefix) + "/"))
            for rel in rels:
                dest = self._k(f"{prefix}/{rel}")
                self.client.copy({"Bucket": self.bucket, "Key": self._k(f"{staging}/{rel}")}, self.bucket, dest)
                old.discard(dest)
            if old:  # files a previous attempt wrote that this one did not
                self._delete_raw(sorted(old))
        except Exception as exc:
            raise self._wrap(exc, "publish", prefix) from exc
        finally:
            try:
                self._delete_raw(staged)
            except Exception:  # pragma: no cover - best effort
                log.warning("could not delete staging objects under %s", staging)
        return {rel: f"{prefix}/{rel}" for rel in rels}

    def ping(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            raise self._wrap(exc, "reach bucket", self.bucket) from exc

    def presigned_url(self, key: str, *, expires_s: int = 300, filename: str | None = None) -> str | None:
        params = {"Bucket": self.bucket, "Key": self._k(key)}
        if filename:
            params["ResponseContentDisposition"] = f'attachment; filename="{filename}"'
        return self.client.generate_presigned_url("get_object", Params=params, ExpiresIn=expires_s)


def storage_from_url(
    storage_url: str,
    *,
    endpoint_url: str | None = None,
    region: str = "us-east-1",
    access_key_id: str | None = None,
    secret_access_key: str | None = None,
) -> Storage:
    parsed = urlparse(storage_url)
    if parsed.scheme == "s3":
        return S3Storage(
            parsed.netloc,
            parsed.path,
            endpoint_url=endpoint_url,
            region=region,
            access_key_id=access_key_id,
            secret_access_key=secret_access_key,
        )
    root = local_path_from_storage_url(storage_url)
    assert root is not None
    return LocalStorage(root)


_cached = functools.lru_cache(maxsize=8)(storage_from_url)


def get_storage(settings: Settings | None = None) -> Storage:
    """The storage for ``settings`` (one client per configuration per process)."""
    s = settings or get_settings()
    secret = s.s3_secret_access_key.get_secret_value() if s.s3_secret_access_key else None
    return _cached(
        s.storage_url,
        endpoint_url=s.s3_endpoint_url,
        region=s.s3_region,
        access_key_id=s.s3_access_key_id,
        secret_access_key=secret,
    )
