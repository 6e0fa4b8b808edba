"""Does the vote miss frequent classes, and does propagating it fix that? The job's own 1,024 paths (seed 0,
DDIM-25) labelled by the vote (data-free) and by the evaluation's classifier (the truth, study only), for
every digit: the vote as it is (at least 3 forget images among the 10 nearest of the forget images and the
other own samples), and the vote propagated (an own sample also becomes forget-like when at least ``bar2`` of
its 10 nearest are forget images or own samples already forget-like; repeated until nothing changes).

    OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1 python bench/study7/propagate.py [MODEL]
"""

import sys

import torch
from common import digit_votes, own_paths

model = sys.argv[1] if len(sys.argv) > 1 else "mnist-ddpm"
unet, sch, own, truth, _, images, labels = own_paths(model)
print(f"{model}: own class histogram {torch.bincount(truth, minlength=10).tolist()}")
print("| digit | labels | called | precision | recall |")
print("|---|---|---:|---:|---:|")
for d, vote in digit_votes(unet, sch, own, images, labels):
    nf = len(vote.ff)
    nn = vote.pool_neighbours  # [n_own, k] into forget ∪ own
    is_d = truth == d

    def row(name, lab, d=d, is_d=is_d):
        n, tp = int(lab.sum()), int((lab & is_d).sum())
        print(f"| {d} | {name} | {n} | {tp / max(n, 1):.2f} | {tp / max(int(is_d.sum()), 1):.2f} ({tp} of "
              f"{int(is_d.sum())}) |", flush=True)

    base = vote.labels
    row(f"vote (bar {vote.bar})", base)
    for bar2 in (4, 5, 6):
        lab = base.clone()
        for _ in range(20):
            marked = torch.cat([torch.ones(nf, dtype=torch.bool), lab])[nn].sum(1) >= bar2
            new = base | marked
            if torch.equal(new, lab):
                break
            lab = new
        row(f"propagated, bar2 {bar2}", lab)
