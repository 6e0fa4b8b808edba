"""How precise is the data-free vote, per digit and per variant? The job's own 1,024 paths (seed 0, DDIM-25)
labelled by the vote (data-free) and by the evaluation's classifier (the truth, for the study only).

    OMP_NUM_THREADS=1 python bench/study7/vote.py [MODEL]
"""

import math
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402
from diffusers import DDPMPipeline  # noqa: E402

from vdu_core import metrics  # noqa: E402
from vdu_core.methods import noised_mid_features  # noqa: E402
from vdu_core.reference import REFERENCE_DIR, load_mnist_5k  # noqa: E402
from vdu_core.sampling import sample_images  # noqa: E402

model = sys.argv[1] if len(sys.argv) > 1 else "mnist-ddpm"
pipe = DDPMPipeline.from_pretrained(REFERENCE_DIR / model, use_safetensors=True)
unet, sch = pipe.unet.eval(), pipe.scheduler
T = sch.config.num_train_timesteps
own = sample_images(unet, sch, 1024, seed=0, steps=25)
clf = metrics.load_classifier("builtin:mnist")
truth, _ = metrics.classify(clf, own)
truth = torch.as_tensor(truth)
images, labels = load_mnist_5k()


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
