"""The unlearning loop: callbacks, stopping rules, cancellation, determinism, methods."""

from __future__ import annotations

import pytest
import torch

from vdu_core import loop, posterior
from vdu_core.config import UnlearnConfig
from vdu_core.errors import Cancelled


def _forget(n=6, size=8):
    g = torch.Generator().manual_seed(3)
    return torch.rand((n, 1, size, size), generator=g) * 2 - 1


def _run(unet, sched, **kw):
    cfg = UnlearnConfig.from_dict({"steps": 6, "batch_size": 4, "posterior": "isotropic", "probe_every": 2,
                                   "method": "vdu_paper", **kw})
    post = posterior.estimate(unet, sched, cfg) if cfg.method != "gradient_ascent" else None
    events = []
    report = loop.unlearn(unet, sched, _forget(), cfg, post, on_progress=events.append)
    return report, events


def test_progress_reports_every_term_each_step(tiny_unet, tiny_scheduler):
    report, events = _run(tiny_unet, tiny_scheduler)
    assert [e.step for e in events] == list(range(1, 7))
    assert all({"stability", "plasticity", "objective"} <= set(e.losses) for e in events)
    assert events[-1].eta_s == 0 and events[0].total == 6
    assert report.steps_run == 6 and report.stopped_by == "max_steps"


def test_gradient_ascent_raises_the_forget_loss(tiny_unet, tiny_scheduler):
    report, events = _run(tiny_unet, tiny_scheduler, method="gradient_ascent", lr=1e-2, steps=10)
    assert "stability" not in events[0].losses
    assert report.forget_loss_ratio > 1.0


def test_target_ratio_stops_early(tiny_unet, tiny_scheduler):
    report, _ = _run(tiny_unet, tiny_scheduler, method="gradient_ascent", lr=5e-2, steps=200, probe_every=1,
                     target_loss_ratio=1.05)
    assert report.stopped_by == "target_loss_ratio" and report.steps_run < 200


def test_cancel_is_checked_every_step(tiny_unet, tiny_scheduler):
    cfg = UnlearnConfig.from_dict({"steps": 50, "batch_size": 2, "method": "gradient_ascent"})
    calls = []

    def should_cancel():
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(Cancelled):
        loop.unlearn(tiny_unet, tiny_scheduler, _forget(), cfg, None, should_cancel=should_cancel)
    assert len(calls) == 4


def test_same_seed_same_weights(tiny_scheduler):
    from tests.conftest import make_tiny_unet

    a, b = make_tiny_unet(), make_tiny_unet()
    _run(a, tiny_scheduler)
    _run(b, tiny_scheduler)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb)


def test_gamma_one_keeps_weights_near_the_posterior_mean(tiny_scheduler):
    from tests.conftest import make_tiny_unet

    free, held = make_tiny_unet(), make_tiny_unet()
    _run(free, tiny_scheduler, gamma=0.0, lr=1e-2)
    _run(held, tiny_scheduler, gamma=1.0, lr=1e-2, posterior_sigma=1e-4)
    ref = make_tiny_unet()
    drift = lambda m: sum(float((p - r).pow(2).sum()) for p, r in zip(m.parameters(), ref.parameters(), strict=True))  # noqa: E731
    assert drift(held) < drift(free)


def test_vdu_ascent_variant_uses_the_bound_and_anchors(tiny_unet, tiny_scheduler):
    cfg = UnlearnConfig.from_dict({"steps": 3, "batch_size": 2, "posterior": "isotropic", "probe_every": 1,
                                   "plasticity_target": "ascent"})
    post = posterior.estimate(tiny_unet, tiny_scheduler, cfg)
    anchors = torch.rand(5, 1, 8, 8) * 2 - 1
    events = []
    loop.unlearn(tiny_unet, tiny_scheduler, _forget(), cfg, post, anchors=anchors, on_progress=events.append)
    assert {"plasticity_bounded", "function_space", "stability"} <= set(events[-1].losses)
    with pytest.raises(ValueError):
        loop.unlearn(tiny_unet, tiny_scheduler, _forget(), cfg, post, anchors=None)


def test_negative_guidance_redirects(tiny_unet, tiny_scheduler):
    cfg = UnlearnConfig.from_dict({"steps": 3, "batch_size": 2, "posterior": "isotropic", "probe_every": 1,
                                   "plasticity_target": "negative_guidance"})
    assert cfg.gamma == 0.5 and cfg.laplace_weight == 0.0  # the forget-image targets' own defaults
    post = posterior.estimate(tiny_unet, tiny_scheduler, cfg)
    events = []
    loop.unlearn(tiny_unet, tiny_scheduler, _forget(), cfg, post, anchors=torch.rand(5, 1, 8, 8) * 2 - 1,
                 on_progress=events.append)
    assert {"redirect", "plasticity", "function_space", "stability"} <= set(events[-1].losses)


def test_empirical_forget_eps_by_hand(tiny_scheduler):
    from vdu_core.methods import empirical_forget_eps

    # One forget image: the posterior mean is that image, so ε_F is the exact noise that produced x_t.
    f = torch.rand(1, 1, 4, 4) * 2 - 1
    noise = torch.randn(3, 1, 4, 4)
    t = torch.tensor([5, 50, 90])
    x_t = tiny_scheduler.add_noise(f.expand(3, -1, -1, -1), noise, t)
    torch.testing.assert_close(empirical_forget_eps(x_t, t, f, tiny_scheduler), noise, rtol=1e-4, atol=1e-4)
    # Two far-apart images, low noise: the nearer one wins.
    g = -f
    eps = empirical_forget_eps(x_t[:1], t[:1], torch.cat([f, g]), tiny_scheduler)
    torch.testing.assert_close(eps, noise[:1], rtol=1e-3, atol=1e-3)


def test_posterior_weighted_guidance_pushes_only_forget_like_inputs(tiny_unet, tiny_scheduler):
    from types import SimpleNamespace

    from vdu_core.methods import guided_target

    g = torch.Generator().manual_seed(0)
    forget = torch.rand(4, 1, 8, 8, generator=g) * 0.5 + 0.5  # bright images
    anchors = -(torch.rand(6, 1, 8, 8, generator=g) * 0.5 + 0.5)  # dark images
    cfg = UnlearnConfig.from_dict({"guidance_weighting": "posterior", "forget_prior": 0.1, "guidance_scale": 2.0})
    ctx = SimpleNamespace(config=cfg, original=tiny_unet.eval(), forget_images=forget, anchors=anchors,
                          scheduler=tiny_scheduler)
    noise = torch.randn(2, 1, 8, 8, generator=g)
    low = torch.tensor([10, 10])
    x_t = tiny_scheduler.add_noise(torch.cat([forget[:1], anchors[:1]]), noise, low)
    with torch.no_grad():
        eps0 = tiny_unet(x_t, low).sample
    uniform = guided_target(SimpleNamespace(**{**vars(ctx), "config": UnlearnConfig.from_dict(
        {"guidance_scale": 2.0, "guidance_weighting": "uniform"})}), x_t, low)
    weighted = guided_target(ctx, x_t, low)
    # a forget-like input gets the full push, an anchor-like one none: its target is the original's ε
    torch.testing.assert_close(weighted[0], uniform[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(weighted[1], eps0[1], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(uniform[1], eps0[1], atol=1e-3)
    # at the largest t the two sets are indistinguishable: the push shrinks to about the prior share
    from diffusers import DDPMScheduler

    long = DDPMScheduler(num_train_timesteps=1000)
    ctx.scheduler = long
    top = torch.tensor([999, 999])
    x_hi = long.add_noise(torch.cat([forget[:1], anchors[:1]]), noise, top)
    with torch.no_grad():
        e0 = tiny_unet(x_hi, top).sample
    full = guided_target(SimpleNamespace(**{**vars(ctx), "config": UnlearnConfig.from_dict(
        {"guidance_scale": 2.0, "guidance_weighting": "uniform"})}), x_hi, top) - e0
    part = guided_target(ctx, x_hi, top) - e0
    assert part.norm() < 0.2 * full.norm()


def test_kernel_log_density_matches_the_empirical_denoiser_and_blur_softens_it(tiny_scheduler):
    from vdu_core.methods import empirical_forget_eps, kernel_log_density

    g = torch.Generator().manual_seed(1)
    refs = torch.rand(5, 1, 6, 6, generator=g) * 2 - 1
    x_t = torch.randn(3, 1, 6, 6, generator=g)
    t = torch.tensor([3, 40, 90])
    _, exact = empirical_forget_eps(x_t, t, refs, tiny_scheduler, with_log_density=True)
    torch.testing.assert_close(kernel_log_density(x_t, t, refs, tiny_scheduler, 0.0), exact)

    def gap(blur):
        return kernel_log_density(x_t, t, refs, tiny_scheduler, blur) - kernel_log_density(x_t, t, -refs,
                                                                                           tiny_scheduler, blur)

    assert (gap(4.0).abs() < gap(0.0).abs()).all()  # a wider kernel is less sure which set an input came from


def test_odds_weighting_is_the_exact_not_forget_shift_capped(tiny_unet, tiny_scheduler):
    from types import SimpleNamespace

    from vdu_core.methods import ODDS_CAP, empirical_forget_eps, guided_target

    g = torch.Generator().manual_seed(0)
    forget = torch.rand(4, 1, 8, 8, generator=g) * 0.5 + 0.5
    anchors = -(torch.rand(6, 1, 8, 8, generator=g) * 0.5 + 0.5)
    cfg = UnlearnConfig.from_dict({"guidance_weighting": "odds", "guidance_scale": 1.0})
    ctx = SimpleNamespace(config=cfg, original=tiny_unet.eval(), forget_images=forget, anchors=anchors,
                          scheduler=tiny_scheduler)
    low = torch.tensor([10, 10])
    x_t = tiny_scheduler.add_noise(torch.cat([forget[:1], anchors[:1]]), torch.randn(2, 1, 8, 8, generator=g), low)
    with torch.no_grad():
        eps0 = tiny_unet(x_t, low).sample
    eps_f = empirical_forget_eps(x_t, low, forget, tiny_scheduler)
    target = guided_target(ctx, x_t, low)
    # surely forget-like: the shift is capped at ODDS_CAP × (ε_F − ε0); surely not: no shift
    torch.testing.assert_close(target[0], eps0[0] - ODDS_CAP * (eps_f[0] - eps0[0]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(target[1], eps0[1], rtol=1e-4, atol=1e-4)


def test_feature_posterior_tells_forget_like_inputs_from_the_rest(tiny_unet, tiny_scheduler):
    from types import SimpleNamespace

    from vdu_core.methods import feature_posterior, flat_features, guided_target, mid_block_output

    g = torch.Generator().manual_seed(0)
    forget = torch.rand(12, 1, 8, 8, generator=g) * 0.5 + 0.5  # bright images
    anchors = -(torch.rand(24, 1, 8, 8, generator=g) * 0.5 + 0.5)  # dark images
    cfg = UnlearnConfig.from_dict({"posterior_space": "features", "forget_prior": 0.2})
    ctx = SimpleNamespace(config=cfg, original=tiny_unet.eval(), forget_images=forget, anchors=anchors,
                          scheduler=tiny_scheduler)
    low = torch.tensor([5, 5])
    x_t = tiny_scheduler.add_noise(torch.cat([forget[:1], anchors[:1]]), torch.randn(2, 1, 8, 8, generator=g), low)
    with torch.no_grad(), mid_block_output(ctx.original) as mid:
        eps0 = ctx.original(x_t, low).sample
    r = feature_posterior(ctx, flat_features(mid["out"]), low)
    assert r[0] > 0.9 and r[1] < 0.05
    with torch.no_grad():
        target = guided_target(ctx, x_t, low)
    torch.testing.assert_close(target[1], eps0[1], rtol=0.05, atol=0.05)  # anchor-like: (almost) unchanged
    assert not torch.allclose(target[0], eps0[0], atol=1e-3)


def test_guard_rolls_back_and_stops_when_retained_samples_drift(tiny_unet, tiny_scheduler):
    from tests.conftest import make_tiny_unet

    cfg = UnlearnConfig.from_dict({"method": "gradient_ascent", "steps": 30, "batch_size": 4, "lr": 5e-2,
                                   "guard_every": 5, "guard_samples": 8, "guard_sample_steps": 2,
                                   "guard_max_drift": 1e-6})
    report = loop.unlearn(tiny_unet, tiny_scheduler, _forget(), cfg, None)
    assert report.stopped_by == "guard" and report.steps_run == 5
    assert report.guard["checks"][0]["ok"] is False
    # rolled back to the last state within the limit: the original weights
    for p, r in zip(tiny_unet.parameters(), make_tiny_unet().parameters(), strict=True):
        torch.testing.assert_close(p, r)


def test_guard_lets_a_gentle_run_finish(tiny_unet, tiny_scheduler):
    cfg = UnlearnConfig.from_dict({"method": "gradient_ascent", "steps": 4, "batch_size": 2, "lr": 1e-7,
                                   "guard_every": 2, "guard_samples": 4, "guard_sample_steps": 2,
                                   "guard_max_drift": 10.0})
    report = loop.unlearn(tiny_unet, tiny_scheduler, _forget(), cfg, None)
    assert report.stopped_by == "max_steps" and len(report.guard["checks"]) == 2


def test_feature_posterior_on_a_model_without_mid_block_is_refused_before_any_work(tiny_scheduler):
    from diffusers import UNet2DModel

    from vdu_core.errors import ConfigError
    from vdu_core.run import unlearn_model

    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, mid_block_type=None)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    phases = []
    cfg = UnlearnConfig.from_dict({"posterior_space": "features", "steps": 2, "anchor_samples": 8,
                                   "plasticity_target": "negative_guidance"})
    with pytest.raises(ConfigError) as err:
        unlearn_model(unet, tiny_scheduler, torch.rand(4, 1, 8, 8) * 2 - 1, cfg,
                      on_progress=lambda p: phases.append(p.phase))
    assert err.value.field == "params.posterior_space" and "mid-block" in err.value.message
    assert phases == []  # nothing ran: no posterior, no anchors, no step
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())
    # the same model is fine with the default pixel posterior
    unlearn_model(unet, tiny_scheduler, torch.rand(4, 1, 8, 8) * 2 - 1,
                  UnlearnConfig.from_dict({"steps": 1, "anchor_samples": 8, "posterior": "isotropic"}))


def test_cosine_schedule_warms_up_then_decays_to_rest(tiny_unet, tiny_scheduler):
    cfg = UnlearnConfig.from_dict({"steps": 40, "lr": 1.0, "lr_schedule": "cosine"})
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p], lr=cfg.lr)
    sched = loop.lr_schedule(opt, cfg)
    lrs = []
    for _ in range(cfg.steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)  # 5 % of 40 steps: 2 warm-up steps
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:], strict=False)) and lrs[-1] < 0.01
    assert loop.lr_schedule(opt, UnlearnConfig.from_dict({"lr_schedule": "constant"})) is None  # no scheduler
    # in the loop: the last step barely moves the weights, the steps after the warm-up do
    cfg = UnlearnConfig.from_dict({"method": "gradient_ascent", "steps": 20, "batch_size": 4, "lr": 1e-2,
                                   "lr_schedule": "cosine"})
    snaps = [torch.cat([q.detach().flatten().clone() for q in tiny_unet.parameters()])]
    loop.unlearn(tiny_unet, tiny_scheduler, _forget(), cfg, None, on_progress=lambda e: snaps.append(
        torch.cat([q.detach().flatten().clone() for q in tiny_unet.parameters()])))
    moves = [float((b - a).norm()) for a, b in zip(snaps, snaps[1:], strict=False)]
    assert len(moves) == 20 and moves[-1] < 0.1 * moves[2]


def test_bad_lr_schedule_is_refused_by_name():
    from vdu_core.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        UnlearnConfig.from_dict({"lr_schedule": "linear"})
    assert e.value.field == "params.lr_schedule"
