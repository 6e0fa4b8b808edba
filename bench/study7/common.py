"""What every study-7 script starts from: the model (argv MODEL, default mnist-ddpm), the job's own 1,024
DDIM-25 paths' ends (seed 0, as the default job records them), the classifier's class and confidence on each
(the truth, study only), and the 5,000 real digits the forget sets are drawn from."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402
from diffusers import DDPMPipeline  # noqa: E402

from vdu_core import metrics  # noqa: E402
from vdu_core.methods import ForgetVote  # noqa: E402
from vdu_core.reference import REFERENCE_DIR, load_mnist_5k  # noqa: E402
from vdu_core.sampling import sample_images  # noqa: E402


def own_paths(model: str):
    """(unet, scheduler, own ends, classes, confidences, real images, real labels)."""
    pipe = DDPMPipeline.from_pretrained(REFERENCE_DIR / model, use_safetensors=True)
    unet, sch = pipe.unet.eval(), pipe.scheduler
    own = sample_images(unet, sch, 1024, seed=0, steps=25)
    pred, conf = metrics.classify(metrics.load_classifier("builtin:mnist"), own)
    images, labels = load_mnist_5k()
    return unet, sch, own, torch.as_tensor(pred), torch.as_tensor(conf), images, labels


def digit_votes(unet, sch, own, images, labels):
    """(digit, the job's vote for a forget set of 100 real digits of it) for every digit."""
    for d in range(10):
        yield d, ForgetVote(unet, sch, own, images[labels == d][:100], seed=0)
