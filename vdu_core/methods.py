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

from dataclasses import dataclass

import torch

from vdu_core.config import METHOD_NAMES
from vdu_core.objective import per_sample_mse, plasticity_term

REGISTRY: dict[str, type[UnlearningMethod]] = {}


def register(cls):
    REGISTRY[cls.name] = cls
    return cls


def get_method(name: str) -> type[UnlearningMethod]:
    return REGISTRY[name]


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

    def __init__(self, config):
        self.config = config

    def compute(self, ctx, batch: ForgetBatch) -> Terms:  # pragma: no cover - interface
        raise NotImplementedError


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
    """The product default: VDU with a bounded plasticity and a function-space stability term.

    L = γ · stability − (1−γ) · plasticity_bounded + λ · function_space

    * plasticity_bounded: per sample, min(‖ε − ε_θ‖², b · ‖ε − ε_θ₀‖²) with θ₀ the original model on the
      same noised input — the forget loss is pushed up to ``plasticity_bound`` times the original's
      and no further, so the ascent cannot run away.
    * function_space: ‖ε_θ(a_t,t) − ε_θ₀(a_t,t)‖² on the original model's own samples ``a`` (those
      nearest the forget set left out), weight λ = ``anchor_weight``: keeps everything else the model
      generates where it was — the function-space inference the paper names as its next step.
    """

    name = "vdu"
    needs_original = True

    def __init__(self, config):
        super().__init__(config)
        self.needs_anchors = config.anchor_weight > 0

    def compute(self, ctx, batch: ForgetBatch) -> Terms:
        cfg = self.config
        gamma = cfg.gamma
        per, plast = _plasticity(ctx, batch)
        report = {"plasticity": float(plast.detach())}
        if cfg.plasticity_bound is not None:
            with torch.no_grad():
                ref = per_sample_mse(ctx.original(batch.x_t, batch.t).sample, batch.noise)
            bounded = torch.minimum(per, cfg.plasticity_bound * ref)
            plast_used = plasticity_term(bounded, batch.weights)
            report["plasticity_bounded"] = float(plast_used)
            report["plasticity_ratio_to_original"] = float(per.mean() / ref.mean().clamp_min(1e-12))
        else:
            plast_used = plast
        loss = -(1.0 - gamma) * plast_used
        if self.needs_anchors:
            a_t, a_time, _ = ctx.anchor_batch()
            with torch.no_grad():
                target = ctx.original(a_t, a_time).sample
            fs = per_sample_mse(ctx.unet(a_t, a_time).sample, target).mean()
            loss = loss + cfg.anchor_weight * fs
            report["function_space"] = float(fs)
        return Terms(loss, gamma, report)


assert set(REGISTRY) == set(METHOD_NAMES), "config.METHOD_NAMES and the registry must agree"
