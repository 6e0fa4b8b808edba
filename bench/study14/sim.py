"""How far must each forget-like path be pushed? Simulate the trajectory target's ideal model: the original's DDIM
paths with ε replaced by the push target (ε_θ0 + η (ε_R − ε_θ0)) inside the push band, for a ladder of η, and label
each end with the classifier and the job's vote.   python bench/study14/sim.py MODEL DIGIT"""
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch  # noqa: E402
from diffusers import DDIMScheduler, DDPMPipeline  # noqa: E402

from vdu_core import metrics  # noqa: E402
from vdu_core.methods import ForgetVote  # noqa: E402
from vdu_core.reference import REFERENCE_DIR, load_mnist_5k  # noqa: E402
from vdu_core.trajectory import push_target, record  # noqa: E402

model, digit = sys.argv[1], int(sys.argv[2])
etas = [float(e) for e in (sys.argv[3] if len(sys.argv) > 3 else "0,1,1.5,2,2.5,3.5,5").split(",")]
pipe = DDPMPipeline.from_pretrained(REFERENCE_DIR / model, use_safetensors=True)
unet, sched = pipe.unet.eval(), pipe.scheduler
clf = metrics.load_classifier("builtin:mnist")
images, labels = load_mnist_5k()
forget = images[labels == digit][:100]
t0 = time.time()
x, eps, t, ends = record(unet, sched, 2048, 0, 25)
vote = ForgetVote(unet, sched, ends, forget, seed=0)
fl = vote.labels
near = vote.near(1, fl)
ret = (~fl & ~near).nonzero().flatten()
fi = fl.nonzero().flatten()
print(f"recorded in {time.time() - t0:.0f} s; forget-like {len(fi)}, anchored {len(ret)}", flush=True)
pe, _ = metrics.classify(clf, ends)
print(f"classifier: forget-like paths that are {digit}: {(pe[fi] == digit).float().mean():.3f}; "
      f"{digit}s caught by the vote {fl[pe == digit].float().mean():.3f}", flush=True)
T = sched.config.num_train_timesteps
low, high = int(0.3 * T), int(0.7 * T)
ddim = DDIMScheduler.from_config(sched.config)
ddim.set_timesteps(25)
assert torch.equal(ddim.timesteps.cpu(), t), (ddim.timesteps, t)
k0 = int(((t < high)).nonzero()[0])
R = ends[ret]
res = {}
with torch.no_grad():
    for eta in etas:
        xs = x[k0, fi].clone()
        for k in range(k0, len(t)):
            tt = torch.full((len(xs),), int(t[k]), dtype=torch.long)
            e0 = torch.cat([unet(xs[i:i + 128], tt[i:i + 128]).sample for i in range(0, len(xs), 128)])
            e = push_target(xs, tt, e0, R, sched, eta) if low <= int(t[k]) < high else e0
            xs = ddim.step(e, t[k], xs).prev_sample
        out = xs.clamp(-1, 1)
        p, _ = metrics.classify(clf, out)
        v = vote.label(unet, sched, out, fi)
        res[eta] = (p == digit, v)
        print(f"eta {eta}: still {digit} (classifier) {(p == digit).float().mean():.3f}; still forget-like (vote) "
              f"{v.float().mean():.3f}; moved {float((out - ends[fi]).flatten(1).norm(dim=1).mean()):.1f}", flush=True)


def smallest(still_of: int, who: str) -> None:
    """Per path, the smallest η whose end ``who`` no longer calls the forgotten digit / forget-like."""
    first = torch.full((len(fi),), float("inf"))
    for eta in sorted(etas, reverse=True):
        first[~res[eta][still_of]] = eta
    vals, counts = torch.unique(first, return_counts=True)
    pairs = ", ".join(f"{float(v)}: {int(c)}" for v, c in zip(vals, counts, strict=True))
    print(f"smallest eta {who} lets go: {pairs}")


smallest(1, "the vote")
smallest(0, "the classifier")
