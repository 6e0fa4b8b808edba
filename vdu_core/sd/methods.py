"""Unlearning methods for text-conditional latent diffusion, behind ``vdu_core.methods``' interface
(``UnlearningMethod.compute(ctx, batch) -> Terms``; registered with ``register_sd``).

Notation: ε₀ is the frozen original UNet, c the condition of a forget latent (its caption, else a
prompt naming the feature), p a prompt naming the feature, ∅ the empty prompt, η = ``guidance_scale``.

* ``esd`` — Erased Stable Diffusion (Gandikota et al. 2023): regress ε_θ(x_t, p) on
  ε₀(x_t, ∅) − η (ε₀(x_t, p) − ε₀(x_t, ∅)). x_t: the noised forget latents (``esd_source='forget'``),
  or as in the paper the model's own DDIM trajectory for p (guidance 3) stopped at a random one of
  ``esd_sample_steps`` steps (``esd_source='self'``). No stability term.
* ``vdu`` — the product default, the MNIST default's idea in text-conditional form:
  γ · stability (posterior over what moves, analytic gradient) + (1−γ) · redirect + λ · function_space,
  redirect = ‖ε_θ(x_t, c) − [ε₀(x_t, c) − (1+η)(ε₀(x_t, p) − ε₀(x_t, ∅))]‖², i.e. the original's
  prediction for the caption with the feature direction removed (with c = p this is ESD's target), and
  function_space = ‖ε_θ(a_t, n) − ε₀(a_t, n)‖² on the original's own latents for neutral prompts n.
* ``vdu_paper`` — the literal objective: γ · stability − (1−γ) · C_t ‖ε − ε_θ(x_t, c)‖².
* ``gradient_ascent`` — −C_t ‖ε − ε_θ(x_t, c)‖² (γ = 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vdu_core.methods import Terms, UnlearningMethod, register_sd
from vdu_core.objective import per_sample_mse, plasticity_term, timestep_weights


@dataclass
class SDBatch:
    x0: torch.Tensor  # forget latents (scaled by the VAE's scaling factor)
    noise: torch.Tensor
    t: torch.Tensor
    x_t: torch.Tensor
    weights: torch.Tensor  # C_t per sample
    cond: torch.Tensor  # text embeddings of each latent's caption (or a feature prompt)
    feature: torch.Tensor  # text embeddings of a prompt naming the feature
    uncond: torch.Tensor  # text embeddings of the empty prompt


def _eps(unet, x_t, t, emb) -> torch.Tensor:
    return unet(x_t, t, encoder_hidden_states=emb).sample


@torch.no_grad()
def frozen_eps(ctx, x_t, t, *embs) -> list[torch.Tensor]:
    """ε₀ for several conditions in one batched call of the frozen model."""
    n = len(embs)
    out = _eps(ctx.original, x_t.repeat(n, 1, 1, 1), t.repeat(n), torch.cat(embs)).float()
    return list(out.chunk(n))


def esd_target(eps_p: torch.Tensor, eps_u: torch.Tensor, eta: float) -> torch.Tensor:
    """ε₀(∅) − η (ε₀(p) − ε₀(∅)): the negatively guided target of ESD."""
    return eps_u - eta * (eps_p - eps_u)


@torch.no_grad()
def self_sampled(ctx, feature: torch.Tensor, uncond: torch.Tensor, steps: int, guidance: float = 3.0):
    """ESD's x_t: the model being trained samples for the feature prompt (DDIM, classifier-free guidance)
    from fresh noise and stops after a random number of its ``steps``; returns (x_t, t) per sample."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(ctx.scheduler.config)
    sched.set_timesteps(steps)
    g = ctx.generator
    n = feature.shape[0]
    cfg = ctx.unet.config
    x = torch.randn((n, int(cfg.in_channels), int(cfg.sample_size), int(cfg.sample_size)), generator=g)
    x = x.to(ctx.device) * sched.init_noise_sigma
    stop = int(torch.randint(0, steps, (1,), generator=g))
    was = ctx.unet.training
    ctx.unet.eval()
    for t in sched.timesteps[:stop]:
        tt = t.repeat(n).to(ctx.device)
        both = _eps(ctx.unet, torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([uncond, feature])).float()
        e_u, e_p = both.chunk(2)
        x = sched.step(e_u + guidance * (e_p - e_u), t, x).prev_sample
    ctx.unet.train(was)
    return x, sched.timesteps[stop].repeat(n).to(ctx.device)


class _SDMethod(UnlearningMethod):
    needs_original = True


@register_sd
class ESD(_SDMethod):
    name = "esd"
    uses_posterior = False

    def compute(self, ctx, batch: SDBatch) -> Terms:
        x_t, t, weights = batch.x_t, batch.t, batch.weights
        if self.config.esd_source == "self":
            x_t, t = self_sampled(ctx, batch.feature, batch.uncond, self.config.esd_sample_steps)
            weights = timestep_weights(ctx.scheduler, t, self.config.timestep_weighting)
        eps_p, eps_u = frozen_eps(ctx, x_t, t, batch.feature, batch.uncond)
        target = esd_target(eps_p, eps_u, self.config.guidance_scale)
        loss = plasticity_term(per_sample_mse(_eps(ctx.unet, x_t, t, batch.feature), target), weights)
        return Terms(loss, 0.0, {"esd": float(loss.detach())})


@register_sd
class SDVDU(_SDMethod):
    name = "vdu"

    def __init__(self, config):
        super().__init__(config)
        self.needs_anchors = config.anchor_weight > 0

    def compute(self, ctx, batch: SDBatch) -> Terms:
        cfg = self.config
        eps_c, eps_p, eps_u = frozen_eps(ctx, batch.x_t, batch.t, batch.cond, batch.feature, batch.uncond)
        target = eps_c - (1.0 + cfg.guidance_scale) * (eps_p - eps_u)
        pred = _eps(ctx.unet, batch.x_t, batch.t, batch.cond)
        redirect = plasticity_term(per_sample_mse(pred, target), batch.weights)
        loss = (1.0 - cfg.gamma) * redirect
        report = {"redirect": float(redirect.detach()),
                  "plasticity": float(plasticity_term(per_sample_mse(pred.detach(), batch.noise), batch.weights))}
        if self.needs_anchors:
            a_t, a_time, a_emb = ctx.anchor_batch()
            with torch.no_grad():
                a_target = _eps(ctx.original, a_t, a_time, a_emb)
            fs = per_sample_mse(_eps(ctx.unet, a_t, a_time, a_emb), a_target).mean()
            loss = loss + cfg.anchor_weight * fs
            report["function_space"] = float(fs.detach())
        return Terms(loss, cfg.gamma, report)


@register_sd
class SDVDUPaper(_SDMethod):
    name = "vdu_paper"
    needs_original = False

    def compute(self, ctx, batch: SDBatch) -> Terms:
        per = per_sample_mse(_eps(ctx.unet, batch.x_t, batch.t, batch.cond), batch.noise)
        plast = plasticity_term(per, batch.weights)
        return Terms(-(1.0 - self.config.gamma) * plast, self.config.gamma, {"plasticity": float(plast.detach())})


@register_sd
class SDGradientAscent(_SDMethod):
    name = "gradient_ascent"
    uses_posterior = False
    needs_original = False

    def compute(self, ctx, batch: SDBatch) -> Terms:
        per = per_sample_mse(_eps(ctx.unet, batch.x_t, batch.t, batch.cond), batch.noise)
        plast = plasticity_term(per, batch.weights)
        return Terms(-plast, 0.0, {"plasticity": float(plast.detach())})
