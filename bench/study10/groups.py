"""Where the job puts the forgotten class's own paths and the others: pushed, left in the margin, anchored.

    python bench/study10/groups.py [DIGIT ...]

The job's 2,048 paths of the reference and the alt model (``propagate.py``'s cache), the classifier as truth
(study only), margin 1 against the vote's labels and against the vote spread with M 7 (``vote_spread`` 7).
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from propagate import own  # noqa: E402

from vdu_core.methods import ForgetVote  # noqa: E402
from vdu_core.reference import load_mnist_5k  # noqa: E402

images, labels = load_mnist_5k()
digits = [int(d) for d in sys.argv[1:]] or [0]
print("| model | digit | labels | class pushed / margin / anchored | others pushed / margin / anchored |")
print("|---|---|---|---|---|")
for model in ("mnist-ddpm-alt", "mnist-ddpm"):
    unet, sch, ends, truth = own(model)
    for d in digits:
        v = ForgetVote(unet, sch, ends, images[labels == d][:100], seed=0)
        for name, lab in (("vote", v.labels), ("vote_spread 7", v.spread(7))):
            near = v.near(1, lab)
            groups = (lab, near, ~lab & ~near)
            is_d = truth == d
            c = " / ".join(str(int((g & is_d).sum())) for g in groups)
            o = " / ".join(str(int((g & ~is_d).sum())) for g in groups)
            print(f"| {model} | {d} | {name} | {c} | {o} |", flush=True)
