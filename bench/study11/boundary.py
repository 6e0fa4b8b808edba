"""Are the retained seeds a job loses the model's borderline samples?

    python bench/study11/boundary.py MODEL DIGIT [key=value ...]

Draws the original's 512 evaluation samples (seed 1234, DDIM-25, the benchmark's), classifies them, and splits
the retained seeds (not the digit) by the classifier's confidence in the original's sample. Per bin: how many,
how many two changes that unlearn nothing flip (the *same* model sampled with DDIM-50 from the same seeds; the
model's lineage checkpoint 250 training steps before the final one, DDIM-25: the model's own class instability),
and how many the default job (``key=value`` overrides; ``job=0``: none) flips. If one model
loses more retained seeds than another at the same pixel move, this says whether it is because it draws more
borderline digits, or because its job moves them more.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402
from bench_quality import lineage_paths, run_one  # noqa: E402
from diffusers import DDPMPipeline  # noqa: E402
from study10.calibrate import parse  # noqa: E402

from vdu_core import metrics  # noqa: E402
from vdu_core.config import UnlearnConfig  # noqa: E402
from vdu_core.models import load_unet_state  # noqa: E402
from vdu_core.reference import REFERENCE_DIR, load_mnist_5k  # noqa: E402
from vdu_core.sampling import sample_images  # noqa: E402

BINS = [(0.0, 0.9), (0.9, 0.99), (0.99, 0.999), (0.999, 1.01)]


def main() -> None:
    model, digit = sys.argv[1], int(sys.argv[2])
    sets = parse(sys.argv[3:])
    job = bool(sets.pop("job", 1))
    cfg = UnlearnConfig.from_dict({"method": "vdu", **sets})
    pipe = DDPMPipeline.from_pretrained(REFERENCE_DIR / model, use_safetensors=True)
    classifier = metrics.load_classifier("builtin:mnist")
    images, labels = load_mnist_5k()
    forget = images[labels == digit][:100]
    before = sample_images(pipe.unet, pipe.scheduler, 512, seed=1234, steps=25)
    pb, cb = metrics.classify(classifier, before)
    changed = {"DDIM-50": sample_images(pipe.unet, pipe.scheduler, 512, seed=1234, steps=50)}
    checkpoints = lineage_paths(REFERENCE_DIR / model)
    if len(checkpoints) >= 2:
        earlier = copy.deepcopy(pipe.unet)
        earlier.load_state_dict(load_unet_state(checkpoints[-2], earlier))
        changed[f"{checkpoints[-2].name}"] = sample_images(earlier, pipe.scheduler, 512, seed=1234, steps=25)
    secs = 0.0
    if job:
        unet, _, secs = run_one(pipe, forget, cfg, [], Path.home() / ".cache" / "vdu")
        changed["unlearned"] = sample_images(unet, pipe.scheduler, 512, seed=1234, steps=25)
    preds = {name: metrics.classify(classifier, x)[0] for name, x in changed.items()}
    moved = {name: (x - before).flatten(1).norm(dim=1) for name, x in changed.items()}
    ret = pb != digit
    print(f"\n### bench/study11/boundary.py {model} {digit} {sys.argv[3:]}\n")
    kept = ", ".join(f"{name} {float((p[ret] == pb[ret]).float().mean()):.3f}" for name, p in preds.items())
    print(f"retained-kept against the original's DDIM-25 samples: {kept}")
    if job:
        pa = preds["unlearned"]
        print(f"unlearned: PUL {metrics.pul(pb, pa, digit)['value']:.1f} %; job {secs:.0f} s")
    print("\n| original's confidence | retained seeds | share | "
          + " | ".join(f"kept / moved, {name}" for name in preds) + " |")
    print("|---|---:|---:|" + "---:|" * len(preds))
    for lo, hi in BINS:
        m = ret & (cb >= lo) & (cb < hi)
        n = int(m.sum())
        if n == 0:
            continue
        cells = " | ".join(f"{float((p[m] == pb[m]).float().mean()):.3f} / {float(moved[name][m].mean()):.2f}"
                           for name, p in preds.items())
        print(f"| [{lo}, {min(hi, 1.0)}) | {n} | {n / int(ret.sum()):.3f} | {cells} |")
    if not job:
        return
    lost = ret & (pa != pb)
    print(f"\nlost retained seeds: {int(lost.sum())}; their original's confidence: median "
          f"{float(cb[lost].median()):.3f}; the kept ones': {float(cb[ret & ~lost].median()):.4f}")
    per_class = [f"{c}: {int((lost & (pb == c)).sum())}/{int((ret & (pb == c)).sum())}"
                 for c in range(10) if c != digit]
    print("lost / retained per original class: " + ", ".join(per_class))
    print("lost went to: " + str(torch.bincount(pa[lost], minlength=10).tolist()))


if __name__ == "__main__":
    main()
