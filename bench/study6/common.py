"""The setup both study-6 scripts share: argv (OUT DIGIT [PARAMS json]), the model (env MODEL), the
classifier, the forget set (100 real digits), the run's config, and the study-only vote bar (env VOTE_BAR)."""

import functools
import json
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from diffusers import DDPMPipeline  # noqa: E402

from vdu_core import methods, metrics  # noqa: E402
from vdu_core.config import UnlearnConfig  # noqa: E402
from vdu_core.reference import REFERENCE_DIR, load_mnist_5k  # noqa: E402

out, digit = sys.argv[1], int(sys.argv[2])
params = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
N = int(os.environ.get("N", 512))
EVERY_DEFAULT = 50
model = os.environ.get("MODEL", "mnist-ddpm")
VOTE_BAR = int(os.environ.get("VOTE_BAR", 3))
pipe = DDPMPipeline.from_pretrained(REFERENCE_DIR / model, use_safetensors=True)
sch = pipe.scheduler
clf = metrics.load_classifier("builtin:mnist")
images, labels = load_mnist_5k()
forget = images[labels == digit][:100]
cfg = UnlearnConfig.from_dict({"method": "vdu", **params})
if VOTE_BAR != 3:  # study only: the training labels' bar (forget images among the 10 nearest neighbours)
    methods.forget_like_vote = functools.partial(methods.forget_like_vote, min_forget=VOTE_BAR)
