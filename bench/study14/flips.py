"""Where do the retained seeds the job loses go? python bench/study14/flips.py MODEL DIGIT DELTAS.pt"""
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch  # noqa: E402
from diffusers import DDPMPipeline  # noqa: E402

from vdu_core import metrics  # noqa: E402
from vdu_core.reference import REFERENCE_DIR  # noqa: E402
from vdu_core.sampling import sample_images  # noqa: E402

model, digit, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
pipe = DDPMPipeline.from_pretrained(REFERENCE_DIR / model, use_safetensors=True)
clf = metrics.load_classifier("builtin:mnist")
x, _ = metrics.prepare_for_classifier(before := sample_images(pipe.unet, pipe.scheduler, 512, seed=1234, steps=25))
with torch.no_grad():
    pr = torch.softmax(clf(x), 1)
top2 = pr.topk(2, dim=1)
delta = torch.load(path)["deltas"][0]
sd = pipe.unet.state_dict()
pipe.unet.load_state_dict({k: sd[k] + delta[k] if k in delta else sd[k] for k in sd})
after = sample_images(pipe.unet, pipe.scheduler, 512, seed=1234, steps=25)
pa, _ = metrics.classify(clf, after)
pb = top2.indices[:, 0]
ret = pb != digit
lost = ret & (pa != pb)
n = int(lost.sum())
to2 = int((lost & (pa == top2.indices[:, 1])).sum())
runner_up = top2.indices[:, 1] == digit
print(f"{model} forget {digit}: retained {int(ret.sum())}, lost {n}; to the original's second choice {to2}; "
      f"to the forget class {int((lost & (pa == digit)).sum())}; original's second choice was the forget class "
      f"{int((lost & runner_up).sum())} (among all retained: {int((ret & runner_up).sum())})")
print("lost by original class:", torch.bincount(pb[lost], minlength=10).tolist(),
      "of", torch.bincount(pb[ret], minlength=10).tolist())
print("median p(top1) lost / kept:", float(top2.values[lost, 0].median()), float(top2.values[ret & ~lost, 0].median()))
