"""Which of the job's own paths would be anchored, pushed or left alone under candidate rules.

A path the vote misses is anchored in the default: for a frequent class (eights, twos) that anchors a third of
the class to stay what it is, against the push on the rest. Here: how many of each class's own paths
(classifier, study only) fall in each group when paths *near* the forget-like ones are left out of the anchors.

    OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1 python bench/study8/neutral.py [MODEL]
"""

import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 2)[0] + "/study7")
from common import digit_votes, own_paths  # noqa: E402

model = sys.argv[1] if len(sys.argv) > 1 else "mnist-ddpm"
unet, sch, own, truth, _, images, labels = own_paths(model)
print("| digit | rule | class pushed / neutral / anchored | others pushed / neutral / anchored |")
print("|---|---|---|---|")
for d, vote in digit_votes(unet, sch, own, images, labels):
    push, is_d = vote.labels, truth == d

    def row(name, neutral, d=d, is_d=is_d, push=push):
        neutral = neutral & ~push
        anch = ~push & ~neutral
        c = [int((g & is_d).sum()) for g in (push, neutral, anch)]
        o = [int((g & ~is_d).sum()) for g in (push, neutral, anch)]
        print(f"| {d} | {name} | {' / '.join(map(str, c))} | {' / '.join(map(str, o))} |", flush=True)

    row("vote (default)", torch.zeros_like(push))
    row("count >= 1", vote.counts >= 1)
    for k in (10, 20):
        nn = vote.pool_distances.topk(k, largest=False).indices
        marked = torch.cat([torch.ones(len(vote.ff), dtype=torch.bool), push])[nn]
        for m in (1, 2, 3):
            row(f"k{k}: >= {m} forget or pushed", marked.sum(1) >= m)
