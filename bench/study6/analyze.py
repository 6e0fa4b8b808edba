"""Where do retained seeds flip, and which forget seeds survive? python bench/study6/analyze.py RUN.pt ..."""

import sys

import torch

for path in sys.argv[1:]:
    d = torch.load(path, weights_only=False)
    k = d["digit"]
    yb, ya = d["pb"].argmax(1), d["pa"].argmax(1)
    cb = d["pb"].max(1).values
    pk = d["pb"][:, k]  # the original sample's probability of the forget class
    v = d["vote_eval"]
    ret = yb != k
    flip = ret & (ya != yb)
    print(
        f"== {path} digit {k} {d['params']}: retained {int(ret.sum())}, flipped {int(flip.sum())} "
        f"(into k: {int((flip & (ya == k)).sum())})"
    )
    for lo, hi in [(0, 0.6), (0.6, 0.8), (0.8, 0.95), (0.95, 1.01)]:
        m = ret & (cb >= lo) & (cb < hi)
        print(
            f"  conf {lo:.2f}-{hi:.2f}: {int(m.sum()):4d} retained, kept {float((ya[m] == yb[m]).float().mean()):.3f}"
        )
    for lo, hi in [(0, 0.01), (0.01, 0.1), (0.1, 1.01)]:
        m = ret & (pk >= lo) & (pk < hi)
        print(
            f"  p(k) {lo:.2f}-{hi:.2f}: {int(m.sum()):4d} retained, kept {float((ya[m] == yb[m]).float().mean()):.3f}"
        )
    for c in range(0, 11):
        m = ret & (v == c)
        if m.any():
            print(
                f"  vote {c:2d}: {int(m.sum()):4d} retained, kept {float((ya[m] == yb[m]).float().mean()):.3f}"
                f"; forget-class seeds {int(((yb == k) & (v == c)).sum())}, forgotten "
                f"{int(((yb == k) & (v == c) & (ya != k)).sum())}"
            )
    # flips by original class -> new class
    pairs = {}
    for b, a in zip(yb[flip].tolist(), ya[flip].tolist(), strict=False):
        pairs[(b, a)] = pairs.get((b, a), 0) + 1
    print("  flips:", sorted(pairs.items(), key=lambda x: -x[1])[:12])
    fk = yb == k
    surv = fk & (ya == k)
    print(f"  forget seeds {int(fk.sum())}, survived {int(surv.sum())}; survivors' conf {cb[surv].tolist()}")
    print(f"  survivors' vote {v[surv].tolist()}; forgotten' vote {v[fk & (ya != k)].tolist()}")
    moved = (d["after"] - d["before"]).flatten(1).norm(dim=1)
    print(
        f"  moved: survivors {float(moved[surv].mean()):.1f}, forgotten {float(moved[fk & ~surv].mean()):.1f}, "
        f"retained kept {float(moved[ret & ~flip].mean()):.1f}, retained flipped {float(moved[flip].mean()):.1f}"
    )
    tb, ta = d["tpb"].argmax(1), d["tpa"].argmax(1)
    vt = d["vote_train"]
    tf = tb == k
    like = vt >= 3
    print(
        f"  train paths: forget-class {int(tf.sum())}, voted forget-like {int(like.sum())} (of which class k "
        f"{int((like & tf).sum())}); forget-class forgotten {int((tf & (ta != k)).sum())}; "
        f"voted&class-k forgotten {int((like & tf & (ta != k)).sum())}, not-voted class-k forgotten "
        f"{int((~like & tf & (ta != k)).sum())} of {int((~like & tf).sum())}"
    )
    tr = ~tf
    print(
        f"  train paths retained kept {float((ta[tr] == tb[tr]).float().mean()):.3f}; voted-like but not class k: "
        f"{int((like & tr).sum())}, kept {float((ta[like & tr] == tb[like & tr]).float().mean()):.3f}"
    )
