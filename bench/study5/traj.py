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
def trajectories(unet, scheduler, z: torch.Tensor, steps: int, bs: int = 128, pick=None):
    """DDIM from ``z``: (xs [K,N,...] inputs at each step, eps [K,N,...] the model's ε there, ts [K], end).

    ``pick(t)``, if given, returns the model to use at step t (e.g. the unlearned one in one band only).
    """
    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(steps)
    was = unet.training
    unet.eval()
    xs, eps_all, ends = [], [], []
    for i in range(0, len(z), bs):
        x = z[i : i + bs].clone()
        xk, ek = [], []
        for t in ddim.timesteps:
            e = (pick(int(t)) if pick else unet)(x, t).sample
            xk.append(x)
            ek.append(e)
            x = ddim.step(e, t, x, eta=0.0).prev_sample
        xs.append(torch.stack(xk))
        eps_all.append(torch.stack(ek))
        ends.append(x.clamp(-1, 1))
    unet.train(was)
    return torch.cat(xs, 1), torch.cat(eps_all, 1), ddim.timesteps.clone(), torch.cat(ends)


def paired_scores(clf, digit: int, before: torch.Tensor, pb: torch.Tensor, after: torch.Tensor) -> dict:
    """PUL, retained-kept and mean distance moved (forget-class seeds / the others) of paired samples."""
    pa = metrics.classify(clf, after)[0]
    moved = (after - before).flatten(1).norm(dim=1)
    wf = pb == digit
    return {"pul": metrics.pul(pb, pa, digit)["value"], "rk": metrics.retained_kept(pb, pa, digit)["value"],
            "moved_f": float(moved[wf].mean()), "moved_r": float(moved[~wf].mean()), "pred": pa}


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
    ap.add_argument("--load", default="", help="skip training: load /tmp/s5/model-LOAD.pt")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--eta", type=float, default=5.0)
    ap.add_argument("--target", choices=["neg", "retain"], default="neg")
    ap.add_argument("--anchor-weight", type=float, default=1.0)
    ap.add_argument("--anchor-weight-out", type=float, default=0.0,
                    help="anchor weight at points outside [tmin, tmax) (default: --anchor-weight)")
    ap.add_argument("--anchor-weighting", choices=["flat", "x0", "step"], default="flat",
                    help="per-t anchor weight: flat; x0 = (σ/√ᾱ)² (x0-prediction space); step = the DDIM step's "
                         "displacement per unit ε error squared, normalised to 1 at t≈500")
    ap.add_argument("--anchor-batch", type=int, default=0, help="anchor points per step (default: --batch)")
    ap.add_argument("--tmin", type=int, default=0, help="push only at trajectory points with t >= tmin")
    ap.add_argument("--tmax", type=int, default=10**6, help="push only at trajectory points with t < tmax")
    ap.add_argument("--project", type=int, default=0,
                    help="rank of the anchor-output sketch the push update is projected off (0: none)")
    ap.add_argument("--project-points", type=int, default=256)
    ap.add_argument("--project-high", action="store_true",
                    help="build the sketch only from retained points at t >= tmax, outputs scaled by the "
                         "--anchor-weighting factor (the band where nothing is pushed)")
    ap.add_argument("--mask-frac", type=float, default=0.0,
                    help="train only this share of weight entries: those with the largest push-gradient² over "
                         "high-noise (t >= tmax) retained-output sensitivity (0: all)")
    ap.add_argument("--lora", type=int, default=0, help="train only a rank-r delta of every conv/linear weight")
    ap.add_argument("--refresh", type=int, default=0)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--sample-steps", type=int, default=25)
    ap.add_argument("--diag", action="store_true",
                    help="also report training-seed retained-kept and the per-step divergence of the eval paths")
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
    ab = sch.alphas_cumprod
    if args.anchor_weighting == "x0":
        tw = (1 - ab[ts]) / ab[ts]
    elif args.anchor_weighting == "step":
        ab_next = torch.cat([ab[ts[1:]], torch.ones(1)])
        c = (1 - ab_next).sqrt() - ab_next.sqrt() * ((1 - ab[ts]) / ab[ts]).sqrt()
        tw = c**2 / c[(ts - 500).abs().argmin()] ** 2
    else:
        tw = torch.ones(len(ts))
    shown = {int(t): round(float(w), 2) for t, w in zip(ts[::4], tw[::4], strict=True)}
    print("anchor weight per t:", shown, flush=True)
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
        pool = (ts >= args.tmax).nonzero().flatten() if args.project_high else torch.arange(K)
        pk = pool[torch.randint(0, len(pool), (args.project_points,), generator=g)]
        xp_, tp_ = xs[pk, pi], ts[pk]
        scale = tw[pk].sqrt().view(-1, 1, 1, 1) if args.project_high else 1.0
        cols = []
        for _ in range(args.project):
            unet.zero_grad(set_to_none=True)
            out = unet(xp_, tp_).sample * scale
            sj = torch.randn(out.shape, generator=g)
            (out * sj).sum().backward()
            cols.append(torch.cat([p.grad.flatten() for p in params]))
        Q, _ = torch.linalg.qr(torch.stack(cols, 1))
        del cols
        unet.zero_grad(set_to_none=True)
        print(f"projection rank {args.project} built ({time.time() - t0:.0f}s)", flush=True)
    if args.load:
        unet.load_state_dict(torch.load(f"/tmp/s5/model-{args.load}.pt"))
    masks = None
    if args.mask_frac and not args.load:
        # diagonal selectivity score: how much an entry serves the push / how much it moves the retained
        # outputs at high noise (sensitivity-weighted), where nothing is pushed and every change is collateral
        gp = [torch.zeros_like(p) for p in params]
        fh = [torch.zeros_like(p) for p in params]
        hi_k = (ts >= args.tmax).nonzero().flatten()
        for _ in range(8):
            fi = torch.randint(0, len(f_idx), (args.batch,), generator=g)
            fk = push_k[torch.randint(0, len(push_k), (args.batch,), generator=g)]
            with torch.no_grad():
                tgt = push_targets(f_xs[fk, fi], ts[fk], f_eps[fk, fi])
            unet.zero_grad(set_to_none=True)
            (unet(f_xs[fk, fi], ts[fk]).sample - tgt).pow(2).mean().backward()
            for a, p in zip(gp, params, strict=True):
                a += p.grad.pow(2)
            ri = ret_idx[torch.randint(0, len(ret_idx), (args.batch,), generator=g)]
            rk = hi_k[torch.randint(0, len(hi_k), (args.batch,), generator=g)]
            unet.zero_grad(set_to_none=True)
            out = unet(xs[rk, ri], ts[rk]).sample
            (out * torch.randn(out.shape, generator=g) * tw[rk].sqrt().view(-1, 1, 1, 1)).sum().backward()
            for a, p in zip(fh, params, strict=True):
                a += p.grad.pow(2)
        unet.zero_grad(set_to_none=True)
        mean_fh = torch.cat([a.flatten() for a in fh]).mean()
        score = [a / (b + 0.1 * mean_fh) for a, b in zip(gp, fh, strict=True)]
        flat = torch.cat([x.flatten() for x in score])
        thr = flat.kthvalue(int((1 - args.mask_frac) * len(flat))).values
        masks = [(x > thr).float() for x in score]
        print(f"mask: {int(sum(m.sum() for m in masks))}/{len(flat)} entries trained", flush=True)
    for step in range(1, 0 if args.load else args.steps + 1):
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
        in_band = ((tr >= args.tmin) & (tr < args.tmax)).float()
        wa = (args.anchor_weight * in_band + (args.anchor_weight_out or args.anchor_weight) * (1 - in_band)) * tw[rk]
        per = (unet(xr, tr).sample - tgt_r).pow(2).flatten(1).mean(1)
        lr_ = per.mean()
        (lf + (wa * per).mean()).backward()
        if masks is not None:
            for p, m in zip(params, masks, strict=True):
                p.grad.mul_(m)
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
    if args.lora:
        from torch.nn.utils import parametrize
        for m in list(unet.modules()):
            if parametrize.is_parametrized(m, "weight"):
                parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    if args.tag:
        torch.save(unet.state_dict(), f"/tmp/s5/model-{args.tag}.pt")

    bcache = Path(f"/tmp/s5/before-{args.model}-{args.samples}-{args.sample_steps}.pt")
    if bcache.exists():
        before = torch.load(bcache)
    else:
        before = sample_images(orig, sch, args.samples, seed=1234, steps=args.sample_steps)
        torch.save(before, bcache)
    after = sample_images(unet, sch, args.samples, seed=1234, steps=args.sample_steps)
    pb = metrics.classify(clf, before)[0]
    sc = paired_scores(clf, args.digit, before, pb, after)
    real = metrics.feature_stats(metrics.extract_features(clf, images[labels != args.digit]))
    fb, fa = metrics.u_fid(before, real, clf)["value"], metrics.u_fid(after, real, clf)["value"]
    p, rk = sc["pul"], sc["rk"]
    share = metrics.largest_class_share(sc["pred"], num_classes=10)
    wf = pb == args.digit
    row = {"tag": args.tag, "digit": args.digit, "pul": p, "u_fid_ratio": fa / fb, "rk": rk,
           "top": share["value"], "moved_f": sc["moved_f"], "moved_r": sc["moved_r"],
           "train_s": train_s, "args": vars(args)}
    print(f"RESULT {args.tag} d{args.digit}: PUL {p:.1f} uFID {fa / fb:.2f}x RK {rk:.3f} top {share['value']:.2f} "
          f"moved {row['moved_f']:.1f}/{row['moved_r']:.1f} train {train_s:.0f}s", flush=True)
    if args.diag:
        # generalisation or conflict? the anchored training seeds themselves, and where along the path
        # the eval seeds part from the original's
        ztr = z[:256]
        _, _, _, tr_after = trajectories(unet, sch, ztr, args.traj_steps)
        tr = paired_scores(clf, args.digit, ends[:256], metrics.classify(clf, ends[:256])[0], tr_after)
        row["train_rk"], row["train_pul"] = tr["rk"], tr["pul"]
        ze = initial_noise(args.samples, (1, 28, 28), seed=1234)
        xo, _, tso, _ = trajectories(orig, sch, ze, args.sample_steps)
        xn, _, _, _ = trajectories(unet, sch, ze, args.sample_steps)
        d = (xn - xo).flatten(2).norm(dim=2)  # [K, N]
        row["div_t"] = [int(t) for t in tso]
        row["div_f"] = [round(float(v), 3) for v in d[:, wf].mean(1)]
        row["div_r"] = [round(float(v), 3) for v in d[:, ~wf].mean(1)]
        print(f"DIAG train seeds: PUL {row['train_pul']:.1f} RK {row['train_rk']:.3f}", flush=True)
        for k in range(0, len(tso), 2):
            print(f"  t {int(tso[k]):4d}: F {row['div_f'][k]:.2f} R {row['div_r'][k]:.2f}", flush=True)
        # which band's change forgets, and which band's change moves the retained seeds
        row["bands"] = {}
        for lo, hi in [(700, 10**6), (300, 700), (0, 300)]:
            hb = trajectories(orig, sch, ze, args.sample_steps,
                              pick=lambda t, lo=lo, hi=hi: unet if lo <= t < hi else orig)[3]
            b = paired_scores(clf, args.digit, before, pb, hb)
            del b["pred"]
            row["bands"][f"{lo}-{hi}"] = b
            print(f"  new model only at {lo} <= t < {hi}: PUL {b['pul']:.1f} RK {b['rk']:.3f} "
                  f"moved {b['moved_f']:.1f}/{b['moved_r']:.1f}", flush=True)
    with open(Path(__file__).parent / "results.jsonl", "a") as fh:
        fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
