"""Decode a forget set (the images a model must stop generating) safely, from memory.

Torch-free at import time: the API imports this module to vet uploads; only ``to_tensor`` imports
torch, lazily. Nothing is ever written to disk: members are read in bounded chunks into memory and
decoded there.

Sources: a zip, a tar (plain, gz, bz2, xz), a folder, a single image file, or the same as ``bytes`` /
a seekable binary file object. The source path itself may be a link (the caller chose it); nothing
inside a folder or an archive is ever followed. What a file *is* is decided by its content (magic
bytes), never by its name; a name only chooses the error when the content is unusable (``x.zip``
that is no archive is ``not_an_archive``, anything else that is no image is ``not_an_image``).

Accepted images: PNG, JPEG and WebP, as detected by Pillow. Every refusal raises
:class:`~vdu_core.errors.ForgetSetError` with ``file`` (the member's name) and ``rule``:

================== ==========================================================================
rule               refused because
================== ==========================================================================
not_found          the source path does not exist
not_an_archive     named like an archive (.zip, .tar, .tgz, ...) but is not one we can read
corrupt_archive    an archive that breaks while being read (bad CRC, truncated stream, ...)
unsupported_compression  a zip member compressed with a method other than store/deflate/bzip2/lzma
encrypted          an encrypted zip member
empty              no image at all (junk files do not count)
too_many_files     more images than ``max_files`` (or more than ``2*max_files+16`` entries of any kind)
total_bytes        the uncompressed members add up to more than ``max_total_bytes``
file_bytes         one member is larger than ``max_file_bytes``
compression_ratio  a zip member (uncompressed/compressed) or a compressed tar stream expands more than
                   ``max_compression_ratio`` (checked on headers *and* on the bytes actually read;
                   members under 64 KiB and streams under 1 MiB are exempt: a bomb needs size)
path_traversal     absolute names, ``..`` components, backslashes, drive letters (``C:``)
bad_name           empty names, control characters, names over 1024 characters, folders over 64 deep
duplicate_name     two members with the same name
symlink            a symlink (tar, zip with unix mode, or inside a folder: folders never follow links)
hardlink           a tar hard link
special_file       devices, fifos, sockets, sparse or unknown tar member types
nested_archive     an archive inside the archive (by extension or by content)
not_an_image       a member that is no PNG/JPEG/WebP image (e.g. a text file named ``.png``)
unsupported_format an image format we do not accept (a static GIF)
truncated_image    an image whose data is truncated or corrupt (every image is fully decoded)
animated_image     more than one frame (animated GIF, WebP or PNG)
too_many_pixels    width*height above ``max_pixels``, read from the header *before* decoding
total_pixels       all images together above ``MAX_TOTAL_PIXELS`` decoded pixels (memory bound)
too_small          the shorter side is below ``min_side``
================== ==========================================================================

Text side files (forget sets of text-conditional models, ``vdu_core.sd``): a ``captions.jsonl``
(one ``{"file": NAME, "caption": TEXT}`` object a line; ``file_name``/``image`` and ``text`` are
accepted too), a ``captions.csv`` (header with a file column and a caption column) and a
``prompts.txt`` (one prompt naming the feature a line; blank lines and ``#`` comments skipped) may
sit beside the images, at most ``MAX_TEXT_BYTES`` each. They are parsed by ``parse_texts`` with the
rules ``bad_captions`` (unparsable, a caption over ``MAX_CAPTION_CHARS``, two captions for one
image, more than ``MAX_PROMPTS`` prompts) and ``caption_without_image`` (a caption naming no image
of the set). Models without text conditioning ignore them.

Junk that archivers add is skipped silently (still counted against the byte limits and the entry
cap, never decoded): anything under ``__MACOSX/``, AppleDouble ``._*`` files, ``.DS_Store``,
``Thumbs.db`` and ``desktop.ini``. Directories are skipped. Any other non-image member is an error.

Mode conversion (accept-and-convert, never refuse for a mode): the decoded image is ``L`` for
single-channel sources and ``RGB`` otherwise.
- ``1`` -> ``L``; ``I;16*``/``I`` (16-bit grey) -> ``L`` by ``round(v / 257)``; ``F`` -> ``L`` clipped.
- ``LA``/``RGBA``/``PA``/palette with transparency: composited onto **black** (the MNIST background):
  each channel is multiplied by alpha. Composite yourself first if you want another background.
- ``P`` (palette) -> ``RGB``, or ``L`` when every palette colour is grey.
- ``CMYK``, ``YCbCr``, ``LAB``, ``HSV`` -> ``RGB`` with Pillow's conversions. ICC profiles are ignored.
- The EXIF orientation tag is applied (phones store rotated JPEGs).
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import lzma
import os
import re
import stat
import tarfile
import zipfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from PIL import Image, ImageChops, ImageOps

from vdu_core.config import Limits
from vdu_core.errors import ForgetSetError

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: Formats we accept (Pillow's names); GIF is opened only to name an animation precisely.
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")
_OPEN_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
#: Upper bound on the decoded pixels of a whole set (about 0.8 GB as RGB); see ``total_pixels``.
MAX_TOTAL_PIXELS = 256 * 1024 * 1024
#: Members / streams smaller than this are exempt from the compression-ratio rule.
RATIO_FLOOR_BYTES = 64 * 1024
STREAM_RATIO_FLOOR_BYTES = 1024 * 1024
MAX_NAME_CHARS = 1024
#: Text side files (captions and prompts of text-conditional forget sets), by base name.
TEXT_MEMBERS = frozenset({"captions.jsonl", "captions.csv", "prompts.txt"})
MAX_TEXT_BYTES = 4 * 1024 * 1024
MAX_CAPTION_CHARS = 1000
MAX_PROMPTS = 256
_FILE_KEYS = ("file", "file_name", "image")
_CAPTION_KEYS = ("caption", "text")
MAX_FOLDER_DEPTH = 64
_CHUNK = 1024 * 1024

ARCHIVE_SUFFIXES = (
    ".zip",
    ".tar",
    ".tgz",
    ".tbz",
    ".tbz2",
    ".txz",
    ".gz",
    ".bz2",
    ".xz",
    ".7z",
    ".rar",
    ".zst",
)
JUNK_NAMES = frozenset({".ds_store", "thumbs.db", "desktop.ini"})
_ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)
_DRIVE = re.compile(r"^[A-Za-z]:")


@dataclass
class DecodedImage:
    """One decoded forget-set image. ``image`` is fully loaded, in mode ``L`` or ``RGB``.

    ``sha256`` hashes the member's raw bytes (what was uploaded), ``source_mode`` and ``format``
    record what the file was before conversion.
    """

    name: str
    image: Image.Image = field(repr=False, compare=False)
    width: int
    height: int
    sha256: str
    format: str = ""
    source_mode: str = ""
    nbytes: int = 0


# --------------------------------------------------------------------------- public API


def decode_forget_set(
    source: str | Path | bytes | IO[bytes], limits: Limits | None = None
) -> list[DecodedImage]:
    """Decode every image of ``source`` under ``limits``; raise ``ForgetSetError`` on the first refusal."""
    return list(_iter_decoded(source, limits or Limits()))


@dataclass
class ForgetTexts:
    """The text side files of a forget set: a caption per image name (where given) and feature prompts."""

    captions: dict[str, str] = field(default_factory=dict)
    prompts: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)


def decode_forget_set_with_texts(
    source: str | Path | bytes | IO[bytes], limits: Limits | None = None
) -> tuple[list[DecodedImage], ForgetTexts]:
    """Like ``decode_forget_set``, and parse its captions and prompts (``parse_texts``)."""
    raw: dict[str, bytes] = {}
    images = list(_iter_decoded(source, limits or Limits(), raw))
    return images, parse_texts(raw, [img.name for img in images])


def parse_texts(raw: dict[str, bytes], image_names: list[str]) -> ForgetTexts:
    """Parse ``captions.jsonl`` / ``captions.csv`` / ``prompts.txt`` members (name -> bytes).

    A caption's file name is resolved relative to the folder of the captions file, then by the
    image's base name when that is unique. Every refusal is a ``ForgetSetError`` naming the file.
    """
    import csv
    import json

    texts = ForgetTexts(files=sorted(raw))
    by_base: dict[str, list[str]] = {}
    for n in image_names:
        by_base.setdefault(n.rsplit("/", 1)[-1], []).append(n)
    known = set(image_names)

    def bad(name: str, why: str, rule: str = "bad_captions"):
        raise ForgetSetError(f"{name}: {why}", file=name, rule=rule)

    def add_caption(src: str, where: str, target, caption) -> None:
        if not isinstance(target, str) or not target or not isinstance(caption, str):
            bad(src, f"{where}: needs a file name and a caption string")
        caption = caption.strip()
        if not caption or len(caption) > MAX_CAPTION_CHARS or any(ord(c) < 32 for c in caption):
            bad(src, f"{where}: a caption must be 1 to {MAX_CAPTION_CHARS} printable characters")
        folder = src.rsplit("/", 1)[0] + "/" if "/" in src else ""
        name = folder + target.lstrip("./") if folder + target.lstrip("./") in known else target.lstrip("./")
        if name not in known:
            candidates = by_base.get(target.rsplit("/", 1)[-1], [])
            if len(candidates) != 1:
                bad(src, f"{where}: {target[:200]!r} names no image of the forget set", "caption_without_image")
            name = candidates[0]
        if name in texts.captions:
            bad(src, f"{where}: a second caption for {name!r}")
        texts.captions[name] = caption

    for src in sorted(raw):
        try:
            text = raw[src].decode("utf-8-sig")
        except UnicodeDecodeError:
            bad(src, "is not UTF-8 text")
        base = src.rsplit("/", 1)[-1].lower()
        if base == "prompts.txt":
            for line in text.splitlines():
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                if len(line) > MAX_CAPTION_CHARS or any(ord(c) < 32 for c in line):
                    bad(src, f"a prompt must be at most {MAX_CAPTION_CHARS} printable characters")
                texts.prompts.append(line)
            if len(texts.prompts) > MAX_PROMPTS:
                bad(src, f"more than {MAX_PROMPTS} prompts")
        elif base == "captions.jsonl":
            for i, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    bad(src, f"line {i} is not JSON")
                if not isinstance(row, dict):
                    bad(src, f"line {i} is not a JSON object")
                target = next((row[k] for k in _FILE_KEYS if k in row), None)
                caption = next((row[k] for k in _CAPTION_KEYS if k in row), None)
                add_caption(src, f"line {i}", target, caption)
        else:  # captions.csv
            try:
                rows = list(csv.DictReader(io.StringIO(text)))
            except csv.Error as exc:
                bad(src, f"is not CSV ({exc})")
            for i, row in enumerate(rows, 2):
                target = next((row[k] for k in _FILE_KEYS if row.get(k)), None)
                caption = next((row[k] for k in _CAPTION_KEYS if row.get(k) is not None), None)
                add_caption(src, f"row {i}", target, caption)
    return texts


def inspect_forget_set(
    source: str | Path | bytes | IO[bytes], limits: Limits | None = None
) -> dict[str, Any]:
    """Validate ``source`` fully (every image decoded) and summarise it for the API, keeping no pixels.

    ``source_sha256`` hashes the file as given (for a folder: the sorted ``name\\0sha256`` lines of
    its images); ``content_sha256`` hashes the sorted images alone, so the same images in a zip and
    in a folder share it.
    """
    limits = limits or Limits()
    images = []
    raw_texts: dict[str, bytes] = {}
    for img in _iter_decoded(source, limits, raw_texts):
        images.append(
            {
                "name": img.name,
                "width": img.width,
                "height": img.height,
                "mode": img.image.mode,
                "source_mode": img.source_mode,
                "format": img.format,
                "bytes": img.nbytes,
                "sha256": img.sha256,
            }
        )
        img.image.close()
    texts = parse_texts(raw_texts, [i["name"] for i in images])
    content = _content_sha256(
        [(i["name"], i["sha256"]) for i in images]
        + [(name, hashlib.sha256(data).hexdigest()) for name, data in raw_texts.items()]
    )
    if isinstance(source, str | Path) and Path(source).is_dir():
        source_sha = content
    else:
        source_sha = _source_sha256(source)
    return {
        "count": len(images),
        "total_bytes": sum(i["bytes"] for i in images),
        "sizes": [[i["width"], i["height"]] for i in images],
        "modes": dict(Counter(i["mode"] for i in images)),
        "source_modes": dict(Counter(i["source_mode"] for i in images)),
        "formats": dict(Counter(i["format"] for i in images)),
        "images": images,
        "text_files": texts.files,
        "captions": len(texts.captions),
        "prompts": len(texts.prompts),
        "source_sha256": source_sha,
        "content_sha256": content,
    }


def to_tensor(images: list[DecodedImage], *, channels: int, resolution: int) -> torch.Tensor:
    """Stack images as float32 ``(N, channels, resolution, resolution)`` in ``[-1, 1]``.

    Channels: ``L`` -> 3 replicates the grey level; ``RGB`` -> 1 uses Pillow's ITU-R 601-2 luma.
    Geometry: centre-crop to a square (the shorter side), then resize with BICUBIC (Pillow's resize
    is antialiased when shrinking, and clamps to 0..255); an image already at the size is untouched.
    """
    import numpy as np
    import torch

    if channels not in (1, 3):
        raise ForgetSetError(
            f"models with {channels} input channels are not supported (1 or 3)", rule="unsupported_channels"
        )
    if not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution must be a positive integer; got {resolution!r}")
    if not images:
        raise ForgetSetError("the forget set holds no image", rule="empty")
    mode = "L" if channels == 1 else "RGB"
    arrays = []
    for img in images:
        im = img.image
        if im.mode != mode:
            im = im.convert(mode)
        w, h = im.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        if (w, h) != (side, side):
            im = im.crop((left, top, left + side, top + side))
        if side != resolution:
            im = im.resize((resolution, resolution), Image.Resampling.BICUBIC)
        arr = np.asarray(im, dtype=np.uint8)
        arrays.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
    batch = torch.from_numpy(np.stack(arrays).astype(np.float32))
    return (batch / 127.5 - 1.0).clamp_(-1.0, 1.0)


# --------------------------------------------------------------------------- budget and names


class _Budget:
    """Running counts of one decode, checked against the limits as members arrive."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.max_entries = 2 * limits.max_files + 16
        self.max_total_pixels = max(
            int(getattr(limits, "max_total_pixels", MAX_TOTAL_PIXELS)), limits.max_pixels
        )
        self.entries = 0
        self.files = 0
        self.header_bytes = 0
        self.read_bytes = 0
        self.pixels = 0
        self.names: set[str] = set()

    def entry(self, name: str | None) -> None:
        self.entries += 1
        if self.entries > self.max_entries:
            raise ForgetSetError(
                f"more than {self.max_entries} entries (limit: {self.limits.max_files} images)",
                file=name,
                rule="too_many_files",
            )

    def unique(self, name: str) -> None:
        if name in self.names:
            raise ForgetSetError(f"{name!r} appears twice", file=name, rule="duplicate_name")
        self.names.add(name)

    def image_file(self, name: str) -> None:
        self.files += 1
        if self.files > self.limits.max_files:
            raise ForgetSetError(
                f"more than {self.limits.max_files} images (max_files)", file=name, rule="too_many_files"
            )

    def declared(self, name: str, size: int) -> None:
        """Account a member's size as its header declares it (before reading a byte)."""
        if size > self.limits.max_file_bytes:
            raise ForgetSetError(
                f"{name!r} is {size} bytes, above max_file_bytes={self.limits.max_file_bytes}",
                file=name,
                rule="file_bytes",
            )
        self.header_bytes += size
        if self.header_bytes > self.limits.max_total_bytes:
            raise ForgetSetError(
                f"the members add up to more than max_total_bytes={self.limits.max_total_bytes}",
                file=name,
                rule="total_bytes",
            )

    def read(self, name: str, n: int) -> None:
        self.read_bytes += n
        if self.read_bytes > self.limits.max_total_bytes:
            raise ForgetSetError(
                f"more than max_total_bytes={self.limits.max_total_bytes} bytes read",
                file=name,
                rule="total_bytes",
            )

    def add_pixels(self, name: str, n: int) -> None:
        self.pixels += n
        if self.pixels > self.max_total_pixels:
            raise ForgetSetError(
                f"the images add up to more than {self.max_total_pixels} pixels",
                file=name,
                rule="total_pixels",
            )


def _check_name(raw: str, *, directory: bool = False) -> str:
    """Validate a member name and return it normalised (``./`` and empty components removed).

    A directory may normalise to ``""`` (the ``./`` entry ``tar -C dir .`` writes first).
    """
    shown = raw[:200]
    if not raw or len(raw) > MAX_NAME_CHARS or any(ord(c) < 32 or ord(c) == 127 for c in raw):
        raise ForgetSetError(
            "member name is empty, too long or holds control characters", file=shown, rule="bad_name"
        )
    if "\\" in raw:
        raise ForgetSetError(f"backslash in member name {shown!r}", file=shown, rule="path_traversal")
    if raw.startswith("/") or _DRIVE.match(raw):
        raise ForgetSetError(f"absolute member name {shown!r}", file=shown, rule="path_traversal")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ForgetSetError(f"'..' in member name {shown!r}", file=shown, rule="path_traversal")
    if not parts and not directory:
        raise ForgetSetError("member name is empty", file=shown, rule="bad_name")
    return "/".join(parts)


def _is_junk(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return name.split("/", 1)[0] == "__MACOSX" or base.lower() in JUNK_NAMES or base.startswith("._")


def _has_archive_suffix(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)


# --------------------------------------------------------------------------- content sniffing


def _sniff_image(head: bytes) -> str | None:
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    return None


def _sniff_archive(head: bytes) -> str | None:
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08"):
        return "zip"
    if head[:2] == b"\x1f\x8b":
        return "gz"
    if head[:3] == b"BZh" and head[3:4].isdigit():
        return "bz2"
    if head[:6] == b"\xfd7zXZ\x00":
        return "xz"
    if head[257:262] == b"ustar":
        return "tar"
    if head[:6] == b"7z\xbc\xaf\x27\x1c":
        return "7z"
    if head[:6] == b"Rar!\x1a\x07":
        return "rar"
    if head[:4] == b"\x28\xb5\x2f\xfd":
        return "zstd"
    return None


# --------------------------------------------------------------------------- sources


def _iter_decoded(source, limits: Limits, texts: dict[str, bytes] | None = None) -> Iterator[DecodedImage]:
    """Decode the images; text side files go into ``texts`` when given (else they are skipped)."""
    budget = _Budget(limits)
    count = 0
    for name, data in _iter_members(source, budget):
        if name.rsplit("/", 1)[-1].lower() in TEXT_MEMBERS:
            if len(data) > MAX_TEXT_BYTES:
                raise ForgetSetError(f"{name!r} is above {MAX_TEXT_BYTES} bytes", file=name, rule="file_bytes")
            if texts is not None:
                texts[name] = data
            continue
        count += 1
        yield _decode(name, data, budget)
    if count == 0:
        raise ForgetSetError("the forget set holds no image", file=None, rule="empty")


def _iter_members(source, budget: _Budget) -> Iterator[tuple[str, bytes]]:
    """Yield ``(name, raw bytes)`` of every candidate image, after the container-level checks."""
    if isinstance(source, bytes | bytearray | memoryview):
        yield from _iter_file(io.BytesIO(bytes(source)), "<upload>", budget)
        return
    if hasattr(source, "read"):
        label = os.path.basename(str(getattr(source, "name", "") or "")) or "<upload>"
        yield from _iter_file(source, label, budget)
        return
    path = Path(source)
    if not os.path.lexists(path):
        raise ForgetSetError(f"{path} does not exist", file=str(path), rule="not_found")
    if path.is_dir():
        yield from _iter_folder(path, budget)
        return
    if not path.is_file():
        raise ForgetSetError(f"{path} is not a regular file or folder", file=path.name, rule="special_file")
    with open(path, "rb") as fh:
        yield from _iter_file(fh, path.name, budget)


def _iter_file(fh: IO[bytes], label: str, budget: _Budget) -> Iterator[tuple[str, bytes]]:
    start = fh.tell()
    head = fh.read(1024)
    fh.seek(start)
    kind = _sniff_archive(head)
    if kind is None and len(head) == 1024 and not any(head):
        kind = "tar"  # two zero blocks: the end-of-archive marker of an empty tar
    named_archive = _has_archive_suffix(label)
    if kind == "zip":
        yield from _iter_zip(fh, label, budget)
    elif kind in ("gz", "bz2", "xz", "tar"):
        yield from _iter_tar(fh, kind, label, budget)
    elif kind is not None:
        raise ForgetSetError(
            f"{label}: {kind} archives are not supported (zip or tar)", file=label, rule="not_an_archive"
        )
    elif named_archive and label.lower().endswith(".tar") and _tar_checksum_ok(head):
        yield from _iter_tar(fh, "tar", label, budget)  # a pre-POSIX (v7) tar without the ustar magic
    elif named_archive:
        raise ForgetSetError(
            f"{label} is named like an archive but is not one", file=label, rule="not_an_archive"
        )
    else:
        budget.entry(label)
        budget.image_file(label)
        data = _read_limited(fh, label, budget)
        yield label, data


def _tar_checksum_ok(head: bytes) -> bool:
    if len(head) < 512:
        return False
    try:
        stored = int(head[148:156].replace(b"\x00", b" ").strip() or b"-1", 8)
    except ValueError:
        return False
    return stored == sum(head[:148]) + 8 * 32 + sum(head[156:512])


def _read_limited(fh: IO[bytes], name: str, budget: _Budget, *, compressed: int | None = None) -> bytes:
    """Read ``fh`` in chunks, refusing as soon as the bytes *actually read* break a limit."""
    limits = budget.limits
    chunks: list[bytes] = []
    total = 0
    while True:
        chunk = fh.read(_CHUNK)
        if not chunk:
            break
        total += len(chunk)
        if total > limits.max_file_bytes:
            raise ForgetSetError(
                f"{name!r} is larger than max_file_bytes={limits.max_file_bytes}",
                file=name,
                rule="file_bytes",
            )
        if (
            compressed is not None
            and total > RATIO_FLOOR_BYTES
            and total > limits.max_compression_ratio * max(compressed, 1)
        ):
            raise ForgetSetError(
                f"{name!r} expands more than {limits.max_compression_ratio:g} times",
                file=name,
                rule="compression_ratio",
            )
        budget.read(name, len(chunk))
        chunks.append(chunk)
    return b"".join(chunks)


def _iter_zip(fh: IO[bytes], label: str, budget: _Budget) -> Iterator[tuple[str, bytes]]:
    limits = budget.limits
    fh.seek(0, os.SEEK_END)
    archive_size = fh.tell()
    fh.seek(0)
    try:
        zf = zipfile.ZipFile(fh)
        infos = zf.infolist()
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        OSError,
        ValueError,
        EOFError,
        NotImplementedError,
    ) as exc:
        raise ForgetSetError(
            f"{label} is not a readable zip archive ({exc})", file=label, rule="not_an_archive"
        ) from None
    # Pass 1: every check that headers allow, before a single member is decompressed.
    todo: list[tuple[str, zipfile.ZipInfo]] = []
    for info in infos:
        name = _check_name(info.filename, directory=info.is_dir())
        budget.entry(name)
        mode = info.external_attr >> 16
        if info.create_system == 3 and mode:
            fmt = stat.S_IFMT(mode)
            if fmt == stat.S_IFLNK:
                raise ForgetSetError(f"{name!r} is a symlink", file=name, rule="symlink")
            if fmt not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise ForgetSetError(f"{name!r} is not a regular file", file=name, rule="special_file")
        if info.is_dir():
            continue
        budget.unique(name)
        budget.declared(name, info.file_size)
        if _is_junk(name):
            continue
        if _has_archive_suffix(name):
            raise ForgetSetError(
                f"{name!r} is an archive inside the archive", file=name, rule="nested_archive"
            )
        if info.flag_bits & 0x1:
            raise ForgetSetError(f"{name!r} is encrypted", file=name, rule="encrypted")
        if info.compress_type not in _ZIP_METHODS:
            raise ForgetSetError(
                f"{name!r} uses zip compression method {info.compress_type}",
                file=name,
                rule="unsupported_compression",
            )
        if info.compress_size > archive_size:
            raise ForgetSetError(
                f"{name!r} claims more compressed bytes than the archive holds",
                file=name,
                rule="corrupt_archive",
            )
        if info.file_size > RATIO_FLOOR_BYTES and (
            info.compress_size == 0 or info.file_size / info.compress_size > limits.max_compression_ratio
        ):
            raise ForgetSetError(
                f"{name!r} expands {info.file_size} / {info.compress_size} bytes, above "
                f"max_compression_ratio={limits.max_compression_ratio:g}",
                file=name,
                rule="compression_ratio",
            )
        budget.image_file(name)
        todo.append((name, info))
    # Pass 2: read each member in chunks, never trusting the header sizes alone.
    for name, info in todo:
        try:
            with zf.open(info) as member:
                data = _read_limited(member, name, budget, compressed=info.compress_size)
        except ForgetSetError:
            raise
        except Exception as exc:  # BadZipFile (CRC), zlib/lzma errors, EOFError, overlapping entries...
            raise ForgetSetError(
                f"{name!r} cannot be read from the zip ({exc})", file=name, rule="corrupt_archive"
            ) from None
        if len(data) != info.file_size:
            raise ForgetSetError(
                f"{name!r} is not the size its header says", file=name, rule="corrupt_archive"
            )
        yield name, data


class _CountingReader:
    """Counts the compressed bytes handed to a decompressor."""

    def __init__(self, raw: IO[bytes]):
        self.raw = raw
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.count += len(data)
        return data

    def readable(self) -> bool:
        return True


class _GuardedStream:
    """The decompressed tar stream, refusing to produce more bytes than the limits allow.

    It is what makes a tar bomb harmless: tarfile reads pax headers and skips member data through it,
    so even bytes we never look at are counted, and the ratio to the compressed bytes consumed is
    checked as they arrive.
    """

    def __init__(self, inner: IO[bytes], counter: _CountingReader | None, budget: _Budget):
        self.inner = inner
        self.counter = counter
        self.budget = budget
        limits = budget.limits
        self.allowed = limits.max_total_bytes + 2048 * (budget.max_entries + 2) + 20480
        self.produced = 0
        self.current: str | None = None

    def read(self, n: int = -1) -> bytes:
        out = []
        want = n if n is not None and n >= 0 else self.allowed + 1
        while want > 0:
            chunk = self.inner.read(min(want, _CHUNK))
            if not chunk:
                break
            self.produced += len(chunk)
            want -= len(chunk)
            self._check()
            out.append(chunk)
        return b"".join(out)

    def _check(self) -> None:
        limits = self.budget.limits
        if self.produced > self.allowed:
            raise ForgetSetError(
                f"the archive expands to more than max_total_bytes={limits.max_total_bytes}",
                file=self.current,
                rule="total_bytes",
            )
        if (
            self.counter is not None
            and self.produced > STREAM_RATIO_FLOOR_BYTES
            and self.produced > limits.max_compression_ratio * max(self.counter.count, 1)
        ):
            raise ForgetSetError(
                f"the archive expands more than max_compression_ratio={limits.max_compression_ratio:g} times",
                file=self.current,
                rule="compression_ratio",
            )

    def readable(self) -> bool:
        return True

    def close(self) -> None:  # tarfile closes only what it opened; nothing to do here
        pass


def _iter_tar(fh: IO[bytes], kind: str, label: str, budget: _Budget) -> Iterator[tuple[str, bytes]]:
    counter = None
    inner: IO[bytes] = fh
    if kind != "tar":
        counter = _CountingReader(fh)
        opener = {"gz": gzip.GzipFile, "bz2": bz2.BZ2File, "xz": lzma.LZMAFile}[kind]
        inner = opener(fileobj=counter, mode="rb") if kind == "gz" else opener(counter, mode="rb")
    stream = _GuardedStream(inner, counter, budget)
    broken = (tarfile.TarError, OSError, EOFError, lzma.LZMAError, ValueError, UnicodeError)
    try:
        tar = tarfile.open(fileobj=stream, mode="r|")  # stream mode: strictly sequential reads
    except ForgetSetError:
        raise
    except broken as exc:
        raise ForgetSetError(
            f"{label} is not a readable tar archive ({exc})", file=label, rule="not_an_archive"
        ) from None
    members = iter(tar)
    while True:
        try:
            member = next(members)
        except StopIteration:
            break
        except ForgetSetError:
            raise
        except broken as exc:
            raise ForgetSetError(
                f"{label}: the tar archive is corrupt ({exc})", file=stream.current, rule="corrupt_archive"
            ) from None
        name = _check_name(member.name, directory=member.isdir())
        stream.current = name
        budget.entry(name)
        if member.issym():
            raise ForgetSetError(
                f"{name!r} is a symlink to {member.linkname[:200]!r}", file=name, rule="symlink"
            )
        if member.islnk():
            raise ForgetSetError(
                f"{name!r} is a hard link to {member.linkname[:200]!r}", file=name, rule="hardlink"
            )
        if member.isdir():
            continue
        if not member.isreg() or member.issparse():
            raise ForgetSetError(
                f"{name!r} is a device, fifo or other special member", file=name, rule="special_file"
            )
        budget.unique(name)
        budget.declared(name, member.size)
        if _is_junk(name):
            continue  # tarfile skips its data through the guarded stream
        if _has_archive_suffix(name):
            raise ForgetSetError(
                f"{name!r} is an archive inside the archive", file=name, rule="nested_archive"
            )
        budget.image_file(name)
        try:
            extracted = tar.extractfile(member)
            data = _read_limited(extracted, name, budget) if extracted is not None else b""
        except ForgetSetError:
            raise
        except broken as exc:
            raise ForgetSetError(
                f"{name!r} cannot be read from the tar ({exc})", file=name, rule="corrupt_archive"
            ) from None
        if len(data) != member.size:
            raise ForgetSetError(f"{name!r} is truncated in the archive", file=name, rule="corrupt_archive")
        yield name, data


def _iter_folder(root: Path, budget: _Budget) -> Iterator[tuple[str, bytes]]:
    """Walk ``root`` in sorted order without following any symlink (a link is refused, not skipped)."""
    stack: list[tuple[Path, str, int]] = [(root, "", 0)]
    while stack:
        folder, prefix, depth = stack.pop()
        if depth > MAX_FOLDER_DEPTH:
            raise ForgetSetError(
                f"folders nested more than {MAX_FOLDER_DEPTH} deep", file=prefix, rule="bad_name"
            )
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
        subfolders = []
        for entry in entries:
            name = _check_name(prefix + entry.name)
            budget.entry(name)
            if entry.is_symlink():
                raise ForgetSetError(
                    f"{name!r} is a symlink; links are never followed", file=name, rule="symlink"
                )
            if entry.is_dir(follow_symlinks=False):
                subfolders.append((Path(entry.path), name + "/", depth + 1))
                continue
            if not entry.is_file(follow_symlinks=False):
                raise ForgetSetError(f"{name!r} is not a regular file", file=name, rule="special_file")
            if _is_junk(name):
                continue
            if _has_archive_suffix(name):
                raise ForgetSetError(
                    f"{name!r} is an archive inside the forget set", file=name, rule="nested_archive"
                )
            yield name, _read_folder_file(entry.path, name, budget)
        stack.extend(reversed(subfolders))


def _read_folder_file(path: str, name: str, budget: _Budget) -> bytes:
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise ForgetSetError(
            f"{name!r} cannot be opened ({exc.strerror})",
            file=name,
            rule="symlink" if os.path.islink(path) else "not_found",
        ) from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ForgetSetError(f"{name!r} is not a regular file", file=name, rule="special_file")
        budget.image_file(name)
        budget.declared(name, st.st_size)
        return _read_limited(fh, name, budget)


# --------------------------------------------------------------------------- images


def _decode(name: str, data: bytes, budget: _Budget) -> DecodedImage:
    limits = budget.limits
    head = data[:512]
    archive = _sniff_archive(head)
    if archive is not None:
        raise ForgetSetError(
            f"{name!r} is a {archive} archive, not an image", file=name, rule="nested_archive"
        )
    guess = _sniff_image(head)
    try:
        im = Image.open(io.BytesIO(data), formats=_OPEN_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ForgetSetError(f"{name!r}: {exc}", file=name, rule="too_many_pixels") from None
    except Exception as exc:
        if guess is None:
            raise ForgetSetError(
                f"{name!r} is not a PNG, JPEG or WebP image", file=name, rule="not_an_image"
            ) from None
        raise ForgetSetError(
            f"{name!r} looks like {guess} but its header is corrupt ({exc})",
            file=name,
            rule="truncated_image",
        ) from None
    with im:
        w, h = im.size
        if w * h > limits.max_pixels:
            raise ForgetSetError(
                f"{name!r} is {w}x{h} = {w * h} pixels, above max_pixels={limits.max_pixels}",
                file=name,
                rule="too_many_pixels",
            )
        if min(w, h) < limits.min_side:
            raise ForgetSetError(
                f"{name!r} is {w}x{h}, its shorter side is below min_side={limits.min_side}",
                file=name,
                rule="too_small",
            )
        try:
            # An MPO is a JPEG with extra pictures (depth maps, previews): its first frame is the photo.
            animated = im.format != "MPO" and (
                bool(getattr(im, "is_animated", False)) or getattr(im, "n_frames", 1) > 1
            )
            im.seek(0)
        except Exception as exc:
            raise ForgetSetError(f"{name!r} is corrupt ({exc})", file=name, rule="truncated_image") from None
        if animated:
            raise ForgetSetError(
                f"{name!r} is animated (more than one frame)", file=name, rule="animated_image"
            )
        if im.format not in (*ACCEPTED_FORMATS, "MPO"):
            raise ForgetSetError(
                f"{name!r} is {im.format}; use PNG, JPEG or WebP", file=name, rule="unsupported_format"
            )
        budget.add_pixels(name, w * h)
        try:
            im.load()
        except Image.DecompressionBombError as exc:
            raise ForgetSetError(f"{name!r}: {exc}", file=name, rule="too_many_pixels") from None
        except Exception as exc:  # OSError "image file is truncated", SyntaxError "broken PNG file", zlib...
            raise ForgetSetError(
                f"{name!r} is truncated or corrupt ({exc})", file=name, rule="truncated_image"
            ) from None
        fmt, source_mode = ("JPEG" if im.format == "MPO" else im.format), im.mode
        try:
            oriented = ImageOps.exif_transpose(im)
        except Exception:  # a broken EXIF block only loses the orientation
            oriented = im
        image = _normalize_mode(oriented if oriented is not None else im)
    return DecodedImage(
        name=name,
        image=image,
        width=image.width,
        height=image.height,
        sha256=hashlib.sha256(data).hexdigest(),
        format=fmt or "",
        source_mode=source_mode,
        nbytes=len(data),
    )


def _premultiply(im: Image.Image, mode: str) -> Image.Image:
    """Composite onto black: every colour channel multiplied by alpha."""
    rgba = im.convert("LA" if mode == "L" else "RGBA")
    *colour, alpha = rgba.split()
    return Image.merge(mode, [ImageChops.multiply(c, alpha) for c in colour])


def _normalize_mode(im: Image.Image) -> Image.Image:
    """Return a new, loaded ``L`` or ``RGB`` image following the module's documented rules."""
    import numpy as np

    mode = im.mode
    if mode in ("L", "RGB"):
        return im.copy()
    if mode == "1":
        return im.convert("L")
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(im).astype(np.float64)
        if mode != "F":
            arr = arr / 257.0
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
    if mode in ("LA", "La"):
        return _premultiply(im, "L")
    if mode in ("RGBA", "RGBa", "PA"):
        return _premultiply(im, "RGB")
    if mode == "P":
        transparent = "transparency" in im.info or (im.palette is not None and im.palette.mode == "RGBA")
        rgb = _premultiply(im, "RGB") if transparent else im.convert("RGB")
        r, g, b = rgb.split()
        if ImageChops.difference(r, g).getbbox() is None and ImageChops.difference(g, b).getbbox() is None:
            return r.copy()
        return rgb
    return im.convert("RGB")  # CMYK, YCbCr, LAB, HSV


# --------------------------------------------------------------------------- hashes


def _content_sha256(pairs) -> str:
    h = hashlib.sha256()
    for name, digest in sorted(pairs):
        h.update(f"{name}\0{digest}\n".encode())
    return h.hexdigest()


def _source_sha256(source) -> str:
    h = hashlib.sha256()
    if isinstance(source, bytes | bytearray | memoryview):
        h.update(source)
        return h.hexdigest()
    if hasattr(source, "read"):
        pos = source.tell()
        source.seek(0)
        while chunk := source.read(_CHUNK):
            h.update(chunk)
        source.seek(pos)
        return h.hexdigest()
    with open(source, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()
