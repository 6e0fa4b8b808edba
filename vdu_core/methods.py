"""Unlearning methods behind one interface, registered by name (like open-unlearning's trainers).

A method decides how the loss of one step is computed from a batch of noised forget images; the
loop (``vdu_core.loop``) owns everything else (sampling, clipping, stopping, callbacks). Every
method reports each of its terms separately.

* ``vdu_paper`` — the objective exactly as the paper writes it: γ·stability − (1−γ)·plasticity.
* ``gradient_ascent`` — the same loop with γ = 0: −plasticity only (the usual baseline).
* ``vdu`` — the product default: the paper's two terms, the plasticity bounded relative to the
  original model, plus the function-space stability term (see ``VDU``). Chosen by the quality study
  (README, "Results").
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

import torch

from vdu_core.config import METHOD_NAMES
from vdu_core.errors import ConfigError
from vdu_core.objective import per_sample_mse, plasticity_term

REGISTRY: dict[str, type[UnlearningMethod]] = {}

#: guidance weightings that need the kernel posterior (and so the anchors)
KERNEL_WEIGHTINGS = ("posterior", "odds")
#: the largest r/(1−r) of the 'odds' weighting (r ≤ 0.95): where the input is surely forget-like the
#: exact shift is unbounded; the cap keeps the regression target finite
ODDS_CAP = 19.0


def register(cls):
    REGISTRY[cls.name] = cls
    return cls


def get_method(name: str) -> type[UnlearningMethod]:
    return REGISTRY[name]


#: Methods for text-conditional (Stable Diffusion) models, by name: the same interface, registered
#: by ``vdu_core.sd.methods`` (imported lazily, so this module needs no transformers).
SD_REGISTRY: dict[str, type[UnlearningMethod]] = {}


def register_sd(cls):
    SD_REGISTRY[cls.name] = cls
    return cls


def get_sd_method(name: str) -> type[UnlearningMethod]:
    import vdu_core.sd.methods  # noqa: F401 - registers the SD methods

    return SD_REGISTRY[name]


@dataclass
class ForgetBatch:
    x0: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor
    x_t: torch.Tensor
    weights: torch.Tensor  # C_t per sample


@dataclass
class Terms:
    """``loss`` is back-propagated; ``stability_scale`` multiplies the analytic stability gradient."""

    loss: torch.Tensor
    stability_scale: float
    report: dict[str, float]


class UnlearningMethod:
    name = "base"
    uses_posterior = True
    needs_original = False
    needs_anchors = False
    needs_trajectories = False

    def __init__(self, config):
        self.config = config

    def compute(self, ctx, batch: ForgetBatch) -> Terms:  # pragma: no cover - interface
        raise NotImplementedError

    def check_model(self, unet) -> None:
        """Refuse, with a ``ConfigError`` naming the parameter, a model this configuration cannot use."""


def _plasticity(ctx, batch: ForgetBatch) -> tuple[torch.Tensor, torch.Tensor]:
    pred = ctx.unet(batch.x_t, batch.t).sample
    per = per_sample_mse(pred, batch.noise)
    return per, plasticity_term(per, batch.weights)


@register
class VDUPaper(UnlearningMethod):
    """L = γ · Σ(θ−μ*)²/(2σ*²) − (1−γ) · Σ_t C_t ‖ε − ε_θ(x_t,t)‖² (normalised, see objective.py)."""

    name = "vdu_paper"

    def compute(self, ctx, batch: ForgetBatch) -> Terms:
        gamma = self.config.gamma
        per, plast = _plasticity(ctx, batch)
        loss = -(1.0 - gamma) * plast
        return Terms(loss, gamma, {"plasticity": float(plast.detach())})


@register
class GradientAscent(UnlearningMethod):
    """−Σ_t C_t ‖ε − ε_θ(x_t,t)‖²: the VDU loop with γ = 0 and no regularizer."""

    name = "gradient_ascent"
    uses_posterior = False

    def compute(self, ctx, batch: ForgetBatch) -> Terms:
        per, plast = _plasticity(ctx, batch)
        return Terms(-plast, 0.0, {"plasticity": float(plast.detach())})


@register
class VDU(UnlearningMethod):
    """The product default: VDU with a bounded plasticity target and a function-space stability term.

    L = γ · stability + (1−γ) · plasticity_target + λ · function_space

    * plasticity_target, ``negative_guidance`` (default): on noised forget inputs, regress ε_θ to
      ε_θ₀ − η w (ε_F − ε_θ₀), where ε_F is the exact denoiser of the forget set's empirical distribution
      (``empirical_forget_eps``): the original model guided away from the forget set, as ESD does with a
      text condition. A regression, so it cannot run away. w (``guidance_weighting``, see
      ``guided_target``) is by default the kernel posterior that the input is forget-like, and the same
      target is then used on the anchors, where it is ε_θ₀ wherever nothing is forget-like.
      ``ascent``: the paper's −‖ε − ε_θ‖², per sample capped at ``plasticity_bound`` × the original's
      loss on the same input.
    * function_space: ‖ε_θ(a_t,t) − target(a_t,t)‖² on the original model's own samples ``a`` (by
      default all of them: the posterior weighting compares the forget set with everything the model
      generates, so no heuristic split is needed), weight λ = ``anchor_weight``: keeps everything else
      the model generates where it was — the function-space inference the paper names as its next step.
    * laplace (``laplace_weight`` > 0): the paper's stability term with a Kronecker-factored Laplace
      precision instead of a diagonal one — the Gauss-Newton of the original's outputs on its own noised
      samples (``vdu_core.laplace``), i.e. the expected squared change of everything the model generates,
      with no sampling noise. Normalisation affines, which it does not cover, are not trained.
    """

    name = "vdu"
    needs_original = True

    def __init__(self, config):
        super().__init__(config)
        self.posterior_weighted = (config.plasticity_target == "negative_guidance"
                                   and config.guidance_weighting in KERNEL_WEIGHTINGS)
        # the posterior weighting compares against the anchors even when their own term is off
        self.needs_anchors = config.anchor_weight > 0 or self.posterior_weighted or config.laplace_weight > 0
        self.needs_trajectories = config.plasticity_target == "trajectory"

    def check_model(self, unet) -> None:
        if (self.posterior_weighted and self.config.posterior_space == "features"
                and getattr(unet, "mid_block", None) is None):
            raise ConfigError("posterior_space 'features' reads the UNet's mid-block, and this model has none; "
                              "use 'pixels'", field="params.posterior_space")

    def compute(self, ctx, batch: ForgetBatch) -> Terms:
        cfg = self.config
        gamma = cfg.gamma
        if cfg.plasticity_target == "trajectory":
            return self._trajectory_terms(ctx, batch)
        pred = ctx.unet(batch.x_t, batch.t).sample
        per = per_sample_mse(pred, batch.noise)
        plast = plasticity_term(per, batch.weights)
        report = {"plasticity": float(plast.detach())}
        if cfg.plasticity_target == "negative_guidance":
            target = guided_target(ctx, batch.x_t, batch.t)
            redirect = plasticity_term(per_sample_mse(pred, target), batch.weights)
            loss = (1.0 - gamma) * redirect
            report["redirect"] = float(redirect.detach())
        elif cfg.plasticity_bound is not None:
            with torch.no_grad():
                ref = per_sample_mse(ctx.original(batch.x_t, batch.t).sample, batch.noise)
            bounded = plasticity_term(torch.minimum(per, cfg.plasticity_bound * ref), batch.weights)
            loss = -(1.0 - gamma) * bounded
            report["plasticity_bounded"] = float(bounded.detach())
        else:
            loss = -(1.0 - gamma) * plast
        if cfg.anchor_weight > 0:
            a_t, a_time, _ = ctx.anchor_batch()
            if self.posterior_weighted:
                # the same target everywhere: ε_θ₀ wherever the input is not forget-like
                a_target = guided_target(ctx, a_t, a_time)
            else:
                with torch.no_grad():
                    a_target = ctx.original(a_t, a_time).sample
            fs = per_sample_mse(ctx.unet(a_t, a_time).sample, a_target).mean()
            loss = loss + cfg.anchor_weight * fs
            report["function_space"] = float(fs.detach())
        return self._add_laplace(ctx, loss, report)

    def _add_laplace(self, ctx, loss: torch.Tensor, report: dict) -> Terms:
        if ctx.laplace is not None:
            lap = ctx.laplace.penalty()
            loss = loss + self.config.laplace_weight * lap
            report["laplace"] = float(lap.detach())
        return Terms(loss, self.config.gamma, report)

    def push_states(self, ctx, batch: ForgetBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A batch of pushed states and their targets (x_t, t, target): states of the forget-like paths in the
        ``push_band``, each with the retained outputs' denoiser target (``trajectory.push_target``). Should the
        vote find no forget-like path, the noised forget images in the band are pushed instead."""
        from vdu_core.trajectory import push_target

        cfg, tr, g, dev = self.config, ctx.trajectories, ctx.generator, ctx.device
        n = cfg.batch_size
        T = ctx.scheduler.config.num_train_timesteps
        low, high = (int(round(f * T)) for f in cfg.push_band)
        f_idx = tr.forget_idx
        band = tr.band(low, high)
        if len(f_idx):
            i = f_idx[torch.randint(0, len(f_idx), (n,), generator=g)]
            k = band[torch.randint(0, len(band), (n,), generator=g)]
            x_t, t, eps0 = tr.x[k, i].to(dev), tr.t[k].to(dev), tr.eps[k, i].to(dev)
        else:
            t = tr.t[band[torch.randint(0, len(band), (len(batch.x0),), generator=g)]].to(dev)
            x_t = ctx.scheduler.add_noise(batch.x0, batch.noise, t)
            with torch.no_grad():
                eps0 = ctx.original(x_t, t).sample
        return x_t, t, push_target(x_t, t, eps0, tr.ends[tr.retained_idx].to(dev), ctx.scheduler, cfg.guidance_scale)

    def anchor_states(self, ctx) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """A batch of anchored states (x, t, recorded ε, step weight) drawn over the retained paths and all steps."""
        tr, g, dev, n = ctx.trajectories, ctx.generator, ctx.device, self.config.batch_size
        i = tr.retained_idx[torch.randint(0, len(tr.retained_idx), (n,), generator=g)]
        k = torch.randint(0, len(tr.t), (n,), generator=g)
        return tr.x[k, i].to(dev), tr.t[k].to(dev), tr.eps[k, i].to(dev), tr.step_weight[k].to(dev)

    def _trajectory_terms(self, ctx, batch: ForgetBatch) -> Terms:
        """The trajectory target (``vdu_core.trajectory``): push the states of the forget-like paths in the
        ``push_band`` toward the retained outputs' denoiser, anchor the other paths' states to the original's
        ε, each weighted by its sampler step's sensitivity. Both batches go through the network in one pass (a
        batch of 2n costs less than two of n; GroupNorm is per sample, so the result is the same)."""
        cfg = self.config
        x_t, t, target = self.push_states(ctx, batch)
        if cfg.anchor_weight > 0:
            xa, ta, eps_a, w_a = self.anchor_states(ctx)
            pred = ctx.unet(torch.cat([x_t, xa]), torch.cat([t, ta])).sample
            pred, anchored = pred[: len(x_t)], pred[len(x_t):]
        else:
            pred = ctx.unet(x_t, t).sample
        push = per_sample_mse(pred, target).mean()
        loss = (1.0 - cfg.gamma) * push
        report = {"push": float(push.detach())}
        if cfg.anchor_weight > 0:
            fs = (w_a * per_sample_mse(anchored, eps_a)).mean()
            loss = loss + cfg.anchor_weight * fs
            report["function_space"] = float(fs.detach())
        return self._add_laplace(ctx, loss, report)


@torch.no_grad()
def guided_target(ctx, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The negative-guidance target ε_θ₀ − η · w · (ε_F − ε_θ₀) on inputs ``x_t`` at timesteps ``t``.

    ``guidance_weighting`` "uniform": w = 1. "posterior": w = r_F(x_t), the probability that x_t was
    noised from the forget set rather than from the model's other output, under kernel (empirical)
    densities of the noised forget images and the noised anchors with prior ``forget_prior``. This is
    the score of p(x)·(1 − r_F(x)) to first order (∇log(1−r_F) ∝ r_F (ε_F − ε)): at high noise, where
    every class overlaps, r_F ≈ the prior and the push is small, so trajectories that end in other
    classes are left alone; where x_t is forget-like, r_F ≈ 1 and the push is the full η.
    ``posterior_space`` "features": r_F is instead a k-NN density ratio in the original's mid-block
    features (``feature_posterior``).
    """
    cfg = ctx.config
    features = cfg.guidance_weighting in KERNEL_WEIGHTINGS and cfg.posterior_space == "features"
    with mid_block_output(ctx.original) if features else contextlib.nullcontext() as mid:
        eps0 = ctx.original(x_t, t).sample.float()
    eps_f, log_qf = empirical_forget_eps(x_t, t, ctx.forget_images, ctx.scheduler, with_log_density=True)
    weight = 1.0
    if cfg.guidance_weighting in KERNEL_WEIGHTINGS:
        if ctx.anchors is None or len(ctx.anchors) == 0:
            raise ValueError(f"guidance_weighting {cfg.guidance_weighting!r} needs anchor samples")
        if features:
            r = feature_posterior(ctx, flat_features(mid["out"]), t).clamp(1e-6, 1 - 1e-6)
            logit = torch.log(r) - torch.log1p(-r)
        else:
            blur = cfg.posterior_bandwidth * _kernel_scale(ctx) if cfg.posterior_bandwidth > 0 else 0.0
            if blur:
                log_qf = kernel_log_density(x_t, t, ctx.forget_images, ctx.scheduler, blur)
            log_qa = kernel_log_density(x_t, t, ctx.anchors, ctx.scheduler, blur)
            logit = math.log(cfg.forget_prior) - math.log1p(-cfg.forget_prior) + log_qf - log_qa
        if cfg.guidance_weighting == "posterior":
            weight = torch.sigmoid(logit)
        else:  # r/(1−r): ε_θ₀ − r/(1−r)·(ε_F − ε_θ₀) is exactly the denoiser of p(x | not forget)
            weight = logit.clamp(max=math.log(ODDS_CAP)).exp()
        weight = weight.view(-1, *([1] * (x_t.dim() - 1)))
    return eps0 - cfg.guidance_scale * weight * (eps_f.float() - eps0)


@contextlib.contextmanager
def mid_block_output(unet):
    """Capture ``unet.mid_block``'s output during the calls inside the ``with`` block."""
    out: dict = {}
    hook = unet.mid_block.register_forward_hook(lambda m, i, o: out.__setitem__("out", o))
    try:
        yield out
    finally:
        hook.remove()


def flat_features(h: torch.Tensor) -> torch.Tensor:
    """Mid-block activations as unit vectors (spatially pooled to at most 8×8 first)."""
    if h.dim() == 4 and (h.shape[-1] > 8 or h.shape[-2] > 8):
        h = torch.nn.functional.adaptive_avg_pool2d(h, 8)
    return torch.nn.functional.normalize(h.float().flatten(1), dim=1)


#: timesteps at which the reference sets' features are precomputed for the 'features' posterior
FEATURE_GRID = 10
FEATURE_K = 10


@torch.no_grad()
def _reference_features(ctx):
    """Features of the forget images and of the anchors, each noised to every grid timestep (cached)."""
    cache = getattr(ctx, "_ref_features", None)
    if cache is not None:
        return cache
    t_hi = ctx.scheduler.config.num_train_timesteps
    grid = torch.linspace(0, t_hi - 1, FEATURE_GRID).round().long()
    g = torch.Generator().manual_seed(int(ctx.config.seed) + 7)
    sets = []
    for refs in (ctx.forget_images, ctx.anchors):
        per_t = []
        for tg in grid.tolist():
            chunks = []
            for i in range(0, len(refs), 128):
                x0 = refs[i : i + 128]
                tt = torch.full((len(x0),), tg, dtype=torch.long, device=x0.device)
                x_t = ctx.scheduler.add_noise(x0, torch.randn(x0.shape, generator=g).to(x0.device), tt)
                with mid_block_output(ctx.original) as mid:
                    ctx.original(x_t, tt)
                chunks.append(flat_features(mid["out"]))
            per_t.append(torch.cat(chunks))
        sets.append(torch.stack(per_t))
    ctx._ref_features = (grid.to(sets[0].device), sets[0], sets[1])
    return ctx._ref_features


def feature_posterior(ctx, feats: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``knn_forget_ratio`` against the references' features at the grid timestep nearest each t."""
    grid, f_feat, a_feat = _reference_features(ctx)
    idx = (t.view(-1, 1).to(grid.device) - grid.view(1, -1)).abs().argmin(1)
    r = torch.empty(len(feats), device=feats.device)
    for j in idx.unique().tolist():
        rows = (idx == j).nonzero().flatten()
        r[rows] = knn_forget_ratio(feats[rows], f_feat[j], a_feat[j], ctx.config.forget_prior)
    return r


def knn_forget_ratio(query: torch.Tensor, forget: torch.Tensor, own: torch.Tensor, prior: float,
                     k: int = FEATURE_K) -> torch.Tensor:
    """r_F = π·q_F/p_model with k-NN densities: among each query's k nearest of ``forget`` ∪ ``own``,
    c_F forget and c_A own references give q_F ∝ c_F/n_F and p_model ∝ (c_A + ½)/n_A; capped at 1."""
    n_f, n_a = len(forget), len(own)
    k = min(k, n_f + n_a)
    d = torch.cat([torch.cdist(query, forget), torch.cdist(query, own)], 1)
    c_f = (d.topk(k, largest=False).indices < n_f).float().sum(1)
    return (prior * (c_f / n_f) / ((k - c_f + 0.5) / n_a)).clamp(max=1.0)


#: images per forward pass when reading mid-block features (the noise is drawn per batch of this size)
FEATURE_BATCH = 128


@torch.no_grad()
def noised_mid_features(unet, scheduler, x: torch.Tensor, t: int, generator: torch.Generator | None,
                        batch_size: int = FEATURE_BATCH, noise: torch.Tensor | None = None) -> torch.Tensor:
    """``flat_features`` of the UNet's mid-block on ``x`` noised to timestep ``t`` (with ``noise``, else noise
    drawn from ``generator`` batch by batch)."""
    out = []
    for i in range(0, len(x), batch_size):
        x0 = x[i : i + batch_size]
        tt = torch.full((len(x0),), t, dtype=torch.long, device=x0.device)
        n = torch.randn(x0.shape, generator=generator) if noise is None else noise[i : i + batch_size]
        x_t = scheduler.add_noise(x0.float(), n.to(x0.device), tt).to(next(unet.parameters()).dtype)
        with mid_block_output(unet) as mid:
            unet(x_t, tt)
        out.append(flat_features(mid["out"]))
    return torch.cat(out)


class ForgetVote:
    """The data-free vote (``forget_like_vote``) with its pool kept: the original model's features of the forget
    images and of its own samples, and the noise each own sample was read with, so that later samples (e.g. the
    unlearned model's, from the same seeds: ``metrics.data_free_forgetting``) are labelled against the same pool
    and bar — an unchanged sample exactly as before. ``labels`` is the vote on the own samples themselves."""

    @torch.no_grad()
    def __init__(self, unet, scheduler, own: torch.Tensor, forget: torch.Tensor, k: int = FEATURE_K,
                 min_forget: int = 3, seed: int = 0):
        self.t = int(0.2 * scheduler.config.num_train_timesteps)
        g = torch.Generator().manual_seed(seed)
        self.ff = self.features(unet, scheduler, forget, generator=g)
        # the noise drawn batch by batch, as noised_mid_features draws it (so the labels are the old vote's)
        self.own_noise = torch.cat([torch.randn(own[i : i + FEATURE_BATCH].shape, generator=g)
                                    for i in range(0, len(own), FEATURE_BATCH)])
        self.fo = self.features(unet, scheduler, own, noise=self.own_noise)
        self.k = min(k, len(self.ff) + len(self.fo) - 1)
        chance = self.k * len(self.ff) / (len(self.ff) + len(self.fo) - 1)
        self.bar = min(self.k, max(min_forget, math.ceil(2 * chance)))

    def features(self, unet, scheduler, x: torch.Tensor, generator=None, noise=None) -> torch.Tensor:
        if getattr(unet, "mid_block", None) is None:
            return torch.nn.functional.normalize(x.float().flatten(1), dim=1)
        return noised_mid_features(unet, scheduler, x, self.t, generator, noise=noise)

    def _neighbours(self, dist: torch.Tensor) -> torch.Tensor:
        """The ``k`` nearest of the pool (forget images first, then own samples) for each row of ``dist``."""
        return dist.topk(self.k, largest=False).indices.cpu()

    @functools.cached_property
    def pool_distances(self) -> torch.Tensor:
        """Each own sample's distances to the forget images, then to the other own samples (itself: inf)."""
        return torch.cat([torch.cdist(self.fo, self.ff),
                          torch.cdist(self.fo, self.fo).fill_diagonal_(float("inf"))], 1)

    @functools.cached_property
    def pool_neighbours(self) -> torch.Tensor:
        """Each own sample's ``k`` nearest in the pool (indices into forget images, then own samples)."""
        return self._neighbours(self.pool_distances)

    @functools.cached_property
    def counts(self) -> torch.Tensor:
        """How many of each own sample's ``k`` nearest neighbours are forget images (its own entry left out)."""
        return (self.pool_neighbours < len(self.ff)).sum(1)

    @property
    def labels(self) -> torch.Tensor:
        """True where an own sample is forget-like: at least ``bar`` forget images among its neighbours."""
        return self.counts >= self.bar

    def _marked(self, labels: torch.Tensor) -> torch.Tensor:
        """How many of each own sample's ``k`` nearest are forget images or own samples marked in ``labels``."""
        return torch.cat([torch.ones(len(self.ff), dtype=torch.bool), labels])[self.pool_neighbours].sum(1)

    @torch.no_grad()
    def near(self, min_marked: int, labels: torch.Tensor | None = None) -> torch.Tensor:
        """True where an own sample that is not forget-like (``labels``, default the vote's) has at least
        ``min_marked`` of its ``k`` nearest neighbours (forget images and other own samples) forget images or
        forget-like own samples: the vote's margin, the samples it is not sure are retained."""
        labels = self.labels if labels is None else labels
        return (self._marked(labels) >= min_marked) & ~labels

    @torch.no_grad()
    def spread(self, min_marked: int, rounds: int = 3) -> torch.Tensor:
        """The vote spread through the neighbours: also forget-like, an own sample with at least ``min_marked``
        of its ``k`` nearest forget images or forget-like own samples; repeated up to ``rounds`` times."""
        labels = self.labels
        for _ in range(rounds):
            new = labels | (self._marked(labels) >= min_marked)
            if torch.equal(new, labels):
                break
            labels = new
        return labels

    @torch.no_grad()
    def label(self, unet, scheduler, x: torch.Tensor, replaces: torch.Tensor) -> torch.Tensor:
        """The vote on new samples ``x``, each standing in for the own sample ``replaces[j]`` (left out of its
        neighbours, its noise reused). ``unet`` must be the model the pool was measured with (the original)."""
        replaces = replaces.cpu()
        fq = self.features(unet, scheduler, x, noise=self.own_noise[replaces])
        d_own = torch.cdist(fq, self.fo)
        d_own[torch.arange(len(fq), device=d_own.device), replaces.to(d_own.device)] = float("inf")
        nn = self._neighbours(torch.cat([torch.cdist(fq, self.ff), d_own], 1))
        return (nn < len(self.ff)).sum(1) >= self.bar


def forget_like_vote(unet, scheduler, own: torch.Tensor, forget: torch.Tensor, k: int = FEATURE_K,
                     min_forget: int = 3, seed: int = 0) -> torch.Tensor:
    """Data-free label of the model's own samples: True where at least ``min_forget`` of an own sample's
    ``k`` nearest neighbours, among the forget images and the other own samples, are forget images — in
    the model's mid-block features at t = 0.2 T (unit-normalised pixels for a model without a mid-block). Caught
    86–94 % of the reference model's own forget-class samples and mislabelled 1.2–3.1 % of the others
    (docs/quality-study.md, section 5). When the forget images are a large share of the candidates (few own
    samples), the bar rises to twice the neighbours that share predicts, so a small sample is not called
    forget-like by chance."""
    if len(own) == 0 or len(forget) == 0:
        return torch.zeros(len(own), dtype=torch.bool)
    return ForgetVote(unet, scheduler, own, forget, k=k, min_forget=min_forget, seed=seed).labels


def _kernel_scale(ctx) -> float:
    if getattr(ctx, "_kernel_scale", None) is None:
        ctx._kernel_scale = kernel_scale(ctx.forget_images)
    return ctx._kernel_scale


def kernel_scale(forget: torch.Tensor) -> float:
    """Median squared distance from each forget image to its nearest other one, per pixel."""
    ff = forget.float().flatten(1)
    if len(ff) < 2:
        return 1.0
    return float(torch.cdist(ff, ff).fill_diagonal_(float("inf")).min(1).values.pow(2).median()) / ff.shape[1]


def kernel_log_density(x_t: torch.Tensor, t: torch.Tensor, refs: torch.Tensor, scheduler, blur: float):
    """log q(x_t) of ``refs`` forward-noised to t, each first blurred by N(0, blur·I) in clean space
    (a kernel density estimate with bandwidth ``blur``), up to a constant shared by every set at t."""
    ac = scheduler.alphas_cumprod.to(x_t.device)[t].float().view(-1, 1)
    xf = x_t.float().flatten(1)
    ff = refs.float().flatten(1).to(x_t.device)
    dist2 = xf.pow(2).sum(1, keepdim=True) - 2 * ac.sqrt() * (xf @ ff.T) + ac * ff.pow(2).sum(1).view(1, -1)
    return torch.logsumexp(-dist2 / (2 * ((1 - ac) + ac * blur)).clamp_min(1e-8), dim=1) - math.log(ff.shape[0])


def empirical_forget_eps(x_t: torch.Tensor, t: torch.Tensor, forget: torch.Tensor, scheduler,
                         with_log_density: bool = False):
    """ε of the forget set's empirical distribution: the exact denoiser if the data were only ``forget``.

    With x_t = √ᾱ x0 + √(1−ᾱ) ε and x0 uniform over the forget images f_j, the posterior over j is
    softmax_j(−‖x_t − √ᾱ f_j‖² / (2(1−ᾱ))), E[x0 | x_t] = Σ_j w_j f_j and
    ε_F = (x_t − √ᾱ E[x0 | x_t]) / √(1−ᾱ). Guiding the original's ε away from ε_F (as ESD does with a
    text condition) removes the forget set's pull on the sampler without raising any loss unboundedly.
    ``with_log_density`` also returns log q_F(x_t) per input, up to a constant shared by every image
    set at the same t (so two sets' values can be compared).
    """
    ac = scheduler.alphas_cumprod.to(x_t.device)[t].float().view(-1, 1)
    xf = x_t.float().flatten(1)
    ff = forget.float().flatten(1).to(x_t.device)
    sq = ac.sqrt()
    # ‖x_t − √ᾱ f_j‖² = ‖x_t‖² − 2√ᾱ x_t·f_j + ᾱ‖f_j‖²
    dist2 = (xf.pow(2).sum(1, keepdim=True) - 2 * sq * (xf @ ff.T) + ac * ff.pow(2).sum(1).view(1, -1))
    logits = -dist2 / (2 * (1 - ac)).clamp_min(1e-8)
    w = torch.softmax(logits, dim=1)
    x0 = w @ ff
    eps = ((xf - sq * x0) / (1 - ac).clamp_min(1e-8).sqrt()).view_as(x_t)
    if not with_log_density:
        return eps
    return eps, torch.logsumexp(logits, dim=1) - math.log(ff.shape[0])


assert set(REGISTRY) == set(METHOD_NAMES), "config.METHOD_NAMES and the registry must agree"
