"""How precise is the data-free vote, per digit and per variant? The job's own 1,024 paths (seed 0, DDIM-25)
labelled by the vote (data-free) and by the evaluation's classifier (the truth, for the study only).

    OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1 python bench/study7/vote.py [MODEL]
"""

import math
import sys

import torch
from common import own_paths

from vdu_core.methods import noised_mid_features

model = sys.argv[1] if len(sys.argv) > 1 else "mnist-ddpm"
unet, sch, own, truth, _, images, labels = own_paths(model)
T = sch.config.num_train_timesteps


def counts(fo, ff, k):
    d = torch.cat([torch.cdist(fo, ff), torch.cdist(fo, fo).fill_diagonal_(float("inf"))], 1)
    return (d.topk(k, largest=False).indices < len(ff)).sum(1)


feats = {}
for tf in (0.1, 0.2, 0.4):
    g = torch.Generator().manual_seed(0)
    feats[tf] = noised_mid_features(unet, sch, own, int(tf * T), g)
print(f"{model}: own class histogram {torch.bincount(truth, minlength=10).tolist()}")
print("| digit | variant | called | of them the digit (precision) | digit caught (recall) |")
print("|---|---|---:|---:|---:|")
for d in range(10):
    forget = images[labels == d][:100]
    is_d = truth == d
    for tf in (0.1, 0.2, 0.4):
        g = torch.Generator().manual_seed(1)
        ff = noised_mid_features(unet, sch, forget, int(tf * T), g)
        for k in (10, 20):
            c = counts(feats[tf], ff, k)
            for bar in sorted({max(3, math.ceil(0.3 * k)), max(3, math.ceil(0.5 * k))}):
                lab = c >= bar
                n = int(lab.sum())
                prec = int((lab & is_d).sum())
                print(f"| {d} | t {tf}T, k {k}, bar {bar} | {n} | {prec} ({prec / max(n, 1):.2f}) | "
                      f"{prec} of {int(is_d.sum())} ({prec / max(int(is_d.sum()), 1):.2f}) |", flush=True)
