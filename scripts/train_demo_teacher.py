"""Train the ``kdforge demo`` teacher and write kdforge/data/assets/demo_teacher_resnet20.{pt,json}.

The teacher is trained by :func:`kdforge.demo.train_demo_teacher` — the very schedule ``kdforge demo --train-teacher``
runs (resnet20, vanilla cross-entropy, 6 epochs on the 10,000 embedded training images, batch 128, SGD lr 0.1
nesterov, cosine with half an epoch of warm-up, seed 0) — on the CPU with a fixed thread count and deterministic
algorithms, so a re-run on the same CPU type and torch version writes the same bytes:

    python scripts/train_demo_teacher.py                                   # the shipped asset (~1-2 min, 2 cores)
    python scripts/train_demo_teacher.py --epochs 1 --subset 1000 --out /tmp/t.pt   # a quick check

The weights are a plain state dict (``torch.save`` with a fixed pickle protocol; its zip records carry no time
stamps). The JSON beside them records their SHA-256 (``kdforge demo`` checks it before use), the test top-1 on the
embedded 2,000-image test split, the per-epoch test curve (plotted by the demo), the command, torch version, threads
and date. Float results of CPU kernels may differ across CPU instruction sets (AVX2/AVX-512) and torch versions; the
record says which torch wrote the asset.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import time
from collections import OrderedDict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # run from a checkout without `pip install -e .`

from kdforge.demo import (  # noqa: E402
    SEED,
    TEACHER,
    TEACHER_ASSET,
    TEACHER_EPOCHS,
    TRAIN_SUBSET,
    build_demo_data,
    sha256_file,
    train_demo_teacher,
)
from kdforge.engine.checkpoint import atomic_write_text  # noqa: E402
from kdforge.engine.evaluation import evaluate  # noqa: E402

PICKLE_PROTOCOL = 2  # torch.save's default today, pinned so a future default cannot change the bytes


def state_dict_bytes(model: torch.nn.Module) -> bytes:
    """The model's state dict as ``torch.save`` bytes: CPU, contiguous, detached tensors in the model's key order."""
    state = OrderedDict((k, v.detach().to("cpu").contiguous().clone()) for k, v in model.state_dict().items())
    buf = io.BytesIO()
    torch.save(state, buf, pickle_protocol=PICKLE_PROTOCOL)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=TEACHER_EPOCHS)
    parser.add_argument("--subset", type=int, default=TRAIN_SUBSET, help="training images (first N of 10,000)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (fixed: results depend on it)")
    parser.add_argument("--out", type=Path, default=TEACHER_ASSET, help="weights path; the .json goes beside it")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    device = torch.device("cpu")
    data = build_demo_data(args.subset, device)
    t0 = time.perf_counter()
    model, result = train_demo_teacher(data, None, epochs=args.epochs, verbose=not args.quiet)
    train_time = time.perf_counter() - t0
    model.eval()
    top1 = evaluate(model, data.test, device=device)["top1"]

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(state_dict_bytes(model))
    record = {
        "model": TEACHER,
        "weights": args.out.name,
        "sha256": sha256_file(args.out),
        "test_top1": top1,
        "test_split": "embedded CIFAR-10 test subset (2,000 images)",
        "curve": [[h["epoch"], h["test_top1"]] for h in result.history if "test_top1" in h],
        "epochs": args.epochs,
        "train_subset": args.subset,
        "seed": SEED,
        "threads": args.threads,
        "train_time_s": round(train_time, 1),
        "command": " ".join(["python scripts/train_demo_teacher.py", *(argv if argv is not None else sys.argv[1:])]),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic_write_text(args.out.with_suffix(".json"), json.dumps(record, indent=2) + "\n")
    print(f"{args.out}: test top-1 {top1:.2f} %, sha256 {record['sha256']}, trained in {train_time:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
