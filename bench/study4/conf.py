"""How sharp a reference model's samples are: the built-in classifier's confidence on 512 DDIM-25 samples."""

import sys

from diffusers import DDPMPipeline

from vdu_core import metrics
from vdu_core.reference import REFERENCE_DIR
from vdu_core.sampling import sample_images

clf = metrics.load_classifier("builtin:mnist")
for name in sys.argv[1:]:
    pipe = DDPMPipeline.from_pretrained(REFERENCE_DIR / name, use_safetensors=True)
    x = sample_images(pipe.unet, pipe.scheduler, 512, seed=1234, steps=25)
    pred, conf = metrics.classify(clf, x)
    shares = ", ".join(
        f"{label} {float(mask.float().mean()):.2f}"
        for label, mask in (("conf >= 0.95", conf >= 0.95), (">= 0.8", conf >= 0.8), ("< 0.6", conf < 0.6))
    )
    print(f"{name}: 512 samples DDIM-25 seed 1234: {shares}; mean conf {float(conf.mean()):.3f}; "
          f"histogram {metrics.class_histogram(pred, 10)}", flush=True)
