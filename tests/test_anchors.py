"""Anchor samples for the function-space term: drawn from the model, forget-like ones left out."""

from __future__ import annotations

import torch

from vdu_core.anchors import build_anchors, nearest_forget_distance


def test_nearest_distance_by_hand():
    samples = torch.zeros(2, 1, 4, 4)
    samples[1] += 1.0
    forget = torch.zeros(1, 1, 4, 4)
    d = nearest_forget_distance(samples, forget)
    assert d[0] == 0 and torch.isclose(d[1], torch.tensor(4.0))  # sqrt(16 pixels * 1^2)


def test_build_anchors_drops_the_share_nearest_the_forget_set(tiny_unet, tiny_scheduler):
    forget = torch.rand(3, 1, 8, 8) * 2 - 1
    anchors, info, self_forget = build_anchors(tiny_unet, tiny_scheduler, forget, n=10, exclude_fraction=0.3,
                                               seed=0, steps=3, self_forget_fraction=0.2)
    assert anchors.shape == (7, 1, 8, 8) and info["excluded"] == 3
    assert self_forget.shape == (2, 1, 8, 8)
    from vdu_core.sampling import sample_images

    all_samples = sample_images(tiny_unet, tiny_scheduler, 10, seed=0, steps=3)
    d_all = nearest_forget_distance(all_samples, forget)
    d_kept = nearest_forget_distance(anchors, forget)
    assert float(d_kept.min()) >= float(torch.sort(d_all).values[2]) - 1e-6
    d_self = nearest_forget_distance(self_forget, forget)
    assert float(d_self.max()) <= float(torch.sort(d_all).values[1]) + 1e-6


def test_anchor_sampling_can_be_cancelled(tiny_unet, tiny_scheduler):
    import pytest

    from vdu_core.errors import Cancelled

    with pytest.raises(Cancelled):
        build_anchors(tiny_unet, tiny_scheduler, torch.zeros(1, 1, 8, 8), n=8, exclude_fraction=0.2, seed=0,
                      steps=2, batch_size=4, should_cancel=lambda: True)
