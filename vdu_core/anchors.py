"""Anchor samples for the function-space stability term: the original model's own samples.

Data-free: the anchors are drawn from the pretrained model itself (no training data). Samples that
resemble the forget set would pull the forgotten content back, so the ``exclude_fraction`` of
them nearest to the forget set (L2 distance to the nearest forget image, on 4×-average-pooled
pixels so small shifts count little) are left out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vdu_core.errors import Cancelled


def cancel_check(should_cancel, what: str):
    """An ``on_batch`` callback for ``sample_images`` that raises ``Cancelled`` between batches."""
    if should_cancel is None:
        return None

    def check(done: int, total: int) -> None:
        if should_cancel():
            raise Cancelled(f"cancelled while {what} ({done}/{total})")

    return check


def _pooled(x: torch.Tensor) -> torch.Tensor:
    k = 4 if min(x.shape[-2:]) >= 16 else 1
    return F.avg_pool2d(x.float(), k).flatten(1) if k > 1 else x.float().flatten(1)


def nearest_forget_distance(samples: torch.Tensor, forget: torch.Tensor) -> torch.Tensor:
    a, b = _pooled(samples), _pooled(forget.to(samples.device))
    return torch.cdist(a, b).min(1).values


def build_anchors(unet, scheduler, forget: torch.Tensor, n: int, exclude_fraction: float, seed: int,
                  steps: int = 25, batch_size: int = 64, self_forget_fraction: float = 0.0,
                  should_cancel=None) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """Sample ``n`` images from ``unet`` (DDIM ``steps``) and split them by distance to the forget set.

    Returns (anchors, info, self_forget): the anchors leave out the ``exclude_fraction`` nearest the
    forget set; ``self_forget`` are the ``self_forget_fraction`` nearest, the model's own renditions
    of the forgotten content, which the plasticity term may use beside the user's forget images (the
    forget set shows what to forget; these show where the model actually generates it).
    """
    from vdu_core.sampling import sample_images

    samples = sample_images(unet, scheduler, n, seed=seed, steps=steps, batch_size=batch_size,
                            on_batch=cancel_check(should_cancel, "drawing anchor samples"))
    dist = nearest_forget_distance(samples, forget)
    keep = max(1, int(round(n * (1.0 - exclude_fraction))))
    order = torch.argsort(dist, descending=True)
    n_self = int(round(n * self_forget_fraction))
    self_forget = samples[order[len(order) - n_self:]] if n_self else samples[:0]
    info = {"generated": n, "kept": keep, "excluded": n - keep, "self_forget": n_self, "sample_steps": steps,
            "exclusion": "L2 to nearest forget image on 4x-pooled pixels"}
    return samples[order[:keep].sort().values], info, self_forget
