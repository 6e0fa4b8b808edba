"""Cost of the literal VDU objective against a plain denoising fine-tune, and of each posterior.

    python bench/bench_objective.py [--model reference/mnist-ddpm] [--batch 16] [--reps 30]

Prints two tables: (1) median seconds per optimisation step of a plain denoising fine-tune step and
of a VDU step (method ``vdu_paper``: plasticity forward/backward + the stability term's analytic
gradient over every parameter), same model, same batch, interleaved, and their ratio (target
<= 1.10); (2) seconds to estimate each posterior variant on the same model.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from vdu_core import posterior  # noqa: E402
from vdu_core.config import UnlearnConfig  # noqa: E402
from vdu_core.loop import Context  # noqa: E402
from vdu_core.methods import ForgetBatch, get_method  # noqa: E402
from vdu_core.objective import StabilityRegularizer, timestep_weights  # noqa: E402
from vdu_core.reference import RECIPES, REFERENCE_DIR, build_scheduler, build_unet  # noqa: E402


def load(model: str):
    from diffusers import DDPMPipeline

    path = REFERENCE_DIR / model if not os.path.isabs(model) else model
    if os.path.exists(os.path.join(path, "model_index.json")):
        pipe = DDPMPipeline.from_pretrained(path, use_safetensors=True)
        return pipe.unet, pipe.scheduler, f"{model} (pretrained)"
    recipe = RECIPES.get(os.path.basename(str(model)), RECIPES["mnist-ddpm"])
    torch.manual_seed(0)
    return build_unet(recipe), build_scheduler(recipe), f"{recipe.name} recipe (random weights)"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="mnist-ddpm")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--posterior-samples", type=int, default=64)
    args = ap.parse_args()

    unet, sched, label = load(args.model)
    n_params = sum(p.numel() for p in unet.parameters())
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand((args.batch, 1, 28, 28), generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, sched.config.num_train_timesteps, (args.batch,), generator=g)
    x_t = sched.add_noise(x0, noise, t)
    batch = ForgetBatch(x0, noise, t, x_t, timestep_weights(sched, t, "uniform"))

    cfg = UnlearnConfig.from_dict({"method": "vdu_paper", "posterior": "isotropic", "batch_size": args.batch})
    params = list(unet.parameters())
    post = posterior.estimate(unet, sched, cfg)
    reg = StabilityRegularizer(params, post.mu, post.var)
    method = get_method("vdu_paper")(cfg)
    ctx = Context(unet, sched, cfg, torch.device("cpu"), g)
    opt = torch.optim.Adam(params, lr=1e-6)
    unet.train()

    def plain_step():
        opt.zero_grad(set_to_none=True)
        F.mse_loss(unet(x_t, t).sample, noise).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    def vdu_step():
        opt.zero_grad(set_to_none=True)
        terms = method.compute(ctx, batch)
        terms.loss.backward()
        reg.add_grad_(terms.stability_scale)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    for _ in range(3):
        plain_step()
        vdu_step()
    times = {"plain": [], "vdu": []}
    for _ in range(args.reps):
        for name, fn in (("plain", plain_step), ("vdu", vdu_step)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    plain, vdu = statistics.median(times["plain"]), statistics.median(times["vdu"])
    print(f"\nModel: {label}, {n_params:,} parameters; batch {args.batch}; {args.reps} interleaved reps; "
          f"threads {torch.get_num_threads()}\n")
    print(f"{'step':<42}{'median s/step':>15}{'ratio':>8}")
    print(f"{'plain denoising fine-tune':<42}{plain:>15.4f}{1.0:>8.3f}")
    print(f"{'VDU (literal objective, vdu_paper)':<42}{vdu:>15.4f}{vdu / plain:>8.3f}")
    print(f"\nVDU / plain = {vdu / plain:.3f} (target <= 1.10): {'PASS' if vdu / plain <= 1.10 else 'FAIL'}\n")

    print(f"{'posterior':<16}{'seconds':>10}  inputs")
    lineage = [build_unet(RECIPES["mnist-ddpm"]).state_dict() for _ in range(2)] if "mnist-ddpm" in label else []
    variants = [
        ("isotropic", {}, "none"),
        ("lineage", {"lineage_states": lineage}, f"{len(lineage) + 1} checkpoints") if lineage else None,
        ("fisher", {}, f"{args.posterior_samples} own samples (DDIM-25) + per-sample gradients"),
        ("self_snapshots", {}, f"{args.posterior_samples} own samples + 100 training steps"),
    ]
    for v in filter(None, variants):
        kind, kw, inputs = v
        c = UnlearnConfig.from_dict({"posterior": kind, "posterior_samples": args.posterior_samples,
                                     "posterior_steps": 100, "batch_size": args.batch})
        t0 = time.perf_counter()
        posterior.estimate(unet, sched, c, **kw)
        print(f"{kind:<16}{time.perf_counter() - t0:>10.2f}  {inputs}")


if __name__ == "__main__":
    main()
