"""Can a job tell, without a classifier, that its push was too weak, and fix it by pushing on?

    python bench/study10/calibrate.py MODEL DIGIT [rounds=2 extra=100 boost=1.4 key=value ...]

Runs the default ``vdu`` job (``key=value`` overrides) on the job's own recorded paths, then, after every round:
the job's *training* seeds re-sampled with the current weights (from each recorded path's own start, DDIM-25)
— the forget-like ones all, ``retained_check`` of the anchored ones — and voted against the job's own pool
(``ForgetVote.label``): the training-seed drop (share of forget-like paths no longer forget-like) and the
anchored paths' mean pixel move, both data-free; beside them the classifier's PUL and retained-kept on those
training seeds (study only), and the usual evaluation on 512 held-out paired seeds (1234). A next round
trains ``extra`` more steps with η multiplied by ``boost`` (the lr schedule restarted), from the weights the
last round left.
"""

from __future__ import annotations

import copy
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch  # noqa: E402
from diffusers import DDPMPipeline  # noqa: E402

from vdu_core import loop, metrics, trajectory  # noqa: E402
from vdu_core.config import UnlearnConfig  # noqa: E402
from vdu_core.methods import ForgetVote  # noqa: E402
from vdu_core.reference import REFERENCE_DIR, load_mnist_5k  # noqa: E402
from vdu_core.sampling import sample_from, sample_images  # noqa: E402


def parse(args: list[str]) -> dict:
    out = {}
    for k, v in (a.split("=", 1) for a in args):
        for cast in (int, float):
            try:
                out[k] = cast(v)
                break
            except ValueError:
                continue
        else:
            out[k] = v
    return out


def main() -> None:
    model, digit = sys.argv[1], int(sys.argv[2])
    sets = parse(sys.argv[3:])
    rounds, extra, boost = int(sets.pop("rounds", 2)), int(sets.pop("extra", 100)), float(sets.pop("boost", 1.4))
    r_check = int(sets.pop("retained_check", 256))
    cfg = UnlearnConfig.from_dict({"method": "vdu", **sets})
    pipe = DDPMPipeline.from_pretrained(REFERENCE_DIR / model, use_safetensors=True)
    orig, sch = pipe.unet.eval(), pipe.scheduler
    classifier = metrics.load_classifier("builtin:mnist")
    images, labels = load_mnist_5k()
    forget = images[labels == digit][:100]
    real = metrics.feature_stats(metrics.extract_features(classifier, images[labels != digit]))
    before = sample_images(orig, sch, 512, seed=1234, steps=25)
    pb, _ = metrics.classify(classifier, before)
    fid_b = metrics.u_fid(before, real, classifier)["value"]

    t0 = time.time()
    paths = trajectory.for_config(orig, sch, forget, cfg)
    vote = ForgetVote(orig, sch, paths.ends, forget, seed=cfg.seed)
    assert torch.equal(vote.labels, paths.forget_like)
    f_idx, r_idx = paths.forget_idx, paths.retained_idx
    r_sub = r_idx[torch.randperm(len(r_idx), generator=torch.Generator().manual_seed(7))[:r_check]]
    tp_b, _ = metrics.classify(classifier, paths.ends)
    print(f"{model} digit {digit} {sets}: {len(f_idx)} forget-like, {len(r_idx)} anchored paths "
          f"(classifier: {int((tp_b[f_idx] == digit).sum())} of the forget-like are the digit, "
          f"{int((tp_b == digit).sum())} of all); recorded in {time.time() - t0:.0f}s", flush=True)
    is_d = tp_b == digit
    for name, m in (("the digit", is_d), ("the others", ~is_d)):
        hist = torch.bincount(vote.counts[m], minlength=vote.k + 1).tolist()
        print(f"vote counts (forget images among the 10 nearest; bar {vote.bar}) of {name}: {hist}")
    print("| round | steps | η | train drop % (vote) | train PUL % (clf) | anchored moved | anchored kept (clf) "
          "| check s | PUL % | ret.kept | u-FID ratio | data-free drop % |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    unet = copy.deepcopy(orig)
    lap = trajectory.laplace_on(unet, paths, cfg.laplace_points, cfg.seed)  # of the original weights, every round
    trajectory.laplace_on = lambda *a, **k: lap
    total, eta = 0, cfg.guidance_scale
    for r in range(rounds + 1):
        steps = cfg.steps if r == 0 else extra
        rcfg = UnlearnConfig.from_dict({**cfg.to_dict(), "guidance_scale": eta, "steps": steps})
        loop.unlearn(unet, sch, forget, rcfg, trajectories=paths)
        total += steps
        unet.eval()
        tc = time.time()
        ends_f = sample_from(unet, sch, paths.x[0, f_idx], steps=len(paths.t))
        still = vote.label(orig, sch, ends_f, f_idx)
        ends_r = sample_from(unet, sch, paths.x[0, r_sub], steps=len(paths.t))
        moved = (ends_r - paths.ends[r_sub]).flatten(1).pow(2).mean(1).sqrt().mean()
        check_s = time.time() - tc
        pf, _ = metrics.classify(classifier, ends_f)
        pr, _ = metrics.classify(classifier, ends_r)
        was_d = tp_b[f_idx] == digit
        train_pul = 100.0 * (1 - int((pf[was_d] == digit).sum()) / max(1, int(was_d.sum())))
        keep_mask = tp_b[r_sub] != digit
        r_kept = float((pr[keep_mask] == tp_b[r_sub][keep_mask]).float().mean())
        after = sample_images(unet, sch, 512, seed=1234, steps=25)
        pa, _ = metrics.classify(classifier, after)
        pul = metrics.pul(pb, pa, digit)["value"]
        rk = metrics.retained_kept(pb, pa, digit)["value"]
        fid = metrics.u_fid(after, real, classifier)["value"] / fid_b
        df = metrics.data_free_forgetting(orig, sch, before, after, forget, seed=1234)
        print(f"| {r} | {total} | {eta:.2f} | {100.0 * (1 - float(still.float().mean())):.1f} | {train_pul:.1f} "
              f"| {float(moved):.3f} | {r_kept:.3f} | {check_s:.0f} | {pul:.1f} | {rk:.3f} | {fid:.2f} "
              f"| {df['forget_like_drop'].get('value', float('nan')):.1f} |", flush=True)
        eta *= boost
    print(f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
