"""The model card: front matter, what was forgotten, parameters, metrics with their provenance,
library versions and hashes, written so that hostile text cannot break it."""

from __future__ import annotations

import hashlib
import re

from vdu_core.card import library_versions, write_model_card

METRICS = {
    "pul": {
        "value": 0.93,
        "implementation": "builtin:mnist classifier, argmax",
        "num_samples": 512,
        "seed": 1234,
    },
    "forget_loss": {"before": 0.0312, "after": 0.2871, "implementation": "denoising MSE", "num_samples": 64},
    "u_fid_ratio": 1.07,
    "collapse": {"collapsed": False, "largest_class_share": 0.18},
}


def front_matter(text: str) -> list[str]:
    assert text.startswith("---\n")
    return text.split("---\n")[1].splitlines()


def test_card_has_everything_a_reader_needs(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
    (tmp_path / "model_index.json").write_text("{}")
    path = write_model_card(
        tmp_path,
        forgotten="digit 3 (200 forget-set images)",
        method="vdu",
        params={"gamma": 0.5, "steps": 400, "lr": 1e-4, "posterior": "fisher", "grad_clip": None},
        metrics=METRICS,
        inputs={"model": "a" * 64, "forget_set": "b" * 64},
    )
    assert path == tmp_path / "README.md"
    text = path.read_text()
    fm = front_matter(text)
    assert "library_name: diffusers" in fm and "- unlearning" in fm and "- vdu" in fm
    assert "digit 3 (200 forget-set images)" in text
    assert "| gamma | 0.5 |" in text and "| lr | 1.0000e-04 |" in text and "| grad_clip | `null` |" in text
    pul = next(line for line in text.splitlines() if line.startswith("| pul |"))
    assert "0.93" in pul and "builtin:mnist classifier" in pul and "512" in pul and "1234" in pul
    assert "0.0312 → 0.2871" in text and "largest_class_share=0.18" in text
    for package in ("torch", "diffusers", "safetensors", "vdu_core"):
        assert re.search(rf"^\| {package} \| .+ \|$", text, re.M), package
    assert f"`{'a' * 64}`" in text and f"`{'b' * 64}`" in text
    # Outputs default to every file of the folder but the card itself.
    assert hashlib.sha256(b"weights").hexdigest() in text
    assert "| model_index.json |" in text and "| README.md |" not in text
    assert not list(tmp_path.glob(".README.*"))


def test_card_without_metrics_and_with_explicit_outputs(tmp_path):
    text = write_model_card(
        tmp_path,
        forgotten="x",
        method="gradient_ascent",
        params={},
        metrics=None,
        inputs={"model": None},
        outputs={"unet/diffusion_pytorch_model.safetensors": "c" * 64},
    ).read_text()
    assert "No evaluation was run" in text and "_(not hashed)_" in text and "c" * 64 in text


def test_shared_provenance_and_hostile_text_are_rendered_safely(tmp_path):
    text = write_model_card(
        tmp_path,
        forgotten="<script>alert(1)</script> | pwned\n---\nlibrary_name: evil",
        method="vdu",
        params={"note": "a|b"},
        metrics={"pul": 1.0, "implementation": "classifier X", "num_samples": 64, "seed": 7},
        inputs={},
    ).read_text()
    assert "<script>" not in text and "&lt;script&gt;" in text
    assert front_matter(text).count(
        "library_name: diffusers"
    ) == 1 and "library_name: evil" not in front_matter(text)
    assert "a\\|b" in text
    pul = next(line for line in text.splitlines() if line.startswith("| pul |"))
    assert "classifier X" in pul and "64" in pul and "7" in pul


def test_library_versions_come_from_package_metadata():
    versions = library_versions()
    assert set(versions) >= {"torch", "diffusers", "safetensors", "vdu_core"}
    assert versions["torch"].startswith("2.13") and versions["diffusers"] == "0.42.1"
