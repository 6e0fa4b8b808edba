"""Posterior estimators: lineage mean/variance, data-free Fisher and self-snapshots, isotropic, cache."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_tiny_unet
from vdu_core import posterior
from vdu_core.config import UnlearnConfig
from vdu_core.errors import ConfigError


def _cfg(**kw):
    return UnlearnConfig.from_dict({"posterior_samples": 8, "posterior_steps": 4, "batch_size": 4, **kw})


def test_lineage_mean_and_variance_by_hand(tiny_unet, tiny_scheduler):
    others = [make_tiny_unet(seed=s).state_dict() for s in (1, 2)]
    post = posterior.estimate(tiny_unet, tiny_scheduler, _cfg(posterior="lineage", posterior_sigma=1e-6),
                              lineage_states=others)
    name = post.names[0]
    stack = torch.stack([dict(tiny_unet.named_parameters())[name].detach(), others[0][name], others[1][name]])
    torch.testing.assert_close(post.mu[0], stack.mean(0))
    torch.testing.assert_close(post.var[0], stack.var(0, unbiased=True).clamp_min(1e-12))
    assert post.kind == "lineage" and post.info["checkpoints"] == 3


def test_lineage_variance_is_floored(tiny_unet, tiny_scheduler):
    same = [tiny_unet.state_dict()]
    post = posterior.estimate(tiny_unet, tiny_scheduler, _cfg(posterior="lineage", posterior_sigma=0.05),
                              lineage_states=same)
    assert all(torch.allclose(v, torch.full_like(v, 0.05**2)) for v in post.var)


def test_lineage_without_checkpoints_is_refused(tiny_unet, tiny_scheduler):
    with pytest.raises(ConfigError) as exc:
        posterior.estimate(tiny_unet, tiny_scheduler, _cfg(posterior="lineage"))
    assert exc.value.field == "params.posterior"


def test_auto_picks_lineage_or_fisher():
    assert posterior.resolve_kind(_cfg(), 2) == "lineage"
    assert posterior.resolve_kind(_cfg(), 0) == "fisher"


def test_isotropic(tiny_unet, tiny_scheduler):
    post = posterior.estimate(tiny_unet, tiny_scheduler, _cfg(posterior="isotropic", posterior_sigma=0.1))
    assert all(torch.allclose(v, torch.full_like(v, 0.01)) for v in post.var)
    torch.testing.assert_close(post.mu[0], next(tiny_unet.parameters()).detach())


def test_fisher_precision_is_bounded_by_the_prior(tiny_unet, tiny_scheduler):
    cfg = _cfg(posterior="fisher", posterior_sigma=0.1)
    post = posterior.estimate(tiny_unet, tiny_scheduler, cfg)
    allv = torch.cat([v.flatten() for v in post.var])
    assert float(allv.max()) <= 0.01 + 1e-9  # variance never exceeds σ_prior²
    assert float(allv.min()) < 0.01  # the Fisher made some directions stiffer
    torch.testing.assert_close(post.mu[0], next(tiny_unet.parameters()).detach())


def test_self_snapshots_gives_a_spread(tiny_unet, tiny_scheduler):
    post = posterior.estimate(tiny_unet, tiny_scheduler, _cfg(posterior="self_snapshots", posterior_sigma=1e-6))
    assert post.info["snapshots"] == 4
    assert float(torch.cat([v.flatten() for v in post.var]).max()) > 1e-12


def test_cache_round_trip(tiny_unet, tiny_scheduler, tmp_path):
    cfg = _cfg(posterior="fisher")
    first = posterior.estimate(tiny_unet, tiny_scheduler, cfg, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("posterior-*.safetensors"))) == 1
    second = posterior.estimate(tiny_unet, tiny_scheduler, cfg, cache_dir=tmp_path)
    assert second.info.get("cached") is True
    for a, b in zip(first.var, second.var, strict=True):
        torch.testing.assert_close(a, b)
    # other weights -> another cache entry
    posterior.estimate(make_tiny_unet(seed=5), tiny_scheduler, cfg, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("posterior-*.safetensors"))) == 2
