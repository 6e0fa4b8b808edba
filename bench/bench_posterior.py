"""How well does the guidance weighting's kernel posterior r_F tell forget-like inputs from the rest?

The default ``vdu`` pushes a noised input by η·r_F(x_t): r_F should be ≈ 1 where the model would draw
the forgotten class and ≈ 0 elsewhere, or retained samples move. This draws the model's own samples
(DDIM), labels them with the built-in classifier (the evaluation's labels, used here only to score
r_F), builds the posterior's reference sets from one half exactly as ``vdu_core.run`` does, and prints,
on the other half noised to several t, the share of retained-class samples with r_F > 0.5 and the mean
r_F of forget-class samples, for each anchor split and kernel bandwidth (``--features``: also a k-NN
posterior in the model's own mid-block features, a candidate not used in training yet).

    python bench/bench_posterior.py --model mnist-ddpm --digits 0 4 7
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from vdu_core import metrics  # noqa: E402
from vdu_core.anchors import nearest_forget_distance  # noqa: E402
from vdu_core.methods import (  # noqa: E402
    FEATURE_K,
    kernel_log_density,
    kernel_scale,
    knn_forget_ratio,
    noised_mid_features,
)
from vdu_core.reference import REFERENCE_DIR, load_mnist_5k  # noqa: E402
from vdu_core.sampling import sample_images  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="mnist-ddpm")
    ap.add_argument("--digits", type=int, nargs="+", default=[0, 4, 7])
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--forget-count", type=int, default=100)
    ap.add_argument("--prior", type=float, default=0.1)
    ap.add_argument("--timesteps", type=int, nargs="+", default=[20, 400, 800])
    ap.add_argument("--bandwidths", type=float, nargs="+", default=[0.0, 64.0])
    ap.add_argument("--splits", nargs="+", default=["0.2,0.1", "0,0"],
                    help="anchor_exclude_fraction,self_forget_fraction pairs")
    ap.add_argument("--features", action="store_true",
                    help="also score a k-NN posterior in the model's own mid-block features (a candidate)")
    args = ap.parse_args(argv)

    from diffusers import DDPMPipeline

    model_dir = Path(args.model) if Path(args.model).exists() else REFERENCE_DIR / args.model
    pipe = DDPMPipeline.from_pretrained(model_dir, use_safetensors=True)
    own = sample_images(pipe.unet, pipe.scheduler, args.samples, seed=0, steps=25)
    labels_own, _ = metrics.classify(metrics.load_classifier("builtin:mnist"), own)
    images, labels = load_mnist_5k()
    half = len(own) // 2
    build, test, test_labels = own[:half], own[half:], labels_own[half:]
    prior = math.log(args.prior) - math.log1p(-args.prior)
    head = " | ".join(f"t={t}: retained r>0.5, forget mean r" for t in args.timesteps)
    print(f"{model_dir.name}, {len(test)} held-out own samples; columns: {head}")
    for digit in args.digits:
        forget = images[labels == digit][: args.forget_count]
        is_forget = test_labels == digit
        order = torch.argsort(nearest_forget_distance(build, forget))
        for split in args.splits:
            exclude, self_share = (float(v) for v in split.split(","))
            refs_f = torch.cat([forget, build[order[: int(self_share * half)]]])
            refs_a = build[order[int(exclude * half):]]
            scale = kernel_scale(refs_f)
            for bw in args.bandwidths:
                g = torch.Generator().manual_seed(0)
                cells = []
                for t in args.timesteps:
                    tt = torch.full((len(test),), t)
                    x_t = pipe.scheduler.add_noise(test, torch.randn(test.shape, generator=g), tt)
                    r = torch.sigmoid(prior + kernel_log_density(x_t, tt, refs_f, pipe.scheduler, bw * scale)
                                      - kernel_log_density(x_t, tt, refs_a, pipe.scheduler, bw * scale))
                    cells.append(f"{(r[~is_forget] > 0.5).float().mean():.2f}, {r[is_forget].mean():.2f}")
                print(f"digit {digit} (forget-class {int(is_forget.sum())}/{len(test)}), exclude {exclude:g}, "
                      f"self-forget {self_share:g}, bandwidth {bw:g}: " + " | ".join(cells), flush=True)
    if args.features:
        forget_by_digit = {d: images[labels == d][: args.forget_count] for d in args.digits}
        feature_knn_rows(pipe, forget_by_digit, build, test, test_labels, args.timesteps, args.prior)


@torch.no_grad()
def mid_features(unet, scheduler, x: torch.Tensor, t: int, seed: int) -> torch.Tensor:
    """The UNet's mid-block features (as the 'features' posterior uses them) on ``x`` noised to ``t``."""
    return noised_mid_features(unet, scheduler, x, t, torch.Generator().manual_seed(seed))


def feature_knn_rows(pipe, forget_by_digit, build, test, test_labels, timesteps, prior: float):
    """The 'features' posterior (``knn_forget_ratio`` on mid-block features, no split)."""
    unet = pipe.unet.eval()
    for digit, forget in forget_by_digit.items():
        is_forget = test_labels == digit
        cells = []
        for t in timesteps:
            a, b, q = (mid_features(unet, pipe.scheduler, x, t, seed) for seed, x in enumerate((forget, build, test)))
            r = knn_forget_ratio(q, a, b, prior)
            cells.append(f"{(r[~is_forget] > 0.5).float().mean():.2f}, {r[is_forget].mean():.2f}")
        print(f"digit {digit} (forget-class {int(is_forget.sum())}/{len(test)}), model mid-block features, "
              f"{FEATURE_K}-NN, no split: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
