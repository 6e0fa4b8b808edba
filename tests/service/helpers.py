"""Small builders shared by the service tests (rows, archives, keys)."""

from __future__ import annotations

import secrets
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from jobs.ids import new_id
from jobs.tables import ForgetSet, Job, Model, Team


def make_team(session: Session, name: str | None = None) -> Team:
    team = Team(id=new_id("team"), name=name or f"team-{secrets.token_hex(4)}")
    session.add(team)
    session.flush()
    return team


def make_model_row(session: Session, team_id: str) -> Model:
    model = Model(id=new_id("model"), team_id=team_id, name="m", source="hub", hub_id="org/model", revision="main")
    session.add(model)
    session.flush()
    return model


def make_forget_set_row(session: Session, team_id: str) -> ForgetSet:
    fs = ForgetSet(
        id=new_id("forget_set"),
        team_id=team_id,
        name="fs",
        filename="fs.zip",
        storage_key=f"teams/{team_id}/forget-sets/x/fs.zip",
        archive_bytes=1,
        sha256="0" * 64,
        image_count=1,
        total_bytes=1,
    )
    session.add(fs)
    session.flush()
    return fs


def count_rows(session: Session, table, team_id: str) -> int:
    return session.scalar(select(func.count()).select_from(table).where(table.team_id == team_id))


def job_count(session: Session, team_id: str) -> int:
    return count_rows(session, Job, team_id)


# --- what a request leaves behind, and the problem it answers --------------------------------
def snapshot(api, team_id: str) -> dict:
    """Everything a request could leave behind for ``team_id``."""
    from jobs.db import session_scope

    with session_scope(api.settings) as s:
        rows = {t.__tablename__: count_rows(s, t, team_id) for t in (ForgetSet, Model, Job)}
    tmp = api.settings.resolved_upload_tmp_dir()
    return {
        "rows": rows,
        "files": api.storage.list(f"teams/{team_id}"),
        "tmp": sorted(p.name for p in tmp.iterdir()) if tmp.exists() else [],
    }


def assert_problem(resp, status: int, field: str | None = None, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json"), resp.headers
    body = resp.json()
    for key in ("type", "title", "status", "detail"):
        assert key in body, body
    assert body["status"] == status
    if field is not None:
        assert body.get("field") == field, body
    if code is not None:
        assert body["code"] == code, body
    return body


# --- files -------------------------------------------------------------------------------------
def png_bytes(seed: int = 0, size: int = 28) -> bytes:
    """A small grey PNG with a blob in it (a stand-in digit; the API only validates images)."""
    import io
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    im = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(im)
    x, y = rng.randint(4, 12), rng.randint(4, 12)
    draw.ellipse([x, y, x + 12, y + 12], outline=255, width=3)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def tar_bytes(members: dict[str, bytes]) -> bytes:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def safetensors_bytes(n: int = 4) -> bytes:
    import numpy as np
    from safetensors.numpy import save

    return save({"weight": np.arange(n, dtype=np.float32), "bias": np.zeros(2, dtype=np.float32)})


TINY = Path(__file__).resolve().parents[2] / "reference" / "mnist-ddpm-tiny"
TINY_FILES = (
    "model_index.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "scheduler/scheduler_config.json",
)


def tiny_model_archive(kind: str = "tar", unet_config: dict | None = None) -> bytes:
    """The tiny reference DDPM pipeline folder as an archive (``unet_config`` overrides its config)."""
    import json

    members = {f"mnist-ddpm-tiny/{rel}": (TINY / rel).read_bytes() for rel in TINY_FILES}
    if unet_config:
        cfg = json.loads(members["mnist-ddpm-tiny/unet/config.json"])
        members["mnist-ddpm-tiny/unet/config.json"] = json.dumps({**cfg, **unet_config}).encode()
    return tar_bytes(members) if kind == "tar" else zip_bytes(members)


PICKLE_PAYLOAD = b"\x80\x04\x95\x1c\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94\x8c\x06system\x94\x93\x94."
