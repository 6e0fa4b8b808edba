"""Session-5 prototype: trajectory-paired unlearning.

The default method pushes noised *forget images* and anchors noised *own samples*. At high noise the
class a noised input came from is not the class the sampler will produce from it, so push and anchor
disagree exactly where the class is decided. Here every training input is a point on one of the
original model's own DDIM trajectories, labelled by where that trajectory ends:

* trajectories that end forget-like: ``--target neg``, the library's negative-guidance target at that
  point (ε_θ₀ − η (ε_F − ε_θ₀), ε_F the forget set's empirical denoiser), or ``--target retain``,
  ε_θ₀ + η (ε_R − ε_θ₀) with ε_R the empirical denoiser of the model's own retained endpoints;
* the others: target = ε_θ₀ at that point (stored, no extra forward pass).

Optionally the forget trajectories are re-drawn with the current model every ``--refresh`` steps
(on-policy: push where the sampler now goes).

    python bench/study5/traj.py --digit 0 --label oracle --eta 5 --steps 400
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from bench_posterior import mid_features  # noqa: E402
from diffusers import DDIMScheduler, DDPMPipeline  # noqa: E402

from vdu_core import metrics  # noqa: E402
from vdu_core.methods import empirical_forget_eps  # noqa: E402
from vdu_core.reference import REFERENCE_DIR, load_mnist_5k  # noqa: E402
from vdu_core.sampling import initial_noise, sample_images  # noqa: E402


@torch.no_grad()
def trajectories(unet, scheduler, z: torch.Tensor, steps: int, bs: int = 128):
    """DDIM from ``z``: (xs [K,N,...] inputs at each step, eps [K,N,...] the model's ε there, ts [K], end)."""
    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(steps)
    was = unet.training
    unet.eval()
    xs, eps_all, ends = [], [], []
    for i in range(0, len(z), bs):
        x = z[i : i + bs].clone()
        xk, ek = [], []
        for t in ddim.timesteps:
            e = unet(x, t).sample
            xk.append(x)
            ek.append(e)
            x = ddim.step(e, t, x, eta=0.0).prev_sample
        xs.append(torch.stack(xk))
        eps_all.append(torch.stack(ek))
        ends.append(x.clamp(-1, 1))
    unet.train(was)
    return torch.cat(xs, 1), torch.cat(eps_all, 1), ddim.timesteps.clone(), torch.cat(ends)


def knn_label(unet, scheduler, own: torch.Tensor, forget: torch.Tensor, t: int = 200, k: int = 10,
              min_forget: int = 3) -> torch.Tensor:
    """Data-free: an own sample is forget-like if ≥ min_forget of its k nearest (mid-block features at
    t, among the forget images and the other own samples) are forget images."""
    ff, fo = mid_features(unet, scheduler, forget, t, 0), mid_features(unet, scheduler, own, t, 1)
    d = torch.cat([torch.cdist(fo, ff), torch.cdist(fo, fo).fill_diagonal_(float("inf"))], 1)
    c_f = (d.topk(k, largest=False).indices < len(ff)).sum(1)
    return c_f >= min_forget


class LowRankDelta(torch.nn.Module):
    """weight = W₀ + B A (reshaped): W₀ frozen, only A and B trained, B starts at zero."""

    def __init__(self, weight: torch.Tensor, rank: int):
        super().__init__()
        out, fan_in = weight.shape[0], weight[0].numel()
        r = min(rank, out, fan_in)
        self.A = torch.nn.Parameter(torch.randn(r, fan_in) / fan_in**0.5)
        self.B = torch.nn.Parameter(torch.zeros(out, r))

    def forward(self, w):
        return w + (self.B @ self.A).view_as(w)


def add_lora(unet, rank: int) -> None:
    from torch.nn.utils import parametrize

    unet.requires_grad_(False)
    for m in list(unet.modules()):
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and m.weight.dim() >= 2:
            parametrize.register_parametrization(m, "weight", LowRankDelta(m.weight.detach(), rank))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="mnist-ddpm")
    ap.add_argument("--digit", type=int, default=0)
    ap.add_argument("--label", choices=["oracle", "knn"], default="oracle")
    ap.add_argument("--n-train", type=int, default=1024)
    ap.add_argument("--traj-steps", type=int, default=25)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--eta", type=float, default=5.0)
    ap.add_argument("--target", choices=["neg", "retain"], default="neg")
    ap.add_argument("--anchor-weight", type=float, default=1.0)
    ap.add_argument("--anchor-batch", type=int, default=0, help="anchor points per step (default: --batch)")
    ap.add_argument("--tmin", type=int, default=0, help="push only at trajectory points with t >= tmin")
    ap.add_argument("--tmax", type=int, default=10**6, help="push only at trajectory points with t < tmax")
    ap.add_argument("--project", type=int, default=0,
                    help="rank of the anchor-output sketch the push update is projected off (0: none)")
    ap.add_argument("--project-points", type=int, default=256)
    ap.add_argument("--lora", type=int, default=0, help="train only a rank-r delta of every conv/linear weight")
    ap.add_argument("--refresh", type=int, default=0)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--sample-steps", type=int, default=25)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    torch.manual_seed(0)

    pipe = DDPMPipeline.from_pretrained(REFERENCE_DIR / args.model, use_safetensors=True)
    orig, sch = pipe.unet.eval(), pipe.scheduler
    clf = metrics.load_classifier("builtin:mnist")
    images, labels = load_mnist_5k()
    forget = images[labels == args.digit][:100]
    t0 = time.time()

    z = initial_noise(args.n_train, (1, 28, 28), seed=777)
    Path("/tmp/s5").mkdir(exist_ok=True)
    cache = Path(f"/tmp/s5/traj-{args.model}-{args.n_train}-{args.traj_steps}.pt")
    if cache.exists():
        xs, eps0, ts, ends = torch.load(cache)
    else:
        xs, eps0, ts, ends = trajectories(orig, sch, z, args.traj_steps)
        torch.save((xs, eps0, ts, ends), cache)
    truth = metrics.classify(clf, ends)[0] == args.digit  # scores the labels; is the label only for "oracle"
    is_f = truth if args.label == "oracle" else knn_label(orig, sch, ends, forget)
    print(f"trajectories {time.time() - t0:.0f}s; forget-labelled {int(is_f.sum())}/{len(is_f)} "
          f"(TP {float(is_f[truth].float().mean()):.2f}, FP {float(is_f[~truth].float().mean()):.3f})", flush=True)

    K = len(ts)
    ret_idx = (~is_f).nonzero().flatten()
    f_idx = is_f.nonzero().flatten()
    push_k = ((ts >= args.tmin) & (ts < args.tmax)).nonzero().flatten()
    ret_ends = ends[~is_f]

    def push_targets(xp, tp, e0):
        if args.target == "neg":
            ef = empirical_forget_eps(xp, tp, forget, sch)
            return e0 - args.eta * (ef - e0)
        # retain: toward the denoiser of the model's own retained samples (the nearest non-forget output)
        er = empirical_forget_eps(xp, tp, ret_ends, sch)
        return e0 + args.eta * (er - e0)

    f_xs, f_eps = xs[:, f_idx], eps0[:, f_idx]
    unet = copy.deepcopy(orig).train()
    if args.lora:
        add_lora(unet, args.lora)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=args.lr)
    g = torch.Generator().manual_seed(1)
    Q = None
    if args.project:
        # span of J^T s_j: J = d(ε_θ on retained trajectory points)/dθ, s_j random output directions,
        # a randomized estimate of the directions that move the retained outputs most
        pi = ret_idx[torch.randint(0, len(ret_idx), (args.project_points,), generator=g)]
        pk = torch.randint(0, K, (args.project_points,), generator=g)
        xp_, tp_ = xs[pk, pi], ts[pk]
        cols = []
        for _ in range(args.project):
            unet.zero_grad(set_to_none=True)
            out = unet(xp_, tp_).sample
            sj = torch.randn(out.shape, generator=g)
            (out * sj).sum().backward()
            cols.append(torch.cat([p.grad.flatten() for p in params]))
        Q, _ = torch.linalg.qr(torch.stack(cols, 1))
        del cols
        unet.zero_grad(set_to_none=True)
        print(f"projection rank {args.project} built ({time.time() - t0:.0f}s)", flush=True)
    for step in range(1, args.steps + 1):
        if args.refresh and step > 1 and step % args.refresh == 1 and len(f_idx):
            # on-policy: where the current model now takes the forget seeds
            nx, _, _, _ = trajectories(unet, sch, z[f_idx], args.traj_steps)
            with torch.no_grad():
                ne = torch.stack([orig(nx[k], ts[k]).sample for k in range(K)])
            f_xs, f_eps = nx, ne
        # forget points
        fi = torch.randint(0, len(f_idx), (args.batch,), generator=g)
        fk = push_k[torch.randint(0, len(push_k), (args.batch,), generator=g)]
        xf = f_xs[fk, fi]
        tf = ts[fk]
        with torch.no_grad():
            tgt_f = push_targets(xf, tf, f_eps[fk, fi])
        nb = args.anchor_batch or args.batch
        ri = ret_idx[torch.randint(0, len(ret_idx), (nb,), generator=g)]
        rk = torch.randint(0, K, (nb,), generator=g)
        xr, tr, tgt_r = xs[rk, ri], ts[rk], eps0[rk, ri]
        opt.zero_grad(set_to_none=True)
        lf = (unet(xf, tf).sample - tgt_f).pow(2).mean()
        lr_ = (unet(xr, tr).sample - tgt_r).pow(2).mean()
        (lf + args.anchor_weight * lr_).backward()
        if Q is None:
            opt.step()
        else:
            with torch.no_grad():
                old = torch.cat([p.flatten() for p in params])
                opt.step()
                delta = torch.cat([p.flatten() for p in params]) - old
                delta -= Q @ (Q.T @ delta)
                new = old + delta
                i0 = 0
                for p in params:
                    p.copy_(new[i0 : i0 + p.numel()].view_as(p))
                    i0 += p.numel()
        if step % 100 == 0:
            print(f"step {step}: push {lf.item():.4f} anchor {lr_.item():.5f} ({time.time() - t0:.0f}s)", flush=True)
    train_s = time.time() - t0
    unet.eval()

    bcache = Path(f"/tmp/s5/before-{args.model}-{args.samples}-{args.sample_steps}.pt")
    if bcache.exists():
        before = torch.load(bcache)
    else:
        before = sample_images(orig, sch, args.samples, seed=1234, steps=args.sample_steps)
        torch.save(before, bcache)
    after = sample_images(unet, sch, args.samples, seed=1234, steps=args.sample_steps)
    pb, pa = metrics.classify(clf, before)[0], metrics.classify(clf, after)[0]
    real = metrics.feature_stats(metrics.extract_features(clf, images[labels != args.digit]))
    fb, fa = metrics.u_fid(before, real, clf)["value"], metrics.u_fid(after, real, clf)["value"]
    p = metrics.pul(pb, pa, args.digit)["value"]
    rk = metrics.retained_kept(pb, pa, args.digit)["value"]
    share = metrics.largest_class_share(pa, num_classes=10)
    moved = (after - before).flatten(1).norm(dim=1)
    wf = pb == args.digit
    row = {"tag": args.tag, "digit": args.digit, "pul": p, "u_fid_ratio": fa / fb, "rk": rk,
           "top": share["value"], "moved_f": float(moved[wf].mean()), "moved_r": float(moved[~wf].mean()),
           "train_s": train_s, "args": vars(args)}
    print(f"RESULT {args.tag} d{args.digit}: PUL {p:.1f} uFID {fa / fb:.2f}x RK {rk:.3f} top {share['value']:.2f} "
          f"moved {row['moved_f']:.1f}/{row['moved_r']:.1f} train {train_s:.0f}s", flush=True)
    with open(Path(__file__).parent / "results.jsonl", "a") as fh:
        fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
