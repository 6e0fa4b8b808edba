"""The two VDU terms against hand computations, and the method registry."""

from __future__ import annotations

import pytest
import torch

from vdu_core.config import METHOD_NAMES, UnlearnConfig
from vdu_core.methods import REGISTRY
from vdu_core.objective import (
    StabilityRegularizer,
    elbo_weights,
    per_sample_mse,
    plasticity_term,
    timestep_weights,
    vdu_loss,
)


def test_stability_matches_hand_computation():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
    q = torch.nn.Parameter(torch.tensor([[0.5]]))
    mu = [torch.tensor([0.0, 2.0, 1.0]), torch.tensor([[0.0]])]
    var = [torch.tensor([1.0, 4.0, 0.5]), torch.tensor([[0.25]])]
    reg = StabilityRegularizer([p, q], mu, var)
    # literal sum: (1)^2/2 + 0 + (2)^2/(2*0.5) + (0.5)^2/(2*0.25) = 0.5 + 4 + 0.5 = 5.0
    assert float(reg.sum_value()) == pytest.approx(5.0)
    # normalised: mean over the 4 parameters
    assert float(reg.value()) == pytest.approx(5.0 / 4)
    value = reg.add_grad_(scale=2.0)
    assert value == pytest.approx(5.0 / 4)
    # d/dθ of 2 * mean: 2 * (θ - μ) / σ² / N
    assert torch.allclose(p.grad, torch.tensor([2 * 1 / 1 / 4, 0.0, 2 * 2 / 0.5 / 4]))
    assert torch.allclose(q.grad, torch.tensor([[2 * 0.5 / 0.25 / 4]]))


def test_analytic_gradient_equals_autograd(tiny_unet):
    params = list(tiny_unet.parameters())
    g = torch.Generator().manual_seed(0)
    mu = [p.detach() + 0.1 * torch.randn(p.shape, generator=g) for p in params]
    var = [torch.rand(p.shape, generator=g) + 0.5 for p in params]
    reg = StabilityRegularizer(params, mu, var)
    reg.value().backward()
    auto = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    reg.add_grad_(1.0)
    for a, p in zip(auto, params, strict=True):
        torch.testing.assert_close(p.grad, a, rtol=1e-5, atol=1e-9)


def test_stability_is_zero_at_the_mean_and_shapes_are_checked():
    p = torch.nn.Parameter(torch.ones(3))
    reg = StabilityRegularizer([p], [torch.ones(3)], [torch.ones(3)])
    assert float(reg.value()) == 0.0
    with pytest.raises(ValueError):
        StabilityRegularizer([p], [torch.ones(2)], [torch.ones(3)])


def test_plasticity_and_objective_hand_computation():
    pred = torch.tensor([[1.0, 3.0], [0.0, 0.0]])
    target = torch.tensor([[0.0, 1.0], [0.0, 2.0]])
    per = per_sample_mse(pred, target)
    assert per.tolist() == pytest.approx([(1 + 4) / 2, (0 + 4) / 2])
    w = torch.tensor([1.0, 3.0])
    plast = plasticity_term(per, w)
    assert float(plast) == pytest.approx((2.5 * 1 + 2.0 * 3) / 2)
    assert float(vdu_loss(torch.tensor(2.0), plast, 0.25)) == pytest.approx(0.25 * 2 - 0.75 * 4.25)


def test_timestep_weights(tiny_scheduler):
    t = torch.tensor([0, 10, 99])
    assert timestep_weights(tiny_scheduler, t, "uniform").tolist() == [1.0, 1.0, 1.0]
    w = elbo_weights(tiny_scheduler)
    assert w.shape == (100,) and float(w.mean()) == pytest.approx(1.0, rel=1e-5)
    betas = tiny_scheduler.betas.double()
    ac = torch.cumprod(1 - betas, 0)
    raw = betas / (2 * (1 - betas) * (1 - ac))
    expected = raw[10] / raw.mean()
    assert float(timestep_weights(tiny_scheduler, t, "elbo")[1]) == pytest.approx(float(expected), rel=1e-5)
    with pytest.raises(ValueError):
        timestep_weights(tiny_scheduler, t, "bogus")


def test_registry_matches_config_names():
    assert set(REGISTRY) == set(METHOD_NAMES)
    assert UnlearnConfig.from_dict({"method": "gradient_ascent"}).gamma == 0.0
    paper = UnlearnConfig.from_dict({"method": "vdu_paper"})
    assert paper.plasticity_bound is None and paper.anchor_weight == 0.0
