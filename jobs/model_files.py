"""Torch-free checks of uploaded model files, and their safe extraction on the worker.

A model upload is either one ``.safetensors`` file or an archive (zip / tar, optionally
compressed) of a diffusers folder: a pipeline (``model_index.json`` + component folders) or a
single UNet folder (``config.json`` + ``diffusion_pytorch_model.safetensors``). Weights must be
safetensors: **pickles are refused** by name (``.bin``, ``.pt``, ``.ckpt``...) and by content (the
pickle opcode header, a torch zip), and nothing here ever unpickles. Every safetensors header is
parsed and its offsets checked against the file size. Archive members may not be links, devices,
absolute paths or ``..`` tricks, and the unpacked size and member count are bounded.

Refusals raise ``vdu_core.errors.ModelLoadError`` with a ``rule``.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from vdu_core.errors import ModelLoadError

SAFETENSORS_DTYPES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
PICKLE_SUFFIXES = {
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".pkl",
    ".pickle",
    ".joblib",
    ".dill",
    ".npy",
    ".npz",
    ".h5",
    ".msgpack",
    ".onnx",
    ".pb",
}
CODE_SUFFIXES = {".py", ".pyc", ".so", ".sh", ".dll", ".dylib", ".exe"}
TEXT_SUFFIXES = {".json", ".txt", ".md"}
TEXT_NAMES = {".gitattributes", "license", "notice", "readme"}
MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_TEXT_BYTES = 16 * 1024 * 1024
MAX_RATIO = 200.0


@dataclass
class ModelLimits:
    max_members: int = 200
    max_unpacked_bytes: int = 16 * 1024**3

    @classmethod
    def from_settings(cls, settings) -> ModelLimits:
        """The limits the service's settings set (the API at upload and the worker at fetch agree)."""
        return cls(max_members=settings.max_model_archive_members,
                   max_unpacked_bytes=settings.max_model_unpacked_bytes)


def _refuse(message: str, rule: str, field: str = "file") -> ModelLoadError:
    return ModelLoadError(message, rule=rule, field=field)


def sniff(head: bytes) -> str:
    """What a file is, from its first bytes."""
    if head[:4] == b"PK\x03\x04" or head[:4] == b"PK\x05\x06":
        return "zip"
    if head[:2] == b"\x1f\x8b":
        return "gzip"
    if head[:3] == b"BZh":
        return "bzip2"
    if head[:6] == b"\xfd7zXZ\x00":
        return "xz"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    return "unknown"


# --- safetensors -------------------------------------------------------------------------------
def check_safetensors(fh: IO[bytes], size: int, name: str, field: str = "file") -> dict[str, Any]:
    """Parse and check a safetensors header read from ``fh`` (positioned at the file's start)."""
    head = fh.read(8)
    if len(head) < 8:
        raise _refuse(f"{name}: too short to be safetensors", "bad_safetensors", field)
    (n,) = struct.unpack("<Q", head)
    if n < 2 or n > MAX_HEADER_BYTES or 8 + n > size:
        raise _refuse(
            f"{name}: the safetensors header length ({n}) does not fit the file ({size} bytes)",
            "bad_safetensors",
            field,
        )
    raw = fh.read(n)
    if len(raw) != n:
        raise _refuse(f"{name}: truncated safetensors header", "bad_safetensors", field)
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _refuse(f"{name}: the safetensors header is not JSON", "bad_safetensors", field) from exc
    if not isinstance(header, dict):
        raise _refuse(f"{name}: the safetensors header is not an object", "bad_safetensors", field)
    data_len = size - 8 - n
    spans = []
    params = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            itemsize = SAFETENSORS_DTYPES[dtype]
            ok = all(isinstance(d, int) and d >= 0 for d in shape) and isinstance(start, int) and isinstance(end, int)
        except (KeyError, TypeError, ValueError) as exc:
            raise _refuse(f"{name}: tensor {key!r} has a malformed entry", "bad_safetensors", field) from exc
        count = math.prod(shape)
        if not ok or not (0 <= start <= end <= data_len) or end - start != count * itemsize:
            raise _refuse(f"{name}: tensor {key!r} lies about its size or offsets", "bad_safetensors", field)
        spans.append((start, end))
        params += count
    if not spans:
        raise _refuse(f"{name}: no tensors in the safetensors file", "bad_safetensors", field)
    spans.sort()
    for (_, prev_end), (start, _) in zip(spans, spans[1:], strict=False):
        if start < prev_end:
            raise _refuse(f"{name}: tensors overlap", "bad_safetensors", field)
    return {"tensors": len(spans), "parameters": params}


# --- archives ----------------------------------------------------------------------------------
@dataclass
class _Member:
    name: str
    size: int
    is_dir: bool


def _check_name(raw: str) -> str:
    name = raw
    if (
        not name
        or "\\" in name
        or name.startswith("/")
        or "\x00" in name
        or len(name) > 1024
        or (len(name) > 1 and name[1] == ":")
        or any(ord(c) < 32 for c in name)
    ):
        raise _refuse(f"unsafe member name {raw!r}", "path_traversal")
    parts = PurePosixPath(name).parts
    if any(p in ("..",) for p in parts):
        raise _refuse(f"unsafe member name {raw!r}", "path_traversal")
    clean = "/".join(p for p in parts if p not in (".", ""))
    if not clean:
        raise _refuse(f"unsafe member name {raw!r}", "path_traversal")
    return clean


def _classify(name: str) -> str:
    base = PurePosixPath(name).name.lower()
    suffix = PurePosixPath(base).suffix
    if suffix == ".safetensors":
        return "weights"
    if suffix in PICKLE_SUFFIXES:
        return "pickle"
    if suffix in CODE_SUFFIXES:
        return "code"
    if suffix in TEXT_SUFFIXES or base in TEXT_NAMES or base.startswith(("license", "readme")):
        return "text"
    return "other"


class _Archive:
    """Uniform, checked iteration over zip and tar members."""

    def __init__(self, path: Path, limits: ModelLimits):
        self.path = path
        self.limits = limits
        with open(path, "rb") as fh:
            kind = sniff(fh.read(512))
        self.kind = kind
        if kind == "zip":
            try:
                self.zf = zipfile.ZipFile(path)
            except (zipfile.BadZipFile, OSError) as exc:
                raise _refuse("the archive is corrupt", "corrupt_archive") from exc
        elif kind in ("tar", "gzip", "bzip2", "xz"):
            try:
                self.tf = tarfile.open(path, "r:*")
            except (tarfile.TarError, OSError, EOFError) as exc:
                raise _refuse("the archive is corrupt", "corrupt_archive") from exc
        else:
            raise _refuse("not a zip or tar archive", "not_an_archive")

    def close(self) -> None:
        (self.zf if self.kind == "zip" else self.tf).close()

    def members(self) -> list[tuple[_Member, Any]]:
        out: list[tuple[_Member, Any]] = []
        total = 0
        seen: set[str] = set()
        try:
            raw_members = self.zf.infolist() if self.kind == "zip" else self.tf.getmembers()
        except (tarfile.TarError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise _refuse("the archive is corrupt", "corrupt_archive") from exc
        if len(raw_members) > self.limits.max_members:
            raise _refuse(f"more than {self.limits.max_members} members", "too_many_files")
        for info in raw_members:
            if self.kind == "zip":
                mode = (info.external_attr >> 16) & 0xFFFF
                if stat.S_ISLNK(mode):
                    raise _refuse(f"{info.filename}: links are refused", "symlink")
                if info.flag_bits & 0x1:
                    raise _refuse(f"{info.filename}: encrypted members are refused", "encrypted")
                is_dir = info.is_dir()
                size = info.file_size
                if size > 1024 * 1024 and info.compress_size and size / info.compress_size > MAX_RATIO:
                    raise _refuse(f"{info.filename}: compression ratio too high", "compression_ratio")
                name = _check_name(info.filename.rstrip("/") if is_dir else info.filename)
            else:
                if info.issym():
                    raise _refuse(f"{info.name}: links are refused", "symlink")
                if info.islnk():
                    raise _refuse(f"{info.name}: hard links are refused", "hardlink")
                if not (info.isfile() or info.isdir()):
                    raise _refuse(f"{info.name}: special files are refused", "special_file")
                is_dir = info.isdir()
                size = info.size
                name = _check_name(info.name)
            if name in seen:
                raise _refuse(f"{name}: duplicate member", "duplicate_name")
            seen.add(name)
            total += size
            if total > self.limits.max_unpacked_bytes:
                raise _refuse(f"the archive unpacks to more than {self.limits.max_unpacked_bytes} bytes", "total_bytes")
            out.append((_Member(name, size, is_dir), info))
        return out

    def open(self, info) -> IO[bytes]:
        try:
            fh = self.zf.open(info) if self.kind == "zip" else self.tf.extractfile(info)
        except (zipfile.BadZipFile, tarfile.TarError, OSError, RuntimeError) as exc:
            raise _refuse("the archive is corrupt", "corrupt_archive") from exc
        if fh is None:
            raise _refuse("the archive is corrupt", "corrupt_archive")
        return fh


def _check_member(arch: _Archive, member: _Member, info) -> dict[str, Any] | None:
    kind = _classify(member.name)
    if kind == "pickle":
        raise _refuse(f"{member.name}: pickle checkpoints are refused; upload safetensors weights", "pickle")
    if kind == "code":
        raise _refuse(f"{member.name}: code files are refused (no remote code)", "code")
    if kind == "other":
        raise _refuse(f"{member.name}: unexpected file in a model archive", "unexpected_file")
    fh = arch.open(info)
    try:
        if kind == "weights":
            return check_safetensors(fh, member.size, member.name)
        if member.size > MAX_TEXT_BYTES:
            raise _refuse(f"{member.name}: text file too large", "file_bytes")
        data = fh.read(MAX_TEXT_BYTES + 1)
        if sniff(data[:512]) == "pickle":
            raise _refuse(f"{member.name}: pickle content is refused", "pickle")
        if member.name.lower().endswith(".json"):
            try:
                json.loads(data)
            except (ValueError, UnicodeDecodeError) as exc:
                raise _refuse(f"{member.name}: invalid JSON", "bad_config") from exc
        return None
    except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError, RuntimeError) as exc:
        raise _refuse(f"{member.name}: the archive is corrupt", "corrupt_archive") from exc
    finally:
        fh.close()


def _find_root(files: list[str]) -> tuple[str, str]:
    """(format, root folder inside the archive) of the diffusers layout found in ``files``."""
    fileset = set(files)
    pipelines = [f for f in files if PurePosixPath(f).name == "model_index.json"]
    if len(pipelines) > 1:
        raise _refuse("more than one model_index.json in the archive", "ambiguous_model")
    if pipelines:
        root = str(PurePosixPath(pipelines[0]).parent)
        root = "" if root == "." else root
        prefix = f"{root}/" if root else ""
        if not any(f.startswith(prefix) and f.endswith(".safetensors") for f in files):
            raise _refuse("the pipeline has no safetensors weights", "no_weights")
        return "diffusers_pipeline", root
    unets = []
    for f in files:
        parent = PurePosixPath(f).parent
        weights = (
            "diffusion_pytorch_model.safetensors"
            if str(parent) == "."
            else f"{parent}/diffusion_pytorch_model.safetensors"
        )
        if PurePosixPath(f).name == "config.json" and weights in fileset:
            unets.append(f)
    if len(unets) == 1:
        root = str(PurePosixPath(unets[0]).parent)
        return "diffusers_model", "" if root == "." else root
    raise _refuse(
        "no diffusers pipeline (model_index.json) or model folder (config.json + "
        "diffusion_pytorch_model.safetensors) in the archive",
        "no_model",
    )


def inspect_model_file(path: Path | str, limits: ModelLimits | None = None, *, field: str = "file") -> dict[str, Any]:
    """Validate an uploaded model file without unpacking it; return a summary for the API."""
    path = Path(path)
    limits = limits or ModelLimits()
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(512)
    kind = sniff(head)
    try:
        if kind == "pickle":
            raise _refuse("pickle checkpoints are refused; upload safetensors weights", "pickle")
        if kind == "safetensors":
            with open(path, "rb") as fh:
                info = check_safetensors(fh, size, path.name)
            return {"format": "safetensors", **info}
        if kind == "unknown":
            raise _refuse("not a safetensors file or a zip/tar archive of a diffusers folder", "unknown_format")
        arch = _Archive(path, limits)
        try:
            members = arch.members()
            if kind == "zip" and any(m.name.endswith("data.pkl") for m, _ in members):
                raise _refuse("a torch pickle archive is refused; upload safetensors weights", "pickle")
            tensors = params = 0
            files = []
            for member, info in members:
                if member.is_dir:
                    continue
                files.append(member.name)
                checked = _check_member(arch, member, info)
                if checked:
                    tensors += checked["tensors"]
                    params += checked["parameters"]
            fmt, root = _find_root(files)
        finally:
            arch.close()
        return {
            "format": fmt,
            "archive": arch.kind,
            "root": root,
            "files": files,
            "tensors": tensors,
            "parameters": params,
        }
    except ModelLoadError as exc:
        exc.field = field
        raise


def extract_model_archive(path: Path | str, dest: Path | str, limits: ModelLimits | None = None) -> Path:
    """Unpack a checked model archive into ``dest``; return the folder to load (pipeline or model root)."""
    path, dest = Path(path), Path(dest)
    summary = inspect_model_file(path, limits)
    if summary["format"] == "safetensors":
        raise _refuse("not an archive", "not_an_archive")
    dest.mkdir(parents=True, exist_ok=True)
    arch = _Archive(path, limits or ModelLimits())
    try:
        for member, info in arch.members():
            target = dest.joinpath(*PurePosixPath(member.name).parts)
            if not str(target.resolve()).startswith(str(dest.resolve()) + os.sep):
                raise _refuse(f"unsafe member name {member.name!r}", "path_traversal")
            if member.is_dir:
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with arch.open(info) as src, open(target, "wb") as out:
                copied = 0
                while chunk := src.read(1024 * 1024):
                    copied += len(chunk)
                    if copied > member.size:
                        raise _refuse(f"{member.name}: larger than its header says", "corrupt_archive")
                    out.write(chunk)
    finally:
        arch.close()
    return dest / summary["root"] if summary["root"] else dest


def copy_limited(src: IO[bytes], dest: Path, max_bytes: int) -> int:
    """Copy at most ``max_bytes`` from ``src`` to ``dest``; refuse more (downloads of URL models)."""
    total = 0
    with open(dest, "wb") as out:
        while chunk := src.read(1024 * 1024):
            total += len(chunk)
            if total > max_bytes:
                raise _refuse(f"the model is larger than {max_bytes} bytes", "too_large", field="url")
            out.write(chunk)
    return total
