"""Paired, deterministic sampling and PNG grids, on a dummy UNet built under a fixed seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from PIL import Image

from tests.conftest import make_tiny_unet
from vdu_core.sampling import initial_noise, sample_from, sample_images, sample_seed, save_grid, side_by_side


def dummy_unet(sample_size: int = 8, seed: int = 0) -> UNet2DModel:
    return make_tiny_unet(seed=seed, sample_size=sample_size, attention=True)


@pytest.fixture(scope="module")
def unet():
    return dummy_unet()


@pytest.fixture(scope="module")
def scheduler():
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")


def test_sample_seed_mixes_seed_and_index():
    seeds = {sample_seed(s, i) for s in range(4) for i in range(4)}
    assert len(seeds) == 16
    assert sample_seed(0, 1) != sample_seed(1, 0)
    assert sample_seed(7, 3) == sample_seed(7, 3)
    with pytest.raises(ValueError):
        sample_seed(-1, 0)


def test_initial_noise_depends_only_on_seed_and_index():
    full = initial_noise(5, (1, 4, 4), seed=3)
    assert full.shape == (5, 1, 4, 4)
    tail = initial_noise(3, (1, 4, 4), seed=3, start=2)
    torch.testing.assert_close(full[2:], tail, rtol=0, atol=0)
    assert not torch.equal(initial_noise(5, (1, 4, 4), seed=4), full)


def test_sampling_is_deterministic_and_independent_of_batch_size(unet, scheduler):
    a = sample_images(unet, scheduler, 5, seed=11, steps=3, batch_size=5)
    b = sample_images(unet, scheduler, 5, seed=11, steps=3, batch_size=2)
    c = sample_images(unet, scheduler, 5, seed=11, steps=3, batch_size=5)
    assert a.shape == (5, 1, 8, 8) and a.dtype == torch.float32
    assert float(a.min()) >= -1.0 and float(a.max()) <= 1.0
    torch.testing.assert_close(a, c, rtol=0, atol=0)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # The first samples of a longer run are the same samples: n does not change sample i.
    torch.testing.assert_close(sample_images(unet, scheduler, 3, seed=11, steps=3), a[:3], rtol=0, atol=1e-5)
    assert not torch.allclose(sample_images(unet, scheduler, 5, seed=12, steps=3), a)


def test_sample_from_given_noise_redraws_chosen_samples(unet, scheduler):
    """Re-running some samples from their starting noise (e.g. recorded paths) gives the same images."""
    full = sample_images(unet, scheduler, 6, seed=5, steps=3)
    pick = torch.tensor([4, 1])
    again = sample_from(unet, scheduler, initial_noise(6, (1, 8, 8), seed=5)[pick], steps=3, batch_size=1)
    torch.testing.assert_close(again, full[pick], rtol=0, atol=1e-5)
    assert sample_from(unet, scheduler, torch.empty(0, 1, 8, 8), steps=3).shape == (0, 1, 8, 8)


def test_stochastic_ddim_noise_is_per_sample(unet, scheduler):
    a = sample_images(unet, scheduler, 4, seed=2, steps=3, batch_size=4, eta=1.0)
    b = sample_images(unet, scheduler, 4, seed=2, steps=3, batch_size=3, eta=1.0)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert not torch.allclose(a, sample_images(unet, scheduler, 4, seed=2, steps=3, eta=0.0))


def test_sampling_restores_training_mode_and_leaves_scheduler_alone(unet, scheduler):
    scheduler.set_timesteps(7)
    before = scheduler.timesteps.clone()
    unet.train()
    sample_images(unet, scheduler, 2, seed=0, steps=2)
    assert unet.training
    unet.eval()
    sample_images(unet, scheduler, 2, seed=0, steps=2)
    assert not unet.training
    torch.testing.assert_close(scheduler.timesteps, before)
    assert all(p.grad is None for p in unet.parameters())


def test_save_grid_size_and_pixels(tmp_path):
    images = torch.linspace(-1, 1, 10).view(10, 1, 1, 1).expand(10, 1, 8, 6).contiguous()
    path = save_grid(images, tmp_path / "g" / "grid.png", nrow=4, pad=2)
    with Image.open(path) as img:
        assert img.mode == "L"
        # Like torchvision's make_grid: pad between and around tiles.
        assert img.size == (4 * (6 + 2) + 2, 3 * (8 + 2) + 2)
        arr = np.asarray(img)
    assert arr[2, 2] == 0  # first tile: -1 -> black
    assert arr[2 + 2 * 10, 2 + 1 * 8] == 255  # tile 9 (row 2, col 1): +1 -> white
    assert arr[0, 0] == 255  # padding is white


def test_save_grid_rgb_and_side_by_side(tmp_path):
    torch.manual_seed(0)
    rgb = torch.rand(3, 3, 5, 5) * 2 - 1
    a = save_grid(rgb, tmp_path / "a.png", nrow=8, pad=1)
    with Image.open(a) as img:
        assert img.mode == "RGB" and img.size == (3 * 6 + 1, 6 + 1)
    gray = save_grid(torch.zeros(2, 1, 5, 5), tmp_path / "b.png", nrow=1, pad=1)
    out = side_by_side(a, gray, tmp_path / "ab.png", gap=4)
    with Image.open(out) as img:
        assert img.size == (19 + 4 + 7, 13)
    with pytest.raises(ValueError):
        save_grid(torch.zeros(2, 2, 5, 5), tmp_path / "bad.png")
