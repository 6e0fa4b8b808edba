"""One unlearning run end to end: load, estimate the posterior, unlearn, evaluate, save, card.

This is the single entry point used by both the CLI (``vdu-core unlearn``) and the service's
worker, so a job and a laptop run take the same code path.

Output folder layout (``out_dir``)::

    model_index.json, unet/, scheduler/   the sanitized pipeline (``DDPMPipeline.from_pretrained(out_dir)``)
    README.md                              the model card
    metrics.json                           every metric with how it was computed, and the run's record
    samples/before.png, samples/after.png  paired sample grids from the same seeds

The folder is written under a temporary name beside ``out_dir`` and renamed into place at the end,
so a failed or cancelled run never leaves a half-written output.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vdu_core.config import EvalConfig, Limits, Progress, UnlearnConfig
from vdu_core.errors import ModelCollapsed


@dataclass
class RunResult:
    out_dir: Path
    metrics: dict
    record: dict = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)  # relative path -> sha256


def default_cache_dir() -> Path:
    return Path(os.environ.get("VDU_CACHE_DIR", Path.home() / ".cache" / "vdu"))


def run_unlearning(
    model: str | Path,
    forget: str | Path,
    out_dir: str | Path,
    config: UnlearnConfig | None = None,
    evaluation: EvalConfig | None = None,
    *,
    lineage: Sequence[str | Path] = (),
    revision: str | None = None,
    limits: Limits | None = None,
    cache_dir: str | Path | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    max_trajectory_bytes: int | None = None,
) -> RunResult:
    """Run VDU (or a baseline) on ``model`` so it forgets what ``forget`` shows; write ``out_dir``.

    ``on_progress`` is called with a ``Progress`` each step (phase "posterior", "anchors",
    "unlearn", "evaluate"); ``should_cancel`` is polled each step and a True ends the run with
    ``vdu_core.errors.Cancelled``. Library errors (``ForgetSetError``, ``ModelLoadError``,
    ``ConfigError``) propagate with their ``code``/``field``. A collapsed model raises
    ``ModelCollapsed`` *after* the evidence (metrics, grids, card) is written, without the weights.
    ``max_trajectory_bytes``: the memory the trajectory target's recorded paths may take
    (``trajectory.MAX_BYTES_DEFAULT`` when None); a run over it is refused before any work.
    """

    from vdu_core import forget_set, loop, models

    config = config or UnlearnConfig()
    evaluation = evaluation or EvalConfig()
    out_dir = Path(out_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    t0 = time.time()

    pipe = models.load_pipeline(model, revision=revision)
    unet, scheduler = pipe.unet, pipe.scheduler
    channels, resolution = int(unet.config.in_channels), int(_side(unet.config.sample_size))
    decoded = forget_set.decode_forget_set(forget, limits)
    forget_images = forget_set.to_tensor(decoded, channels=channels, resolution=resolution)
    lineage_states = [models.load_unet_state(ref, unet) for ref in lineage]
    device = loop.pick_device(config)
    unet.to(device)

    original = copy.deepcopy(unet).eval()
    report, post, anchor_info = unlearn_model(
        unet, scheduler, forget_images, config, lineage_states=lineage_states, cache_dir=cache_dir,
        on_progress=on_progress, should_cancel=should_cancel, max_trajectory_bytes=max_trajectory_bytes)

    tmp = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        result = _evaluate_and_write(tmp, original, unet, scheduler, forget_images, config, evaluation,
                                     post, anchor_info, report, decoded, model, forget, lineage, t0,
                                     _phased(on_progress, "evaluate"))
        collapsed = bool(result["metrics"].get("collapse", {}).get("value", False))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.replace(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    artifacts = {
        str(p.relative_to(out_dir)): models.sha256_file(p) for p in sorted(out_dir.rglob("*")) if p.is_file()
    }
    res = RunResult(out_dir=out_dir, metrics=result["metrics"], record=result["record"], artifacts=artifacts)
    if collapsed:
        reasons = ", ".join(result["metrics"]["collapse"].get("reasons", [])) or "see metrics.json"
        raise ModelCollapsed(f"unlearning collapsed the model ({reasons}); the evidence is in {out_dir}, "
                             "the weights were not saved")
    return res


def unlearn_model(unet, scheduler, forget_images, config: UnlearnConfig, *, lineage_states=(),
                  cache_dir: Path | None = None, on_progress=None, should_cancel=None,
                  max_trajectory_bytes: int | None = None):
    """Posterior, anchors and the loop on an in-memory model: the algorithm without any I/O.

    Shared by ``run_unlearning`` and the benchmarks, so both run exactly the same method.
    Returns (loop report, posterior or None, anchor info or None); ``unet`` is updated in place.
    """
    import torch

    from vdu_core import anchors as anchors_mod
    from vdu_core import loop, posterior
    from vdu_core.methods import get_method

    def phase(name: str):
        return _phased(on_progress, name)

    method = get_method(config.method)(config)
    method.check_model(unet)  # before any work: a configuration the model cannot serve is refused first
    if method.needs_trajectories:
        from vdu_core.trajectory import check_memory

        check_memory(unet, config, max_trajectory_bytes)
    post = None
    if method.uses_posterior and config.gamma > 0:
        post = posterior.estimate(unet, scheduler, config, lineage_states=lineage_states,
                                  cache_dir=Path(cache_dir) / "posteriors" if cache_dir else None,
                                  on_progress=phase("posterior"), should_cancel=should_cancel)
    anchor_set, anchor_info, paths = None, None, None
    forget_all = forget_images
    needs_anchors = method.needs_anchors
    self_forget_wanted = config.method == "vdu" and config.self_forget_fraction > 0
    if method.needs_trajectories or needs_anchors or self_forget_wanted:
        if on_progress is not None:
            on_progress(Progress(step=0, total=1, losses={}, forget_loss_ratio=1.0, elapsed_s=0.0, eta_s=0.0,
                                 phase="anchors"))
    if method.needs_trajectories:
        from vdu_core import trajectory

        t_paths = time.time()

        def path_batch(done: int, total: int) -> None:  # a few minutes on a CPU: reported per batch
            if on_progress is not None:
                el = time.time() - t_paths
                on_progress(Progress(step=done, total=total, losses={}, forget_loss_ratio=1.0, elapsed_s=el,
                                     eta_s=el / max(done, 1) * (total - done), phase="anchors"))

        paths = trajectory.for_config(unet, scheduler, forget_images, config, should_cancel, on_batch=path_batch)
        anchor_info = paths.summary()
    elif needs_anchors or self_forget_wanted:
        anchor_set, anchor_info, self_forget = anchors_mod.build_anchors(
            unet, scheduler, forget_images, config.anchor_samples, config.anchor_exclude_fraction, config.seed,
            self_forget_fraction=config.self_forget_fraction, should_cancel=should_cancel)
        if len(self_forget):
            forget_all = torch.cat([forget_images, self_forget.to(forget_images.device)])
        if not needs_anchors:
            anchor_set = None
    report = loop.unlearn(unet, scheduler, forget_all, config, post, anchors=anchor_set,
                          on_progress=phase("unlearn"), should_cancel=should_cancel,
                          probe_images=forget_images, trajectories=paths)
    return report, post, anchor_info


def _phased(on_progress, name: str):
    """Wrap ``on_progress`` so every report carries the phase ``name``."""
    if on_progress is None:
        return None

    def report(p: Progress) -> None:
        p.phase = name
        on_progress(p)

    return report


def _side(sample_size) -> int:
    return sample_size[0] if isinstance(sample_size, list | tuple) else sample_size


def _evaluate_and_write(tmp, original, unet, scheduler, forget_images, config, evaluation, post,
                        anchor_info, report, decoded, model_ref, forget_ref, lineage, t0, on_progress):
    from diffusers import DDPMPipeline

    from vdu_core import card, models

    unet.eval()
    metrics: dict = {}
    if evaluation.enabled:
        from vdu_core import metrics as metrics_mod

        before = DDPMPipeline(unet=original, scheduler=scheduler)
        after = DDPMPipeline(unet=unet, scheduler=scheduler)
        t_eval = time.time()

        def eval_progress(phase: str, done: int, total: int) -> None:
            if on_progress is not None:
                elapsed = time.time() - t_eval
                on_progress(Progress(step=done, total=max(total, 1), losses={},
                                     forget_loss_ratio=report.forget_loss_ratio, elapsed_s=elapsed, eta_s=0.0,
                                     extra={"evaluation_phase": phase}))

        ev = metrics_mod.evaluate(before, after, forget_images, evaluation, out_dir=tmp,
                                  on_progress=eval_progress)
        metrics = dict(ev["metrics"])
        metrics["evaluation_record"] = {k: v for k, v in ev.items() if k != "metrics"}
    metrics["unlearning"] = {
        "steps_run": report.steps_run,
        "stopped_by": report.stopped_by,
        "forget_loss_ratio_probe": round(report.forget_loss_ratio, 4),
        "implementation": "denoising MSE on a fixed probe (<=32 forget images x 8 timesteps, fixed noise), "
                          "after / before",
        "train_seconds": round(report.seconds, 2),
        "guard": report.guard,
        "device": report.device,
    }
    collapsed = bool(metrics.get("collapse", {}).get("value", False))
    if not collapsed:
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp, safe_serialization=True)
    record = {
        "method": config.method,
        "params": config.to_dict(),
        "evaluation": evaluation.to_dict(),
        "posterior": post.summary() if post is not None else None,
        "anchors": anchor_info,
        "forget_set": {"images": len(decoded), "sha256": _source_sha(forget_ref, models),
                       "resolution": list(forget_images.shape[1:])},
        "model": {"reference": str(model_ref), "sha256": _source_sha(model_ref, models)},
        "lineage": [str(p) for p in lineage],
        "history_tail": report.history[-5:],
        "seconds": round(time.time() - t0, 2),
        "versions": versions(),
    }
    (tmp / "metrics.json").write_text(json.dumps({"metrics": metrics, "record": record}, indent=2, default=str))
    weights = tmp / "unet" / "diffusion_pytorch_model.safetensors"
    card.write_model_card(
        tmp,
        forgotten=_forgotten_label(evaluation, decoded),
        method=config.method,
        params=config.to_dict(),
        metrics=metrics,
        inputs={"model": record["model"]["sha256"], "forget_set": record["forget_set"]["sha256"]},
        outputs={"unet/diffusion_pytorch_model.safetensors": models.sha256_file(weights)} if weights.exists()
        else None,
    )
    return {"metrics": metrics, "record": record}


def _forgotten_label(evaluation: EvalConfig, decoded) -> str:
    if evaluation.forget_class is not None:
        return f"class {evaluation.forget_class} ({len(decoded)} forget-set images)"
    return f"the content of {len(decoded)} forget-set images"


def _source_sha(ref, models) -> str | None:
    p = Path(str(ref))
    if p.is_file():
        return models.sha256_file(p)
    if p.is_dir():
        return models.sha256_tree(p)
    return None


def versions() -> dict:
    import diffusers
    import safetensors
    import torch

    from vdu_core import __version__

    return {"vdu_core": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "safetensors": safetensors.__version__, "python": platform.python_version()}
