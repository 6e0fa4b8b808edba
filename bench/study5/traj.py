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
from diffusers import DDIMScheduler, DDPMPipeline  # noqa: E402

from vdu_core import metrics  # noqa: E402
from vdu_core.laplace import KroneckerLaplace  # noqa: E402
from vdu_core.methods import empirical_forget_eps, forget_like_vote  # noqa: E402
from vdu_core.reference import REFERENCE_DIR, load_mnist_5k  # noqa: E402
from vdu_core.sampling import initial_noise, sample_images  # noqa: E402


@torch.no_grad()
def trajectories(unet, scheduler, z: torch.Tensor, steps: int, bs: int = 128, pick=None, start: int = 0):
    """DDIM from ``z``: (xs [K,N,...] inputs at each step, eps [K,N,...] the model's ε there, ts [K], end).

    ``pick(t)``, if given, returns the model to use at step t (e.g. the unlearned one in one band only).
    ``start``: ``z`` is the state at DDIM step ``start`` (not pure noise); only the remaining steps run.
    """
    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(steps)
    ddim.timesteps = ddim.timesteps[start:]
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


def flow_sensitivity(unet, scheduler, xs: torch.Tensor, ends: torch.Tensor, steps: int, ks, delta: float = 0.5,
                     seed: int = 9) -> torch.Tensor:
    """S [K+1, N]: how far the endpoint of each trajectory moves per unit of a random perturbation of its
    state entering DDIM step k (‖Φ_k(x_k + δu) − Φ_k(x_k)‖ / δ, ‖u‖ = 1), measured at the steps ``ks`` and
    carried back to the steps before them; S[K] = 1 (the endpoint itself)."""
    K, N = xs.shape[0], xs.shape[1]
    S = torch.ones(K + 1, N)
    g = torch.Generator().manual_seed(seed)
    done = K
    for k in sorted(ks, reverse=True):
        u = torch.randn(xs[k].shape, generator=g)
        u = u / u.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        pe = trajectories(unet, scheduler, xs[k] + delta * u, steps, start=k)[3]
        S[k:done] = ((pe - ends).flatten(1).norm(dim=1) / delta).unsqueeze(0)
        done = k
    S[:done] = S[done]
    return S


def paired_scores(clf, digit: int, before: torch.Tensor, pb: torch.Tensor, after: torch.Tensor) -> dict:
    """PUL, retained-kept and mean distance moved (forget-class seeds / the others) of paired samples."""
    pa = metrics.classify(clf, after)[0]
    moved = (after - before).flatten(1).norm(dim=1)
    wf = pb == digit
    return {"pul": metrics.pul(pb, pa, digit)["value"], "rk": metrics.retained_kept(pb, pa, digit)["value"],
            "moved_f": float(moved[wf].mean()), "moved_r": float(moved[~wf].mean()), "pred": pa}


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
    ap.add_argument("--anchor-weighting", choices=["flat", "x0", "step", "endpoint"], default="flat",
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
    ap.add_argument("--kfac", type=float, default=0.0,
                    help="weight of the Kronecker-factored Gauss-Newton stability term (session 7)")
    ap.add_argument("--kfac-points", type=int, default=1024,
                    help="preservation points: retained trajectory points at every t (weight: --anchor-weighting)")
    ap.add_argument("--kfac-high", type=int, default=0,
                    help="extra preservation points at t >= tmax on every trajectory, forget ones included")
    ap.add_argument("--rollout", type=float, default=0.0,
                    help="weight of an endpoint loss: roll --rollout-batch retained training seeds through the "
                         "whole DDIM-(--rollout-steps) sampler with gradients, match the original's endpoints")
    ap.add_argument("--rollout-batch", type=int, default=8)
    ap.add_argument("--rollout-steps", type=int, default=10)
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
    is_f = truth if args.label == "oracle" else forget_like_vote(orig, sch, ends, forget)
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
    else:
        tw = torch.ones(len(ts))
    anchor_p = None
    if args.anchor_weighting in ("step", "endpoint"):
        ab_next = torch.cat([ab[ts[1:]], torch.ones(1)])
        c = (1 - ab_next).sqrt() - ab_next.sqrt() * ((1 - ab[ts]) / ab[ts]).sqrt()
        tw = c**2 / c[(ts - 500).abs().argmin()] ** 2
    if args.anchor_weighting == "endpoint":
        # session 7: an ε error at step k moves the next state by c_k Δε, and the endpoint by S[k+1] times
        # that; anchors drawn ∝ c_k² S[k+1]² (importance sampling), each weighted by the mean weight
        scache = Path(f"/tmp/s5/sens-{args.model}-{args.n_train}-{args.traj_steps}.pt")
        if scache.exists():
            S = torch.load(scache)
        else:
            S = flow_sensitivity(orig, sch, xs, ends, args.traj_steps, ks=range(1, K, 3))
            torch.save(S, scache)
        W = tw.view(-1, 1) * S[1:, ret_idx] ** 2 / S[1:, ret_idx].pow(2).mean()  # [K, R], mean over t as step
        print("endpoint sensitivity S per t (median / p90):",
              {int(ts[k]): (round(float(S[k + 1, ret_idx].median()), 2),
                            round(float(S[k + 1, ret_idx].quantile(0.9)), 2)) for k in range(0, K, 4)}, flush=True)
        anchor_p = W.flatten() / W.sum()
        tw_mean = float(W.mean())
    shown = {int(t): round(float(w), 2) for t, w in zip(ts[::4], tw[::4], strict=True)}
    print("anchor weight per t:", shown, flush=True)
    unet = copy.deepcopy(orig).train()
    if args.lora:
        add_lora(unet, args.lora)
    kf = None
    if args.kfac and not args.load:
        pi = ret_idx[torch.randint(0, len(ret_idx), (args.kfac_points,), generator=torch.Generator().manual_seed(5))]
        pk = torch.randint(0, K, (args.kfac_points,), generator=torch.Generator().manual_seed(6))
        if args.kfac_high:
            hi_k = (ts >= args.tmax).nonzero().flatten()
            gh = torch.Generator().manual_seed(7)
            pi = torch.cat([pi, torch.randint(0, len(is_f), (args.kfac_high,), generator=gh)])
            pk = torch.cat([pk, hi_k[torch.randint(0, len(hi_k), (args.kfac_high,), generator=gh)]])
        kf = KroneckerLaplace(unet, xs[pk, pi], ts[pk], tw[pk], seed=3)
        for p in kf.uncovered(list(unet.parameters())):
            p.requires_grad_(False)
        print(f"K-FAC factors on {len(pk)} points ({time.time() - t0:.0f}s)", flush=True)
    if args.rollout:
        ro = DDIMScheduler.from_config(sch.config)
        ro.set_timesteps(args.rollout_steps)
        ro_cache = Path(f"/tmp/s5/ends-{args.model}-{args.n_train}-{args.rollout_steps}.pt")
        if ro_cache.exists():
            ro_ends = torch.load(ro_cache)
        else:
            ro_ends = trajectories(orig, sch, z, args.rollout_steps)[3]
            torch.save(ro_ends, ro_cache)

        def rollout_loss():
            ri = ret_idx[torch.randint(0, len(ret_idx), (args.rollout_batch,), generator=g)]
            x = z[ri]
            for t in ro.timesteps:
                x = ro.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
            return (x.clamp(-1, 1) - ro_ends[ri]).pow(2).mean()
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
        if anchor_p is None:
            ri = ret_idx[torch.randint(0, len(ret_idx), (nb,), generator=g)]
            rk = torch.randint(0, K, (nb,), generator=g)
            tw_r = tw[rk]
        else:
            j = torch.multinomial(anchor_p, nb, replacement=True, generator=g)
            rk, ri = j // len(ret_idx), ret_idx[j % len(ret_idx)]
            tw_r = torch.full((nb,), tw_mean)
        xr, tr, tgt_r = xs[rk, ri], ts[rk], eps0[rk, ri]
        opt.zero_grad(set_to_none=True)
        lf = (unet(xf, tf).sample - tgt_f).pow(2).mean()
        in_band = ((tr >= args.tmin) & (tr < args.tmax)).float()
        wa = (args.anchor_weight * in_band + (args.anchor_weight_out or args.anchor_weight) * (1 - in_band)) * tw_r
        if args.anchor_weight or args.anchor_weight_out:
            per = (unet(xr, tr).sample - tgt_r).pow(2).flatten(1).mean(1)
        else:
            per = torch.zeros(nb)
        lr_ = per.mean()
        loss = lf + (wa * per).mean()
        if kf is not None:
            pen = kf.penalty()
            loss = loss + args.kfac * pen
        if args.rollout:
            lro = rollout_loss()
            loss = loss + args.rollout * lro
        loss.backward()
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
            kfs = f" kfac {pen.item():.5f}" if kf is not None else ""
            kfs += f" endpoint {lro.item():.5f}" if args.rollout else ""
            print(f"step {step}: push {lf.item():.4f} anchor {lr_.item():.5f}{kfs} ({time.time() - t0:.0f}s)",
                  flush=True)
    train_s = time.time() - t0
    unet.eval()
    if kf is not None:
        # is the quadratic model right? the true sensitivity-weighted ε change on fresh retained points
        gv = torch.Generator().manual_seed(11)
        vi = ret_idx[torch.randint(0, len(ret_idx), (512,), generator=gv)]
        vk = torch.randint(0, K, (512,), generator=gv)
        with torch.no_grad():
            true = ((unet(xs[vk, vi], ts[vk]).sample - eps0[vk, vi]).pow(2).flatten(1).mean(1) * tw[vk]).mean()
            print(f"K-FAC check: penalty {kf.penalty().item():.5f} vs measured {true.item():.5f}", flush=True)
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
