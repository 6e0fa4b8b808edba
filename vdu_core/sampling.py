"""Deterministic, paired sampling from unconditional diffusers UNets, and PNG sample grids.

"Paired samples" are the heart of the before/after evidence: sample ``i`` of the original and
sample ``i`` of the unlearned model start from the same initial noise (and, with ``eta > 0``, the
same per-step noise), so any difference between them comes from the weights alone. To make that
hold whatever the batch size, every sample owns a ``torch.Generator`` seeded from ``(seed, i)``
only (see ``sample_seed``); no generator is ever shared across a batch.

Sampling uses DDIM (``DDIMScheduler.from_config(scheduler.config)``, about 50 steps) for speed;
the model's own training scheduler is left untouched. Grids are written with PIL only.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = ["sample_seed", "initial_noise", "sample_images", "save_grid", "side_by_side", "to_uint8"]


def sample_seed(seed: int, index: int) -> int:
    """The 63-bit seed of sample ``index`` under run seed ``seed`` (numpy ``SeedSequence`` mixing).

    Mixing through ``SeedSequence`` (rather than ``seed + index``) keeps the streams of runs with
    neighbouring seeds unrelated: sample 1 of seed 0 is not sample 0 of seed 1.
    """
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0; got seed={seed}, index={index}")
    words = np.random.SeedSequence([int(seed), int(index)]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def _generators(seed: int, start: int, stop: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(sample_seed(seed, i)) for i in range(start, stop)]


def _draw(generators: list[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=g) for g in generators])


def initial_noise(n: int, shape: tuple[int, ...], seed: int, *, start: int = 0) -> torch.Tensor:
    """Initial noise of samples ``start .. start+n-1``: (n, *shape), float32, on CPU.

    Row ``j`` depends only on ``(seed, start + j)``, never on how samples are batched.
    """
    return _draw(_generators(seed, start, start + n), tuple(shape))


def _sample_shape(unet) -> tuple[int, int, int]:
    size = unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return int(unet.config.in_channels), int(h), int(w)


def _device_of(module: torch.nn.Module) -> torch.device:
    try:
        return next(module.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters
        return torch.device("cpu")


@torch.no_grad()
def sample_images(
    unet,
    scheduler,
    n: int,
    *,
    seed: int,
    steps: int = 50,
    batch_size: int = 64,
    device=None,
    eta: float = 0.0,
    on_batch: Callable[[int, int], None] | None = None,
    on_step: Callable[[int, int, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Draw ``n`` samples with DDIM; returns a float32 CPU tensor (n, C, H, W) clamped to [-1, 1].

    ``scheduler`` is the model's own scheduler (any diffusers scheduler whose config DDIM accepts);
    a fresh ``DDIMScheduler`` is built from its config, so its state is never modified. Sample ``i``
    is a function of ``(weights, seed, i, steps, eta)`` only. ``on_batch(done, n)`` is called after
    each batch. ``on_step(start, k, t, x, eps)`` is called at every DDIM step ``k`` of the batch whose
    first sample is ``start``, with the state ``x`` entering the step and the model's ``eps`` there
    (``vdu_core.trajectory`` records trajectories this way). The model is put in eval mode and its
    training mode restored afterwards.
    """
    if n < 0 or batch_size < 1 or steps < 1:
        raise ValueError(f"need n >= 0, batch_size >= 1 and steps >= 1; got {n}, {batch_size}, {steps}")
    shape = _sample_shape(unet)
    if n == 0:
        return torch.empty((0, *shape))
    device = torch.device(device) if device is not None else _device_of(unet)
    dtype = next(unet.parameters()).dtype
    out = []
    with _eval_ddim(unet, scheduler, steps) as ddim:
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            gens = _generators(seed, start, stop)
            x = _draw(gens, shape).to(device=device, dtype=dtype)
            step_hook = None if on_step is None else (lambda k, t, x_, e, s=start: on_step(s, k, t, x_, e))
            x = _denoise(unet, ddim, x, eta, gens, step_hook)
            out.append(x.float().clamp(-1.0, 1.0).cpu())
            if on_batch is not None:
                on_batch(stop, n)
    return torch.cat(out)


@contextlib.contextmanager
def _eval_ddim(unet, scheduler, steps: int):
    """A fresh DDIM schedule of ``steps`` built from ``scheduler``'s config (never modified), with ``unet`` in
    eval mode for the duration and its training mode restored afterwards."""
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(steps)
    was_training = unet.training
    unet.eval()
    try:
        yield ddim
    finally:
        unet.train(was_training)


def _denoise(unet, ddim, x: torch.Tensor, eta: float = 0.0, gens=None, on_step=None) -> torch.Tensor:
    """Run the prepared DDIM schedule from ``x``; ``on_step(k, t, x, eps)`` at each step."""
    device = x.device
    for k, t in enumerate(ddim.timesteps):
        eps = unet(ddim.scale_model_input(x, t), t.to(device)).sample
        if on_step is not None:
            on_step(k, t, x, eps)
        variance_noise = None
        if eta > 0:
            # Per-sample step noise from the sample's own generator: batch-independent too.
            variance_noise = _draw(gens, x.shape[1:]).to(device=device, dtype=x.dtype)
        x = ddim.step(eps, t, x, eta=eta, variance_noise=variance_noise).prev_sample
    return x


@torch.no_grad()
def sample_from(unet, scheduler, x_T: torch.Tensor, *, steps: int = 50, batch_size: int = 64) -> torch.Tensor:
    """Deterministic DDIM (η = 0) from given starting noise ``x_T`` (e.g. recorded paths' first states):
    the same images ``sample_images`` draws from that noise. Float32 CPU, clamped to [-1, 1]."""
    device, dtype = _device_of(unet), next(unet.parameters()).dtype
    with _eval_ddim(unet, scheduler, steps) as ddim:
        out = [_denoise(unet, ddim, x_T[i : i + batch_size].to(device=device, dtype=dtype)).float().clamp(-1, 1).cpu()
               for i in range(0, len(x_T), batch_size)]
    return torch.cat(out) if out else torch.empty_like(x_T).float()


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> uint8 (N, H, W, C) in [0, 255] (values outside are clipped)."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def save_grid(
    images: torch.Tensor, path: str | Path, nrow: int = 8, pad: int = 2, pad_value: int = 255
) -> Path:
    """Write images (N, C, H, W) in [-1, 1] as one PNG grid; ``nrow`` images per row.

    The layout follows torchvision's ``make_grid``: ``pad`` pixels between and around the tiles,
    so the PNG is ``cols*(W+pad)+pad`` wide and ``rows*(H+pad)+pad`` high. The padding is white
    by default, which separates dark-background digits. 1-channel images become a grayscale PNG,
    3-channel RGB; other channel counts are refused.
    """
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"expected a non-empty (N, C, H, W) batch; got shape {tuple(images.shape)}")
    n, c, h, w = images.shape
    if c not in (1, 3):
        raise ValueError(f"grids support 1 or 3 channels; got {c}")
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), pad_value, dtype=np.uint8)
    tiles = to_uint8(images)
    for i in range(n):
        r, col = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        canvas[y : y + h, x : x + w] = tiles[i]
    img = Image.fromarray(canvas[:, :, 0] if c == 1 else canvas)  # uint8 2-D -> "L", (H, W, 3) -> "RGB"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")
    return path


def side_by_side(before_png: str | Path, after_png: str | Path, out_png: str | Path, gap: int = 12) -> Path:
    """Put two grids next to each other (before left, after right) with a white gap; PNG out."""
    with Image.open(before_png) as a_img, Image.open(after_png) as b_img:
        a, b = a_img.convert("RGB"), b_img.convert("RGB")
    canvas = Image.new("RGB", (a.width + gap + b.width, max(a.height, b.height)), (255, 255, 255))
    canvas.paste(a, (0, 0))
    canvas.paste(b, (a.width + gap, 0))
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out_png, format="PNG")
    return out_png
