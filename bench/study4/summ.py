"""The paired-sample summary table of saved ``flips.py`` runs (docs/quality-study.md section 5)."""

import sys

import torch

BINS = ((0, 0.6), (0.6, 0.8), (0.8, 0.95), (0.95, 1.01))

print("| run | PUL % | ret.kept | moved F/R | kept, original conf < 0.6 / 0.6–0.8 / 0.8–0.95 / ≥ 0.95 |")
print("|---|---:|---:|---:|---|")
for path in sys.argv[1:]:
    d = torch.load(path, weights_only=False)
    pb, pa, k = d["pb"], d["pa"], d["digit"]
    yb, ya = pb.argmax(1), pa.argmax(1)
    ret = yb != k
    f = ~ret
    conf = pb.max(1).values
    mv = (d["after"] - d["before"]).flatten(1).norm(dim=1)
    pul = 100 * (1 - float((ya == k).sum()) / float(f.sum()))
    rk = float((ya[ret] == yb[ret]).float().mean())
    cells = []
    for lo, hi in BINS:
        m = ret & (conf >= lo) & (conf < hi)
        cells.append(f"{float((ya[m] == yb[m]).float().mean()):.2f}")
    moved = f"{float(mv[f].mean()):.1f} / {float(mv[ret].mean()):.1f}"
    name = path.replace(".pt", "").replace("fl_", "")
    print(f"| {name} | {pul:.1f} | {rk:.3f} | {moved} | {' / '.join(cells)} |")
