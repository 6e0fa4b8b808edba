"""Streaming multipart uploads: straight to a temporary folder, the size limit enforced per chunk.

FastAPI's ``UploadFile`` parses the whole body before the route runs; here the route parses it
itself, so that an oversized upload is refused (413) as soon as it crosses the limit, memory stays
bounded by one chunk, and the temporary folder is removed on every error path (and swept at startup
if a previous process died mid-upload).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import time
import unicodedata
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import anyio
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header
from starlette.requests import ClientDisconnect, Request

from jobs.errors import InvalidInput, PayloadTooLarge, ServiceError, UnsupportedMediaType

log = logging.getLogger(__name__)
WRITE_BATCH = 1024 * 1024
MAX_FIELD_BYTES = 64 * 1024
MULTIPART_OVERHEAD = 64 * 1024
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


class MalformedMultipart(ServiceError):
    status = 400
    code = "malformed_multipart"
    title = "Malformed multipart body"


@dataclass
class UploadedFile:
    field: str
    filename: str  # the client's name, reduced to a safe basename
    path: Path
    size: int = 0
    sha256: str = ""
    content_type: str | None = None


@dataclass
class Upload:
    dir: Path
    files: list[UploadedFile] = field(default_factory=list)
    fields: dict[str, str] = field(default_factory=dict)

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def files_for(self, name: str) -> list[UploadedFile]:
        return [f for f in self.files if f.field == name]


def safe_filename(name: str, default: str = "upload") -> str:
    """A display/storage name: the basename, NFC, without control or unsafe characters."""
    name = unicodedata.normalize("NFC", name).replace("\\", "/").rsplit("/", 1)[-1]
    name = _UNSAFE.sub("_", name).strip("._") or default
    return name[:200]


def file_sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def sweep_stale_uploads(tmp_root: Path, max_age_s: float = 24 * 3600) -> int:
    """Remove temporary upload folders left by processes that died mid-upload."""
    removed = 0
    if not tmp_root.is_dir():
        return 0
    for entry in tmp_root.iterdir():
        if not entry.name.startswith("upl-"):
            continue
        try:
            pid = int(entry.name.split("-")[1])
        except (IndexError, ValueError):
            pid = -1
        alive = pid > 0 and pid != os.getpid() and _pid_alive(pid)
        old = time.time() - entry.stat().st_mtime > max_age_s
        if not alive or old:
            shutil.rmtree(entry, ignore_errors=True)
            removed += 1
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Receiver:
    def __init__(self, upload: Upload, *, max_bytes: int, max_files: int, file_fields: set[str], text_fields: set[str]):
        self.upload = upload
        self.max_bytes = max_bytes
        self.max_files = max_files
        self.file_fields = file_fields
        self.text_fields = text_fields
        self.total = 0
        self._header_name = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._current: UploadedFile | None = None
        self._current_field: str | None = None
        self._text = bytearray()
        self._fh: IO[bytes] | None = None
        self._hash = None
        self.pending: list[tuple[IO[bytes], bytes]] = []
        self._buffer = bytearray()

    # python-multipart callbacks ------------------------------------------------------------
    def on_part_begin(self) -> None:
        self._headers = {}
        self._current = None
        self._current_field = None
        self._text = bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._header_name.lower()] = self._header_value
        self._header_name = b""
        self._header_value = b""

    def on_headers_finished(self) -> None:
        disposition, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = options.get(b"name")
        if disposition != b"form-data" or name is None:
            raise MalformedMultipart("each part needs Content-Disposition: form-data with a name", field="body")
        field_name = name.decode("utf-8", "replace")
        self._current_field = field_name
        if b"filename" in options:
            if field_name not in self.file_fields:
                raise InvalidInput(
                    f"unexpected file field {field_name!r}; expected {', '.join(sorted(self.file_fields))}",
                    field=field_name,
                )
            if len(self.upload.files) >= self.max_files:
                raise InvalidInput(f"at most {self.max_files} files per upload", field=field_name)
            raw_name = options[b"filename"].decode("utf-8", "replace")
            index = len(self.upload.files)
            # one folder per part keeps the client's (safe) name: what a file is called matters to
            # the checks (an "x.zip" that is no archive is reported as such)
            display = safe_filename(raw_name, f"file{index}")
            path = self.upload.dir / f"p{index:04d}" / display
            path.parent.mkdir()
            ctype = self._headers.get(b"content-type")
            self._current = UploadedFile(
                field_name,
                display,
                path,
                content_type=ctype.decode("latin-1") if ctype else None,
            )
            self.upload.files.append(self._current)
            self._fh = open(path, "wb")  # noqa: SIM115 - closed in on_part_end / cleanup
            self._hash = hashlib.sha256()
        elif field_name not in self.text_fields:
            raise InvalidInput(
                f"unexpected field {field_name!r}; expected {', '.join(sorted(self.text_fields | self.file_fields))}",
                field=field_name,
            )

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._current is None:
            self._text += chunk
            if len(self._text) > MAX_FIELD_BYTES:
                raise PayloadTooLarge(
                    f"field {self._current_field!r} is over {MAX_FIELD_BYTES} bytes",
                    field=self._current_field,
                )
            return
        self.total += len(chunk)
        self._current.size += len(chunk)
        if self.total > self.max_bytes:
            raise PayloadTooLarge(
                f"uploads are limited to {self.max_bytes} bytes",
                field=self._current.field,
                limit=self.max_bytes,
            )
        self._hash.update(chunk)
        self._buffer += chunk
        if len(self._buffer) >= WRITE_BATCH:
            self.pending.append((self._fh, bytes(self._buffer)))
            self._buffer = bytearray()

    def on_part_end(self) -> None:
        if self._current is None:
            if self._current_field is not None:
                try:
                    value = self._text.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise InvalidInput("fields must be UTF-8 text", field=self._current_field) from exc
                if self._current_field in self.upload.fields:
                    raise InvalidInput(f"field {self._current_field!r} given twice", field=self._current_field)
                self.upload.fields[self._current_field] = value
            return
        if self._buffer:
            self.pending.append((self._fh, bytes(self._buffer)))
            self._buffer = bytearray()
        self.pending.append((self._fh, b""))  # b"" marks: close after writing
        self._current.sha256 = self._hash.hexdigest()
        self._current = None
        self._fh = None

    def close_all(self) -> None:
        for fh, _ in self.pending:
            fh.close()
        if self._fh is not None:
            self._fh.close()


def _flush(pending: list[tuple[IO[bytes], bytes]]) -> None:
    for fh, data in pending:
        if data:
            fh.write(data)
        else:
            fh.close()


async def receive_upload(
    request: Request,
    *,
    tmp_root: Path,
    max_bytes: int,
    max_files: int,
    file_fields: set[str],
    text_fields: set[str],
) -> Upload:
    """Stream a multipart/form-data body into a fresh temporary folder. The caller must
    ``cleanup()`` the returned ``Upload``; on any error here it is already removed."""
    ctype = request.headers.get("content-type", "")
    mime, options = parse_options_header(ctype)
    if mime != b"multipart/form-data":
        raise UnsupportedMediaType(f"expected multipart/form-data, got {ctype or 'none'!r}", field="Content-Type")
    boundary = options.get(b"boundary")
    if not boundary:
        raise MalformedMultipart("the multipart Content-Type has no boundary", field="Content-Type")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes + MULTIPART_OVERHEAD:
        raise PayloadTooLarge(f"uploads are limited to {max_bytes} bytes", field="body", limit=max_bytes)

    tmp_root.mkdir(parents=True, exist_ok=True)
    upload = Upload(dir=tmp_root / f"upl-{os.getpid()}-{uuid.uuid4().hex}")
    upload.dir.mkdir()
    receiver = _Receiver(
        upload, max_bytes=max_bytes, max_files=max_files, file_fields=file_fields, text_fields=text_fields
    )
    callbacks = {
        name: getattr(receiver, name)
        for name in (
            "on_part_begin",
            "on_part_data",
            "on_part_end",
            "on_header_field",
            "on_header_value",
            "on_header_end",
            "on_headers_finished",
        )
    }
    parser = MultipartParser(boundary, callbacks)
    try:
        async for chunk in request.stream():
            try:
                parser.write(chunk)
            except ServiceError:
                raise
            except Exception as exc:
                raise MalformedMultipart("the multipart body cannot be parsed", field="body") from exc
            if receiver.pending:
                pending, receiver.pending = receiver.pending, []
                await anyio.to_thread.run_sync(_flush, pending)
        if parser.state not in (MultipartState.END, MultipartState.BOUNDARY_PADDING):
            raise MalformedMultipart("the multipart body ended before its closing boundary", field="body")
        if receiver.pending:
            pending, receiver.pending = receiver.pending, []
            await anyio.to_thread.run_sync(_flush, pending)
    except BaseException as exc:
        receiver.close_all()
        upload.cleanup()
        if isinstance(exc, ClientDisconnect):
            log.info("client disconnected during an upload; temporary files removed")
        raise
    return upload
