"""A user's story: run a short real unlearning on the small pretrained model through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from scripts.make_forget_set import write_forget_zip

FAST = ["--steps", "4", "--batch-size", "4", "--param", "anchor_samples=16", "--param", "posterior_samples=8",
        "--num-samples", "16", "--sample-steps", "4"]


def _cli(*args, cwd=None):
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "vdu_core.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)


@pytest.mark.timeout(600)
def test_unlearn_then_evaluate_through_the_cli(reference_tiny, tmp_path):
    forget = tmp_path / "forget0.zip"
    assert write_forget_zip(0, 20, str(forget)) == 20
    out = tmp_path / "unlearned"
    proc = _cli("unlearn", "--model", str(reference_tiny), "--forget", str(forget), "--out", str(out),
                "--forget-class", "0", "--cache-dir", str(tmp_path / "cache"), "--json", *FAST)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    m = result["metrics"]
    for key in ("pul", "retained_kept", "u_fid_original", "u_fid_unlearned", "forget_loss_ratio", "unlearning"):
        assert key in m, key
    assert m["pul"]["num_samples"] == 16 and "implementation" in m["u_fid_unlearned"]
    if m["retained_kept"].get("computed"):  # split by the classifier's confidence in the original's sample
        split = m["retained_kept"]["by_confidence"]
        assert split["confident"]["n"] + split["unsure"]["n"] == m["retained_kept"]["num_retained"]
    assert m["unlearning"]["steps_run"] == 4

    from diffusers import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(out)  # plain diffusers, nothing of ours
    assert pipe.unet.config.sample_size == 28
    assert (out / "samples" / "before.png").exists() and (out / "samples" / "after.png").exists()
    card = (out / "README.md").read_text()
    assert "vdu" in card and "class 0" in card
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["record"]["method"] == "vdu" and saved["record"]["forget_set"]["images"] == 20
    assert not list(tmp_path.glob(".unlearned.partial-*")), "no temporary output left behind"

    proc = _cli("evaluate", "--original", str(reference_tiny), "--unlearned", str(out), "--forget-class", "0",
                "--forget", str(forget), "--num-samples", "16", "--sample-steps", "4", "--null-yardstick")
    assert proc.returncode == 0, proc.stderr
    assert "PUL" in proc.stdout or "pul" in proc.stdout
    assert "retained-kept, null yardstick" in proc.stdout and "DDIM-8 instead of DDIM-4" in proc.stdout


def test_bad_inputs_give_clear_errors_and_write_nothing(reference_tiny, tmp_path):
    forget = tmp_path / "forget.zip"
    write_forget_zip(3, 4, str(forget))
    out = tmp_path / "out"
    proc = _cli("unlearn", "--model", str(reference_tiny), "--forget", str(forget), "--out", str(out),
                "--gamma", "1.5")
    assert proc.returncode == 2 and "params.gamma" in proc.stderr
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\x80\x04K\x01.")
    proc = _cli("unlearn", "--model", str(pickle), "--forget", str(forget), "--out", str(out))
    assert proc.returncode == 2 and "invalid_model" in proc.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = _cli("unlearn", "--model", str(reference_tiny), "--forget", str(empty), "--out", str(out))
    assert proc.returncode == 2 and "invalid_forget_set" in proc.stderr
    assert not out.exists()
