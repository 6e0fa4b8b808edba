"""``vdu-core``: run VDU and evaluate it on a laptop, no service needed.

    vdu-core unlearn --model DIR --forget ARCHIVE --out DIR [--method vdu --steps 400 --param guidance_scale=3]
    vdu-core evaluate --original DIR --unlearned DIR --forget-class K [--forget ARCHIVE] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from vdu_core.config import EvalConfig, UnlearnConfig  # noqa: E402
from vdu_core.errors import VDUError  # noqa: E402

#: Flags that map one-to-one onto ``UnlearnConfig`` fields (the rest go through ``--param k=v``).
_TUNING_FLAGS = ("method", "gamma", "steps", "lr", "batch_size", "posterior", "seed", "device")


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _params(args) -> dict:
    params = {}
    for name in _TUNING_FLAGS:
        value = getattr(args, name, None)
        if value is not None:
            params[name] = value
    for item in args.param or []:
        if "=" not in item:
            raise VDUError(f"--param expects key=value, got {item!r}", field="param")
        key, value = item.split("=", 1)
        params[key.strip().replace("-", "_")] = _parse_value(value)
    return params


NULL_HELP = ("also report retained_kept_null: the original against itself with twice the DDIM steps, what a "
             "change that unlearns nothing keeps (one more sampling pass)")


def _eval_params(args) -> dict:
    ev = {}
    for name in ("forget_class", "num_samples", "sample_steps", "classifier"):
        value = getattr(args, name, None)
        if value is not None:
            ev[name] = value
    if getattr(args, "eval_seed", None) is not None:
        ev["seed"] = args.eval_seed
    if getattr(args, "no_eval", False):
        ev["enabled"] = False
    if getattr(args, "null_yardstick", False):
        ev["null_yardstick"] = True
    return ev


class _Bars:
    """One tqdm bar per phase, with every loss term in the postfix."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None
        self.phase = None

    def __call__(self, p) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if p.phase != self.phase or self.bar is None:
            self.close()
            self.phase = p.phase
            self.bar = tqdm(total=p.total, desc=p.phase, unit="step", file=sys.stderr, dynamic_ncols=True)
        self.bar.n = p.step
        post = {k: f"{v:.4g}" for k, v in p.losses.items() if k in ("stability", "plasticity", "function_space")}
        if p.phase == "unlearn":
            post["ratio"] = f"{p.forget_loss_ratio:.2f}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _unlearn_sd(args) -> int:
    """A Stable Diffusion model (``vdu_core.sd``): SD parameters; evaluation options via --eval-param."""
    from vdu_core.sd.run import run_job

    ev = {}
    for item in args.eval_param or []:
        if "=" not in item:
            raise VDUError(f"--eval-param expects key=value, got {item!r}", field="eval_param")
        key, value = item.split("=", 1)
        ev[key.strip().replace("-", "_")] = _parse_value(value)
    if args.eval_seed is not None:
        ev["seed"] = args.eval_seed
    if args.no_eval:
        ev["enabled"] = False
    bars = _Bars(not args.json and not args.quiet)
    try:
        result = run_job(args.model, args.forget, args.out, _params(args), ev, lineage=args.lineage or (),
                         revision=args.revision, cache_dir=args.cache_dir, on_progress=bars)
    finally:
        bars.close()
    print(json.dumps({"out_dir": str(result.out_dir), "metrics": result.metrics}, indent=2, default=str))
    if not args.json:
        print(f"\nsanitized pipeline: {result.out_dir}  (StableDiffusionPipeline.from_pretrained)")
    return 0


def cmd_unlearn(args) -> int:
    from vdu_core.run import run_unlearning
    from vdu_core.sd.models import is_sd_model

    if is_sd_model(args.model, revision=args.revision):
        return _unlearn_sd(args)
    config = UnlearnConfig.from_dict(_params(args))
    evaluation = EvalConfig.from_dict(_eval_params(args), prefix="evaluation")
    bars = _Bars(not args.json and not args.quiet)
    try:
        result = run_unlearning(args.model, args.forget, args.out, config, evaluation, lineage=args.lineage or (),
                                revision=args.revision, cache_dir=args.cache_dir, on_progress=bars)
    finally:
        bars.close()
    if args.json:
        print(json.dumps({"out_dir": str(result.out_dir), "metrics": result.metrics}, indent=2, default=str))
    else:
        from vdu_core.metrics import format_table

        print(format_table({"metrics": result.metrics}))
        print(f"\nsanitized pipeline: {result.out_dir}  (DDPMPipeline.from_pretrained)")
        if (result.out_dir / "samples" / "before.png").exists():
            print(f"sample grids: {result.out_dir / 'samples'}/before.png, after.png")
    return 0


def cmd_evaluate(args) -> int:
    from vdu_core import metrics

    evaluation = EvalConfig.from_dict(_eval_params(args), prefix="evaluation")
    forget_images = None
    if args.forget:
        from vdu_core import forget_set, models

        unet_cfg = models.load_pipeline(args.original).unet.config
        side = unet_cfg.sample_size if isinstance(unet_cfg.sample_size, int) else unet_cfg.sample_size[0]
        forget_images = forget_set.to_tensor(forget_set.decode_forget_set(args.forget),
                                             channels=unet_cfg.in_channels, resolution=side)
    result = metrics.evaluate_dirs(Path(args.original), Path(args.unlearned), forget_images, evaluation,
                                   out_dir=Path(args.out) if args.out else None)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(metrics.format_table(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vdu-core", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    u = sub.add_parser("unlearn", help="make a diffusers DDPM forget what a set of images shows")
    u.add_argument("--model", required=True, help="pipeline/UNet folder, .safetensors file or hub id")
    u.add_argument("--revision", help="hub revision (commit) when --model is a hub id")
    u.add_argument("--forget", required=True, help="zip, tar or folder of PNG/JPEG/WebP images")
    u.add_argument("--out", required=True, help="output folder (a diffusers pipeline + evidence)")
    u.add_argument("--lineage", nargs="*", help="extra checkpoints of the same training run (posterior)")
    u.add_argument("--method", choices=["vdu", "vdu_paper", "gradient_ascent", "esd"], help="esd: SD models only")
    u.add_argument("--gamma", type=float)
    u.add_argument("--steps", type=int)
    u.add_argument("--lr", type=float)
    u.add_argument("--batch-size", dest="batch_size", type=int)
    u.add_argument("--posterior", choices=["auto", "lineage", "self_snapshots", "fisher", "isotropic"])
    u.add_argument("--seed", type=int)
    u.add_argument("--device", choices=["auto", "cpu", "cuda"])
    u.add_argument("--param", action="append", metavar="KEY=VALUE", help="any other method parameter")
    u.add_argument("--forget-class", dest="forget_class", type=int, help="class index for PUL / u-FID")
    u.add_argument("--classifier", help="'builtin:mnist' (default) or a classifier folder")
    u.add_argument("--num-samples", dest="num_samples", type=int, help="paired samples for the metrics")
    u.add_argument("--sample-steps", dest="sample_steps", type=int, help="DDIM steps for sampling")
    u.add_argument("--eval-seed", dest="eval_seed", type=int)
    u.add_argument("--no-eval", dest="no_eval", action="store_true", help="skip the evaluation")
    u.add_argument("--null-yardstick", dest="null_yardstick", action="store_true", help=NULL_HELP)
    u.add_argument("--eval-param", dest="eval_param", action="append", metavar="KEY=VALUE",
                   help="an SD evaluation option (vdu_core.sd.config.SDEvalConfig), e.g. detector=nudenet")
    u.add_argument("--cache-dir", dest="cache_dir", help="posterior cache (default ~/.cache/vdu)")
    u.add_argument("--json", action="store_true", help="print the result as JSON")
    u.add_argument("--quiet", action="store_true", help="no progress bars")
    u.set_defaults(func=cmd_unlearn)

    e = sub.add_parser("evaluate", help="compare an original and an unlearned pipeline")
    e.add_argument("--original", required=True)
    e.add_argument("--unlearned", required=True)
    e.add_argument("--forget-class", dest="forget_class", type=int)
    e.add_argument("--forget", help="forget-set archive, for the forget-set loss")
    e.add_argument("--classifier")
    e.add_argument("--num-samples", dest="num_samples", type=int)
    e.add_argument("--sample-steps", dest="sample_steps", type=int)
    e.add_argument("--eval-seed", dest="eval_seed", type=int)
    e.add_argument("--null-yardstick", dest="null_yardstick", action="store_true", help=NULL_HELP)
    e.add_argument("--out", help="folder for before/after grids")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except VDUError as exc:
        where = f" [{exc.field}]" if exc.field else ""
        print(f"error: {exc.code}{where}: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
