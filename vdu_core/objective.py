"""The two terms of the VDU objective, each computed and reported on its own.

    L_VDU(θ) = γ · Σ_i (θ_i − μ*_i)² / (2 σ*_i²)  −  (1 − γ) · Σ_{x∈D_f} Σ_t C_t ‖ε − ε_θ(x_t, t)‖²

Normalisation (so that one γ means the same on a 0.3M- and a 900M-parameter model):

* **stability** is the *mean* over the N trainable parameters of (θ_i − μ*_i)² / (2σ*_i²), i.e. the
  paper's sum divided by N. ``StabilityRegularizer.sum_value`` also reports the literal sum.
* **plasticity** is the C_t-weighted *mean* squared error per element (pixels × channels) over the
  batch, with the weights C_t normalised to mean 1 over the timesteps sampled, i.e. the paper's sum
  divided by (batch × elements). Uniform C_t by default; ``elbo`` uses the DDPM ELBO weights
  β_t² / (2 σ_t² α_t (1 − ᾱ_t)) (with σ_t² = β_t), normalised to mean 1 over all timesteps.

The stability term's gradient is applied analytically (``add_grad_``) rather than through autograd:
it is exact, costs a few fused element-wise passes over the weights, and keeps one VDU step within a
few percent of a plain fine-tuning step (``bench/bench_objective.py`` measures the ratio).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class StabilityRegularizer:
    """(θ − μ*)² / (2σ*²), averaged over parameters. Holds μ* and the precision 1/σ*² per tensor."""

    def __init__(self, params: Sequence[torch.Tensor], mu: Sequence[torch.Tensor], var: Sequence[torch.Tensor]):
        self.params = list(params)
        if not (len(self.params) == len(mu) == len(var)):
            raise ValueError("params, mu and var must have one tensor per parameter")
        for p, m, v in zip(self.params, mu, var, strict=True):
            if p.shape != m.shape or p.shape != v.shape:
                raise ValueError(f"posterior shape {tuple(m.shape)} does not match parameter {tuple(p.shape)}")
        dev = self.params[0].device
        self.mu = [m.detach().to(dev, torch.float32) for m in mu]
        self.precision = [(1.0 / v.detach().to(dev, torch.float32)) for v in var]
        self.count = sum(p.numel() for p in self.params)

    @torch.no_grad()
    def sum_value(self) -> torch.Tensor:
        """The paper's literal Σ_i (θ_i − μ*_i)² / (2σ*_i²)."""
        diffs = torch._foreach_sub([p.float() for p in self.params], self.mu)
        sq = torch._foreach_mul(diffs, diffs)
        terms = torch._foreach_mul(sq, self.precision)
        return 0.5 * torch.stack([t.sum() for t in terms]).sum()

    def value(self) -> torch.Tensor:
        """The normalised term (mean over parameters); differentiable through autograd."""
        total = sum(((p.float() - m) ** 2 * w).sum() for p, m, w in zip(self.params, self.mu, self.precision,
                                                                          strict=True))
        return 0.5 * total / self.count

    @torch.no_grad()
    def add_grad_(self, scale: float) -> float:
        """Add ``scale`` × ∇(normalised term) to each ``p.grad``; return the normalised value.

        ∇_θ = (θ − μ*) · precision / N. Fused ``_foreach`` passes: no autograd graph.
        """
        diffs = torch._foreach_sub([p.detach().float() for p in self.params], self.mu)
        weighted = torch._foreach_mul(diffs, self.precision)
        value = 0.5 * torch.stack([(d * w).sum() for d, w in zip(diffs, weighted, strict=True)]).sum() / self.count
        if scale != 0.0:
            torch._foreach_mul_(weighted, scale / self.count)
            for p, g in zip(self.params, weighted, strict=True):
                if p.grad is None:
                    p.grad = g.to(p.dtype)
                else:
                    p.grad.add_(g.to(p.dtype))
        return float(value)


def elbo_weights(scheduler) -> torch.Tensor:
    """DDPM ELBO weights C_t = β_t² / (2 σ_t² α_t (1 − ᾱ_t)) with σ_t² = β_t, normalised to mean 1."""
    betas = scheduler.betas.double()
    alphas = 1.0 - betas
    alphas_cumprod = torch.cumprod(alphas, 0)
    w = betas / (2.0 * alphas * (1.0 - alphas_cumprod))
    w = w / w.mean()
    return w.float()


def timestep_weights(scheduler, timesteps: torch.Tensor, kind: str) -> torch.Tensor:
    """C_t for each sampled timestep (mean 1 over all timesteps, so ``uniform`` and ``elbo`` compare)."""
    if kind == "uniform":
        return torch.ones(timesteps.shape, dtype=torch.float32, device=timesteps.device)
    if kind == "elbo":
        return elbo_weights(scheduler).to(timesteps.device)[timesteps]
    raise ValueError(f"unknown timestep weighting {kind!r}")


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """‖ε − ε_θ‖² averaged over each sample's elements: shape (batch,)."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def plasticity_term(per_sample: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_t C_t ‖ε − ε_θ(x_t, t)‖², normalised per element and per sample (see module docstring)."""
    return (weights * per_sample).mean()


def vdu_loss(stability: torch.Tensor, plasticity: torch.Tensor, gamma: float) -> torch.Tensor:
    """γ · stability − (1 − γ) · plasticity: the objective exactly as the paper writes it."""
    return gamma * stability - (1.0 - gamma) * plasticity
