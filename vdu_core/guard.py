"""A data-free guard against damage: watch a small fixed-seed sample while unlearning.

Before the first step the guard draws ``guard_samples`` images from the original model (DDIM,
``guard_sample_steps``, fixed noise) and splits them by distance to the forget set: the nearest
``self_forget_fraction`` are the model's own renditions of the forgotten content ("forget-like"); those
beyond the ``anchor_exclude_fraction`` nearest are "retained". Every ``guard_every`` steps it redraws
the same noise with the current weights and measures how far each group moved (L2 on 4x-pooled pixels,
divided by the median distance between two different original samples, so 1.0 means "as different as
another sample"). No classifier and no training data are involved.

If the retained drift exceeds ``guard_max_drift``, the weights roll back to the last checked state
within the limit and the run stops (``stopped_by = "guard"``): damage is refused, not reported later.
"""

from __future__ import annotations

import copy

import torch

from vdu_core.anchors import _pooled, nearest_forget_distance


class Guard:
    def __init__(self, unet, scheduler, forget: torch.Tensor, config):
        from vdu_core.sampling import sample_images

        self.config = config
        self.scheduler = scheduler
        self.n = config.guard_samples
        self.steps = config.guard_sample_steps
        self.seed = config.seed + 7
        self.reference = sample_images(unet, scheduler, self.n, seed=self.seed, steps=self.steps)
        dist = nearest_forget_distance(self.reference, forget)
        order = torch.argsort(dist)  # nearest first
        n_like = max(1, int(round(self.n * config.self_forget_fraction))) if config.self_forget_fraction else 0
        n_excl = int(round(self.n * config.anchor_exclude_fraction))
        self.forget_like = order[:n_like]
        self.retained = order[max(n_excl, n_like):]
        pooled = _pooled(self.reference)
        pair = torch.cdist(pooled, pooled)
        self.scale = float(pair[~torch.eye(len(pooled), dtype=torch.bool)].median().clamp_min(1e-6))
        self.best_state = copy.deepcopy(unet.state_dict())
        self.history: list[dict] = []

    def measure(self, unet) -> dict:
        from vdu_core.sampling import sample_images

        now = sample_images(unet, self.scheduler, self.n, seed=self.seed, steps=self.steps)
        moved = (_pooled(now) - _pooled(self.reference)).norm(dim=1) / self.scale
        out = {"retained_drift": float(moved[self.retained].mean()) if len(self.retained) else 0.0,
               "forget_like_drift": float(moved[self.forget_like].mean()) if len(self.forget_like) else 0.0}
        return out

    def check(self, unet, step: int) -> tuple[bool, dict]:
        """Measure; keep a snapshot while within the limit. Returns (ok, measurement)."""
        m = self.measure(unet)
        m["step"] = step
        ok = m["retained_drift"] <= self.config.guard_max_drift
        m["ok"] = ok
        self.history.append(m)
        if ok:
            self.best_state = copy.deepcopy(unet.state_dict())
        return ok, m

    def rollback(self, unet) -> None:
        if self.best_state is not None:
            unet.load_state_dict(self.best_state)

    def summary(self) -> dict:
        return {
            "implementation": f"paired fixed-seed samples (DDIM-{self.steps}, {self.n} images) of the original "
                              "vs the current model; L2 on 4x-pooled pixels / median distance between two "
                              "original samples; retained = beyond the anchor exclusion, forget-like = nearest "
                              "the forget set",
            "max_drift": self.config.guard_max_drift,
            "checks": self.history,
        }
