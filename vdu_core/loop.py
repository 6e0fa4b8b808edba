"""The unlearning loop: one place for batching, timesteps, clipping, stopping and callbacks.

Methods (``vdu_core.methods``) only say how a step's loss is computed. The loop:

* draws forget-set batches and timesteps from a seeded generator (same seed, same run);
* applies the stability term's gradient analytically (``StabilityRegularizer.add_grad_``);
* clips the global gradient norm, steps Adam (constant rate, or ``lr_schedule = "cosine"``);
* measures the forget-set loss ratio on a fixed probe (fixed images, timesteps and noise) every
  ``probe_every`` steps and stops when it reaches ``target_loss_ratio`` (or at ``steps``);
* reports every loss term, the ratio and an ETA through ``on_progress`` each step, and polls
  ``should_cancel`` each step (raising ``Cancelled``);
* runs on CUDA when present (bf16 autocast), else on the CPU.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from vdu_core.config import Progress, UnlearnConfig
from vdu_core.errors import Cancelled
from vdu_core.methods import ForgetBatch, get_method
from vdu_core.objective import StabilityRegularizer, per_sample_mse, timestep_weights
from vdu_core.posterior import Posterior, trainable


def pick_device(config: UnlearnConfig) -> torch.device:
    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def autocast_dtype(config: UnlearnConfig, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or config.mixed_precision == "no":
        return None
    if config.mixed_precision == "fp16":
        return torch.float16
    return torch.bfloat16


def stability_regularizer(method, config, params, posterior) -> StabilityRegularizer | None:
    """The stability term over ``params`` when the method uses one (γ > 0), else None."""
    if not (method.uses_posterior and config.gamma > 0):
        return None
    if posterior is None:
        raise ValueError(f"method {config.method!r} needs a posterior")
    return StabilityRegularizer(params, posterior.mu, posterior.var)


def add_stability(regularizer: StabilityRegularizer | None, terms) -> dict[str, float]:
    """Add the analytic stability gradient (after backward) and return the step's terms with it."""
    losses = dict(terms.report)
    if regularizer is None:
        losses["objective"] = float(terms.loss.detach())
        return losses
    stab = regularizer.add_grad_(terms.stability_scale)
    losses["stability"] = stab
    losses["objective"] = terms.stability_scale * stab + float(terms.loss.detach())
    return losses


def lr_schedule(opt, config: UnlearnConfig):
    """None for a constant rate; for 'cosine', a linear warm-up over the first 5 % of ``steps`` and a cosine
    decay to 0 at ``steps`` (so the run ends at rest, not at a random phase of the push/anchor balance)."""
    if config.lr_schedule == "constant":
        return None
    import math

    warm = max(1, round(0.05 * config.steps))

    def factor(i: int) -> float:  # i = steps taken so far
        if i < warm:
            return (i + 1) / warm
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (i - warm + 1) / max(1, config.steps - warm + 1))))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


@dataclass
class UnlearnReport:
    steps_run: int
    stopped_by: str
    initial_probe_loss: float
    final_probe_loss: float
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    device: str = "cpu"
    guard: dict | None = None

    @property
    def forget_loss_ratio(self) -> float:
        return self.final_probe_loss / max(self.initial_probe_loss, 1e-12)


class Context:
    """What a method may use: the model being trained, the frozen original, batches, anchors."""

    def __init__(self, unet, scheduler, config: UnlearnConfig, device, generator, anchors=None):
        self.unet = unet
        self.scheduler = scheduler
        self.config = config
        self.device = device
        self.generator = generator
        self.anchors = anchors
        self.laplace = None  # a vdu_core.laplace.KroneckerLaplace when laplace_weight > 0
        self.trajectories = None  # a vdu_core.trajectory.Trajectories for the trajectory target
        self._original = None
        self.t_min = config.t_min
        self.t_max = config.t_max or scheduler.config.num_train_timesteps

    @property
    def original(self):
        if self._original is None:
            self._original = copy.deepcopy(self.unet).eval().requires_grad_(False)
        return self._original

    def noised(self, x0: torch.Tensor):
        g = self.generator
        noise = torch.randn(x0.shape, generator=g).to(self.device)
        t = torch.randint(self.t_min, self.t_max, (x0.shape[0],), generator=g).to(self.device)
        return self.scheduler.add_noise(x0, noise, t), t, noise

    def anchor_batch(self):
        idx = torch.randint(0, len(self.anchors), (self.config.batch_size,), generator=self.generator)
        return self.noised(self.anchors[idx.to(self.anchors.device)])


class Probe:
    """Fixed forget images × fixed timesteps × fixed noise: a repeatable forget-set loss."""

    def __init__(self, forget: torch.Tensor, scheduler, t_min: int, t_max: int, seed: int,
                 max_images: int = 32, n_timesteps: int = 8):
        g = torch.Generator().manual_seed(seed + 99)
        x0 = forget[:max_images]
        ts = torch.linspace(t_min, t_max - 1, n_timesteps).round().long()
        self.x0 = x0.repeat_interleave(len(ts), 0)
        self.t = ts.repeat(len(x0)).to(x0.device)
        self.noise = torch.randn(self.x0.shape, generator=g).to(x0.device)
        self.x_t = scheduler.add_noise(self.x0, self.noise, self.t)

    @torch.no_grad()
    def loss(self, unet, batch_size: int = 128) -> float:
        was = unet.training
        unet.eval()
        total = 0.0
        for i in range(0, len(self.x_t), batch_size):
            pred = unet(self.x_t[i : i + batch_size], self.t[i : i + batch_size]).sample
            total += float(per_sample_mse(pred, self.noise[i : i + batch_size]).sum())
        unet.train(was)
        return total / len(self.x_t)


def unlearn(
    unet: torch.nn.Module,
    scheduler,
    forget: torch.Tensor,
    config: UnlearnConfig,
    posterior: Posterior | None = None,
    *,
    anchors: torch.Tensor | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    probe_images: torch.Tensor | None = None,
    trajectories=None,
    max_trajectory_bytes: int | None = None,
) -> UnlearnReport:
    """Unlearn ``forget`` (N, C, H, W in [-1, 1]) from ``unet`` in place; return what happened.

    ``probe_images`` (default: ``forget``) are the images whose loss ratio is reported and used by
    the stopping rule: the user's forget set, when ``forget`` was augmented. ``trajectories`` (a
    ``vdu_core.trajectory.Trajectories`` of ``unet``): the trajectory target's paths; recorded here
    (``anchor_samples`` of them) when that target is used and none are given, after the same memory check as a
    job's (``trajectory.check_memory`` with ``max_trajectory_bytes``, the default limit when None).
    """
    method = get_method(config.method)(config)
    device = pick_device(config)
    unet.to(device)
    forget = forget.to(device)
    torch.manual_seed(config.seed)
    g = torch.Generator().manual_seed(config.seed)
    if method.needs_trajectories and trajectories is None:
        from vdu_core.trajectory import check_memory, for_config

        check_memory(unet, config, max_trajectory_bytes)
        trajectories = for_config(unet, scheduler, forget, config, should_cancel)
    if trajectories is not None and anchors is None:
        anchors = trajectories.ends
    if method.needs_anchors and (anchors is None or len(anchors) == 0):
        raise ValueError(f"method {config.method!r} with anchor_weight > 0 or posterior-weighted guidance "
                         "needs anchor samples")
    ctx = Context(unet, scheduler, config, device, g, anchors.to(device) if anchors is not None else None)
    ctx.forget_images = forget
    ctx.trajectories = trajectories
    if method.needs_original:
        _ = ctx.original  # freeze a copy before the first update
    if config.method == "vdu" and config.laplace_weight > 0:
        from vdu_core.anchors import cancel_check
        from vdu_core.laplace import from_own_samples
        from vdu_core.trajectory import laplace_on

        check = cancel_check(should_cancel, "measuring the Laplace factors")
        if trajectories is not None:
            ctx.laplace = laplace_on(unet, trajectories, config.laplace_points, config.seed, should_cancel=check)
        else:
            ctx.laplace = from_own_samples(unet, scheduler, ctx.anchors, config.laplace_points, config.seed,
                                           forget=forget, should_cancel=check)
    names, params = trainable(unet)
    regularizer = stability_regularizer(method, config, params, posterior)
    uncovered = ctx.laplace.uncovered(params) if ctx.laplace is not None else []
    opt = torch.optim.Adam(params, lr=config.lr)
    schedule = lr_schedule(opt, config)
    natural = None
    if config.step_direction == "natural":  # validated: vdu with the Laplace term, so ctx.laplace is set
        from vdu_core.laplace import NaturalStep

        natural = NaturalStep(ctx.laplace, config.natural_damping)
    probe_src = forget if probe_images is None else probe_images.to(device)
    probe = Probe(probe_src, scheduler, ctx.t_min, ctx.t_max, config.seed)
    p0 = probe.loss(unet)
    ratio = 1.0
    guard = None
    if config.guard_every > 0:
        from vdu_core.guard import Guard

        guard = Guard(unet, scheduler, probe_src, config)
    amp = autocast_dtype(config, device)
    unet.train()
    history: list[dict] = []
    t_start = time.time()
    stopped_by = "max_steps"
    step = 0
    for step in range(1, config.steps + 1):
        if should_cancel is not None and should_cancel():
            raise Cancelled(f"cancelled at step {step - 1} of {config.steps}")
        idx = torch.randint(0, len(forget), (config.batch_size,), generator=g).to(device)
        x0 = forget[idx]
        x_t, t, noise = ctx.noised(x0)
        batch = ForgetBatch(x0, noise, t, x_t, timestep_weights(scheduler, t, config.timestep_weighting))
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            terms = method.compute(ctx, batch)
        terms.loss.backward()
        losses = add_stability(regularizer, terms)
        for p in uncovered:  # what the Laplace term does not see does not move
            p.grad = None
        if config.grad_clip is not None:
            losses["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, config.grad_clip))
        if natural is not None:
            losses.update(natural.step(opt))
        else:
            opt.step()
        if schedule is not None:
            schedule.step()
        if step % config.probe_every == 0 or step == config.steps:
            ratio = probe.loss(unet) / max(p0, 1e-12)
        elapsed = time.time() - t_start
        prog = Progress(step=step, total=config.steps, losses=losses, forget_loss_ratio=ratio,
                        elapsed_s=elapsed, eta_s=elapsed / step * (config.steps - step))
        history.append({"step": step, "forget_loss_ratio": ratio, **losses})
        if on_progress is not None:
            on_progress(prog)
        if config.target_loss_ratio is not None and ratio >= config.target_loss_ratio:
            stopped_by = "target_loss_ratio"
            break
        if guard is not None and (step % config.guard_every == 0 or step == config.steps):
            ok, measured = guard.check(unet, step)
            history[-1]["guard"] = measured
            if not ok:
                guard.rollback(unet)
                stopped_by = "guard"
                break
    unet.eval()
    final = probe.loss(unet)
    return UnlearnReport(steps_run=step, stopped_by=stopped_by, initial_probe_loss=p0, final_probe_loss=final,
                         history=history, seconds=time.time() - t_start, device=str(device),
                         guard=guard.summary() if guard is not None else None)
