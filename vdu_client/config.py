"""Where the CLI finds the endpoint and key: flags, then ``VDU_ENDPOINT``/``VDU_API_KEY``, then
``~/.config/vdu/config.json`` (``$XDG_CONFIG_HOME/vdu``; written 0600 by ``vdu configure``)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from vdu_client.errors import VDUClientError


def config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "vdu" / "config.json"


@dataclass
class Config:
    endpoint: str | None = None
    api_key: str | None = None


def load_file(path: Path | None = None) -> Config:
    path = path or config_path()
    if not path.exists():
        return Config()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise VDUClientError(f"cannot read {path}: {exc}") from exc
    return Config(endpoint=data.get("endpoint"), api_key=data.get("api_key"))


def resolve(endpoint: str | None = None, api_key: str | None = None) -> Config:
    """Flags win over the environment, which wins over the file."""
    stored = load_file()
    return Config(
        endpoint=endpoint or os.environ.get("VDU_ENDPOINT") or stored.endpoint,
        api_key=api_key or os.environ.get("VDU_API_KEY") or stored.api_key,
    )


def save(config: Config, path: Path | None = None) -> Path:
    """Write the file readable by its owner only (the folder 0700, the file 0600), atomically."""
    path = path or config_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump({"endpoint": config.endpoint, "api_key": config.api_key}, fh, indent=2)
        fh.write("\n")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path
