"""Clean-level labelling of the model's own samples as forget-like: which data-free score separates best?"""

import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from bench_posterior import mid_features
from diffusers import DDPMPipeline

from vdu_core import metrics
from vdu_core.methods import kernel_log_density, kernel_scale
from vdu_core.reference import REFERENCE_DIR, load_mnist_5k
from vdu_core.sampling import sample_images

model = sys.argv[1] if len(sys.argv) > 1 else "mnist-ddpm"
N = int(sys.argv[2]) if len(sys.argv) > 2 else 768
pipe = DDPMPipeline.from_pretrained(REFERENCE_DIR / model, use_safetensors=True)
unet, sch = pipe.unet.eval(), pipe.scheduler
t0 = time.time()
own = sample_images(unet, sch, N, seed=0, steps=25)
print("sampled", time.time() - t0, flush=True)
lab, _ = metrics.classify(metrics.load_classifier("builtin:mnist"), own)
images, labels = load_mnist_5k()


def feats(x, t, seed):
    """The 'features' posterior's mid-block features of ``x`` noised to ``t`` (bench_posterior's)."""
    return mid_features(unet, sch, x, t, seed)


def knn_loo(q_f, q_o, k=10, prior=0.1):
    # q_o: own features (queries are own samples themselves, leave one out)
    nf, no = len(q_f), len(q_o)
    d = torch.cat([torch.cdist(q_o, q_f), torch.cdist(q_o, q_o).fill_diagonal_(float("inf"))], 1)
    c_f = (d.topk(k, largest=False).indices < nf).float().sum(1)
    return (prior * (c_f / nf) / ((k - c_f + 0.5) / (no - 1))).clamp(max=1.0), c_f / k


def report(name, score, is_f, ths=(0.3, 0.5, 0.7)):
    cells = []
    for th in ths:
        pos = score > th
        cells.append(f"th{th}: FP {pos[~is_f].float().mean():.3f} TP {pos[is_f].float().mean():.2f}")
    print(f"  {name:38s} " + " | ".join(cells), flush=True)


for digit in [0, 4, 7]:
    forget = images[labels == digit][:100]
    is_f = lab == digit
    print(f"digit {digit}: {int(is_f.sum())}/{N} own forget-class", flush=True)
    # pixel kernel LOO at t
    for t in (0, 50, 200):
        for bw in (0.0, 16.0):
            scale = kernel_scale(forget)
            tt = torch.full((N,), t)
            g = torch.Generator().manual_seed(1)
            x_t = sch.add_noise(own, torch.randn(own.shape, generator=g), tt) if t > 0 else own
            blur = bw * scale if bw else (1e-3 if t == 0 else 0.0)
            lqf = kernel_log_density(x_t, tt, forget, sch, blur)
            # LOO own density
            ac = sch.alphas_cumprod[tt].float().view(-1, 1)
            xf = x_t.flatten(1)
            ff = own.flatten(1)
            d2 = xf.pow(2).sum(1, keepdim=True) - 2 * ac.sqrt() * (xf @ ff.T) + ac * ff.pow(2).sum(1).view(1, -1)
            lk = -d2 / (2 * ((1 - ac) + ac * blur)).clamp_min(1e-8)
            lk.fill_diagonal_(-float("inf"))
            lqa = torch.logsumexp(lk, 1) - math.log(N - 1)
            r = torch.sigmoid(math.log(0.1 / 0.9) + lqf - lqa)
            report(f"pixel LOO t={t} bw={bw:g}", r, is_f)
    for t in (20, 100, 200, 400):
        ff, fo = feats(forget, t, 0), feats(own, t, 1)
        r, frac = knn_loo(ff, fo)
        report(f"feat kNN t={t} ratio", r, is_f)
        report(f"feat kNN t={t} frac", frac, is_f)
    # concatenated multi-t features
    ts = (20, 100, 200, 400)
    ff = torch.cat([feats(forget, t, 0) for t in ts], 1) / 2
    fo = torch.cat([feats(own, t, 1) for t in ts], 1) / 2
    r, frac = knn_loo(ff, fo)
    report("feat kNN concat ratio", r, is_f)
    report("feat kNN concat frac", frac, is_f)
