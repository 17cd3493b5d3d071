"""Writes the no-download receipt / non-receipt image folders of docs/examples/receipts.md.

    python scripts/make_receipts.py --out data/receipts [--per-class 600 --val-per-class 150 --size 64 --seed 0]

Backgrounds come from the embedded CIFAR-10 subset (training images for ``train/``, test images for ``val/``), so no
photograph appears in both splits. The layout is what ``data.name=folder`` reads, exactly like a folder of real
receipt photos would be.
"""

from __future__ import annotations

import argparse
import sys

from kdforge.data import _embedded_arrays
from kdforge.data.synth.receipts import write_receipt_folder
from kdforge.errors import KDForgeError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder to create (must not hold train/ or val/ yet)")
    p.add_argument("--per-class", type=int, default=600, help="training images per class")
    p.add_argument("--val-per-class", type=int, default=150, help="validation images per class")
    p.add_argument("--size", type=int, default=64, help="side of the square images")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    src = _embedded_arrays()
    try:
        root = write_receipt_folder(
            args.out,
            {"train": src.train_images, "val": src.test_images},
            {"train": args.per_class, "val": args.val_per_class},
            seed=args.seed,
            size=args.size,
        )
    except KDForgeError as err:
        print(f"make_receipts: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {root}/train and {root}/val ({args.per_class}/{args.val_per_class} images per class)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
