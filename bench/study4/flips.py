import copy
import json
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch
from diffusers import DDPMPipeline

from vdu_core import metrics
from vdu_core.config import UnlearnConfig
from vdu_core.reference import REFERENCE_DIR, load_mnist_5k
from vdu_core.run import unlearn_model
from vdu_core.sampling import sample_images

out = sys.argv[1]
digit = int(sys.argv[2])
params = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
N = int(os.environ.get("N", 256))
steps = int(os.environ.get("SS", 25))
pipe = DDPMPipeline.from_pretrained(REFERENCE_DIR / os.environ.get("MODEL", "mnist-ddpm"), use_safetensors=True)
clf = metrics.load_classifier("builtin:mnist")


def probs(x):
    xx, _ = metrics.prepare_for_classifier(x)
    with torch.no_grad():
        return torch.softmax(clf(xx).float(), 1)


images, labels = load_mnist_5k()
forget = images[labels == digit][:100]
before = sample_images(pipe.unet, pipe.scheduler, N, seed=1234, steps=steps)
pb = probs(before)
unet = copy.deepcopy(pipe.unet)
cfg = UnlearnConfig.from_dict({"method": "vdu", **params})
t0 = time.time()
unlearn_model(unet, pipe.scheduler, forget, cfg, cache_dir=None)
after = sample_images(unet.eval(), pipe.scheduler, N, seed=1234, steps=steps)
pa = probs(after)
torch.save(
    {
        "before": before,
        "after": after,
        "pb": pb,
        "pa": pa,
        "digit": digit,
        "params": params,
        "state": unet.state_dict(),
        "secs": time.time() - t0,
    },
    out,
)
yb, ya = pb.argmax(1), pa.argmax(1)
ret = yb != digit
print(
    out,
    params,
    "PUL",
    1 - float((ya == digit).float().sum() / max((yb == digit).float().sum(), 1)),
    "RK",
    float((ya[ret] == yb[ret]).float().mean()),
)
