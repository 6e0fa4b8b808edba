"""One SD unlearning run end to end: load, latents, anchors, posterior, unlearn, evaluate, save, card.

The SD counterpart of ``vdu_core.run.run_unlearning`` with the same contract (``RunResult``, progress
phases, cancel, the output folder written under a temporary name and renamed into place). The worker
routes a job here when its model is a ``StableDiffusionPipeline`` (``run_job``).

Output folder::

    model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/   StableDiffusionPipeline.from_pretrained
    delta/                    the partial update (cross_attn or LoRA), see vdu_core.sd.models.save_sd_pipeline
    README.md, metrics.json   the model card; every metric with how it was computed
    samples/before.png, samples/after.png                 feature prompts, original vs unlearned
    samples/neutral_before.png, samples/neutral_after.png neutral prompts
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from vdu_core.config import Limits, Progress
from vdu_core.errors import ConfigError
from vdu_core.run import RunResult, _phased, _source_sha, default_cache_dir, versions
from vdu_core.sd.config import SDEvalConfig, SDUnlearnConfig


def run_job(model, forget, out_dir, params: dict, evaluation: dict, *, lineage=(), **kwargs) -> RunResult:
    """The worker's entry: validate ``params``/``evaluation`` as SD parameters, then run."""
    if lineage:
        raise ConfigError("lineage checkpoints are not used for Stable Diffusion models (posterior: fisher or "
                          "isotropic)", field="model.lineage")
    try:
        config = SDUnlearnConfig.from_dict(params, prefix="params")
        ev = SDEvalConfig.from_dict(evaluation, prefix="evaluation")
    except ConfigError as exc:
        exc.message += (" (this model is a Stable Diffusion pipeline: its job takes SD parameters; for a hub or URL "
                        "model name one, e.g. params.trainable, so the service validates them as such)")
        raise
    return run_sd_unlearning(model, forget, out_dir, config, ev, **kwargs)


def run_sd_unlearning(
    model: str | Path,
    forget: str | Path,
    out_dir: str | Path,
    config: SDUnlearnConfig | None = None,
    evaluation: SDEvalConfig | None = None,
    *,
    revision: str | None = None,
    limits: Limits | None = None,
    cache_dir: str | Path | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> RunResult:
    import torch
    from diffusers import DDPMScheduler

    from vdu_core import forget_set, models
    from vdu_core.loop import pick_device
    from vdu_core.posterior import weights_digest
    from vdu_core.sd import prompts as prompt_sets
    from vdu_core.sd import train
    from vdu_core.sd.detectors import check_detector_name
    from vdu_core.sd.models import load_sd_pipeline, save_sd_pipeline

    config = config or SDUnlearnConfig()
    evaluation = evaluation or SDEvalConfig()
    check_detector_name(evaluation.detector)
    out_dir = Path(out_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    t0 = time.time()

    pipe = load_sd_pipeline(model, revision=revision)
    pipe.set_progress_bar_config(disable=True)
    unet, vae = pipe.unet, pipe.vae
    train_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    decoded, texts = forget_set.decode_forget_set_with_texts(forget, limits)
    feature_prompts = list(texts.prompts) + list(config.prompts or [])
    if not feature_prompts:
        raise ConfigError("name the feature: a prompts.txt in the forget set or params.prompts", field="params.prompts")
    neutral = list(config.neutral_prompts or prompt_sets.get_prompt_set("neutral-v1"))
    resolution = int(unet.config.sample_size) * pipe.vae_scale_factor
    images = forget_set.to_tensor(decoded, channels=3, resolution=resolution)
    device = pick_device(config)
    pipe.to(device)

    # latents: VAE-encoded once, cached by (VAE weights, forget content, resolution)
    content = forget_set._content_sha256((d.name, d.sha256) for d in decoded)
    key = train.latents_key(weights_digest(vae), content, resolution)
    cache_file = cache_dir / "sd-latents" / f"{key}.safetensors"
    from safetensors.torch import load_file, save_file

    if cache_file.exists():
        latents = load_file(str(cache_file))["latents"].to(device)
    else:
        latents = train.encode_latents(vae, images, device)
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        save_file({"latents": latents.cpu().contiguous()}, str(cache_file))

    captions = [texts.captions.get(d.name) for d in decoded]
    strings = [""] + feature_prompts + sorted({c for c in captions if c}) + neutral
    row = {s: i for i, s in reversed(list(enumerate(strings)))}
    emb = train.encode_prompts(pipe, strings, device)
    cond_idx = torch.tensor([row[c] if c else row[feature_prompts[i % len(feature_prompts)]]
                             for i, c in enumerate(captions)])
    feature_idx = torch.tensor([row[p] for p in feature_prompts])

    unet.to(device)
    original = copy.deepcopy(unet).eval().requires_grad_(False)
    uses_posterior = config.method in ("vdu", "vdu_paper") and config.gamma > 0
    need_anchors = (config.method == "vdu" and config.anchor_weight > 0) or (
        uses_posterior and config.posterior in ("auto", "fisher"))
    anchors = anchor_idx = None
    if need_anchors and config.anchor_samples > 0:
        _phased(on_progress, "anchors")(Progress(0, 1, {}, 1.0, 0.0, 0.0)) if on_progress else None
        anchors, which = train.draw_anchors(pipe, neutral, config.anchor_samples, config.anchor_sample_steps,
                                            config.seed, device, should_cancel)
        anchor_idx = torch.tensor([row[neutral[k]] for k in which.tolist()])
    elif config.method == "vdu" and config.anchor_weight > 0:
        raise ConfigError("anchor_weight > 0 needs anchor_samples > 0", field="params.anchor_samples")

    train.select_trainable(unet, config)
    post = None
    if uses_posterior:
        post = train.estimate_posterior(unet, train_scheduler, config, anchors,
                                        emb[anchor_idx] if anchors is not None else None,
                                        on_progress=_phased(on_progress, "posterior"), should_cancel=should_cancel)
    data = train.SDData(latents=latents, cond_idx=cond_idx, feature_idx=feature_idx, uncond_idx=0, emb=emb,
                        anchors=anchors, anchor_idx=anchor_idx)
    frozen = original if config.trainable != "lora" else None
    report = train.unlearn_sd(unet, train_scheduler, data, config, post, original=frozen,
                              on_progress=_phased(on_progress, "unlearn"), should_cancel=should_cancel)
    n_trainable = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    delta = train.trainable_delta(unet, config)
    train.merge_lora(unet, config)
    unet.requires_grad_(False).eval()

    tmp = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        metrics: dict = {}
        if evaluation.enabled:
            if evaluation.feature_prompt_set:
                feature = (evaluation.feature_prompt_set,
                           list(prompt_sets.get_prompt_set(evaluation.feature_prompt_set)))
            else:
                feature = ("forget-set-prompts", feature_prompts)
            n_name = evaluation.neutral_prompt_set
            n_set = (n_name, list(prompt_sets.get_prompt_set(n_name, field="evaluation.neutral_prompt_set")))
            eval_progress = _phased(on_progress, "evaluate")

            def progress(which, done, total):
                if eval_progress is not None:
                    eval_progress(Progress(done, total, {}, report.forget_loss_ratio, time.time() - t0, 0.0,
                                           extra={"evaluation_phase": which}))

            from vdu_core.sd.evaluate import evaluate_sd

            metrics.update(evaluate_sd(pipe, original.to(device), unet, train_scheduler, feature, n_set, evaluation,
                                       tmp, device, on_progress=progress))
        pipe.unet = unet
        metrics["unlearning"] = {
            "steps_run": report.steps_run, "stopped_by": report.stopped_by,
            "forget_loss_ratio_probe": round(report.forget_loss_ratio, 4),
            "implementation": "latent denoising MSE on a fixed probe (<=16 forget latents x 4 timesteps, fixed "
                              "noise, conditioned as in training), after / before",
            "train_seconds": round(report.seconds, 2), "trainable": config.trainable,
            "trainable_parameters": n_trainable,
            **report.gpu,
        }
        unet.to("cpu")
        pipe.to("cpu")
        delta_files = save_sd_pipeline(pipe, tmp, trainable=config.trainable, delta=delta)
        record = {
            "family": "sd", "method": config.method, "params": config.to_dict(), "evaluation": evaluation.to_dict(),
            "posterior": post.summary() if post is not None else None,
            "anchors": {"count": len(anchors), "steps": config.anchor_sample_steps,
                        "prompts": prompt_sets.describe("neutral", neutral)} if anchors is not None else None,
            "forget_set": {"images": len(decoded), "captions": sum(c is not None for c in captions),
                           "prompts": feature_prompts, "sha256": _source_sha(forget, models),
                           "resolution": resolution, "latents_cache": key},
            "model": {"reference": str(model), "sha256": _source_sha(model, models)},
            "delta_files": delta_files, "history_tail": report.history[-5:],
            "seconds": round(time.time() - t0, 2), "versions": sd_versions(),
        }
        (tmp / "metrics.json").write_text(json.dumps({"metrics": metrics, "record": record}, indent=2, default=str))
        from vdu_core import card

        weights = tmp / "unet" / "diffusion_pytorch_model.safetensors"
        card.write_model_card(
            tmp, forgotten=f"the feature named by {feature_prompts[0]!r} ({len(decoded)} forget-set images)",
            method=config.method, params=config.to_dict(), metrics=metrics,
            inputs={"model": record["model"]["sha256"], "forget_set": record["forget_set"]["sha256"]},
            outputs={"unet/diffusion_pytorch_model.safetensors": models.sha256_file(weights),
                     **{f: models.sha256_file(tmp / f) for f in delta_files}},
            pipeline_class="StableDiffusionPipeline")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.replace(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    artifacts = {str(p.relative_to(out_dir)): models.sha256_file(p) for p in sorted(out_dir.rglob("*")) if p.is_file()}
    return RunResult(out_dir=out_dir, metrics=metrics, record=record, artifacts=artifacts)


def sd_versions() -> dict:
    from importlib import metadata

    out = versions()
    for dist in ("transformers", "peft", "accelerate"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out
