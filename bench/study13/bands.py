"""Where along the sampler does an unlearned model forget, and where does it lose retained seeds?

    python bench/study13/bands.py MODEL DIGIT DELTAS

DELTAS is a file written by ``bench/study12/soup.py … save=FILE`` (its first run's weight change is used).
The benchmark's 512 paired samples (seed 1234, DDIM-25) are drawn with the unlearned model at the steps whose
timestep lies in one band and the original everywhere else, for the bands above, inside and below the default
push band (``UnlearnConfig``'s ``push_band``, 0.3–0.7 T), and every step; per band: PUL, retained-kept (all, and
split by the classifier's confidence in the original's sample) and the mean pixel move of the forget-class /
retained seeds (docs/quality-study.md, sections 7 and 17).
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch  # noqa: E402
from diffusers import DDPMPipeline  # noqa: E402

from vdu_core import metrics  # noqa: E402
from vdu_core.config import UnlearnConfig  # noqa: E402
from vdu_core.reference import REFERENCE_DIR  # noqa: E402
from vdu_core.sampling import sample_images  # noqa: E402


class Hybrid(torch.nn.Module):
    """The unlearned UNet at timesteps in [low, high), the original elsewhere (DDIM calls it one step at a time)."""

    def __init__(self, original, unlearned, low: int, high: int):
        super().__init__()
        self.original, self.unlearned, self.low, self.high = original, unlearned, low, high
        self.config = original.config

    def forward(self, x, t, **kwargs):
        step = int(t.flatten()[0]) if torch.is_tensor(t) else int(t)
        return (self.unlearned if self.low <= step < self.high else self.original)(x, t, **kwargs)


def main() -> None:
    model, digit, deltas = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    pipe = DDPMPipeline.from_pretrained(REFERENCE_DIR / model, use_safetensors=True)
    original = pipe.unet.eval()
    delta = torch.load(deltas)["deltas"][0]
    theta0 = original.state_dict()
    unlearned = copy.deepcopy(original)
    unlearned.load_state_dict({k: theta0[k] + delta[k] if k in delta else theta0[k] for k in theta0})
    unlearned.eval()
    T = pipe.scheduler.config.num_train_timesteps
    classifier = metrics.load_classifier("builtin:mnist")
    before = sample_images(original, pipe.scheduler, 512, seed=1234, steps=25)
    pb, cb = metrics.classify(classifier, before)
    f = pb == digit
    print(f"\n### bench/study13/bands.py {' '.join(sys.argv[1:])}\n")
    print("| unlearned model used at | PUL % | ret.kept | ret.kept (conf ≥ 0.9) | ret.kept (conf < 0.9) | moved F/R |")
    print("|---|---:|---:|---:|---:|---:|", flush=True)
    a, b = UnlearnConfig.from_dict({}).push_band  # the default push band, as the job rounds it
    lo, hi = int(round(a * T)), int(round(b * T))
    for name, low, high in [(f"t ≥ {b} T", hi, T + 1), (f"{a} T ≤ t < {b} T", lo, hi), (f"t < {a} T", 0, lo),
                            (f"t ≥ {a} T", lo, T + 1), ("every step", 0, T + 1)]:
        after = sample_images(Hybrid(original, unlearned, low, high), pipe.scheduler, 512, seed=1234, steps=25)
        pa, _ = metrics.classify(classifier, after)
        rk = metrics.retained_kept(pb, pa, digit, before_conf=cb)
        split = rk["by_confidence"]
        moved = (after - before).flatten(1).norm(dim=1)
        print(f"| {name} | {metrics.pul(pb, pa, digit)['value']:.1f} | {rk['value']:.3f} | "
              f"{split['confident']['kept']:.3f} | {split['unsure']['kept']:.3f} | "
              f"{float(moved[f].mean()):.1f}/{float(moved[~f].mean()):.1f} |", flush=True)


if __name__ == "__main__":
    main()
