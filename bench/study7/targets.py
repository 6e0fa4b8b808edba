"""Which retained ends does the push aim the forget-like paths at? For the job's own 1,024 paths (seed 0,
DDIM-25) and the vote the job uses: each forget-like path's nearest retained end in pixels (what the retained
denoiser ε_R is dominated by in the push band), by the classifier's class (study only).

    OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1 python bench/study7/targets.py DIGIT [MODEL]
"""

import sys

import torch
from common import own_paths

from vdu_core.methods import ForgetVote

digit = int(sys.argv[1])
model = sys.argv[2] if len(sys.argv) > 2 else "mnist-ddpm"
unet, sch, own, truth, _, images, labels = own_paths(model)
vote = ForgetVote(unet, sch, own, images[labels == digit][:100], seed=0)
fl, counts = vote.labels, vote.counts
print(f"{model} digit {digit}: forget-like {int(fl.sum())} ({int((fl & (truth == digit)).sum())} of them the digit); "
      f"missed digit-{digit} ends {int((~fl & (truth == digit)).sum())}, their forget-neighbour counts "
      f"{sorted(counts[~fl & (truth == digit)].tolist())}")
for name, pool in (("retained", ~fl), ("clear (0 forget neighbours)", ~fl & (counts == 0))):
    r = pool.nonzero().flatten()
    d = torch.cdist(own[fl].flatten(1), own[r].flatten(1))
    near = truth[r[d.argmin(1)]]
    is_d = truth[fl] == digit
    print(f"  targets {name} ({len(r)} ends, {int((truth[r] == digit).sum())} of them the digit): nearest target "
          f"of the forget-like digit-{digit} paths is the digit {int((near[is_d] == digit).sum())} of "
          f"{int(is_d.sum())} times; classes {torch.bincount(near[is_d], minlength=10).tolist()}")
