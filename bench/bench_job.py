"""What two cheaper ways of doing the default job's work save.

    python bench/bench_job.py [--model mnist-ddpm] [--paths 256] [--reps 20] [--batch 64]

Prints one table, every row measured in the same run on the same model (the default ``vdu`` settings):

* recording the model's own DDIM-25 paths (``trajectory.record``) in batches of 64 (the default, baseline)
  and of 128: seconds per path, and the ratio (2 threads here: 0.92–0.98 over three runs; the default stays 64);
* one training step of the trajectory target (push + anchors + Laplace penalty, forward and backward): the
  push and anchor batches through the network in two passes (the former step, baseline, written out here)
  and in one pass of twice the batch (the library's ``VDU.compute``): median seconds per step, and the ratio.

Both compute the same thing up to float rounding (sample ``i`` depends only on its seed; GroupNorm is per
sample), so a job's result does not depend on them (``tests/test_trajectory.py`` checks both properties).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from vdu_core import trajectory  # noqa: E402
from vdu_core.config import UnlearnConfig  # noqa: E402
from vdu_core.loop import Context  # noqa: E402
from vdu_core.methods import ForgetBatch, get_method  # noqa: E402
from vdu_core.objective import per_sample_mse, timestep_weights  # noqa: E402
from vdu_core.reference import REFERENCE_DIR, load_mnist_5k  # noqa: E402


def two_pass_step(method, ctx, batch) -> torch.Tensor:
    """The step as it was before one pass served both batches: the same draws, two forwards."""
    cfg = method.config
    x_t, t, target = method.push_states(ctx, batch)
    loss = (1.0 - cfg.gamma) * per_sample_mse(ctx.unet(x_t, t).sample, target).mean()
    xa, ta, eps_a, w_a = method.anchor_states(ctx)
    loss = loss + cfg.anchor_weight * (w_a * per_sample_mse(ctx.unet(xa, ta).sample, eps_a)).mean()
    return loss + cfg.laplace_weight * ctx.laplace.penalty()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="mnist-ddpm")
    ap.add_argument("--paths", type=int, default=256)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=None, help="the step's batch (default: the job's default)")
    args = ap.parse_args()
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(REFERENCE_DIR / args.model, use_safetensors=True)
    unet, sched = pipe.unet, pipe.scheduler
    cfg = UnlearnConfig.from_dict({"method": "vdu", **({"batch_size": args.batch} if args.batch else {})})
    images, labels = load_mnist_5k()
    forget = images[labels == 0][:100]

    rec = {}
    for bs in (64, 128, 64, 128):  # interleaved, best of two
        t0 = time.perf_counter()
        trajectory.record(unet, sched, args.paths, 0, cfg.trajectory_steps, batch_size=bs)
        rec[bs] = min(rec.get(bs, float("inf")), (time.perf_counter() - t0) / args.paths)

    tr = trajectory.build(unet, sched, forget, args.paths, 0, cfg.trajectory_steps, margin=cfg.anchor_margin)
    g = torch.Generator().manual_seed(0)
    ctx = Context(unet, sched, cfg, torch.device("cpu"), g, tr.ends)
    ctx.trajectories = tr
    ctx.laplace = trajectory.laplace_on(unet, tr, 128, 0)
    method = get_method("vdu")(cfg)
    x0 = forget[: cfg.batch_size]
    noise = torch.randn(x0.shape, generator=g)
    t = torch.full((len(x0),), 500)
    batch = ForgetBatch(x0, noise, t, sched.add_noise(x0, noise, t), timestep_weights(sched, t, "uniform"))
    unet.train()
    times: dict[str, list[float]] = {"two passes": [], "one pass": []}
    for _ in range(args.reps):
        for name in times:
            unet.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            loss = two_pass_step(method, ctx, batch) if name == "two passes" else method.compute(ctx, batch).loss
            loss.backward()
            times[name].append(time.perf_counter() - t0)
    two, one = statistics.median(times["two passes"]), statistics.median(times["one pass"])
    print(f"\n### bench/bench_job.py {args.model}: {torch.get_num_threads()} threads, {args.paths} paths, "
          f"{args.reps} steps each, batch {cfg.batch_size} + {cfg.batch_size}\n")
    print("| phase | baseline | now | now / baseline |")
    print("|---|---:|---:|---:|")
    print(f"| record a path (DDIM-{cfg.trajectory_steps}): batch 64 (default) → 128 | {rec[64] * 1e3:.1f} ms | "
          f"{rec[128] * 1e3:.1f} ms | {rec[128] / rec[64]:.2f} |")
    print(f"| training step (push + anchors + Laplace, fwd + bwd): two passes → one | {two:.3f} s | {one:.3f} s | "
          f"{one / two:.2f} |")


if __name__ == "__main__":
    main()
