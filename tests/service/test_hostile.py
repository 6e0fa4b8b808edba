"""A hostile corpus, generated here: archives, images, models, URLs, requests and keys built to break
or subvert the service. Each case asserts the status, the problem+json body naming what is wrong
(``code``, ``field`` and, for files, the ``rule``), that nothing was left behind (the team's rows,
its stored files, the temporary upload folder) and that the service keeps serving.

The cases of ``test_api.py`` (path traversal in a tar, pickles named .ckpt/.safetensors, a truncated
safetensors, the wrong architecture, loopback/link-local/private/file:// URLs, malformed and huge
JSON, missing/invalid/revoked/other-team keys, a reused idempotency key) are not repeated here.
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zipfile
import zlib

import pytest
from sqlalchemy import select

from api.keys import revoke_key
from jobs.db import session_scope
from jobs.tables import ApiKey
from tests.service.helpers import (
    PICKLE_PAYLOAD,
    assert_problem,
    png_bytes,
    safetensors_bytes,
    snapshot,
    tar_bytes,
    zip_bytes,
)

pytestmark = pytest.mark.timeout(120)
EMPTY = {"rows": {"forget_sets": 0, "models": 0, "jobs": 0}, "files": [], "tmp": []}


# --- builders ------------------------------------------------------------------------------------
def image(fmt: str = "PNG", mode: str = "L", size=(28, 28), **save) -> bytes:
    from PIL import Image, ImageDraw

    im = Image.new(mode, size)
    if min(size) > 8:
        ImageDraw.Draw(im).ellipse([4, 4, size[0] - 4, size[1] - 4], outline="white" if mode != "I;16" else 65535)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **save)
    return buf.getvalue()


def animated(fmt: str) -> bytes:
    from PIL import Image

    frames = [Image.new("L", (28, 28), v) for v in (0, 128, 255)]
    buf = io.BytesIO()
    frames[0].save(buf, format=fmt, save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (a decompression bomb is decoded from that)."""
    raw = png_bytes()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return raw[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + raw[33:]


def tar_with(*infos: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for info, data in infos:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def tar_link(name: str, target: str, kind: bytes) -> bytes:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    first = tarfile.TarInfo("a.png")
    return tar_with((first, png_bytes()), (info, None))


def tar_special(kind: bytes) -> bytes:
    info = tarfile.TarInfo("dev.png")
    info.type = kind
    return tar_with((tarfile.TarInfo("a.png"), png_bytes()), (info, None))


def zip_symlink() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("a.png", png_bytes())
        info = zipfile.ZipInfo("link.png")
        info.external_attr = 0o120777 << 16  # a unix symlink
        zf.writestr(info, "/etc/passwd")
    return buf.getvalue()


def zip_deflated(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def zip_flagged_encrypted() -> bytes:
    """A zip whose member says it is encrypted (general purpose bit 0 set in both headers)."""
    data = bytearray(zip_bytes({"a.png": png_bytes()}))
    for sig, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = data.find(sig)
        data[at + offset] |= 1
    return bytes(data)


def zip_bad_crc() -> bytes:
    data = bytearray(zip_bytes({"a.png": png_bytes(), "b.png": png_bytes(1)}))
    at = data.find(b"PK\x03\x04")
    data[at + 14] ^= 0xFF  # the local header's CRC-32
    at = data.find(b"PK\x01\x02")
    data[at + 16] ^= 0xFF  # and the central directory's
    return bytes(data)


def many_tiny_files(n: int) -> bytes:
    return zip_bytes({f"f{i:05d}.png": b"" for i in range(n)})


def safetensors_raw(header: dict | bytes, data: bytes = b"", header_len: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data


def model_tar(members: dict[str, bytes]) -> bytes:
    return tar_bytes({f"pipe/{k}": v for k, v in members.items()})


def torch_zip_pickle() -> bytes:
    """What ``torch.save`` writes: a zip holding ``archive/data.pkl`` (a pickle, whatever it is named)."""
    return zip_bytes({"archive/data.pkl": PICKLE_PAYLOAD, "archive/version": b"3\n"})


# --- forget sets ---------------------------------------------------------------------------------
MiB = 1024 * 1024
HOSTILE_FORGET_SETS = [
    # archives
    ("zip bomb (ratio)", lambda: zip_deflated({"bomb.png": b"\0" * (12 * MiB)}), "compression_ratio"),
    (
        "zip bomb (total size)",
        lambda: zip_deflated({f"{i}.png": b"\0" * (9 * MiB) for i in range(25)}),
        "compression_ratio",
    ),
    ("absolute name in tar", lambda: tar_bytes({"/etc/cron.d/x.png": png_bytes()}), "path_traversal"),
    ("absolute name in zip", lambda: zip_bytes({"/tmp/x.png": png_bytes()}), "path_traversal"),
    ("dot-dot inside a zip", lambda: zip_bytes({"a/../../x.png": png_bytes()}), "path_traversal"),
    ("backslash traversal", lambda: zip_bytes({"..\\..\\x.png": png_bytes()}), "path_traversal"),
    ("drive letter", lambda: zip_bytes({"C:/x.png": png_bytes()}), "path_traversal"),
    ("symlink in tar", lambda: tar_link("l.png", "/etc/passwd", tarfile.SYMTYPE), "symlink"),
    ("hard link in tar", lambda: tar_link("h.png", "a.png", tarfile.LNKTYPE), "hardlink"),
    ("symlink in zip", zip_symlink, "symlink"),
    ("device in tar", lambda: tar_special(tarfile.CHRTYPE), "special_file"),
    ("fifo in tar", lambda: tar_special(tarfile.FIFOTYPE), "special_file"),
    (
        "zip inside a zip",
        lambda: zip_bytes({"a.png": png_bytes(), "inner.zip": zip_bytes({"b.png": png_bytes()})}),
        "nested_archive",
    ),
    (
        "tar disguised as png in a zip",
        lambda: zip_bytes({"a.png": tar_bytes({"b.png": png_bytes()})}),
        "nested_archive",
    ),
    ("thousands of tiny files", lambda: many_tiny_files(3000), "too_many_files"),
    (
        "duplicate member names",
        lambda: tar_with((tarfile.TarInfo("a.png"), png_bytes()), (tarfile.TarInfo("a.png"), png_bytes(2))),
        "duplicate_name",
    ),
    ("control character in a name", lambda: zip_bytes({"a\x1b[31m.png": png_bytes()}), "bad_name"),
    ("encrypted member", zip_flagged_encrypted, "encrypted"),
    ("bad CRC", zip_bad_crc, "corrupt_archive"),
    ("truncated zip", lambda: zip_bytes({f"{i}.png": png_bytes(i) for i in range(4)})[:400], "not_an_archive"),
    ("gzip named tar.gz holding garbage", lambda: __import__("gzip").compress(b"not a tar" * 100), "not_an_archive"),
    ("7z named .zip", lambda: b"7z\xbc\xaf\x27\x1c" + b"\0" * 200, "not_an_archive"),
    # images
    ("truncated PNG", lambda: png_bytes()[:60], "truncated_image"),
    ("truncated JPEG", lambda: image("JPEG")[:300], "truncated_image"),
    ("decompression bomb", lambda: png_claiming(60000, 60000), "too_many_pixels"),
    ("animated GIF", lambda: animated("GIF"), "animated_image"),
    ("animated WebP", lambda: animated("WEBP"), "animated_image"),
    ("animated PNG", lambda: animated("PNG"), "animated_image"),
    ("static GIF", lambda: image("GIF"), "unsupported_format"),
    ("BMP", lambda: image("BMP"), "not_an_image"),
    (
        "SVG named .png",
        lambda: b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>',
        "not_an_image",
    ),
    ("1x1 pixel", lambda: image(size=(1, 1)), "too_small"),
]
FILENAMES = {
    "gzip named tar.gz holding garbage": "x.tar.gz",
    "7z named .zip": "x.zip",
    "truncated zip": "x.zip",
    "truncated PNG": "x.png",
    "truncated JPEG": "x.jpg",
    "decompression bomb": "x.png",
    "animated GIF": "x.gif",
    "animated WebP": "x.webp",
    "animated PNG": "x.png",
    "static GIF": "x.gif",
    "BMP": "x.bmp",
    "SVG named .png": "x.png",
    "1x1 pixel": "x.png",
}


@pytest.fixture
def team(api):
    return api.new_team()


def keeps_serving(api, headers) -> None:
    assert api.client.get("/readyz").status_code == 200
    assert api.client.get("/v1/forget-sets", headers=headers).status_code == 200


@pytest.mark.parametrize(("case", "make", "rule"), HOSTILE_FORGET_SETS, ids=[c[0] for c in HOSTILE_FORGET_SETS])
def test_hostile_forget_sets_are_refused_naming_the_rule(api, team, case, make, rule):
    team_id, headers = team
    name = FILENAMES.get(case, "x.tar" if "tar" in case else "x.zip")
    resp = api.client.post("/v1/forget-sets", headers=headers, files={"file": (name, make())})
    body = assert_problem(resp, 422, "file", "invalid_forget_set")
    assert body["rule"] == rule, body
    assert snapshot(api, team_id) == EMPTY
    keeps_serving(api, headers)


@pytest.mark.parametrize(
    ("case", "data", "filename"),
    [
        ("16-bit grey PNG", lambda: image(mode="I;16"), "deep.png"),
        ("CMYK JPEG", lambda: image("JPEG", "CMYK"), "print.jpg"),
        ("palette PNG", lambda: image(mode="P"), "palette.png"),
        ("RGBA WebP", lambda: image("WEBP", "RGBA"), "alpha.webp"),
        ("a traversal filename", png_bytes, "../../etc/passwd.png"),
    ],
)
def test_odd_but_valid_images_are_converted_not_refused(api, team, case, data, filename):
    """Unusual modes are images all the same: accepted and converted (documented in vdu_core.forget_set);
    a client's path in the filename is reduced to a safe name inside the team's prefix."""
    team_id, headers = team
    resp = api.client.post("/v1/forget-sets", headers=headers, files={"file": (filename, data())})
    assert resp.status_code == 201, resp.text
    fs = resp.json()
    assert fs["image_count"] == 1 and "/" not in fs["filename"] and ".." not in fs["filename"]
    assert snapshot(api, team_id)["files"] == [f"teams/{team_id}/forget-sets/{fs['id']}/{fs['filename']}"]


# --- models --------------------------------------------------------------------------------------
TENSOR = {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
HOSTILE_MODELS = [
    ("pickle named .bin", "model.bin", lambda: PICKLE_PAYLOAD, "pickle"),
    ("pickle named .pt", "model.pt", lambda: PICKLE_PAYLOAD, "pickle"),
    ("torch zip pickle named .pt", "model.pt", torch_zip_pickle, "pickle"),
    (
        "safetensors header length beyond the file",
        "m.safetensors",
        lambda: safetensors_raw(TENSOR, b"\0" * 16, header_len=2**40),
        "bad_safetensors",
    ),
    (
        "safetensors header not JSON",
        "m.safetensors",
        lambda: safetensors_raw(b"{not json" + b" " * 7),
        "bad_safetensors",
    ),
    (
        "safetensors offsets beyond the data",
        "m.safetensors",
        lambda: safetensors_raw({"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}, b"\0" * 16),
        "bad_safetensors",
    ),
    (
        "safetensors shape disagreeing with offsets",
        "m.safetensors",
        lambda: safetensors_raw({"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 16]}}, b"\0" * 16),
        "bad_safetensors",
    ),
    (
        "safetensors unknown dtype",
        "m.safetensors",
        lambda: safetensors_raw({"w": {"dtype": "EVIL", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16),
        "bad_safetensors",
    ),
    (
        "config.json not JSON",
        "m.tar",
        lambda: model_tar(
            {"unet/config.json": b"{oops", "unet/diffusion_pytorch_model.safetensors": safetensors_bytes()}
        ),
        "bad_config",
    ),
    (
        "symlink in a model archive",
        "m.tar",
        lambda: tar_link("pipe/unet/diffusion_pytorch_model.safetensors", "/etc/shadow", tarfile.SYMTYPE),
        "symlink",
    ),
    ("traversal in a model archive", "m.tar", lambda: tar_bytes({"../../x/config.json": b"{}"}), "path_traversal"),
    (
        "zip bomb as a model",
        "m.zip",
        lambda: zip_deflated({"pipe/unet/config.json": b" " * (64 * MiB)}),
        "compression_ratio",
    ),
    ("too many members", "m.zip", lambda: zip_bytes({f"pipe/f{i}.json": b"{}" for i in range(400)}), "too_many_files"),
    (
        "nested archive in a model",
        "m.tar",
        lambda: model_tar({"model_index.json": b"{}", "unet/weights.zip": zip_bytes({"a": b"b"})}),
        "unexpected_file",
    ),
]


@pytest.mark.parametrize(("case", "filename", "make", "rule"), HOSTILE_MODELS, ids=[c[0] for c in HOSTILE_MODELS])
def test_hostile_model_files_are_refused_naming_the_rule(api, team, case, filename, make, rule):
    team_id, headers = team
    resp = api.client.post("/v1/models", headers=headers, files={"file": (filename, make())})
    body = assert_problem(resp, 422, "file", "invalid_model")
    assert body["rule"] == rule, body
    assert "/tmp" not in body["detail"]
    assert snapshot(api, team_id) == EMPTY
    keeps_serving(api, headers)


# --- URLs ------------------------------------------------------------------------------------------
HOSTILE_URLS = [
    "https://10.0.0.1/m.safetensors",
    "https://192.168.1.10/m.safetensors",
    "https://172.16.0.1/m.safetensors",
    "https://100.64.0.1/m.safetensors",  # carrier-grade NAT
    "https://0.0.0.0/m.safetensors",
    "https://[fe80::1]/m.safetensors",
    "https://[::ffff:127.0.0.1]/m.safetensors",
    "https://[fd00::1]/m.safetensors",
    "https://2130706433/m.safetensors",  # 127.0.0.1 as one decimal number
    "https://0x7f000001/m.safetensors",
    "https://metadata.localhost/latest",
    "https://user:secret@example.com/m.safetensors",
    "http://example.com/m.safetensors",  # plain http
    "gopher://example.com/_GET",
    "ftp://example.com/m.safetensors",
    "data:application/octet-stream;base64,AAAA",
    "s3://bucket-only",
]


@pytest.mark.parametrize("url", HOSTILE_URLS)
def test_hostile_model_urls_are_refused(api, team, url):
    team_id, headers = team
    resp = api.client.post("/v1/models", headers=headers, json={"name": "m", "source": "url", "url": url})
    assert_problem(resp, 422, "url")
    assert snapshot(api, team_id) == EMPTY


@pytest.mark.parametrize(
    "url",
    [
        "https://[::1]/hook",
        "https://10.1.1.1/hook",
        "https://169.254.169.254/latest/meta-data/",
        "ftp://e.com/h",
        "https://0x7f000001/hook",
        "https://a:b@example.com/hook",
    ],
)
def test_hostile_webhook_urls_are_refused(api, ready, url):
    team_id, headers, model_id, fs_id = ready
    before = snapshot(api, team_id)
    body = {"model": model_id, "forget_set": fs_id, "params": {"steps": 3}, "webhook_url": url}
    assert_problem(api.client.post("/v1/jobs", headers=headers, json=body), 422, "webhook_url")
    assert snapshot(api, team_id) == before


@pytest.mark.parametrize(
    "target",
    [
        "http://169.254.169.254/latest/meta-data/iam",
        "https://127.0.0.1:5432/",
        "https://10.0.0.5/x",
        "file:///etc/passwd",
    ],
)
def test_a_model_url_redirecting_to_a_private_address_is_not_followed(monkeypatch, tmp_path, target):
    """The worker re-checks every redirect hop before following it (``worker.fetch.download_url``)."""
    import socket

    import httpx

    from jobs.settings import Settings
    from vdu_core.errors import ModelLoadError
    from worker import fetch

    real = socket.getaddrinfo

    def fake_dns(host, *args, **kwargs):  # models.example.org is public; nothing else resolves offline
        if host == "models.example.org":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", 443))]
        return real(host, *args, **kwargs)

    requested: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requested.append(str(request.url))
        return httpx.Response(302, headers={"Location": target})

    transport = httpx.MockTransport(handler)
    real_client = httpx.Client
    monkeypatch.setattr(socket, "getaddrinfo", fake_dns)
    monkeypatch.setattr(httpx, "Client", lambda **kw: real_client(transport=transport, **kw))
    with pytest.raises(ModelLoadError) as err:
        fetch.download_url("https://models.example.org/m.safetensors", tmp_path / "m", Settings(log_json=False))
    assert err.value.rule == "url_refused" and err.value.field == "url"
    assert requested == ["https://models.example.org/m.safetensors"]  # the redirect target was never requested
    assert not (tmp_path / "m").exists()


# --- requests --------------------------------------------------------------------------------------
@pytest.fixture
def ready(api, team):
    team_id, headers = team
    model = api.client.post(
        "/v1/models", headers=headers, json={"name": "m", "source": "hub", "hub_id": "org/m", "revision": "abc"}
    )
    fs = api.client.post(
        "/v1/forget-sets", headers=headers, files={"file": ("d.zip", zip_bytes({"a.png": png_bytes()}))}
    )
    assert model.status_code == 201 and fs.status_code == 201
    return team_id, headers, model.json()["id"], fs.json()["id"]


def job_json(model_id: str, fs_id: str, **over) -> bytes:
    return json.dumps({"model": model_id, "forget_set": fs_id, "params": {"steps": 3}, **over}).encode()


HOSTILE_JOB_BODIES = [
    # (case, body builder(model_id, fs_id) -> bytes, status, field)
    ("nested 30,000 deep", lambda m, f: b"[" * 30000 + b"]" * 30000, 400, "body"),
    ("invalid UTF-8", lambda m, f: b'{"model": "\xff\xfe"}', 400, "body"),
    ("empty body", lambda m, f: b"", 400, "body"),
    ("a JSON array", lambda m, f: b"[1, 2]", 422, "body"),
    ("a JSON string", lambda m, f: b'"job"', 422, "body"),
    ("lone surrogate", lambda m, f: job_json(m, f).replace(m.encode(), b"\\ud800"), 422, "model"),
    ("NUL in the model id", lambda m, f: job_json(m + "\x00", f), 422, "model"),
    ("NUL in the forget set id", lambda m, f: job_json(m, "\x00" + f), 422, "forget_set"),
    (
        "overflowing float",
        lambda m, f: job_json(m, f, params={"gamma": 0.5}).replace(b"0.5", b"1e400"),
        422,
        "params.gamma",
    ),
    ("400-digit integer", lambda m, f: job_json(m, f, params={"steps": 10**400}), 422, "params.steps"),
    ("negative seed", lambda m, f: job_json(m, f, params={"seed": -5}), 422, "params.seed"),
    ("boolean steps", lambda m, f: job_json(m, f, params={"steps": True}), 422, "params.steps"),
    ("huge evaluation seed", lambda m, f: job_json(m, f, evaluation={"seed": 10**30}), 422, "evaluation.seed"),
    ("NUL in the webhook", lambda m, f: job_json(m, f, webhook_url="https://x\x00y/"), 422, "webhook_url"),
    ("unknown evaluation key", lambda m, f: job_json(m, f, evaluation={"__class__": 1}), 422, "evaluation.__class__"),
]


@pytest.mark.parametrize(
    ("case", "build", "status", "field"), HOSTILE_JOB_BODIES, ids=[c[0] for c in HOSTILE_JOB_BODIES]
)
def test_hostile_job_bodies(api, ready, case, build, status, field):
    team_id, headers, model_id, fs_id = ready
    before = snapshot(api, team_id)
    resp = api.client.post(
        "/v1/jobs", headers={**headers, "Content-Type": "application/json"}, content=build(model_id, fs_id)
    )
    assert_problem(resp, status, field)
    assert snapshot(api, team_id) == before
    keeps_serving(api, headers)


@pytest.mark.parametrize(
    ("case", "body", "field"),
    [
        ("NUL in the name", {"name": "evil\x00", "source": "hub", "hub_id": "o/m", "revision": "r"}, "name"),
        ("escape sequence in the name", {"name": "\x1b[2J", "source": "hub", "hub_id": "o/m", "revision": "r"}, "name"),
        ("newline in the revision", {"name": "m", "source": "hub", "hub_id": "o/m", "revision": "main\nx"}, "revision"),
        ("hub id with a scheme", {"name": "m", "source": "hub", "hub_id": "https://evil/x", "revision": "r"}, "hub_id"),
        (
            "url and hub id together",
            {"name": "m", "source": "url", "url": "https://e.com/m", "hub_id": "o/m"},
            "hub_id",
        ),
        (
            "17 lineage checkpoints",
            {
                "name": "m",
                "source": "hub",
                "hub_id": "o/m",
                "revision": "r",
                "lineage": [{"hub_id": "o/m", "revision": "r"}] * 17,
            },
            "lineage",
        ),
    ],
)
def test_hostile_model_references(api, team, case, body, field):
    team_id, headers = team
    assert_problem(api.client.post("/v1/models", headers=headers, json=body), 422, field)
    assert snapshot(api, team_id) == EMPTY


def test_unicode_names_are_kept_as_sent(api, team):
    """Names are text, not code: right-to-left overrides and emoji are stored and returned verbatim."""
    _, headers = team
    name = "zéro \u202egnp.exe 🚫"
    resp = api.client.post(
        "/v1/models", headers=headers, json={"name": name, "source": "hub", "hub_id": "o/m", "revision": "r"}
    )
    assert resp.status_code == 201 and resp.json()["name"] == name


@pytest.mark.parametrize(
    ("case", "method", "path", "status", "field"),
    [
        ("NUL in a job id", "GET", "/v1/jobs/%00", 404, None),
        ("NUL in a forget set id", "DELETE", "/v1/forget-sets/fs_%00", 404, None),
        ("a 5,000-character id", "GET", "/v1/models/" + "m" * 5000, 404, None),
        ("a huge limit", "GET", "/v1/jobs?limit=" + "9" * 40, 422, "limit"),
        ("a negative limit", "GET", "/v1/models?limit=-1", 422, "limit"),
        ("a unicode cursor", "GET", "/v1/jobs?after=job_%C3%A9%00", 422, "after"),
        ("a huge events cursor", "GET", "/v1/jobs/job_x/events?after=" + "9" * 40, 422, "after"),
        ("artifact path traversal", "GET", "/v1/jobs/job_x/artifacts/..%2F..%2Fetc%2Fpasswd", 404, None),
        ("an unknown status filter", "GET", "/v1/jobs?status=%00", 422, "status[0]"),
    ],
)
def test_hostile_paths_and_queries(api, team, case, method, path, status, field):
    team_id, headers = team
    assert_problem(api.client.request(method, path, headers=headers), status, field)
    assert snapshot(api, team_id) == EMPTY


def test_multipart_abuse(api, team):
    team_id, headers = team
    h = {**headers, "Content-Type": "multipart/form-data"}  # no boundary
    assert_problem(api.client.post("/v1/forget-sets", headers=h, content=b"--x\r\n"), 400, "Content-Type")
    too_many = [("files", (f"{i}.png", b"x")) for i in range(api.settings.max_upload_files + 1)]
    assert_problem(api.client.post("/v1/forget-sets", headers=headers, files=too_many), 422, "files")
    big_field = {"name": "n" * (70 * 1024)}
    resp = api.client.post("/v1/forget-sets", headers=headers, data=big_field, files={"file": ("a.png", png_bytes())})
    assert_problem(resp, 413, "name")
    twice = [("name", (None, "a")), ("name", (None, "b")), ("file", ("a.png", png_bytes()))]
    assert_problem(api.client.post("/v1/forget-sets", headers=headers, files=twice), 422, "name")
    two_models = [("file", ("a.safetensors", safetensors_bytes())), ("file", ("b.safetensors", safetensors_bytes()))]
    assert_problem(api.client.post("/v1/models", headers=headers, files=two_models), 422, "file")
    bad_text = b'--B\r\nContent-Disposition: form-data; name="name"\r\n\r\n\xff\xfe\r\n--B--\r\n'
    resp = api.client.post(
        "/v1/forget-sets", headers={**headers, "Content-Type": "multipart/form-data; boundary=B"}, content=bad_text
    )
    assert_problem(resp, 422, "name")
    assert snapshot(api, team_id) == EMPTY


# --- keys ------------------------------------------------------------------------------------------
def test_hostile_keys_are_401_and_say_nothing_about_them(api, team):
    team_id, headers = team
    key = headers["Authorization"].split(" ", 1)[1]
    secret = key.split("_", 2)[2]
    forged = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    attempts = [
        {"Authorization": f"Bearer {forged}"},  # the right public id, a wrong secret
        {"Authorization": f"Token {key}"},
        {"Authorization": f"Bearer {key}{key}"},
        {"Authorization": "Bearer " + "vdu_" + "A" * 8000},
        {"Authorization": b"Bearer vdu_\xff\xfe"},
        {"X-Api-Key": key},  # only the Authorization header counts
    ]
    for h in attempts:
        body = assert_problem(api.client.get("/v1/jobs", headers=h), 401, "Authorization", "unauthorized")
        assert secret not in json.dumps(body)
    resp = api.client.get(f"/v1/jobs?api_key={key}")
    assert_problem(resp, 401, "Authorization") and secret not in resp.text
    with session_scope(api.settings) as s:
        prefix = s.scalar(select(ApiKey.prefix).where(ApiKey.team_id == team_id))
        assert revoke_key(s, prefix)
    for path in ("/v1/jobs", "/v1/models", "/v1/forget-sets"):
        assert_problem(api.client.get(path, headers=headers), 401, "Authorization")
    resp = api.client.post("/v1/forget-sets", headers=headers, files={"file": ("a.png", png_bytes())})
    assert_problem(resp, 401, "Authorization")
    assert snapshot(api, team_id) == EMPTY


def test_an_idempotency_key_belongs_to_one_team(api, ready):
    """The same Idempotency-Key from another team is another request: never a replay of someone else's job."""
    team_id, headers, model_id, fs_id = ready
    other = api.new_team()
    other_ready = (other[0], other[1])
    h = {**headers, "Idempotency-Key": "shared-key-1"}
    h["Content-Type"] = "application/json"
    first = api.client.post("/v1/jobs", headers=h, content=job_json(model_id, fs_id))
    assert first.status_code == 201
    # the other team reuses the key with our ids: its own validation answers (our model is not theirs)
    resp = api.client.post(
        "/v1/jobs",
        headers={**other_ready[1], "Idempotency-Key": "shared-key-1", "Content-Type": "application/json"},
        content=job_json(model_id, fs_id),
    )
    assert_problem(resp, 422, "model")
    assert snapshot(api, other[0]) == EMPTY
    again = api.client.post(
        "/v1/jobs",
        headers=h,
        content=job_json(model_id, fs_id, params={"steps": 4}),
    )
    assert_problem(again, 422, "Idempotency-Key", "idempotency_key_reused")
    assert snapshot(api, team_id)["rows"]["jobs"] == 1
