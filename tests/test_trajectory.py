"""The trajectory target (vdu_core.trajectory): the model's own DDIM paths, labelled by where they end."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.conftest import make_tiny_unet
from vdu_core import loop, trajectory
from vdu_core.config import UnlearnConfig
from vdu_core.errors import ConfigError, ForgetSetError
from vdu_core.laplace import sampler_step_weights
from vdu_core.sampling import initial_noise, sample_images


def test_recorded_paths_are_the_samplers_own(tiny_scheduler):
    """The states, the ε and the ends are exactly what ``sample_images`` computes, batch by batch."""
    unet = make_tiny_unet().eval()
    x, eps, t, ends = trajectory.record(unet, tiny_scheduler, 10, seed=3, steps=5, batch_size=4)
    assert x.shape == (5, 10, 1, 8, 8) and eps.shape == x.shape and t.tolist() == sorted(t.tolist(), reverse=True)
    assert torch.allclose(ends, sample_images(unet, tiny_scheduler, 10, seed=3, steps=5), atol=1e-5)
    assert torch.equal(x[0], initial_noise(10, (1, 8, 8), seed=3))
    with torch.no_grad():
        assert torch.allclose(eps[2], unet(x[2], t[2]).sample, atol=1e-6)
    x7 = trajectory.record(unet, tiny_scheduler, 10, seed=3, steps=5, batch_size=7)[0]
    assert torch.allclose(x7, x, atol=1e-5)  # a path depends on its seed, not on the batch it was drawn in


def test_the_step_is_the_two_passes_it_replaces(tiny_scheduler):
    """The library's step (one pass through the push and anchor batches) gives the loss and gradients of the
    push and anchor terms computed apart from the same draws: per-sample normalisation makes one pass two, and
    the slicing back into the two batches is right."""
    from vdu_core.loop import Context
    from vdu_core.methods import ForgetBatch, get_method
    from vdu_core.objective import per_sample_mse, timestep_weights

    unet = make_tiny_unet().train()
    tr = _paths(unet, tiny_scheduler, [i % 3 == 0 for i in range(24)])
    cfg = _cfg(batch_size=6, laplace_weight=0.0)
    method = get_method("vdu")(cfg)
    x0 = torch.randn(6, 1, 8, 8)
    t = torch.full((6,), 500)
    batch = ForgetBatch(x0, torch.randn_like(x0), t, x0, timestep_weights(tiny_scheduler, t, "uniform"))

    def ctx():
        c = Context(unet, tiny_scheduler, cfg, torch.device("cpu"), torch.Generator().manual_seed(5), tr.ends)
        c.trajectories = tr
        return c

    unet.zero_grad()
    one = method.compute(ctx(), batch).loss
    one.backward()
    g_one = [p.grad.clone() for p in unet.parameters()]
    unet.zero_grad()
    c = ctx()
    x_t, tt, target = method.push_states(c, batch)
    xa, ta, eps_a, w_a = method.anchor_states(c)
    two = (per_sample_mse(unet(x_t, tt).sample, target).mean()
           + cfg.anchor_weight * (w_a * per_sample_mse(unet(xa, ta).sample, eps_a)).mean())
    two.backward()
    assert torch.allclose(one, two, rtol=1e-5)
    assert all(torch.allclose(g1, p.grad, atol=1e-5, rtol=1e-4) for g1, p in zip(g_one, unet.parameters(), strict=True))


def _paths(unet, scheduler, forget_like):
    x, eps, t, ends = trajectory.record(unet, scheduler, len(forget_like), seed=0, steps=10)
    return trajectory.Trajectories(x, eps, t, ends, torch.tensor(forget_like), sampler_step_weights(scheduler, t, 10))


def _cfg(**kw):
    return UnlearnConfig.from_dict({"steps": 30, "batch_size": 8, "lr": 3e-3, "laplace_points": 32,
                                    "push_band": [0.2, 0.8], "probe_every": 10, **kw})


def _band_error(unet, tr, scheduler, cfg, idx):
    """On the band's states of paths ``idx``: the mean squared distance of ε_θ from the push target, from
    the original's ε, and the cosine between ε_θ's change and the target's direction."""
    T = scheduler.config.num_train_timesteps
    k = tr.band(*(int(round(f * T)) for f in cfg.push_band))
    xb, tb = tr.x[k][:, idx].flatten(0, 1), tr.t[k].repeat_interleave(len(idx))
    e0 = tr.eps[k][:, idx].flatten(0, 1)
    target = trajectory.push_target(xb, tb, e0, tr.ends[tr.retained_idx], scheduler, cfg.guidance_scale)
    with torch.no_grad():
        out = unet(xb, tb).sample
    cos = torch.nn.functional.cosine_similarity((out - e0).flatten(), (target - e0).flatten(), dim=0)
    return float((out - target).pow(2).mean()), float((out - e0).pow(2).mean()), float(cos)


def test_forget_paths_move_toward_the_target_and_the_others_stay(reference_tiny):
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(reference_tiny, use_safetensors=True)
    unet, scheduler = pipe.unet, pipe.scheduler
    tr = _paths(unet, scheduler, [i % 4 == 0 for i in range(24)])
    cfg = _cfg()
    f_idx, r_idx = tr.forget_idx, tr.retained_idx
    push0, _, _ = _band_error(unet, tr, scheduler, cfg, f_idx)
    original = copy.deepcopy(unet)
    report = loop.unlearn(unet, scheduler, torch.rand(6, 1, 28, 28) * 2 - 1, cfg, trajectories=tr)
    assert report.steps_run == cfg.steps and {"push", "function_space", "laplace"} <= set(report.history[-1])
    push1, moved_f, towards = _band_error(unet, tr, scheduler, cfg, f_idx)
    _, moved_r, _ = _band_error(unet, tr, scheduler, cfg, r_idx)
    # the forget paths' outputs went toward the retained outputs' denoiser
    assert push1 < push0 and towards > 0.3, (push0, push1, towards)
    assert moved_r < 0.5 * moved_f  # the anchored paths' outputs moved far less
    # the Laplace term does not see the normalisation affines: they are not trained
    for (name, p), p0 in zip(unet.named_parameters(), original.parameters(), strict=True):
        if "norm" in name:
            assert torch.equal(p, p0), name


def test_without_forget_like_paths_the_forget_images_are_pushed(tiny_scheduler):
    unet = make_tiny_unet()
    tr = _paths(unet, tiny_scheduler, [False] * 12)
    forget = torch.rand(6, 1, 8, 8) * 2 - 1
    before = copy.deepcopy(unet)
    report = loop.unlearn(unet, tiny_scheduler, forget, _cfg(steps=10, anchor_weight=0.0, laplace_weight=0.0),
                          trajectories=tr)
    assert report.history[-1]["push"] > 0
    assert any(not torch.equal(p, q) for p, q in zip(unet.parameters(), before.parameters(), strict=True))


def test_the_loop_records_the_paths_itself_and_labels_them(tiny_scheduler):
    unet = make_tiny_unet()
    forget = sample_images(unet, tiny_scheduler, 4, seed=99, steps=10)
    report = loop.unlearn(unet, tiny_scheduler, forget, _cfg(steps=2, anchor_samples=16, trajectory_steps=10))
    assert report.steps_run == 2 and "push" in report.history[-1]


def test_a_forget_set_that_is_everything_the_model_makes_is_refused(tiny_scheduler):
    unet = make_tiny_unet()
    own = sample_images(unet, tiny_scheduler, 12, seed=0, steps=5)
    with pytest.raises(ForgetSetError) as e:  # every own sample is in the forget set, many times
        trajectory.build(unet, tiny_scheduler, own.repeat(20, 1, 1, 1), 12, seed=0, steps=5)
    assert e.value.rule == "forget_set_covers_model"


def test_defaults_follow_the_target():
    d = UnlearnConfig.from_dict({})
    assert (d.plasticity_target, d.gamma, d.laplace_weight, d.anchor_weight, d.batch_size, d.steps, d.lr,
            d.lr_schedule, d.guidance_scale, d.anchor_margin, d.anchor_samples) == (
        "trajectory", 0.0, 1e4, 10.0, 64, 150, 2e-4, "cosine", 2.5, 1, 2048)
    ng = UnlearnConfig.from_dict({"plasticity_target": "negative_guidance"})
    assert (ng.gamma, ng.laplace_weight, ng.anchor_weight, ng.batch_size, ng.guidance_scale, ng.grad_clip, ng.lr,
            ng.lr_schedule) == (0.5, 0.0, 1.0, 16, 5.0, 1.0, 1e-4, "constant")
    assert UnlearnConfig.from_dict({"plasticity_target": "negative_guidance", "gamma": 0.2}).gamma == 0.2
    paper = UnlearnConfig.from_dict({"method": "vdu_paper"})
    assert (paper.plasticity_target, paper.gamma, paper.laplace_weight, paper.anchor_weight, paper.steps, paper.lr,
            paper.lr_schedule) == ("ascent", 0.5, 0, 0, 400, 1e-4, "constant")


@pytest.mark.parametrize("params, field", [
    ({"push_band": [0.7, 0.3]}, "params.push_band"),
    ({"push_band": [0.3]}, "params.push_band"),
    ({"push_band": [0.3, 1.5]}, "params.push_band[1]"),
    ({"push_band": "0.3-0.7"}, "params.push_band"),
    ({"self_forget_fraction": 0.1}, "params.self_forget_fraction"),
    ({"anchor_exclude_fraction": 0.1}, "params.anchor_exclude_fraction"),
    ({"anchor_samples": 1}, "params.anchor_samples"),
    ({"trajectory_steps": 1}, "params.trajectory_steps"),
    ({"anchor_margin": -1}, "params.anchor_margin"),
    ({"anchor_margin": 0.5}, "params.anchor_margin"),
    ({"anchor_margin": 11}, "params.anchor_margin"),
    ({"vote_spread": -1}, "params.vote_spread"),
    ({"vote_spread": 11}, "params.vote_spread"),
])
def test_bad_trajectory_parameters_are_refused_by_name(params, field):
    with pytest.raises(ConfigError) as e:
        UnlearnConfig.from_dict(params)
    assert e.value.field == field


def test_the_vote_does_not_call_a_small_sample_forget_like_by_chance(tiny_unet, tiny_scheduler):
    """Own samples and forget images from one distribution, with the forget images a third of the candidates:
    the bar rises with their share, so (almost) nothing is called forget-like."""
    from vdu_core.methods import forget_like_vote

    g = torch.Generator().manual_seed(4)
    own, forget = torch.rand((8, 1, 8, 8), generator=g) * 2 - 1, torch.rand((4, 1, 8, 8), generator=g) * 2 - 1
    assert int(forget_like_vote(tiny_unet, tiny_scheduler, own, forget).sum()) <= 1


def test_recording_the_paths_is_reported_and_cancellable(tiny_scheduler):
    from vdu_core.errors import Cancelled
    from vdu_core.run import unlearn_model

    unet = make_tiny_unet()
    forget = torch.rand(6, 1, 8, 8) * 2 - 1
    events = []
    cfg = _cfg(steps=1, anchor_samples=130, trajectory_steps=4)
    unlearn_model(unet, tiny_scheduler, forget, cfg, on_progress=events.append)
    paths = [(e.step, e.total) for e in events if e.phase == "anchors"]
    assert (64, 130) in paths and (130, 130) in paths
    with pytest.raises(Cancelled, match="recording the model's own paths"):
        unlearn_model(unet, tiny_scheduler, forget, cfg, should_cancel=lambda: True)


def test_the_vote_labels_new_samples_against_the_same_pool(tiny_scheduler):
    from vdu_core.methods import ForgetVote

    unet = make_tiny_unet().eval()
    own = sample_images(unet, tiny_scheduler, 60, seed=0, steps=10)
    forget = own[:3].repeat(5, 1, 1, 1)  # the first three ends, five times each
    vote = ForgetVote(unet, tiny_scheduler, own, forget)
    labels = vote.labels
    assert labels[:3].all() and labels.sum() < len(labels) / 2
    # an own sample standing in for itself keeps its label; a forget image standing in for a retained one is
    # forget-like; a retained end standing in for a forget-like one is not
    assert torch.equal(vote.label(unet, tiny_scheduler, own, torch.arange(len(own))), labels)
    r, f = (~labels).nonzero().flatten()[:3], labels.nonzero().flatten()[:3]
    assert vote.label(unet, tiny_scheduler, forget[:3], r).all()
    assert not vote.label(unet, tiny_scheduler, own[r], f).any()


def test_anchor_margin_leaves_the_votes_margin_out_of_the_anchors(tiny_scheduler):
    """Own samples next to forget-like ones are neither pushed nor anchored; a margin that would leave
    nothing to anchor is not applied."""
    from vdu_core.methods import ForgetVote

    unet = make_tiny_unet().eval()
    own = sample_images(unet, tiny_scheduler, 60, seed=0, steps=10)
    forget = own[:3].repeat(5, 1, 1, 1)
    vote = ForgetVote(unet, tiny_scheduler, own, forget)
    near1, near5 = vote.near(1), vote.near(5)
    assert not (near1 & vote.labels).any() and bool(near1.any())
    assert bool((near5 <= near1).all()) and int(near5.sum()) < int(near1.sum())
    # a margin of 1: every own sample with a forget image among its neighbours is pushed or left out
    assert bool((near1 | vote.labels)[vote.counts >= 1].all())

    tr = trajectory.build(unet, tiny_scheduler, forget, 60, seed=0, steps=10, margin=1)
    assert torch.equal(tr.near, near1) and torch.equal(tr.forget_like, vote.labels)
    assert torch.equal(tr.retained_idx, (~vote.labels & ~near1).nonzero().flatten())
    assert tr.summary()["margin"] == int(near1.sum())
    # the forget set is most of what the model makes: a margin would leave nothing to anchor, so none applies
    crowded = trajectory.build(unet, tiny_scheduler, own[:50], 60, seed=0, steps=10, margin=1)
    assert crowded.near is None and len(crowded.retained_idx) == int((~crowded.forget_like).sum()) > 0
    with pytest.raises(ForgetSetError) as e:
        trajectory.build(unet, tiny_scheduler, forget[:0], 60, seed=0, steps=10, margin=1)
    assert e.value.rule == "empty"


def test_vote_spread_pushes_the_neighbours_of_forget_like_paths(tiny_scheduler):
    """``vote_spread`` m: a path with at least m of its 10 nearest forget images or forget-like paths is pushed
    too, repeated (up to 3 times by default, here to a fixed point); the margin is then measured against the
    spread labels."""
    from vdu_core.methods import ForgetVote

    unet = make_tiny_unet().eval()
    own = sample_images(unet, tiny_scheduler, 60, seed=0, steps=10)
    forget = own[:3].repeat(5, 1, 1, 1)
    vote = ForgetVote(unet, tiny_scheduler, own, forget)
    marked = lambda lab: torch.cat([torch.ones(len(vote.ff), dtype=torch.bool), lab])[vote.pool_neighbours].sum(1)  # noqa: E731
    for m in (3, 5, 8):
        spread = vote.spread(m, rounds=100)
        assert bool((spread >= vote.labels).all())  # never un-marks a voted path
        assert torch.equal(spread, vote.labels | (marked(spread) >= m))  # a fixed point of the rule
        assert torch.equal(vote.spread(m, rounds=1), vote.labels | (marked(vote.labels) >= m))
    wide, narrow = vote.spread(5), vote.spread(6)
    assert int(wide.sum()) > int(narrow.sum()) > int(vote.labels.sum()) and bool((narrow <= wide).all())

    tr = trajectory.build(unet, tiny_scheduler, forget, 60, seed=0, steps=10, margin=1, spread=5)
    assert torch.equal(tr.forget_like, wide)
    assert torch.equal(tr.near, vote.near(1, wide)) and not (tr.near & wide).any()
    assert torch.equal(trajectory.build(unet, tiny_scheduler, forget, 60, seed=0, steps=10).forget_like, vote.labels)
    # a spread that would call every path forget-like is not applied
    assert bool(vote.spread(1).all())
    assert torch.equal(trajectory.build(unet, tiny_scheduler, forget, 60, seed=0, steps=10, spread=1).forget_like,
                       vote.labels)


def test_paths_that_would_not_fit_the_memory_limit_are_refused_before_any_work(tiny_scheduler):
    from vdu_core.run import unlearn_model

    unet = make_tiny_unet()
    forget = torch.zeros(2, 1, 8, 8)
    cfg = _cfg(steps=1, anchor_samples=64, trajectory_steps=10)
    need = trajectory.recorded_bytes(unet, 64, 10)
    assert need == 2 * 10 * 64 * 1 * 8 * 8 * 4
    before = copy.deepcopy(unet.state_dict())
    with pytest.raises(ConfigError) as e:
        unlearn_model(unet, tiny_scheduler, forget, cfg, max_trajectory_bytes=need - 1)
    assert e.value.field == "params.anchor_samples" and "at most 63 paths fit" in e.value.message
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in before.items())
    report, _, _ = unlearn_model(unet, tiny_scheduler, forget, cfg, max_trajectory_bytes=need)  # at the limit: runs
    assert report.steps_run == 1
    # the loop recording its own paths (no run around it) checks the same limit before recording
    with pytest.raises(ConfigError) as e:
        loop.unlearn(unet, tiny_scheduler, forget, cfg, max_trajectory_bytes=need - 1)
    assert e.value.field == "params.anchor_samples"
    assert loop.unlearn(unet, tiny_scheduler, forget, cfg, max_trajectory_bytes=need).steps_run == 1
