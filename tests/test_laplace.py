"""The Kronecker-factored Laplace stability term (vdu_core.laplace)."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.conftest import make_tiny_unet
from vdu_core import loop, posterior
from vdu_core.config import UnlearnConfig
from vdu_core.errors import ConfigError
from vdu_core.laplace import KroneckerLaplace, NaturalStep, _flat, from_own_samples, sampler_step_weights


def _points(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, 1, 8, 8), generator=g), torch.randint(0, 100, (n,), generator=g)


def _perturb_one(unet, layer, scale, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = layer.weight
        w.add_(torch.randn(w.shape, generator=g) * scale * w.std())


def test_the_penalty_is_the_measured_output_change_for_one_layer():
    """For a small change of one layer the Gauss-Newton quadratic is the (weighted) mean squared output
    change, up to the Kronecker factorisation: the same order, for layers early, in the middle and late."""
    unet = make_tiny_unet(attention=True).eval()
    x, t = _points()
    w = torch.rand(len(x), generator=torch.Generator().manual_seed(2)) + 0.5
    lap = KroneckerLaplace(unet, x, t, w)
    assert float(lap.penalty().detach()) == 0.0
    state = copy.deepcopy(unet.state_dict())
    with torch.no_grad():
        before = unet(x, t).sample
    ratios = []
    for layer in (lap.mods[1], lap.mods[len(lap.mods) // 2], lap.mods[-2]):
        _perturb_one(unet, layer, 1e-3)
        with torch.no_grad():
            true = ((unet(x, t).sample - before).pow(2).flatten(1).mean(1) * w).mean()
        ratios.append(float(lap.penalty().detach()) / float(true))
        unet.load_state_dict(state)
    assert all(0.3 < r < 3.0 for r in ratios), ratios


def test_sampler_step_weights_are_largest_at_high_noise(tiny_scheduler):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    w = sampler_step_weights(sched, torch.tensor([960, 800, 500, 200, 0]))
    assert w[0] > 50 and w[1] > w[2] and abs(float(w[2]) - 1.0) < 1e-6 and w[4] < w[2]
    assert torch.all(torch.isfinite(sampler_step_weights(tiny_scheduler, torch.arange(0, 100))))


def test_laplace_term_holds_the_model_and_leaves_norms_alone(tiny_scheduler):
    forget = torch.rand((6, 1, 8, 8), generator=torch.Generator().manual_seed(3)) * 2 - 1
    anchors = torch.rand((16, 1, 8, 8), generator=torch.Generator().manual_seed(4)) * 2 - 1
    drift = {}
    for weight in (0.0, 1e6):
        unet = make_tiny_unet()
        orig = copy.deepcopy(unet)
        cfg = UnlearnConfig.from_dict({"steps": 8, "batch_size": 4, "posterior": "isotropic", "lr": 1e-3,
                                       "laplace_weight": weight, "laplace_points": 32, "anchor_weight": 0.0,
                                       "guidance_weighting": "uniform"})
        post = posterior.estimate(unet, tiny_scheduler, cfg)
        events = []
        loop.unlearn(unet, tiny_scheduler, forget, cfg, post, anchors=anchors, on_progress=events.append)
        x, t = _points(32, seed=5)
        with torch.no_grad():
            drift[weight] = float((unet(x, t).sample - orig(x, t).sample).pow(2).mean())
        if weight:
            assert "laplace" in events[-1].losses
            norms = [n for n, _ in unet.named_parameters() if "norm" in n]
            assert norms
            for n in norms:
                assert torch.equal(unet.get_parameter(n), orig.get_parameter(n)), n
    assert drift[1e6] < 0.1 * drift[0.0]


def test_laplace_weight_is_a_vdu_term_only():
    with pytest.raises(ConfigError) as e:
        UnlearnConfig.from_dict({"method": "vdu_paper", "laplace_weight": 10.0})
    assert e.value.field == "params.laplace_weight"
    with pytest.raises(ConfigError):
        UnlearnConfig.from_dict({"laplace_weight": -1.0})


def test_the_natural_step_moves_as_far_as_adams_in_the_laplace_metric_in_another_direction():
    """``step_direction = "natural"``: each step is as long as Adam's in the Laplace term's metric, points
    elsewhere, and moves only the layers the term covers."""
    unet = make_tiny_unet(attention=True)
    x, t = _points()
    lap = KroneckerLaplace(unet, x, t, torch.ones(len(x)))
    step = NaturalStep(lap, damping=10.0)
    params = [p for p in unet.parameters() if p.requires_grad]
    covered = {id(p) for m in lap.mods for p in (m.weight, m.bias) if p is not None}
    opt = torch.optim.Adam(params, lr=1e-3)
    for k in range(3):
        opt.zero_grad(set_to_none=True)
        xb, tb = _points(16, seed=10 + k)
        unet(xb, tb).sample.pow(2).mean().backward()
        for p in params:
            if id(p) not in covered:
                p.grad = None  # as the loop does with the Laplace term
        twin = copy.deepcopy(unet)
        twin_params = [p for p in twin.parameters() if p.requires_grad]
        twin_opt = torch.optim.Adam(twin_params, lr=1e-3)
        twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # its moments are updated in place
        for p, q in zip(params, twin_params, strict=True):
            q.grad = None if p.grad is None else p.grad.clone()
        twin_opt.step()
        names, twins = {id(m): n for n, m in unet.named_modules()}, dict(twin.named_modules())
        twin_mods = [twins[names[id(m)]] for m in lap.mods]
        before = [_flat(m).detach().clone() for m in lap.mods]
        frozen = {n: p.detach().clone() for n, p in unet.named_parameters() if id(p) not in covered}
        report = step.step(opt)
        moved = [_flat(m).detach() - b for m, b in zip(lap.mods, before, strict=True)]
        adams = [_flat(m).detach() - b for m, b in zip(twin_mods, before, strict=True)]
        assert report["step_distance"] == pytest.approx(step.distance(adams), rel=1e-6)
        assert step.distance(moved) == pytest.approx(step.distance(adams), rel=1e-3)
        assert step.distance(moved) > 0
        flat_m, flat_a = torch.cat([d.flatten() for d in moved]), torch.cat([d.flatten() for d in adams])
        assert float(torch.nn.functional.cosine_similarity(flat_m, flat_a, dim=0)) < 0.95
        for n, p in unet.named_parameters():
            if n in frozen:
                assert torch.equal(p, frozen[n]), n


def test_the_natural_step_needs_the_laplace_term(tiny_scheduler):
    for params in ({"step_direction": "natural", "laplace_weight": 0.0},
                   {"method": "vdu_paper", "step_direction": "natural"}):
        with pytest.raises(ConfigError) as e:
            UnlearnConfig.from_dict(params)
        assert e.value.field == "params.step_direction"
    with pytest.raises(ConfigError) as e:
        UnlearnConfig.from_dict({"step_direction": "sideways"})
    assert e.value.field == "params.step_direction"
    forget = torch.rand((6, 1, 8, 8), generator=torch.Generator().manual_seed(3)) * 2 - 1
    unet = make_tiny_unet()
    cfg = UnlearnConfig.from_dict({"steps": 3, "batch_size": 4, "anchor_samples": 24, "trajectory_steps": 5,
                                   "laplace_points": 16, "step_direction": "natural"})
    report = loop.unlearn(unet, tiny_scheduler, forget, cfg)
    assert report.steps_run == 3 and all(h["step_distance"] > 0 for h in report.history)


def test_from_own_samples_needs_samples(tiny_unet, tiny_scheduler):
    with pytest.raises(ValueError):
        from_own_samples(tiny_unet, tiny_scheduler, torch.empty(0, 1, 8, 8), 16, 0)
    forget = torch.rand((12, 1, 8, 8), generator=torch.Generator().manual_seed(8)) * 2 - 1
    with pytest.raises(ValueError, match="forget set"):  # every own sample is in the forget set, many times
        from_own_samples(tiny_unet, tiny_scheduler, forget.clone(), 16, 0, forget=forget.repeat(20, 1, 1, 1))


def test_forget_like_vote_finds_own_samples_that_look_like_the_forget_set(tiny_unet, tiny_scheduler):
    from vdu_core.methods import forget_like_vote

    g = torch.Generator().manual_seed(6)
    forget = (torch.rand((12, 1, 8, 8), generator=g) * 0.2 + 0.8).clamp(-1, 1)  # bright
    like = (forget[:6] + 0.05 * torch.randn((6, 1, 8, 8), generator=g)).clamp(-1, 1)
    other = (torch.rand((20, 1, 8, 8), generator=g) * 0.2 - 1.0)  # dark
    labels = forget_like_vote(tiny_unet.eval(), tiny_scheduler, torch.cat([like, other]), forget)
    assert labels.dtype == torch.bool and labels.shape == (26,)
    assert labels[:6].all() and not labels[6:].any()
    assert not forget_like_vote(tiny_unet, tiny_scheduler, other, forget[:0]).any()
