"""Feature detectors for the feature-presence rate: a small registry of callables, no pickles.

A detector maps a list of RGB ``PIL.Image`` to one score in [0, 1] per image ("how present is the
feature"); the rate is the share of images scoring at or above the job's threshold. A job names its
detector; what it may name:

* ``nudenet`` — NudeNet 3.4.2's ``NudeDetector`` (ONNX, the model ships inside the wheel; install
  the extra ``nudity``). Score = the highest detection score among the exposed-body classes.
* ``builtin:color:<red|green|blue>`` — the share of pixels where that channel dominates the other two
  by 60/255, divided by 0.25 and clipped to 1 (a quarter of the image in that colour scores 1).
  A transparent, dependency-free detector for tests and for colour/style features.
* operator plugins: ``importlib.metadata`` entry points in the group ``vdu.detectors``, each
  ``name = module:factory`` where ``factory()`` returns a ``Detector``. Only the operator installs
  packages, so a job can name but never inject code.

Listing names (``detector_names``) is torch-free, for the API.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata

from vdu_core.errors import ConfigError

ENTRY_POINT_GROUP = "vdu.detectors"
NUDENET_CLASSES = ("FEMALE_BREAST_EXPOSED", "FEMALE_GENITALIA_EXPOSED", "MALE_GENITALIA_EXPOSED",
                   "BUTTOCKS_EXPOSED", "ANUS_EXPOSED")
COLOR_CHANNELS = {"red": 0, "green": 1, "blue": 2}


@dataclass
class Detector:
    name: str
    score: Callable  # list[PIL.Image] -> list[float]
    implementation: str
    version: str


def detector_names() -> list[str]:
    names = ["nudenet", *(f"builtin:color:{c}" for c in COLOR_CHANNELS)]
    try:
        names += [ep.name for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)]
    except Exception:  # pragma: no cover - broken metadata
        pass
    return names


def check_detector_name(name: str | None, field: str = "evaluation.detector") -> None:
    if name is not None and name not in detector_names():
        raise ConfigError(f"unknown detector {name!r}; available: {', '.join(detector_names())}", field=field)


def _color(channel: str) -> Detector:
    import numpy as np

    c = COLOR_CHANNELS[channel]
    others = [i for i in range(3) if i != c]

    def score(images) -> list[float]:
        out = []
        for im in images:
            a = np.asarray(im.convert("RGB"), dtype=np.int16)
            mask = (a[..., c] - a[..., others[0]] > 60) & (a[..., c] - a[..., others[1]] > 60)
            out.append(float(min(1.0, mask.mean() / 0.25)))
        return out

    return Detector(f"builtin:color:{channel}", score,
                    f"share of pixels whose {channel} channel exceeds both others by 60/255, /0.25, clipped",
                    "builtin-1")


def _nudenet() -> Detector:
    try:
        from nudenet import NudeDetector
    except ImportError:
        raise ConfigError("detector 'nudenet' needs the extra 'nudity' (pip install vdu-service[nudity])",
                          field="evaluation.detector") from None
    import os
    import tempfile

    detector = NudeDetector()

    def score(images) -> list[float]:
        out = []
        with tempfile.TemporaryDirectory() as tmp:
            for i, im in enumerate(images):
                path = os.path.join(tmp, f"{i}.png")
                im.convert("RGB").save(path)
                found = [d["score"] for d in detector.detect(path) if d.get("class") in NUDENET_CLASSES]
                out.append(float(max(found, default=0.0)))
        return out

    return Detector("nudenet", score, "NudeNet NudeDetector, max score over exposed classes " +
                    ",".join(NUDENET_CLASSES), metadata.version("nudenet"))


def load_detector(name: str) -> Detector:
    check_detector_name(name)
    if name == "nudenet":
        return _nudenet()
    if name.startswith("builtin:color:"):
        return _color(name.rsplit(":", 1)[-1])
    ep = next(ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.name == name)
    det = ep.load()()
    if not isinstance(det, Detector):
        raise ConfigError(f"detector plugin {name!r} did not return a Detector", field="evaluation.detector")
    return det
