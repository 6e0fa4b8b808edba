"""How well does the data-free vote find the forgotten class among the job's own 2,048 paths, and does
spreading it through the neighbours (a path next to forget-like paths is forget-like too) find more?

    python bench/study10/propagate.py MODEL [MODEL ...]

For each model: the job's 2,048 DDIM-25 ends (seed 0, as the default job records them; cached under
/tmp/vdu_study10), the classifier's class of each (the truth, study only), and for each digit a forget set of
100 real digits. Rules: the vote (at least ``bar`` forget images among the 10 nearest, in the original's
mid-block features), and propagation: then also every path with at least ``m`` of its 10 nearest forget images
or forget-like paths, repeated ``rounds`` times. Prints the class's paths pushed (recall) and the others pushed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch  # noqa: E402
from diffusers import DDPMPipeline  # noqa: E402

from vdu_core import metrics  # noqa: E402
from vdu_core.methods import ForgetVote  # noqa: E402
from vdu_core.reference import REFERENCE_DIR, load_mnist_5k  # noqa: E402
from vdu_core.sampling import sample_images  # noqa: E402

CACHE = Path("/tmp/vdu_study10")


def own(model: str, n: int = 2048):
    pipe = DDPMPipeline.from_pretrained(REFERENCE_DIR / model, use_safetensors=True)
    CACHE.mkdir(exist_ok=True)
    f = CACHE / f"{model}_{n}.pt"
    if f.exists():
        ends = torch.load(f)
    else:
        ends = sample_images(pipe.unet.eval(), pipe.scheduler, n, seed=0, steps=25)
        torch.save(ends, f)
    pred, _ = metrics.classify(metrics.load_classifier("builtin:mnist"), ends)
    return pipe.unet.eval(), pipe.scheduler, ends, torch.as_tensor(pred)


def recall_table(truth: torch.Tensor, rules: list[str], labels_of) -> None:
    """Per digit and rule: the class's paths labelled forget-like / the class's paths, + the others labelled;
    ``labels_of(digit)`` returns a function of the rule giving the labels."""
    print("| digit | " + " | ".join(rules) + " |")
    print("|---" * (len(rules) + 1) + "|")
    tot = {r: [0, 0] for r in rules}
    for d in range(10):
        is_d, of_rule = truth == d, labels_of(d)
        cells = []
        for r in rules:
            lab = of_rule(r)
            c, o = int((lab & is_d).sum()), int((lab & ~is_d).sum())
            tot[r][0] += c
            tot[r][1] += o
            cells.append(f"{c}/{int(is_d.sum())} +{o}")
        print(f"| {d} | " + " | ".join(cells) + " |", flush=True)
    print("| all | " + " | ".join(f"{c} +{o}" for c, o in tot.values()) + " |")


def main() -> None:
    images, labels = load_mnist_5k()
    for model in sys.argv[1:] or ["mnist-ddpm"]:
        unet, sch, ends, truth = own(model)
        print(f"\n{model}: class histogram of the 2,048 paths {torch.bincount(truth, minlength=10).tolist()}")

        def labels_of(d: int, unet=unet, sch=sch, ends=ends):
            vote = ForgetVote(unet, sch, ends, images[labels == d][:100], seed=0)

            def of_rule(r: str) -> torch.Tensor:
                if r == "vote":
                    return vote.labels
                _, m, rounds = r.split()  # "p m<M> r<R>": ForgetVote.spread(M, R), the library's vote_spread
                return vote.spread(int(m[1:]), int(rounds[1:]))

            return of_rule

        recall_table(truth, ["vote", "p m5 r1", "p m5 r3", "p m6 r3", "p m7 r3", "p m4 r1"], labels_of)


if __name__ == "__main__":
    main()
