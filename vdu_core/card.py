"""The model card (``README.md``) written beside a sanitized pipeline.

It states what was forgotten, by which method and parameters, the metrics with how each was
computed, the library versions, and the sha256 of every input and output, so a reader can check
the checkpoint in hand is the one the evidence is about. Hugging Face style: YAML front matter
(``library_name: diffusers``, tags ``unlearning`` and ``vdu``) then Markdown.

Torch-free: library versions come from package metadata, nothing is imported to learn them.
User-supplied text is escaped (HTML, table pipes, newlines) and kept out of the front matter.
"""

from __future__ import annotations

import html
import json
import math
import os
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from vdu_core.models import sha256_file

#: Packages whose versions every card records (distribution name -> shown name).
VERSIONED_PACKAGES = {
    "torch": "torch",
    "diffusers": "diffusers",
    "safetensors": "safetensors",
    "huggingface-hub": "huggingface_hub",
    "numpy": "numpy",
    "pillow": "pillow",
    "vdu-service": "vdu_core",
}
#: Shown only where installed: the Stable Diffusion path's libraries (extra ``sd``, ``nudity``).
OPTIONAL_PACKAGES = {"transformers": "transformers", "peft": "peft", "accelerate": "accelerate",
                     "nudenet": "nudenet"}
#: Keys of a metric's dict that say how it was computed (rendered in their own columns).
HOW_KEYS = ("implementation", "num_samples", "seed")


def write_model_card(
    out_dir: Path,
    *,
    forgotten: str,
    method: str,
    params: dict[str, Any],
    metrics: dict[str, Any] | None,
    inputs: dict[str, str],
    outputs: dict[str, str] | None = None,
    pipeline_class: str = "DDPMPipeline",
) -> Path:
    """Write ``out_dir/README.md`` and return its path.

    ``inputs`` / ``outputs`` map a name (``model``, ``forget_set``, a file) to its sha256 (None is
    shown as "not hashed", e.g. a hub id whose files were not local). When
    ``outputs`` is None, every file under ``out_dir`` except the card itself is hashed.
    ``metrics`` is rendered generically: a metric whose value is a dict may carry
    ``implementation``, ``num_samples`` and ``seed`` (shown as columns) and any other fields
    (``value``, ``before``/``after``, ...); top-level ``implementation``/``num_samples``/``seed``
    apply to every metric.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    card = out_dir / "README.md"
    if outputs is None:
        outputs = _hash_outputs(out_dir, skip=card)
    text = render_model_card(
        forgotten=forgotten, method=method, params=params, metrics=metrics, inputs=inputs, outputs=outputs,
        pipeline_class=pipeline_class,
    )
    fd, tmp = tempfile.mkstemp(prefix=".README.", suffix=".tmp", dir=out_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, card)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return card


def render_model_card(
    *,
    forgotten: str,
    method: str,
    params: dict[str, Any],
    metrics: dict[str, Any] | None,
    inputs: dict[str, str],
    outputs: dict[str, str],
    pipeline_class: str = "DDPMPipeline",
) -> str:
    """The card's text (see :func:`write_model_card`). ``pipeline_class``: the diffusers class that
    loads the folder (``StableDiffusionPipeline`` for text-to-image models)."""
    tag = "text-to-image" if pipeline_class == "StableDiffusionPipeline" else "unconditional-image-generation"
    lines = [
        "---",
        "library_name: diffusers",
        f"pipeline_tag: {tag}",
        "tags:",
        "- unlearning",
        "- vdu",
        "- diffusers",
        f"- {tag}",
        "---",
        "",
        "# Unlearned diffusion model",
        "",
        f"This checkpoint was produced by **{_text(method)}** unlearning: it should no longer generate "
        f"{_text(forgotten)}. It loads with plain diffusers:",
        "",
        "```python",
        f"from diffusers import {_code(pipeline_class)}",
        f'pipe = {_code(pipeline_class)}.from_pretrained("path/to/this/folder")',
        "```",
        "",
        "## What was forgotten",
        "",
        _text(forgotten) or "_(not stated)_",
        "",
        "## Method and parameters",
        "",
        f"Method: `{_code(method)}`",
        "",
        *_table(["Parameter", "Value"], [[_text(k), _value(v)] for k, v in sorted(params.items())]),
        "",
        "## Metrics",
        "",
        *_metrics_section(metrics),
        "",
        "## Library versions",
        "",
        *_table(["Package", "Version"], [[name, version] for name, version in library_versions().items()]),
        "",
        "## Inputs (sha256)",
        "",
        *_hash_table(inputs, "Input"),
        "",
        "## Outputs (sha256)",
        "",
        *_hash_table(outputs, "File"),
        "",
    ]
    return "\n".join(lines)


def library_versions() -> dict[str, str]:
    """Installed versions of the packages that shaped the checkpoint (read from metadata)."""
    versions = {}
    for dist, shown in VERSIONED_PACKAGES.items():
        try:
            versions[shown] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[shown] = "source tree (not installed)" if shown == "vdu_core" else "not installed"
    for dist, shown in OPTIONAL_PACKAGES.items():
        try:
            versions[shown] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return versions


# --------------------------------------------------------------------------- rendering helpers


def _hash_outputs(out_dir: Path, *, skip: Path) -> dict[str, str]:
    hashes = {}
    for folder, dirs, files in os.walk(out_dir):
        dirs.sort()
        for name in sorted(files):
            path = Path(folder) / name
            if path == skip or name.startswith(".README.") or not path.is_file():
                continue
            hashes[path.relative_to(out_dir).as_posix()] = sha256_file(path)
    return dict(sorted(hashes.items()))


def _text(value: Any) -> str:
    """User text made inert for Markdown/HTML and kept on one line."""
    s = " ".join(str(value).split())
    return html.escape(s, quote=False).replace("|", "\\|").replace("`", "\\`")


def _code(value: Any) -> str:
    return " ".join(str(value).split()).replace("`", "'")


def _value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return f"`{json.dumps(value)}`"
    if isinstance(value, float):
        return _number(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return _text(value)
    try:
        dumped = json.dumps(value, sort_keys=True, default=str)
    except (TypeError, ValueError):
        dumped = str(value)
    if len(dumped) > 200:
        dumped = dumped[:197] + "..."
    return f"`{_code(dumped)}`"


def _number(x: float) -> str:
    if math.isnan(x) or math.isinf(x):
        return str(x)
    if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
        return f"{x:.4e}"
    return f"{x:.4g}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    if not rows:
        return ["_(none)_"]
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return out


def _hash_table(hashes: dict[str, str | None], label: str) -> list[str]:
    rows = [[_text(k), f"`{_code(v)}`" if v else "_(not hashed)_"] for k, v in sorted(hashes.items())]
    return _table([label, "sha256"], rows)


def _metrics_section(metrics: dict[str, Any] | None) -> list[str]:
    if not metrics:
        return ["_No evaluation was run._"]
    shared = {k: metrics[k] for k in HOW_KEYS if k in metrics and not isinstance(metrics[k], dict)}
    rows = []
    for name, entry in metrics.items():
        if name in shared:
            continue
        if isinstance(entry, dict):
            how = {k: entry.get(k, shared.get(k)) for k in HOW_KEYS}
            rest = {k: v for k, v in entry.items() if k not in HOW_KEYS}
            value = _metric_value(rest)
        else:
            how = {k: shared.get(k) for k in HOW_KEYS}
            value = _value(entry)
        rows.append([_text(name), value, *(_value(how[k]) if how[k] is not None else "—" for k in HOW_KEYS)])
    out = _table(["Metric", "Value", "Implementation", "Samples", "Seed"], rows)
    if shared:
        out += [
            "",
            "Unless a row says otherwise: "
            + ", ".join(f"{k} = {_value(v)}" for k, v in shared.items())
            + ".",
        ]
    return out


def _metric_value(fields: dict[str, Any]) -> str:
    """``value`` alone, ``before → after`` when both exist, then any remaining fields as ``k=v``."""
    parts = []
    rest = dict(fields)
    if "value" in rest:
        parts.append(_value(rest.pop("value")))
    if "before" in rest and "after" in rest:
        parts.append(f"{_value(rest.pop('before'))} → {_value(rest.pop('after'))}")
    parts += [f"{_text(k)}={_value(v)}" for k, v in rest.items()]
    return "; ".join(parts) if parts else "—"
