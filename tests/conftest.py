"""Shared fixtures: dummy diffusers components under a fixed seed, as diffusers' own tests build them."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from vdu_core.reference import REFERENCE_DIR  # noqa: E402


def make_tiny_unet(seed: int = 0, sample_size: int = 8, channels: int = 1, attention: bool = False):
    """A two-block UNet2DModel under a fixed seed (``attention``: the lower block attends)."""
    import torch
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=sample_size, in_channels=channels, out_channels=channels, layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D" if attention else "DownBlock2D"),
        up_block_types=("AttnUpBlock2D" if attention else "UpBlock2D", "UpBlock2D"), norm_num_groups=4,
    )


@pytest.fixture
def tiny_unet():
    return make_tiny_unet()


@pytest.fixture
def tiny_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=100)


@pytest.fixture(scope="session")
def reference_tiny():
    """The small pretrained reference DDPM (reference/mnist-ddpm-tiny), trained by scripts/train_reference.py."""
    path = REFERENCE_DIR / "mnist-ddpm-tiny"
    if not (path / "model_index.json").exists():
        pytest.fail(f"{path} is missing: run `python scripts/train_reference.py`")
    return path
