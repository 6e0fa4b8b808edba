"""Where along one run the default job forgets and where it loses the retained seeds.

    python bench/study9/steps.py MODEL DIGIT [key=value ...]

Runs the default ``vdu`` job (with ``key=value`` overrides) once, keeps the weights every ``--every`` steps,
and evaluates each kept state like ``bench_quality.py`` (512 paired DDIM-25 samples, seed 1234): PUL,
retained-kept, u-FID ratio, the data-free drop; plus the data-free signals a job could watch without a
classifier, on a small held-out sample (the first ``--watch`` of the same seeds): the vote's forget-like
drop and the mean pixel drift of the paths the vote calls forget-like / not.
"""

from __future__ import annotations

import copy
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from diffusers import DDPMPipeline  # noqa: E402

from vdu_core import metrics  # noqa: E402
from vdu_core.config import UnlearnConfig  # noqa: E402
from vdu_core.reference import REFERENCE_DIR, load_mnist_5k  # noqa: E402
from vdu_core.run import unlearn_model  # noqa: E402
from vdu_core.sampling import sample_images  # noqa: E402


def main() -> None:
    model, digit = sys.argv[1], int(sys.argv[2])
    sets = dict(a.split("=", 1) for a in sys.argv[3:] if "=" in a)
    every = int(sets.pop("every", 50))
    watch = int(sets.pop("watch", 128))
    params = {"method": "vdu"}
    for k, v in sets.items():
        try:
            params[k] = int(v)
        except ValueError:
            try:
                params[k] = float(v)
            except ValueError:
                params[k] = v
    cfg = UnlearnConfig.from_dict(params)
    pipe = DDPMPipeline.from_pretrained(REFERENCE_DIR / model, use_safetensors=True)
    sch = pipe.scheduler
    classifier = metrics.load_classifier("builtin:mnist")
    images, labels = load_mnist_5k()
    forget = images[labels == digit][:100]
    real = metrics.feature_stats(metrics.extract_features(classifier, images[labels != digit]))
    before = sample_images(pipe.unet, sch, 512, seed=1234, steps=25)
    pb, _ = metrics.classify(classifier, before)
    fid_b = metrics.u_fid(before, real, classifier)["value"]

    unet = copy.deepcopy(pipe.unet)
    kept: dict[int, dict] = {}

    def on_progress(p) -> None:
        if p.phase == "unlearn" and p.step % every == 0:
            kept[p.step] = copy.deepcopy(unet.state_dict())

    t0 = time.time()
    unlearn_model(unet, sch, forget, cfg, on_progress=on_progress)
    print(f"{model} digit {digit} {params}: trained in {time.time() - t0:.0f}s", flush=True)
    print("| step | PUL % | ret.kept | u-FID ratio | data-free drop % (512) | watch drop % | watch moved FL / other |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for step, state in sorted(kept.items()):
        unet.load_state_dict(state)
        unet.eval()
        after = sample_images(unet, sch, 512, seed=1234, steps=25)
        pa, _ = metrics.classify(classifier, after)
        pul = metrics.pul(pb, pa, digit)["value"]
        rk = metrics.retained_kept(pb, pa, digit)["value"]
        fid = metrics.u_fid(after, real, classifier)["value"] / fid_b
        df = metrics.data_free_forgetting(pipe.unet, sch, before, after, forget, seed=1234)
        w = metrics.data_free_forgetting(pipe.unet, sch, before[:watch], after[:watch], forget, seed=1234)
        print(f"| {step} | {pul:.1f} | {rk:.3f} | {fid:.2f} | {df['forget_like_drop'].get('value', float('nan')):.1f} "
              f"| {w['forget_like_drop'].get('value', float('nan')):.1f} "
              f"| {w['moved_forget_like'].get('value', float('nan')):.3f} / {w['moved_other']['value']:.3f} |",
              flush=True)


if __name__ == "__main__":
    main()
