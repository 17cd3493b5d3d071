"""Build kdforge/data/assets/cifar10_subset.npz, the embedded dataset, from the full CIFAR-10 JPEG .npz.

A class-balanced, seeded subset (1,000 train and 200 test images per class) whose JPEG bytes are copied unchanged
from the source, in the same .npz layout, so one reader serves both files.

    python scripts/build_embedded_cifar10.py --source ../shared/data/cifar10/cifar10_jpeg.npz

The subset is drawn by ``kdforge.data.balanced_subset`` with ``--seed`` (default 0), so the output is reproducible.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # run from a checkout without `pip install -e .`

from kdforge.data import balanced_subset  # noqa: E402
from kdforge.data.cifar import write_jpeg_npz  # noqa: E402

OUT = REPO / "kdforge" / "data" / "assets" / "cifar10_subset.npz"


def _take(blob: np.ndarray, offsets: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    parts = [blob[offsets[i] : offsets[i + 1]] for i in idx]
    new_offsets = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
    return np.concatenate(parts).astype(np.uint8), new_offsets


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shared = REPO.parent / "shared" / "data" / "cifar10" / "cifar10_jpeg.npz"
    p.add_argument("--source", default=str(shared))
    p.add_argument("--train", type=int, default=10_000)
    p.add_argument("--test", type=int, default=2_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    with np.load(args.source) as z:
        src = {k: z[k] for k in z.files}
    out: dict[str, np.ndarray] = {"classes": src["classes"]}
    for split, n in (("train", args.train), ("test", args.test)):
        idx = balanced_subset(src[f"{split}_labels"], n, seed=args.seed)
        out[f"{split}_jpeg"], out[f"{split}_offsets"] = _take(src[f"{split}_jpeg"], src[f"{split}_offsets"], idx)
        out[f"{split}_labels"] = src[f"{split}_labels"][idx].astype(np.int64)
        out[f"{split}_source_index"] = idx.astype(np.int64)  # provenance: positions in the full CIFAR-10 split
    write_jpeg_npz(args.out, out)
    size = Path(args.out).stat().st_size
    print(f"wrote {args.out}: {args.train} train + {args.test} test images, {size / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
