"""Do independent unlearning runs agree on the forgetting and disagree on the damage?

    python bench/study12/soup.py MODEL DIGIT RUNS [key=value ...] [scales=1,1.25]

Runs the job RUNS times with seeds 0..RUNS-1 (each seed records its own paths, draws its own batches and its
own Laplace points), keeps each run's weight change Δ_k = θ_k − θ₀, and evaluates on the benchmark's 512 paired
samples (seed 1234, DDIM-25): each run alone, and the "soup" θ₀ + s · mean_k Δ_k for each scale s. If the
forgetting is a direction the runs share and the retained seeds' spill-over is run-specific, averaging keeps the
first and shrinks the second (model soups: Wortsman et al. 2022; task arithmetic: Ilharco et al. 2023).
``shared=1``: the runs train on one recording of paths (seed0's) and differ only in their batch draws and
Laplace points (a job's cost: one recording, RUNS trainings). ``split=1``: one recording, the paths dealt out
to the runs (run r trains on paths r, r + RUNS, ...; the vote and its margin from all of them).
``vary=KEY:V1,V2``: on one recording, every seed once per value of KEY (no soup): a setting against the
default over the same seeds.
Prints PUL / u-FID ratio / retained-kept / retained-kept on confident originals / moved F/R per row.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402
from bench_quality import run_one  # noqa: E402
from diffusers import DDPMPipeline  # noqa: E402
from study10.calibrate import parse  # noqa: E402

from vdu_core import metrics  # noqa: E402
from vdu_core.config import UnlearnConfig  # noqa: E402
from vdu_core.reference import REFERENCE_DIR, load_mnist_5k  # noqa: E402
from vdu_core.sampling import sample_images  # noqa: E402


def main() -> None:
    model, digit, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    sets = parse(sys.argv[4:])
    scales = [float(s) for s in str(sets.pop("scales", "1")).split(",")]
    base_seed = int(sets.pop("seed0", 0))
    save = sets.pop("save", None)
    shared = bool(sets.pop("shared", 0))  # 1: every run trains on the same recorded paths (seed0's)
    vary = sets.pop("vary", None)  # "key:v1,v2": every run once per value (shared paths; no soup)
    split = bool(sets.pop("split", 0))  # 1: one recording, run r trains on the paths i with i % RUNS == r
    pipe = DDPMPipeline.from_pretrained(REFERENCE_DIR / model, use_safetensors=True)
    classifier = metrics.load_classifier("builtin:mnist")
    images, labels = load_mnist_5k()
    forget = images[labels == digit][:100]
    real_stats = metrics.feature_stats(metrics.extract_features(classifier, images[labels != digit]))
    before = sample_images(pipe.unet, pipe.scheduler, 512, seed=1234, steps=25)
    pb, cb = metrics.classify(classifier, before)
    fid_b = metrics.u_fid(before, real_stats, classifier)["value"]
    theta0 = {k: v.detach().clone() for k, v in pipe.unet.state_dict().items()}
    print(f"\n### bench/study12/soup.py {' '.join(sys.argv[1:])}\n", flush=True)
    print("| model | PUL % | u-FID ratio | ret.kept | ret.kept (conf ≥ 0.9) | moved F/R | train s |")
    print("|---|---:|---:|---:|---:|---:|---:|", flush=True)

    def evaluate(name: str, unet, secs: float = 0.0) -> None:
        after = sample_images(unet, pipe.scheduler, 512, seed=1234, steps=25)
        pa, _ = metrics.classify(classifier, after)
        rk = metrics.retained_kept(pb, pa, digit, before_conf=cb)
        fid_a = metrics.u_fid(after, real_stats, classifier)["value"]
        moved = (after - before).flatten(1).norm(dim=1)
        f = pb == digit
        print(f"| {name} | {metrics.pul(pb, pa, digit)['value']:.1f} | {fid_a / fid_b:.2f} | {rk['value']:.3f} | "
              f"{rk['by_confidence']['confident']['kept']:.3f} | {float(moved[f].mean()):.1f}/"
              f"{float(moved[~f].mean()):.1f} | {secs:.0f} |", flush=True)

    deltas = []
    paths = None
    if vary is not None:
        shared = True
        key, _, values = vary.partition(":")
        variants = [{key: parse([f"{key}={v}"])[key]} for v in values.split(",")]
    else:
        variants = [{}]
    if shared or split:
        from vdu_core import trajectory

        t0 = time.time()
        paths = trajectory.for_config(pipe.unet, pipe.scheduler, forget,
                                      UnlearnConfig.from_dict({"method": "vdu", **sets, "seed": base_seed}))
        print(f"recorded {len(paths.ends)} shared paths in {time.time() - t0:.0f} s", flush=True)
    for variant, r in ((v, r) for v in variants for r in range(runs)):
        cfg = UnlearnConfig.from_dict({"method": "vdu", **sets, **variant, "seed": base_seed + r})
        t0 = time.time()
        if paths is None:
            unet, _, _ = run_one(pipe, forget, cfg, [], Path.home() / ".cache" / "vdu")
        else:
            from vdu_core.loop import unlearn

            unet = copy.deepcopy(pipe.unet)
            tr = paths
            if split:
                idx = torch.arange(r, len(paths.ends), runs)
                tr = dataclasses.replace(paths, x=paths.x[:, idx], eps=paths.eps[:, idx], ends=paths.ends[idx],
                                         forget_like=paths.forget_like[idx],
                                         near=None if paths.near is None else paths.near[idx])
            unlearn(unet, pipe.scheduler, forget, cfg, trajectories=tr)
            unet.eval()
        secs = time.time() - t0
        sd = unet.state_dict()
        deltas.append({k: (sd[k] - theta0[k]) for k in theta0 if theta0[k].is_floating_point()})
        evaluate(f"run seed {base_seed + r}{''.join(f', {k} {v}' for k, v in variant.items())}", unet, secs)
    if vary is not None:
        return
    mean = {k: sum(d[k] for d in deltas) / runs for k in deltas[0]}
    if save:
        torch.save({"deltas": deltas}, save)
    if runs >= 2:
        a = torch.cat([deltas[0][k].flatten() for k in mean])
        b = torch.cat([deltas[1][k].flatten() for k in mean])
        cos = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
        print(f"\ncosine(Δ_0, Δ_1) = {cos:.3f}; |Δ_0| {float(a.norm()):.3f}, |Δ_1| {float(b.norm()):.3f}, "
              f"|mean| {float(torch.cat([mean[k].flatten() for k in mean]).norm()):.3f}\n", flush=True)
    for s in scales:
        unet = copy.deepcopy(pipe.unet)
        unet.load_state_dict({k: (theta0[k] + s * mean[k]) if k in mean else theta0[k] for k in theta0})
        evaluate(f"soup of {runs}, scale {s}", unet.eval())


if __name__ == "__main__":
    main()
