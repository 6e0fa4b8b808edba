"""Which features let the vote find the forgotten class among the job's own paths: the original's mid-block at
other noise levels, several noise levels at once, or plain pixels.

    python bench/study10/features.py MODEL [MODEL ...]

Same paths, truth and forget sets as ``propagate.py`` (its cache). The vote's rule is the job's: at least
``bar`` forget images (3, as the job computes it) among each path's 10 nearest of the forget images and the other
paths. A variant 'a+b' concatenates the unit-normalised features of two noise levels. Prints, per digit, the
class's paths called forget-like / the class's paths, and + the other paths called forget-like.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from propagate import own, recall_table  # noqa: E402

from vdu_core.methods import FEATURE_K, noised_mid_features  # noqa: E402
from vdu_core.reference import load_mnist_5k  # noqa: E402

VARIANTS = ["t0.05", "t0.1", "t0.2", "t0.35", "t0.5", "t0.1+t0.35", "pixels"]


def feats(unet, sch, x: torch.Tensor, name: str) -> torch.Tensor:
    if name == "pixels":
        return torch.nn.functional.normalize(x.float().flatten(1), dim=1)
    parts = []
    for piece in name.split("+"):
        t = int(float(piece[1:]) * sch.config.num_train_timesteps)
        f = noised_mid_features(unet, sch, x, t, torch.Generator().manual_seed(0))
        parts.append(torch.nn.functional.normalize(f, dim=1))
    return torch.cat(parts, 1) / math.sqrt(len(parts))


def vote(fo: torch.Tensor, ff: torch.Tensor) -> torch.Tensor:
    k = FEATURE_K
    chance = k * len(ff) / (len(ff) + len(fo) - 1)
    bar = min(k, max(3, math.ceil(2 * chance)))
    d = torch.cat([torch.cdist(fo, ff), torch.cdist(fo, fo).fill_diagonal_(float("inf"))], 1)
    return (d.topk(k, largest=False).indices < len(ff)).sum(1) >= bar


def main() -> None:
    images, labels = load_mnist_5k()
    for model in sys.argv[1:] or ["mnist-ddpm"]:
        unet, sch, ends, truth = own(model)
        print(f"\n{model}")
        fos = {v: feats(unet, sch, ends, v) for v in VARIANTS}

        def labels_of(d: int, unet=unet, sch=sch, fos=fos):
            forget = images[labels == d][:100]
            return lambda name: vote(fos[name], feats(unet, sch, forget, name))

        recall_table(truth, VARIANTS, labels_of)


if __name__ == "__main__":
    main()
