"""The built-in digit classifier ("vdu-mnist-cnn-v1").

Used by PUL (which class a generated sample shows) and, through its 128-d penultimate layer, as
the documented feature network of u-FID for 28x28 grayscale digits (no Inception weights offline).
Weights are stored as safetensors with a JSON config: nothing is unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

CLASSIFIER_NAME = "vdu-mnist-cnn-v1"
FEATURE_DIM = 128


class DigitClassifier(nn.Module):
    """A small CNN: 28x28x1 in [-1, 1] -> 10 logits; ``features`` gives the 128-d penultimate layer."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.num_classes = num_classes
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.GELU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.GELU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 7 * 7, FEATURE_DIM), nn.GELU(),
        )
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, directory / "model.safetensors")
        (directory / "config.json").write_text(
            json.dumps({"name": CLASSIFIER_NAME, "num_classes": self.num_classes, "feature_dim": FEATURE_DIM})
        )

    @classmethod
    def load(cls, directory: Path) -> DigitClassifier:
        directory = Path(directory)
        cfg = json.loads((directory / "config.json").read_text())
        model = cls(num_classes=int(cfg.get("num_classes", 10)))
        model.load_state_dict(load_file(directory / "model.safetensors"))
        return model.eval()
