"""Stable Diffusion through the same job API, with real processes (uvicorn, Celery, Postgres, Redis,
S3 on loopback): a team uploads a tiny SD pipeline archive and a forget set of red images with
captions and feature prompts, runs a LoRA VDU job, polls it, downloads the checkpoint and loads it
with plain ``StableDiffusionPipeline.from_pretrained``. Bad SD parameters are 4xx naming the field."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

from tests.service.stack import Stack, wait_until  # noqa: E402
from tests.test_sd import red_forget_zip  # noqa: E402

pytestmark = pytest.mark.timeout(300)
FINAL = ("succeeded", "failed", "cancelled")
PARAMS = {"trainable": "lora", "steps": 3, "batch_size": 2, "anchor_samples": 2, "anchor_sample_steps": 2,
          "posterior_samples": 2}
EVALUATION = {"detector": "builtin:color:red", "images_per_prompt": 1, "num_inference_steps": 2, "max_prompts": 2,
              "grid_samples": 2}


def sd_archive(tmp: Path) -> bytes:
    from vdu_core.sd.tiny import save_tiny_pipeline

    folder = save_tiny_pipeline(tmp / "tiny-sd", seed=0)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                tf.add(f, arcname=f"tiny-sd/{f.relative_to(folder).as_posix()}")
    return buf.getvalue()


def test_a_team_unlearns_a_feature_from_stable_diffusion_and_loads_the_result(service_stack: Stack, tmp_path):
    stack = service_stack
    headers = stack.team("moderation-sd")
    with stack.client(headers) as c:
        model = c.post("/v1/models", files={"file": ("tiny-sd.tar", sd_archive(tmp_path), "application/x-tar")},
                       data={"name": "tiny-sd"})
        assert model.status_code == 201, model.text
        assert model.json()["description"]["family"] == "sd"
        fs = c.post("/v1/forget-sets", files={"file": ("red.zip", red_forget_zip(), "application/zip")},
                    data={"name": "red squares"})
        assert fs.status_code == 201, fs.text
        assert fs.json()["image_count"] == 4 and fs.json()["captions"] == 2 and fs.json()["prompts"] == 2
        body = {"model": model.json()["id"], "forget_set": fs.json()["id"], "method": "vdu", "params": PARAMS,
                "evaluation": EVALUATION}

        for bad, field in [({"params": {**PARAMS, "trainable": "attn"}}, "params.trainable"),
                           ({"evaluation": {**EVALUATION, "detector": "no-such"}}, "evaluation.detector"),
                           ({"method": "esd", "params": {**PARAMS, "gamma": 0.5}}, "params.gamma")]:
            r = c.post("/v1/jobs", json={**body, **bad})
            assert 400 <= r.status_code < 500, r.text
            assert r.json()["field"] == field and r.headers["content-type"].startswith("application/problem+json")

        job_id = c.post("/v1/jobs", json=body).json()["id"]

        def done():
            job = c.get(f"/v1/jobs/{job_id}").json()
            return job if job["status"] in FINAL else None

        job = wait_until(done, 240, interval=0.5, what=f"job {job_id}")
        assert job["status"] == "succeeded", (job["error"], stack.worker.log()[-3000:])
        m = job["metrics"]
        assert m["feature_presence"]["implementation"].startswith("builtin:color:red")
        assert {"neutral_pixel_change", "neutral_denoising_loss"} <= set(m)
        assert m["unlearning"]["trainable"] == "lora"
        archive = tmp_path / "checkpoint.tar"
        with c.stream("GET", f"/v1/jobs/{job_id}/artifacts/checkpoint") as resp:
            assert resp.status_code == 200
            with open(archive, "wb") as fh:
                for chunk in resp.iter_bytes():
                    fh.write(chunk)
        assert c.get(f"/v1/jobs/{job_id}/artifacts/samples/after.png").content[:8] == b"\x89PNG\r\n\x1a\n"

    folder = tmp_path / "pipeline"
    with tarfile.open(archive) as tf:
        tf.extractall(folder, filter="data")
    assert (folder / "delta" / "pytorch_lora_weights.safetensors").is_file()
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder)
    with torch.no_grad():
        image = pipe(["a cat"], num_inference_steps=2, output_type="np", generator=torch.manual_seed(0)).images
    assert image.shape == (1, 32, 32, 3)
