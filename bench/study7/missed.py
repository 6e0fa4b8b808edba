"""Which of the model's own samples of a class does the vote miss? Confidence of the evaluation's classifier
(study only) on the job's own 1,024 paths (seed 0, DDIM-25) of each digit, caught vs missed by the vote.

    OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1 python bench/study7/missed.py [MODEL]
"""

import sys

from common import own_paths

from vdu_core.methods import ForgetVote

model = sys.argv[1] if len(sys.argv) > 1 else "mnist-ddpm"
unet, sch, own, pred, conf, images, labels = own_paths(model)
print(f"{model}: the classifier's confidence on the own samples of each digit, caught / missed by the vote")
print("| digit | own samples | confident (≥ 0.9) share | caught: n, mean conf, share ≥ 0.9 | missed: n, mean conf, "
      "share ≥ 0.9 | recall among confident |")
print("|---|---:|---:|---|---|---:|")
for d in range(10):
    lab = ForgetVote(unet, sch, own, images[labels == d][:100], seed=0).labels
    is_d = pred == d
    hi = conf >= 0.9
    c, m = is_d & lab, is_d & ~lab

    def part(mask, hi=hi):
        n = int(mask.sum())
        if n == 0:
            return "0, -, -"
        return f"{n}, {float(conf[mask].mean()):.2f}, {float(hi[mask].float().mean()):.2f}"

    print(f"| {d} | {int(is_d.sum())} | {float(hi[is_d].float().mean()):.2f} | {part(c)} | {part(m)} | "
          f"{int((c & hi).sum()) / max(int((is_d & hi).sum()), 1):.2f} |", flush=True)
