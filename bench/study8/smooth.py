"""Does the push aim the forget-like paths at something that, *averaged over similar states*, is still the
forgotten digit? A denoiser cannot give very different outputs to nearly equal inputs, so where the nearest
retained ends of neighbouring forget-like states belong to different classes (eights: 1, 3, 5, 9, ...), what it
can learn is their local mean. For each pushed state in the band: the push's x0 (the retained denoiser's
posterior mean, η 1, and the η-extrapolated one), and the same averaged over the 10 pushed states of that
step whose original x0-prediction is nearest (similar content); the classifier's verdict on each (study only).

    OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1 python bench/study8/smooth.py DIGIT [MODEL] [ETA]
"""

import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 2)[0] + "/study7")
from common import own_paths  # noqa: E402

from vdu_core import metrics, trajectory  # noqa: E402
from vdu_core.methods import ForgetVote, empirical_forget_eps  # noqa: E402

digit = int(sys.argv[1])
model = sys.argv[2] if len(sys.argv) > 2 else "mnist-ddpm"
eta = float(sys.argv[3]) if len(sys.argv) > 3 else 3.0
unet, sch, _, _, _, images, labels = own_paths(model)
x, eps, t, ends = trajectory.record(unet, sch, 1024, seed=0, steps=25)
clf = metrics.load_classifier("builtin:mnist")
truth = torch.as_tensor(metrics.classify(clf, ends)[0])
vote = ForgetVote(unet, sch, ends, images[labels == digit][:100], seed=0)
fl = vote.labels
f_idx, r_idx = fl.nonzero().flatten(), (~fl).nonzero().flatten()
is_d = truth[f_idx] == digit
T = sch.config.num_train_timesteps
print(f"{model} digit {digit}: {len(f_idx)} pushed paths, {int(is_d.sum())} of them the digit; eta {eta}")
print("| t | x0 of the original | x0_R (η 1) | x0_R averaged over 10 nearest pushed states | η-extrapolated | "
      "η-extrapolated, averaged |")
print("|---|---|---|---|---|---|")
for k in range(len(t)):
    if not (0.3 * T <= int(t[k]) < 0.7 * T):
        continue
    xt, tt = x[k, f_idx], t[k].repeat(len(f_idx))
    ac = sch.alphas_cumprod[t[k]].float()
    e_r = empirical_forget_eps(xt, tt, ends[r_idx], sch)

    def x0(e, xt=xt, ac=ac):
        return ((xt - (1 - ac).sqrt() * e) / ac.sqrt()).clamp(-1, 1)

    x0_o, x0_r = x0(eps[k, f_idx]), x0(e_r)
    x0_e = x0(eps[k, f_idx] + eta * (e_r - eps[k, f_idx]))
    nn = torch.cdist(x0_o.flatten(1), x0_o.flatten(1)).topk(10, largest=False).indices  # similar content

    def share(img):
        p = torch.as_tensor(metrics.classify(clf, img)[0])
        return f"{float((p[is_d] == digit).float().mean()):.2f}"

    print(f"| {int(t[k])} | {share(x0_o)} | {share(x0_r)} | {share(x0_r[nn].mean(1))} | {share(x0_e)} | "
          f"{share(x0_e[nn].mean(1))} |", flush=True)
