"""The quality study: does unlearning forget the class *and* keep everything else?

    python bench/bench_quality.py --model mnist-ddpm --digits 0 4 7 --methods vdu vdu_paper gradient_ascent
    python bench/bench_quality.py --model mnist-ddpm-tiny --digits 0 --set vdu:anchor_weight=2 --samples 256

For each forgotten digit: a forget set of ``--forget-count`` real digits of that class, then each
method unlearns a fresh copy of the model (the same building blocks as ``vdu-core unlearn``:
posterior, anchors, loop) and is evaluated on ``--samples`` paired samples (same seeds before and
after; DDIM ``--sample-steps``) with the built-in classifier: PUL, u-FID of both models,
retained-kept share, largest single-class share, forget-set loss ratio, wall time of the
unlearning (posterior + anchors + loop), and how far the paired samples moved (mean pixel L2 between
before and after, over the seeds that were the forgotten class / another class: "moved F/R"; a method
that forgets selectively moves the first far and the second little). The original model's samples are
drawn once per model, and once more with twice the sampler steps from the same seeds: what that change,
which unlearns nothing, keeps of the retained seeds ("null ret.kept") is the yardstick for retained-kept —
a borderline digit flips under any change. "ret.kept (conf ≥ 0.9)": retained-kept over the originals the
classifier was sure of.
Prints one table and appends it, with the exact settings, to ``--log`` (markdown).
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


from vdu_core import metrics  # noqa: E402
from vdu_core.config import UnlearnConfig  # noqa: E402
from vdu_core.reference import REFERENCE_DIR, load_mnist_5k  # noqa: E402
from vdu_core.run import unlearn_model  # noqa: E402
from vdu_core.sampling import sample_images  # noqa: E402

FLOORS = {"pul": 90.0, "u_fid_ratio": 1.25, "retained_kept": 0.90}


def parse_sets(items: list[str]) -> dict[str, dict]:
    """``method:key=value`` -> {method: {key: value}}; ``key=value`` applies to every method."""
    out: dict[str, dict] = {}
    for item in items or []:
        scope, _, kv = item.rpartition(":") if ":" in item.split("=")[0] else ("*", "", item)
        key, _, value = kv.partition("=")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out.setdefault(scope or "*", {})[key] = parsed
    return out


def lineage_paths(model_dir: Path) -> list[Path]:
    return sorted((model_dir / "lineage").glob("step-*")) if (model_dir / "lineage").exists() else []


def run_one(pipe, forget, cfg: UnlearnConfig, lineage_states, cache_dir: Path):
    unet = copy.deepcopy(pipe.unet)
    t0 = time.time()
    report, _, _ = unlearn_model(unet, pipe.scheduler, forget, cfg, lineage_states=lineage_states,
                                 cache_dir=cache_dir)
    return unet.eval(), report, time.time() - t0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="mnist-ddpm")
    ap.add_argument("--digits", type=int, nargs="+", default=[0, 4, 7])
    ap.add_argument("--methods", nargs="+", default=["vdu", "vdu_paper", "gradient_ascent"])
    ap.add_argument("--set", action="append", default=[], help="method:key=value overrides")
    ap.add_argument("--forget-count", type=int, default=100)
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--sample-steps", type=int, default=50)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--lineage", action="store_true", help="use the model's lineage checkpoints (posterior)")
    ap.add_argument("--log", default="bench/results/quality.md")
    ap.add_argument("--tag", default="")
    ap.add_argument("--no-null", action="store_true", help="skip the twice-the-steps yardstick")
    args = ap.parse_args(argv)

    from diffusers import DDPMPipeline

    model_dir = Path(args.model) if Path(args.model).exists() else REFERENCE_DIR / args.model
    pipe = DDPMPipeline.from_pretrained(model_dir, use_safetensors=True)
    lineage_states = []
    if args.lineage:
        from vdu_core.models import load_unet_state

        lineage_states = [load_unet_state(p, pipe.unet) for p in lineage_paths(model_dir)]
    classifier = metrics.load_classifier("builtin:mnist")
    images, labels = load_mnist_5k()
    cache_dir = Path(os.environ.get("VDU_CACHE_DIR", Path.home() / ".cache" / "vdu"))
    overrides = parse_sets(args.set)

    t0 = time.time()
    before = sample_images(pipe.unet, pipe.scheduler, args.samples, seed=args.seed, steps=args.sample_steps)
    preds_b, conf_b = metrics.classify(classifier, before)
    t_before = time.time() - t0
    hist_b = metrics.class_histogram(preds_b, 10)
    print(f"{model_dir.name}: original class histogram over {args.samples} samples: {hist_b} "
          f"({t_before:.0f}s)", flush=True)
    preds_null = None
    args.null_steps = metrics.null_steps(args.sample_steps, pipe.scheduler.config.num_train_timesteps)
    if not args.no_null:  # the job's evaluation.null_yardstick, computed once for every digit
        null = sample_images(pipe.unet, pipe.scheduler, args.samples, seed=args.seed, steps=args.null_steps)
        preds_null, _ = metrics.classify(classifier, null)

    rows = []
    for k in args.digits:
        real_stats = metrics.feature_stats(metrics.extract_features(classifier, images[labels != k]))
        fid_b = metrics.u_fid(before, real_stats, classifier)["value"]
        forget = images[labels == k][: args.forget_count]
        for method in args.methods:
            params = {"method": method, **overrides.get("*", {}), **overrides.get(method, {})}
            cfg = UnlearnConfig.from_dict(params)
            unet, report, secs = run_one(pipe, forget, cfg, lineage_states, cache_dir)
            after = sample_images(unet, pipe.scheduler, args.samples, seed=args.seed, steps=args.sample_steps)
            preds_a, _ = metrics.classify(classifier, after)
            p = metrics.pul(preds_b, preds_a, k)["value"]
            sure = conf_b >= metrics.CONFIDENT_THRESHOLD  # PUL on the forget-class samples it was sure of
            p_sure = metrics.pul(preds_b[sure], preds_a[sure], k)
            rk_rec = metrics.retained_kept(preds_b, preds_a, k, before_conf=conf_b)
            rk = rk_rec["value"]
            share = metrics.largest_class_share(preds_a, num_classes=10)
            fid_a = metrics.u_fid(after, real_stats, classifier)["value"]
            col = metrics.collapse_check(preds_b, preds_a, k, u_fid_ratio=fid_a / fid_b)
            moved = (after - before).flatten(1).norm(dim=1)
            data_free = metrics.data_free_forgetting(pipe.unet, pipe.scheduler, before, after, forget,
                                                     seed=args.seed)["forget_like_drop"]
            was_forget = preds_b == k
            ok = (p is not None and p >= FLOORS["pul"] and fid_a / fid_b <= FLOORS["u_fid_ratio"]
                  and rk >= FLOORS["retained_kept"] and not col["value"])
            row = {"digit": k, "method": method, "pul": p, "u_fid_orig": fid_b, "u_fid_unl": fid_a,
                   "retained_kept": rk, "largest_share": share["value"], "largest_class": share["class"],
                   "forget_ratio": report.forget_loss_ratio, "steps": report.steps_run, "secs": secs,
                   "moved_forget": float(moved[was_forget].mean()) if was_forget.any() else float("nan"),
                   "moved_retained": float(moved[~was_forget].mean()),
                   "collapsed": col["value"], "meets_floors": ok, "data_free": data_free, "pul_sure": p_sure,
                   "stopped_by": report.stopped_by,
                   "rk_sure": rk_rec["by_confidence"]["confident"]["kept"],
                   "rk_null": (metrics.retained_kept(preds_b, preds_null, k)["value"]
                               if preds_null is not None else None),
                   "guard": (report.guard or {}).get("checks", []),
                   "params": {k2: v for k2, v in params.items() if k2 != "method"}}
            rows.append(row)
            print(fmt_row(row), flush=True)
            for g in row["guard"]:
                print(f"    guard step {g['step']}: retained drift {g['retained_drift']:.3f}, "
                      f"forget-like drift {g['forget_like_drift']:.3f}", flush=True)

    table = render(rows, args, model_dir, hist_b)
    print("\n" + table)
    log = Path(args.log)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as fh:
        fh.write(table + "\n")


HEADER = (f"| {'digit':>5} | {'method':<16} | {'PUL %':>6} | {'u-FID orig':>10} | {'u-FID unl':>9} | "
          f"{'ratio':>5} | {'ret.kept':>8} | {'top share':>9} | {'forget loss x':>13} | {'steps':>5} | "
          f"{'time s':>6} | {'moved F/R':>9} | {'data-free drop %':>16} | {'PUL % (conf ≥ 0.9)':>18} | "
          f"{'ret.kept (conf ≥ 0.9)':>21} | {'null ret.kept':>13} | floors |")


def fmt_row(r: dict) -> str:
    pul = f"{r['pul']:.1f}" if r["pul"] is not None else "n/a"
    verdict = "COLLAPSE" if r["collapsed"] else ("yes" if r["meets_floors"] else "no")
    df = r.get("data_free") or {}
    drop = f"{df['value']:.1f} ({df['n_before']}->{df['n_after']})" if df.get("computed") else "n/a"
    ps = r.get("pul_sure") or {}
    sure = f"{ps['value']:.1f} ({ps['n_before']}->{ps['n_after']})" if ps.get("computed") else "n/a"
    rk_sure = f"{r['rk_sure']:.3f}" if r.get("rk_sure") is not None else "n/a"
    rk_null = f"{r['rk_null']:.3f}" if r.get("rk_null") is not None else "n/a"
    return (f"| {r['digit']:>5} | {r['method']:<16} | {pul:>6} | {r['u_fid_orig']:>10.2f} | "
            f"{r['u_fid_unl']:>9.2f} | {r['u_fid_unl'] / r['u_fid_orig']:>5.2f} | {r['retained_kept']:>8.3f} | "
            f"{r['largest_share']:>6.3f} ({r['largest_class']}) | {r['forget_ratio']:>13.2f} | {r['steps']:>5} | "
            f"{r['secs']:>6.0f} | {r['moved_forget']:>4.1f}/{r['moved_retained']:<4.1f} | {drop:>16} | {sure:>18} | "
            f"{rk_sure:>21} | {rk_null:>13} | {verdict} |")


def render(rows, args, model_dir, hist_b) -> str:
    lines = [
        f"### {model_dir.name} {args.tag} ({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"forget set: {args.forget_count} real digits of the class; {args.samples} paired samples, "
        f"DDIM-{args.sample_steps}, seed {args.seed}; original histogram {hist_b}; "
        f"overrides {parse_sets(args.set) or 'none'}; lineage posterior: {args.lineage}"
        + ("" if args.no_null else f"; null ret.kept: the original itself with DDIM-{args.null_steps}, "
                                     "same seeds"),
        "",
        HEADER,
        "|" + "|".join("---" for _ in range(17)) + "|",
        *[fmt_row(r) for r in rows],
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
