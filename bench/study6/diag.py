"""Study 6 diagnostics: one vdu run, per-seed data kept (eval seeds and the training paths' own seeds).

python bench/study6/diag.py OUT.pt DIGIT '{"guidance_scale": 3}'   (env MODEL, N=512, SS=25)
"""

import copy
import os
import time

import torch
from common import N, cfg, clf, digit, forget, model, out, params, pipe

from vdu_core import metrics
from vdu_core.methods import FEATURE_K, noised_mid_features
from vdu_core.run import unlearn_model
from vdu_core.sampling import sample_images

SS = int(os.environ.get("SS", 25))


def probs(x):
    xx, _ = metrics.prepare_for_classifier(x)
    with torch.no_grad():
        return torch.softmax(clf(xx).float(), 1)


def vote_count(unet, own):
    t = int(0.2 * pipe.scheduler.config.num_train_timesteps)
    g = torch.Generator().manual_seed(0)
    ff, fo = (
        noised_mid_features(unet, pipe.scheduler, forget, t, g),
        noised_mid_features(unet, pipe.scheduler, own, t, g),
    )
    d = torch.cat([torch.cdist(fo, ff), torch.cdist(fo, fo).fill_diagonal_(float("inf"))], 1)
    return (d.topk(FEATURE_K, largest=False).indices < len(ff)).sum(1)


before = sample_images(pipe.unet, pipe.scheduler, N, seed=1234, steps=SS)
tr_before = sample_images(pipe.unet, pipe.scheduler, cfg.anchor_samples, seed=cfg.seed, steps=cfg.trajectory_steps)
unet = copy.deepcopy(pipe.unet)
t0 = time.time()
report, _, _ = unlearn_model(unet, pipe.scheduler, forget, cfg, cache_dir=None)
secs = time.time() - t0
unet.eval()
after = sample_images(unet, pipe.scheduler, N, seed=1234, steps=SS)
tr_after = sample_images(unet, pipe.scheduler, cfg.anchor_samples, seed=cfg.seed, steps=cfg.trajectory_steps)
d = {
    "before": before,
    "after": after,
    "pb": probs(before),
    "pa": probs(after),
    "tpb": probs(tr_before),
    "tpa": probs(tr_after),
    "vote_eval": vote_count(pipe.unet, before),
    "vote_train": vote_count(pipe.unet, tr_before),
    "digit": digit,
    "params": params,
    "model": model,
    "secs": secs,
    "history": report.history[-1:],
    "state": unet.state_dict(),
}
torch.save(d, out)
yb, ya = d["pb"].argmax(1), d["pa"].argmax(1)
tb, ta = d["tpb"].argmax(1), d["tpa"].argmax(1)
fb = yb == digit
rk = float((ya[~fb] == yb[~fb]).float().mean())
pul = 100 * (int(fb.sum()) - int((ya == digit).sum())) / max(int(fb.sum()), 1)
tf = tb == digit
tpul = 100 * (int(tf.sum()) - int((ta == digit).sum())) / max(int(tf.sum()), 1)
trk = float((ta[~tf] == tb[~tf]).float().mean())
print(
    f"RESULT {out} {model} d{digit} {params} PUL {pul:.1f} ({int(fb.sum())}) RK {rk:.3f} | train-paths PUL {tpul:.1f} "
    f"({int(tf.sum())}) RK {trk:.3f} | {secs:.0f}s",
    flush=True,
)
