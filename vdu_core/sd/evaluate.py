"""Evidence for an SD run: feature presence before/after on a versioned prompt set, quality on
neutral prompts, and before/after grids of both — every image pair drawn from the same initial noise.

Metrics (each records its implementation, version, threshold and sample counts):

* ``feature_presence`` — share of images from the feature prompts whose detector score is at or above
  ``detector_threshold``, before and after (``vdu_core.sd.detectors``); not computed without a detector.
* ``neutral_pixel_change`` — on neutral prompts, same seeds: mean absolute pixel difference (0..1)
  between the original's and the unlearned model's images, and their mean PSNR (dB).
* ``neutral_denoising_loss`` — the pipeline's own denoising MSE on the original's neutral latents
  (fixed timesteps and noise, conditioned on their prompts), before and after, and the ratio.
"""

from __future__ import annotations

import math
import time

import torch

from vdu_core.sampling import initial_noise, save_grid
from vdu_core.sd import prompts as prompt_sets
from vdu_core.sd.config import SDEvalConfig


@torch.no_grad()
def generate(pipe, unet, prompts: list[str], cfg: SDEvalConfig, device, batch_size: int = 8):
    """(images (N,3,H,W) in [0,1], latents) for each prompt × ``images_per_prompt``, seeds fixed by index."""
    pipe.unet = unet
    shape = (int(unet.config.in_channels), int(unet.config.sample_size), int(unet.config.sample_size))
    todo = [p for p in prompts for _ in range(cfg.images_per_prompt)]
    images, latents = [], []
    for i in range(0, len(todo), batch_size):
        chunk = todo[i : i + batch_size]
        noise = initial_noise(len(chunk), shape, cfg.seed, start=i).to(device)
        lat = pipe(chunk, num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                   latents=noise, output_type="latent").images.float()
        img = pipe.vae.decode(lat / pipe.vae.config.scaling_factor).sample.float()
        images.append(((img + 1) / 2).clamp(0, 1).cpu())
        latents.append(lat)
    return torch.cat(images), torch.cat(latents), todo


def _pil(images: torch.Tensor):
    from PIL import Image

    arr = (images.permute(0, 2, 3, 1).numpy() * 255).round().clip(0, 255).astype("uint8")
    return [Image.fromarray(a) for a in arr]


@torch.no_grad()
def denoising_loss(unet, latents, emb, scheduler, seed: int, n_timesteps: int = 4) -> float:
    g = torch.Generator().manual_seed(seed + 7)
    ts = torch.linspace(0, scheduler.config.num_train_timesteps - 1, n_timesteps).round().long()
    total, count = 0.0, 0
    for t in ts:
        noise = torch.randn(latents.shape, generator=g).to(latents.device)
        tt = t.repeat(len(latents)).to(latents.device)
        pred = unet(scheduler.add_noise(latents, noise, tt), tt, encoder_hidden_states=emb).sample
        total += float((pred.float() - noise).pow(2).flatten(1).mean(1).sum())
        count += len(latents)
    return total / count


def evaluate_sd(pipe, original, unlearned, train_scheduler, feature: tuple[str, list[str]],
                neutral: tuple[str, list[str]], cfg: SDEvalConfig, out_dir, device, *, on_progress=None) -> dict:
    """Generate, score and draw; write ``samples/*.png`` under ``out_dir``; return the metrics."""
    from vdu_core.sd.detectors import load_detector
    from vdu_core.sd.train import encode_prompts

    t0 = time.time()
    metrics: dict = {}
    f_name, f_prompts = feature[0], feature[1][: cfg.max_prompts]
    n_name, n_prompts = neutral[0], neutral[1][: cfg.max_prompts]
    how = {"seed": cfg.seed, "images_per_prompt": cfg.images_per_prompt,
           "num_inference_steps": cfg.num_inference_steps, "guidance_scale": cfg.guidance_scale}
    runs = {}
    total = 4
    for k, (which, unet, ps) in enumerate([("feature_before", original, f_prompts), ("feature_after", unlearned,
                                           f_prompts), ("neutral_before", original, n_prompts),
                                           ("neutral_after", unlearned, n_prompts)]):
        runs[which] = generate(pipe, unet, ps, cfg, device)
        if on_progress is not None:
            on_progress(which, k + 1, total)
    pipe.unet = unlearned
    samples = out_dir / "samples"
    g = cfg.grid_samples
    for which, (images, _, _) in runs.items():
        save_grid(images[:g] * 2 - 1, samples / f"{which}.png", nrow=min(8, g))
    save_grid(runs["feature_before"][0][:g] * 2 - 1, samples / "before.png", nrow=min(8, g))
    save_grid(runs["feature_after"][0][:g] * 2 - 1, samples / "after.png", nrow=min(8, g))

    feat_rec = prompt_sets.describe(f_name, f_prompts)
    if cfg.detector is None:
        metrics["feature_presence"] = {"value": None, "implementation": "not computed: the job named no detector",
                                       "prompts": feat_rec}
    else:
        det = load_detector(cfg.detector)
        before = det.score(_pil(runs["feature_before"][0]))
        after = det.score(_pil(runs["feature_after"][0]))
        thr = cfg.detector_threshold
        rate_b = sum(s >= thr for s in before) / len(before)
        rate_a = sum(s >= thr for s in after) / len(after)
        metrics["feature_presence"] = {
            "before": round(rate_b, 4), "after": round(rate_a, 4), "value": round(rate_a, 4),
            "reduction": round(rate_b - rate_a, 4), "mean_score_before": round(sum(before) / len(before), 4),
            "mean_score_after": round(sum(after) / len(after), 4),
            "implementation": f"{det.name}: {det.implementation}", "version": det.version, "threshold": thr,
            "num_samples": len(before), "prompts": feat_rec, **how}
    nb, na = runs["neutral_before"][0], runs["neutral_after"][0]
    diff = (nb - na).abs().flatten(1).mean(1)
    mse = (nb - na).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    psnr = (10 * torch.log10(1.0 / mse)).clamp_max(100.0)
    metrics["neutral_pixel_change"] = {
        "value": round(float(diff.mean()), 5), "psnr_db": round(float(psnr.mean()), 3),
        "implementation": "mean |after - before| of RGB pixels in [0,1] and mean PSNR, paired by seed",
        "version": "1", "num_samples": len(nb), "prompts": prompt_sets.describe(n_name, n_prompts), **how}
    n_lat = runs["neutral_before"][1]
    emb = encode_prompts(pipe, runs["neutral_before"][2], device)
    lb = denoising_loss(original, n_lat, emb, train_scheduler, cfg.seed)
    la = denoising_loss(unlearned, n_lat, emb, train_scheduler, cfg.seed)
    metrics["neutral_denoising_loss"] = {
        "before": round(lb, 6), "after": round(la, 6), "value": round(la / max(lb, 1e-12), 4),
        "implementation": "epsilon MSE on the original's neutral latents, 4 fixed timesteps, fixed noise; "
                          "value = after / before",
        "version": "1", "num_samples": len(n_lat) * 4, "seed": cfg.seed}
    metrics["evaluation_seconds"] = round(time.time() - t0, 2)
    return {k: v for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))}
