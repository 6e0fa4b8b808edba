"""The original model's own DDIM trajectories, labelled by where they end: the training points of the
default ``vdu`` target (``plasticity_target="trajectory"``).

Pushing noised *forget images* and anchoring noised *own samples* disagree exactly where the sampler
decides the class: at high noise, the image a noised input came from is not what the sampler makes of
it (docs/quality-study.md, sections 6-8). Here every training point is a state on one of the original
model's own deterministic DDIM paths, and it is labelled by the path's end:

* paths whose end the data-free vote (``methods.forget_like_vote``) calls forget-like are *pushed*,
  in a middle band of noise levels, toward the empirical denoiser of the model's own retained
  endpoints (``push_target``): to the nearest thing the model makes that is not the forgotten content;
* with ``vote_spread`` M (off by default), also the paths with at least M of their 10 nearest forget images or
  forget-like paths, repeated up to 3 times (docs/quality-study.md, section 14);
* paths in the vote's margin (``anchor_margin``: a forget image or a pushed path among their 10 nearest,
  ``ForgetVote.near``) are neither pushed nor anchored, so the part of a class the vote misses is not
  anchored against the part it pushes (docs/quality-study.md, section 12);
* the states of the other paths are *anchored* to the original's ε there (recorded, no extra pass),
  each weighted by how far one DDIM step moves the state per unit ε error (``sampler_step_weights``);
* the Kronecker-factored Laplace term (``vdu_core.laplace``) is measured on the same retained states.

Nothing but the model and the forget set is used: the paper's data constraint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from vdu_core.errors import ConfigError, ForgetSetError
from vdu_core.laplace import KroneckerLaplace, sampler_step_weights

#: What the recorded paths may hold in memory by default (states and ε, float32, on the CPU); the service's
#: setting ``VDU_MAX_TRAJECTORY_BYTES``. 2,048 paths of 25 steps of a 28x28 image take 0.3 GiB, of a 3x64x64 one 4.7.
MAX_BYTES_DEFAULT = 8 * 2**30


def recorded_bytes(unet, n: int, steps: int) -> int:
    """Memory the ``n`` recorded paths of ``steps`` DDIM steps take: every state and ε, float32."""
    from vdu_core.sampling import _sample_shape

    c, h, w = _sample_shape(unet)
    return 2 * steps * n * c * h * w * 4


def check_memory(unet, config, limit: int | None = None) -> None:
    """Refuse, before any work, a run whose recorded paths would take more than ``limit`` bytes
    (``MAX_BYTES_DEFAULT`` when None): a ``ConfigError`` naming ``params.anchor_samples``."""
    limit = MAX_BYTES_DEFAULT if limit is None else limit
    need = recorded_bytes(unet, config.anchor_samples, config.trajectory_steps)
    if need > limit:
        fits = max(2, limit // max(1, recorded_bytes(unet, 1, config.trajectory_steps)))
        raise ConfigError(
            f"recording {config.anchor_samples} paths of {config.trajectory_steps} DDIM steps of this model's "
            f"images takes {need / 2**30:.1f} GiB, over the limit of {limit / 2**30:.1f} GiB "
            f"(max_trajectory_bytes; the service's VDU_MAX_TRAJECTORY_BYTES); at most {fits} paths fit: "
            "lower params.anchor_samples or params.trajectory_steps", field="params.anchor_samples")


@dataclass
class Trajectories:
    """``x[k, i]`` is the state of path ``i`` entering DDIM step ``k`` (timestep ``t[k]``), ``eps[k, i]`` the
    original's ε there, ``ends[i]`` the sample it became; ``forget_like[i]`` the vote on that end."""

    x: torch.Tensor
    eps: torch.Tensor
    t: torch.Tensor
    ends: torch.Tensor
    forget_like: torch.Tensor
    step_weight: torch.Tensor
    near: torch.Tensor | None = None  # paths in the vote's margin: neither pushed nor anchored

    @property
    def forget_idx(self) -> torch.Tensor:
        return self.forget_like.nonzero().flatten()

    @property
    def retained_idx(self) -> torch.Tensor:
        """The anchored paths (and push targets): not forget-like, and not in the vote's margin."""
        keep = ~self.forget_like if self.near is None else ~self.forget_like & ~self.near
        return keep.nonzero().flatten()

    def band(self, low: int, high: int) -> torch.Tensor:
        """Indices of the steps with ``low <= t < high`` (at least the one nearest the band's middle)."""
        k = ((self.t >= low) & (self.t < high)).nonzero().flatten()
        if len(k) == 0:
            k = (self.t - (low + high) // 2).abs().argmin().view(1)
        return k

    def summary(self) -> dict:
        return {"generated": len(self.ends), "forget_like": int(self.forget_like.sum()),
                "margin": 0 if self.near is None else int(self.near.sum()),
                "sample_steps": len(self.t), "labels": "data-free 10-NN vote in the original's mid-block features"}


@torch.no_grad()
def record(unet, scheduler, n: int, seed: int, steps: int = 25, batch_size: int = 64,
           on_batch: Callable[[int, int], None] | None = None):
    """Sample ``n`` paths with DDIM ``steps`` (the seeds of ``sampling.sample_images``) and keep every state
    and ε on the CPU: (x [K, n, ...], eps [K, n, ...], t [K], ends [n, ...])."""
    from vdu_core.sampling import sample_images

    xs: list[list[torch.Tensor]] = []
    es: list[list[torch.Tensor]] = []
    ts: list[int] = []

    def keep(start: int, k: int, t, x, eps) -> None:
        if start == 0:
            xs.append([])
            es.append([])
            ts.append(int(t))
        xs[k].append(x.detach().float().cpu())
        es[k].append(eps.detach().float().cpu())

    ends = sample_images(unet, scheduler, n, seed=seed, steps=steps, batch_size=batch_size, on_batch=on_batch,
                         on_step=keep)
    x = torch.stack([torch.cat(parts) for parts in xs])
    eps = torch.stack([torch.cat(parts) for parts in es])
    return x, eps, torch.tensor(ts, dtype=torch.long), ends


def build(unet, scheduler, forget: torch.Tensor, n: int, seed: int, steps: int = 25,
          on_batch: Callable[[int, int], None] | None = None, margin: int = 0, spread: int = 0) -> Trajectories:
    """Record ``n`` of the model's own paths and label each by the data-free vote on its end; with ``margin``
    > 0, the paths with at least that many forget images or forget-like paths among their neighbours
    (``ForgetVote.near``) are left out of the anchors and push targets; with ``spread`` > 0, the vote is first
    spread through the neighbours (``ForgetVote.spread``: a path with at least that many forget images or
    forget-like paths among its 10 nearest is forget-like too), unless that would leave nothing to anchor."""
    from vdu_core.methods import ForgetVote

    if len(forget) == 0:
        raise ForgetSetError("the forget set holds no image", rule="empty")
    x, eps, t, ends = record(unet, scheduler, n, seed, steps, on_batch=on_batch)
    vote = ForgetVote(unet, scheduler, ends.to(forget.device), forget, seed=seed)
    forget_like = vote.labels.cpu()
    if spread > 0:
        spread_labels = vote.spread(spread).cpu()
        if not bool(spread_labels.all()):  # a spread that would leave nothing to anchor is not applied
            forget_like = spread_labels
    if bool(forget_like.all()):
        raise ForgetSetError(f"all {n} of the model's own samples look like the forget set: unlearning it would "
                             "leave nothing the model generates to keep", rule="forget_set_covers_model")
    near = vote.near(margin, forget_like.to(vote.labels.device)).cpu() if margin > 0 else None
    if near is not None and bool((forget_like | near).all()):
        near = None  # a margin that would leave nothing to anchor is not applied
    return Trajectories(x, eps, t, ends, forget_like, sampler_step_weights(scheduler, t, steps), near)


def for_config(unet, scheduler, forget: torch.Tensor, config, should_cancel: Callable[[], bool] | None = None,
               on_batch: Callable[[int, int], None] | None = None) -> Trajectories:
    """``build`` with a run's settings (``anchor_samples`` paths, ``seed``, ``trajectory_steps``), cancellable
    between batches (``should_cancel``), ``on_batch(done, total)`` after each."""
    from vdu_core.anchors import cancel_check

    check = cancel_check(should_cancel, "recording the model's own paths")

    def batch(done: int, total: int) -> None:
        if check is not None:
            check(done, total)
        if on_batch is not None:
            on_batch(done, total)

    return build(unet, scheduler, forget, config.anchor_samples, config.seed, config.trajectory_steps, on_batch=batch,
                 margin=config.anchor_margin, spread=config.vote_spread)


def laplace_on(unet, tr: Trajectories, n_points: int, seed: int,
               should_cancel: Callable[[int, int], None] | None = None) -> KroneckerLaplace:
    """The Laplace factors on ``n_points`` retained states drawn at random over paths and steps, each
    weighted by its step's ``step_weight``."""
    ret = tr.retained_idx
    g = torch.Generator().manual_seed(seed + 5)
    i = ret[torch.randint(0, len(ret), (n_points,), generator=g)]
    k = torch.randint(0, len(tr.t), (n_points,), generator=g)
    return KroneckerLaplace(unet, tr.x[k, i], tr.t[k], tr.step_weight[k], seed=seed + 3,
                            should_cancel=should_cancel)


def push_target(x_t: torch.Tensor, t: torch.Tensor, eps0: torch.Tensor, retained_ends: torch.Tensor, scheduler,
                eta: float) -> torch.Tensor:
    """ε_θ₀ + η (ε_R − ε_θ₀), ε_R the exact denoiser of the model's own retained endpoints (their empirical
    distribution): the original's prediction moved toward the nearest retained output."""
    from vdu_core.methods import empirical_forget_eps

    eps_r = empirical_forget_eps(x_t, t, retained_ends, scheduler)
    return eps0 + eta * (eps_r.float() - eps0.float())
