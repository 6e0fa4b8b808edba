"""Where the flips of saved ``flips.py`` runs come from: confidence, destination, how far samples moved."""

import sys

import torch

for path in sys.argv[1:]:
    d = torch.load(path, weights_only=False)
    pb, pa, k = d["pb"], d["pa"], d["digit"]
    yb, ya = pb.argmax(1), pa.argmax(1)
    ret = yb != k
    flip = ret & (ya != yb)
    kept = ret & (ya == yb)
    conf = pb.max(1).values
    dist = (d["after"] - d["before"]).flatten(1).norm(dim=1)
    rk = float(kept.sum() / ret.sum())
    print(path, d["params"], f"retained {int(ret.sum())}, flipped {int(flip.sum())} (RK {rk:.3f})")
    for name, m in (("flipped", flip), ("kept", kept)):
        low = float((conf[m] < 0.8).float().mean())
        print(f"  {name:8s} orig conf mean {float(conf[m].mean()):.2f}, conf<0.8 share {low:.2f}, "
              f"P(forget) mean {float(pb[m, k].mean()):.3f}, pixel change mean {float(dist[m].mean()):.1f}")
    bins = [0, 0.6, 0.8, 0.95, 1.01]
    for lo, hi in zip(bins[:-1], bins[1:], strict=True):
        m = ret & (conf >= lo) & (conf < hi)
        share = float((ya[m] == yb[m]).float().mean()) if m.sum() else float("nan")
        print(f"  conf [{lo},{hi}): n {int(m.sum())}, kept {share:.2f}")
    print("  flips (from->to):", sorted([(int(a), int(b)) for a, b in zip(yb[flip], ya[flip], strict=True)]))
    f = yb == k
    dest = torch.bincount(ya[f], minlength=10).tolist()
    print("  forget-class seeds go to:", dest, "pixel change", float(dist[f].mean()))
