"""A Kronecker-factored Laplace (K-FAC Gauss-Newton) stability term, estimated from the model alone.

The paper's stability term is a diagonal Gaussian posterior over the weights. A diagonal precision
ignores how weights act together, and the quality study found it either pins the model or lets it
drift (docs/quality-study.md, sections 1 and 8). The Gauss-Newton matrix of the model's own outputs is
the Laplace precision of the weights under the data the model generates; K-FAC (Martens & Grosse 2015,
Grosse & Martens 2016 for convolutions; Ritter et al. 2018 for continual learning) approximates it per
layer as A ⊗ G:

* A = E[a aᵀ], a = the layer's input (im2col patches for a convolution, a 1 appended for the bias);
* G = E[g gᵀ], g = the gradient at the layer's output of a random probe s · √w · ε_θ(x_t, t),
  s ~ N(0, 1) per output element, so E[g gᵀ] is the Gauss-Newton matrix of the (weighted) squared
  output change.

Both are measured once on the original model at preservation points x_t with weights w. Then

    Σ_l tr(G_l ΔW_l A_l ΔW_lᵀ) / (output elements)  ≈  E_p[w_p · mean (ε_θ(x_p) − ε_θ₀(x_p))²]

for the whole distribution the points stand for: a function-space stability term with no sampling
noise during training and one small matrix product per layer per step. Only linear and (ungrouped)
convolution weights and biases are covered; the loop does not train the rest (normalisation affines,
grouped convolutions: ``KroneckerLaplace.uncovered``), so nothing moves unregularised.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def _covered(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """Linear layers and ungrouped 2-D convolutions (a grouped one's patches do not factor this way)."""
    return [m for m in unet.modules()
            if isinstance(m, torch.nn.Linear) or (isinstance(m, torch.nn.Conv2d) and m.groups == 1)]


def _flat(m: torch.nn.Module, grad: bool = False) -> torch.Tensor:
    """The layer's weight (or, with ``grad``, its gradient, zeros where none) as one matrix, the bias as the
    last column."""
    def value(p: torch.Tensor) -> torch.Tensor:
        return (torch.zeros_like(p) if p.grad is None else p.grad) if grad else p

    w = value(m.weight).reshape(m.weight.shape[0], -1)
    return torch.cat([w, value(m.bias).view(-1, 1)], 1) if m.bias is not None else w


def sampler_step_weights(scheduler, timesteps: torch.Tensor, steps: int = 25) -> torch.Tensor:
    """How far one deterministic DDIM step (stride T/``steps``) moves the state per unit error in the
    predicted ε at each timestep, squared and relative to t ≈ T/2: ≈ 125 at the first step of a cosine
    schedule, 1 in the middle, < 1 below. An ε error at high noise moves the sample most."""
    ab = scheduler.alphas_cumprod.to(torch.float64)
    T = len(ab)
    stride = max(T // steps, 1)

    def factor(t: torch.Tensor) -> torch.Tensor:
        nxt = t - stride
        ab_next = torch.where(nxt >= 0, ab[nxt.clamp(min=0)], torch.ones_like(ab[t]))
        return (1 - ab_next).sqrt() - ab_next.sqrt() * ((1 - ab[t]) / ab[t]).sqrt()

    mid = torch.tensor([T // 2])
    return (factor(timesteps.long().cpu()) ** 2 / factor(mid) ** 2).float()


class KroneckerLaplace:
    """Σ_l tr(G_l ΔW_l A_l ΔW_lᵀ) / output elements, ΔW_l = the layer's change since construction."""

    def __init__(self, unet: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, weights: torch.Tensor,
                 batch_size: int = 32, seed: int = 0, should_cancel: Callable[[int, int], None] | None = None):
        self.mods = _covered(unet)
        if not self.mods:
            raise ValueError("the model has no convolution or linear layers to regularise")
        dev = next(unet.parameters()).device
        self.theta0 = [_flat(m).detach().clone() for m in self.mods]
        A = [torch.zeros(w.shape[1], w.shape[1], device=dev) for w in self.theta0]
        G = [torch.zeros(w.shape[0], w.shape[0], device=dev) for w in self.theta0]
        index = {m: i for i, m in enumerate(self.mods)}
        acts: dict[int, torch.Tensor] = {}
        grads: dict[int, torch.Tensor] = {}

        def hook(m, inp, out):
            i = index[m]
            acts[i] = inp[0].detach()
            out.register_hook(lambda g, i=i: grads.__setitem__(i, g.detach()))

        handles = [m.register_forward_hook(hook) for m in self.mods]
        gen = torch.Generator().manual_seed(seed)
        was = unet.training
        unet.eval()
        n = len(x)
        out_numel = 1
        try:
            for start in range(0, n, batch_size):
                if should_cancel is not None:
                    should_cancel(start, n)
                xb, tb = x[start : start + batch_size].to(dev), t[start : start + batch_size].to(dev)
                wb = weights[start : start + batch_size].to(dev)
                acts.clear()
                grads.clear()
                with torch.enable_grad():
                    out = unet(xb, tb).sample.float()
                    probe = torch.randn(out.shape, generator=gen).to(dev) * wb.sqrt().view(-1, *[1] * (out.dim() - 1))
                    (out * probe).sum().backward()
                out_numel = out[0].numel()
                for i, m in enumerate(self.mods):
                    if i not in grads:  # a layer the output does not depend on
                        continue
                    a, g = acts[i].float(), grads[i].float()
                    if isinstance(m, torch.nn.Conv2d):
                        a = F.unfold(a, m.kernel_size, m.dilation, m.padding, m.stride)  # B, C·k·k, L
                        positions = a.shape[-1]
                        a = a.transpose(1, 2).reshape(-1, a.shape[1])
                        g = g.flatten(2).transpose(1, 2).reshape(-1, g.shape[1])
                    else:
                        positions = a[0].numel() // a.shape[-1]
                        a, g = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
                    if m.bias is not None:
                        a = torch.cat([a, torch.ones(len(a), 1, device=dev)], 1)
                    A[i] += a.T @ a / (n * positions)
                    G[i] += g.T @ g / n
        finally:
            for h in handles:
                h.remove()
            unet.zero_grad(set_to_none=True)
            unet.train(was)
        self.A, self.G = A, G
        self.out_numel = out_numel

    def penalty(self) -> torch.Tensor:
        total = 0.0
        with torch.autocast(self.theta0[0].device.type, enabled=False):  # small differences: keep float32
            for m, w0, A, G in zip(self.mods, self.theta0, self.A, self.G, strict=True):
                d = _flat(m).float() - w0
                total = total + ((G @ d) * (d @ A)).sum()
        return total / self.out_numel

    def uncovered(self, params) -> list[torch.nn.Parameter]:
        """Those of ``params`` the term does not see (normalisation affines): not to be trained."""
        covered = {id(p) for m in self.mods for p in (m.weight, m.bias) if p is not None}
        return [p for p in params if id(p) not in covered]


class NaturalStep:
    """A step in the K-FAC natural-gradient direction (Martens & Grosse 2015) of the gradient's momentum, moved
    as far in the Laplace term's metric as the optimizer's own step would have moved: only the direction
    differs from Adam's (``step_direction = "natural"``, docs/quality-study.md section 19).

    Per layer, the direction is −(G + d_G I)⁻¹ M (A + d_A I)⁻¹, M the momentum (β 0.9) of the flattened
    gradient, d = ``damping`` × the factor's mean eigenvalue. It favours changes the retained states' outputs
    are least sensitive to, as the Laplace term measures them. The optimizer's step is taken first to measure
    its length in that metric (its moments keep their usual updates), then undone."""

    def __init__(self, lap: KroneckerLaplace, damping: float, beta: float = 0.9):
        self.lap, self.beta = lap, beta
        self.A_inv = [torch.linalg.inv(A + damping * A.diagonal().mean() * torch.eye(len(A), device=A.device))
                      for A in lap.A]
        self.G_inv = [torch.linalg.inv(G + damping * G.diagonal().mean() * torch.eye(len(G), device=G.device))
                      for G in lap.G]
        self.momentum: list[torch.Tensor | None] = [None] * len(lap.mods)

    def distance(self, deltas: list[torch.Tensor]) -> float:
        """The length of a change of the covered layers in the Laplace metric (the penalty's square root)."""
        sq = sum(float(((G @ d) * (d @ A)).sum()) for d, A, G in zip(deltas, self.lap.A, self.lap.G, strict=True))
        return (max(sq, 0.0) / self.lap.out_numel) ** 0.5

    @torch.no_grad()
    def step(self, opt: torch.optim.Optimizer) -> dict:
        mods = self.lap.mods
        before = [_flat(m).detach().clone() for m in mods]
        for i, m in enumerate(mods):
            g = _flat(m, grad=True).float()
            self.momentum[i] = g if self.momentum[i] is None else self.beta * self.momentum[i] + g
        opt.step()
        own = [_flat(m).detach().float() - b for m, b in zip(mods, before, strict=True)]
        natural = [-(Gi @ mom @ Ai) for mom, Ai, Gi in zip(self.momentum, self.A_inv, self.G_inv, strict=True)]
        length, nat_length = self.distance(own), self.distance(natural)
        scale = length / nat_length if nat_length > 0 else 0.0
        for m, b, d in zip(mods, before, natural, strict=True):
            new = (b + scale * d).to(m.weight.dtype)
            if m.bias is not None:
                m.bias.copy_(new[:, -1])
                new = new[:, :-1]
            m.weight.copy_(new.reshape(m.weight.shape))
        return {"step_distance": length}


def from_own_samples(unet: torch.nn.Module, scheduler, samples: torch.Tensor, n_points: int, seed: int,
                     forget: torch.Tensor | None = None, steps: int = 25,
                     should_cancel: Callable[[int, int], None] | None = None) -> KroneckerLaplace:
    """The factors on ``n_points`` of the model's own samples, each noised to a timestep of the DDIM-``steps``
    grid and weighted by ``sampler_step_weights`` there (data-free: nothing but the model's output).

    With ``forget``, the own samples the data-free vote (``methods.forget_like_vote``) calls forget-like are
    left out: the term must hold everything else the model generates, not the content being removed."""
    if samples is None or len(samples) == 0:
        raise ValueError("the Laplace term needs the model's own samples")
    if forget is not None:
        from vdu_core.methods import forget_like_vote

        keep = ~forget_like_vote(unet, scheduler, samples, forget, seed=seed)
        if int(keep.sum()) == 0:
            raise ValueError("every own sample looks like the forget set: nothing left for the Laplace term to hold")
        samples = samples[keep.to(samples.device)]
    g = torch.Generator().manual_seed(seed + 17)
    T = scheduler.config.num_train_timesteps
    grid = torch.arange(0, T, max(T // steps, 1))
    idx = torch.randint(0, len(samples), (n_points,), generator=g)
    t = grid[torch.randint(0, len(grid), (n_points,), generator=g)]
    noise = torch.randn((n_points, *samples.shape[1:]), generator=g)
    x0 = samples[idx.to(samples.device)].detach().cpu().float()
    x_t = scheduler.add_noise(x0, noise, t)
    return KroneckerLaplace(unet, x_t, t, sampler_step_weights(scheduler, t, steps), seed=seed,
                            should_cancel=should_cancel)
