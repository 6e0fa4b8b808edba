"""Train the reference MNIST models and classifier into reference/ (skips what already exists).

    python scripts/train_reference.py                # classifier, tiny and reference DDPM
    python scripts/train_reference.py mnist-ddpm-alt # one named recipe
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from vdu_core.reference import RECIPES, REFERENCE_DIR, train_classifier, train_ddpm  # noqa: E402


def main(argv: list[str]) -> None:
    names = argv or ["classifier", "mnist-ddpm-tiny", "mnist-ddpm-base", "mnist-ddpm"]
    for name in names:
        out = REFERENCE_DIR / name
        if (out / "training.json").exists():
            print(f"{name}: cached at {out}")
            continue
        if name == "classifier":
            print(train_classifier(out))
        else:
            print(train_ddpm(RECIPES[name], out))


if __name__ == "__main__":
    main(sys.argv[1:])
