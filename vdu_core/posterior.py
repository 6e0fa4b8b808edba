"""Where μ* and σ*² come from: a diagonal Gaussian over the pretrained weights.

Variants (``UnlearnConfig.posterior``):

* ``lineage`` — K ≥ 2 checkpoints of the same training run: per-parameter mean and (unbiased)
  variance, the variance floored at ``posterior_sigma²``. This is the paper's estimator.
* ``self_snapshots`` — one checkpoint, data-free: continue training the model on its *own* samples
  for ``posterior_steps`` steps and treat evenly spaced snapshots as a lineage. μ* is the pretrained
  weights (the snapshots only supply the spread).
* ``fisher`` — one checkpoint, data-free Laplace approximation: precision = N_eff · F + 1/σ_prior²,
  F the diagonal empirical Fisher of the denoising loss on the model's own samples (per-sample
  squared gradients). μ* is the pretrained weights.
* ``isotropic`` — μ* the pretrained weights, σ* = ``posterior_sigma`` everywhere (an L2 anchor).
* ``auto`` — ``lineage`` when at least one extra checkpoint is given, else ``fisher``.

Estimates are cached on disk (safetensors, keyed by the weights' sha256 and every input that changes
the estimate), so a second job on the same model does not pay for them again.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vdu_core.config import Progress, UnlearnConfig
from vdu_core.errors import Cancelled, ConfigError


@dataclass
class Posterior:
    names: list[str]
    mu: list[torch.Tensor]
    var: list[torch.Tensor]
    kind: str
    info: dict = field(default_factory=dict)

    def summary(self) -> dict:
        allv = torch.cat([v.flatten() for v in self.var])
        return {
            "kind": self.kind,
            "sigma_median": float(allv.median().sqrt()),
            "sigma_min": float(allv.min().sqrt()),
            "sigma_max": float(allv.max().sqrt()),
            **self.info,
        }

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        tensors = {}
        for n, m, v in zip(self.names, self.mu, self.var, strict=True):
            tensors[f"mu.{n}"] = m.contiguous().cpu()
            tensors[f"var.{n}"] = v.contiguous().cpu()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(tensors, tmp, metadata={"kind": self.kind, "info": json.dumps(self.info)})
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path, names: list[str]) -> Posterior:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as fh:
            meta = fh.metadata() or {}
            mu = [fh.get_tensor(f"mu.{n}") for n in names]
            var = [fh.get_tensor(f"var.{n}") for n in names]
        info = json.loads(meta.get("info", "{}"))
        info["cached"] = True
        return cls(names=names, mu=mu, var=var, kind=meta.get("kind", "unknown"), info=info)


def trainable(unet: torch.nn.Module) -> tuple[list[str], list[torch.nn.Parameter]]:
    names, params = [], []
    for n, p in unet.named_parameters():
        if p.requires_grad:
            names.append(n)
            params.append(p)
    return names, params


def resolve_kind(config: UnlearnConfig, lineage_count: int) -> str:
    kind = config.posterior
    if kind == "auto":
        return "lineage" if lineage_count >= 1 else "fisher"
    if kind == "lineage" and lineage_count < 1:
        raise ConfigError(
            "posterior 'lineage' needs at least one extra checkpoint of the same training run "
            "(K >= 2 with the model itself)", field="params.posterior")
    return kind


def weights_digest(unet: torch.nn.Module) -> str:
    return weights_digest_state(unet.state_dict())


def estimate(
    unet: torch.nn.Module,
    scheduler,
    config: UnlearnConfig,
    *,
    lineage_states: Sequence[dict[str, torch.Tensor]] = (),
    cache_dir: Path | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> Posterior:
    """Estimate (or load from the cache) the posterior for ``unet``'s trainable parameters."""
    kind = resolve_kind(config, len(lineage_states))
    names, params = trainable(unet)
    key_parts = {"kind": kind, "weights": weights_digest(unet), "sigma": config.posterior_sigma}
    if kind in ("self_snapshots", "fisher"):
        key_parts.update(samples=config.posterior_samples, steps=config.posterior_steps, seed=config.seed)
    if kind == "lineage":
        key_parts["lineage"] = [weights_digest_state(s) for s in lineage_states]
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:32]
    cache_path = Path(cache_dir) / f"posterior-{key}.safetensors" if cache_dir else None
    if cache_path is not None and cache_path.exists():
        return Posterior.load(cache_path, names)
    t0 = time.time()
    floor = config.posterior_sigma**2
    if kind == "isotropic":
        post = Posterior(names, [p.detach().clone() for p in params],
                         [torch.full_like(p, floor) for p in params], kind)
    elif kind == "lineage":
        post = from_checkpoints(unet, lineage_states, floor)
    elif kind == "self_snapshots":
        post = from_self_snapshots(unet, scheduler, config, floor, on_progress, should_cancel)
    elif kind == "fisher":
        post = from_fisher(unet, scheduler, config, on_progress, should_cancel)
    else:  # pragma: no cover - config validation forbids it
        raise ConfigError(f"unknown posterior {kind!r}", field="params.posterior")
    post.info["estimate_seconds"] = round(time.time() - t0, 2)
    if cache_path is not None:
        post.save(cache_path)
    return post


def weights_digest_state(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for n, t in sorted(state.items()):
        h.update(n.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def from_checkpoints(unet: torch.nn.Module, states: Sequence[dict[str, torch.Tensor]], floor: float) -> Posterior:
    """Mean and unbiased variance over the model and its K−1 lineage checkpoints (K ≥ 2)."""
    names, params = trainable(unet)
    own = {n: p.detach() for n, p in zip(names, params, strict=True)}
    all_states = [own, *states]
    mu, var = [], []
    for n in names:
        stack = torch.stack([s[n].detach().float().to(own[n].device) for s in all_states])
        mu.append(stack.mean(0))
        var.append(stack.var(0, unbiased=True).clamp_min(floor))
    return Posterior(names, mu, var, "lineage", {"checkpoints": len(all_states), "floor": floor})


def _own_samples(unet, scheduler, n: int, seed: int, should_cancel=None, steps: int = 25) -> torch.Tensor:
    from vdu_core.anchors import cancel_check
    from vdu_core.sampling import sample_images

    return sample_images(unet, scheduler, n, seed=seed, steps=steps,
                         on_batch=cancel_check(should_cancel, "sampling for the posterior"))


def _denoise_loss_per_sample(unet, scheduler, x0: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    noise = torch.randn(x0.shape, generator=g).to(x0.device)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=g).to(x0.device)
    pred = unet(scheduler.add_noise(x0, noise, t), t).sample
    return (pred.float() - noise.float()).pow(2).flatten(1).mean(1)


def _report(on_progress, step, total, t0, phase_loss):
    if on_progress is not None:
        elapsed = time.time() - t0
        on_progress(Progress(step=step, total=total, losses=phase_loss, forget_loss_ratio=1.0,
                             elapsed_s=elapsed, eta_s=elapsed / max(step, 1) * (total - step), phase="posterior"))


def from_self_snapshots(unet, scheduler, config: UnlearnConfig, floor: float, on_progress=None,
                        should_cancel=None, snapshots: int = 5) -> Posterior:
    """Continue training a copy on the model's own samples; snapshots act as a lineage."""
    names, params = trainable(unet)
    data = _own_samples(unet, scheduler, config.posterior_samples, config.seed, should_cancel)
    model = copy.deepcopy(unet).train()
    mnames, mparams = trainable(model)
    opt = torch.optim.Adam(mparams, lr=config.lr)
    g = torch.Generator().manual_seed(config.seed + 1)
    every = max(1, config.posterior_steps // snapshots)
    snaps, t0 = [], time.time()
    for step in range(config.posterior_steps):
        if should_cancel is not None and should_cancel():
            raise Cancelled("cancelled while estimating the posterior")
        idx = torch.randint(0, len(data), (min(config.batch_size, len(data)),), generator=g)
        loss = _denoise_loss_per_sample(model, scheduler, data[idx], g).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % every == 0:
            snaps.append([p.detach().clone() for p in mparams])
        _report(on_progress, step + 1, config.posterior_steps, t0, {"posterior_loss": float(loss.detach())})
    mu = [p.detach().clone() for p in params]
    var = []
    for i, p in enumerate(params):
        stack = torch.stack([s[i] for s in snaps] + [p.detach()])
        var.append(stack.var(0, unbiased=True).clamp_min(floor))
    return Posterior(names, mu, var, "self_snapshots",
                     {"samples": config.posterior_samples, "steps": config.posterior_steps,
                      "snapshots": len(snaps), "floor": floor})


def from_fisher(unet, scheduler, config: UnlearnConfig, on_progress=None, should_cancel=None,
                data_size: float | None = None) -> Posterior:
    """Laplace: precision_i = N_eff · E[(∂ℓ/∂θ_i)²] + 1/σ_prior², on the model's own samples.

    ℓ is the per-sample denoising loss at a random timestep; the expectation is over
    ``posterior_samples`` own samples. N_eff defaults to the number of own samples used, so the
    Fisher part is the Hessian of the summed loss over a data set of that size (documented: the
    service cannot know the size of the data the model was trained on). σ_prior = ``posterior_sigma``
    bounds the variance from above (the floor of the precision).
    """
    names, params = trainable(unet)
    n = config.posterior_samples
    data = _own_samples(unet, scheduler, n, config.seed, should_cancel)
    g = torch.Generator().manual_seed(config.seed + 2)
    fisher = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    was_training = unet.training
    unet.train()
    t0 = time.time()
    micro = 1
    for i in range(0, n, micro):
        if should_cancel is not None and should_cancel():
            raise Cancelled("cancelled while estimating the posterior")
        loss = _denoise_loss_per_sample(unet, scheduler, data[i : i + micro], g).sum()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for f, gr in zip(fisher, grads, strict=True):
            if gr is not None:
                f.add_(gr.detach().float().pow(2))
        _report(on_progress, i + micro, n, t0, {"posterior_loss": float(loss.detach())})
    unet.train(was_training)
    n_eff = float(data_size if data_size is not None else n)
    prior_precision = 1.0 / config.posterior_sigma**2
    var = [1.0 / (n_eff * f / n + prior_precision) for f in fisher]
    mu = [p.detach().clone() for p in params]
    return Posterior(names, mu, var, "fisher", {"samples": n, "n_eff": n_eff, "sigma_prior": config.posterior_sigma})

