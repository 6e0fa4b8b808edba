"""PUL / retained-kept along one run (snapshots every EVERY steps), beside data-free signals measured on the
training paths' own seeds: python bench/study6/steps.py OUT.pt DIGIT '{"steps": 450}'  (env MODEL, N, EVERY)"""

import copy
import json
import os
import time

import torch
from common import EVERY_DEFAULT, VOTE_BAR, N, cfg, clf, digit, forget, model, out, params, pipe, sch

from vdu_core import metrics
from vdu_core.methods import FEATURE_K, noised_mid_features
from vdu_core.run import unlearn_model
from vdu_core.sampling import initial_noise, sample_from, sample_images

EVERY = int(os.environ.get("EVERY", EVERY_DEFAULT))
snaps = {}


def on_progress(p):
    if p.phase in (None, "train", "unlearn") and p.step and p.step % EVERY == 0 and p.step not in snaps:
        snaps[p.step] = copy.deepcopy(unet.state_dict())


unet = copy.deepcopy(pipe.unet)
t0 = time.time()
unlearn_model(unet, sch, forget, cfg, cache_dir=None, on_progress=on_progress)
print("trained", time.time() - t0, sorted(snaps), flush=True)
g = torch.Generator().manual_seed(0)
t20 = int(0.2 * sch.config.num_train_timesteps)
tr0 = sample_images(pipe.unet, sch, cfg.anchor_samples, seed=cfg.seed, steps=cfg.trajectory_steps)
ff = noised_mid_features(pipe.unet, sch, forget, t20, g)
f0 = noised_mid_features(pipe.unet, sch, tr0, t20, g)


def votes(x):  # forget neighbours among forget images + the original's own ends
    fx = noised_mid_features(pipe.unet, sch, x, t20, torch.Generator().manual_seed(0))
    d = torch.cat([torch.cdist(fx, ff), torch.cdist(fx, f0)], 1)
    return (d.topk(FEATURE_K + 1, largest=False).indices[:, 1:] < len(ff)).sum(1)


v0 = votes(tr0)
like_all = v0 >= VOTE_BAR
sub = torch.cat([like_all.nonzero().flatten(), (~like_all).nonzero().flatten()[:256]])  # forget-like + 256 others
tr0, like = tr0[sub], like_all[sub]
xT = initial_noise(cfg.anchor_samples, tuple(tr0.shape[1:]), cfg.seed)[sub]
assert torch.allclose(sample_from(pipe.unet, sch, xT[:4], steps=cfg.trajectory_steps), tr0[:4], atol=1e-4)
before = sample_images(pipe.unet, sch, N, seed=1234, steps=25)
yb = metrics.classify(clf, before)[0]
tb = metrics.classify(clf, tr0)[0]
rows = []
m = copy.deepcopy(pipe.unet).eval()
for s in sorted(snaps):
    m.load_state_dict(snaps[s])
    after = sample_images(m, sch, N, seed=1234, steps=25)
    ya = metrics.classify(clf, after)[0]
    fb = yb == digit
    pul = 100 * (int(fb.sum()) - int((ya == digit).sum())) / max(int(fb.sum()), 1)
    rk = float((ya[~fb] == yb[~fb]).float().mean())
    tra = sample_from(m, sch, xT, steps=cfg.trajectory_steps)
    ta = metrics.classify(clf, tra)[0]
    va = votes(tra)
    still = float((va[like] >= VOTE_BAR).float().mean())
    drift = float((tra[~like] - tr0[~like]).flatten(1).norm(dim=1).mean())
    fdrift = float((tra[like] - tr0[like]).flatten(1).norm(dim=1).mean())
    tf = tb == digit
    tpul = 100 * (int(tf.sum()) - int((ta == digit).sum())) / max(int(tf.sum()), 1)
    row = dict(
        step=s,
        pul=pul,
        rk=rk,
        train_pul=tpul,
        train_rk=float((ta[~tf] == tb[~tf]).float().mean()),
        still_like=still,
        drift_r=drift,
        drift_f=fdrift,
    )
    rows.append(row)
    print("ROW", json.dumps(row), flush=True)
torch.save({"rows": rows, "params": params, "digit": digit, "model": model}, out)
