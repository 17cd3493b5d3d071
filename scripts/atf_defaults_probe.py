"""How ATF's defaults were chosen: short ATF variants against KD from the same teacher (docs/methods/atf.md).

Needs a teacher trained by ``kdforge demo --train-teacher`` (``runs/demo/teacher/model.pt``: resnet20 on the embedded
subset; the default demo ships its teacher and writes no teacher run).

    kdforge demo --train-teacher --out runs/demo
    python scripts/atf_defaults_probe.py --teacher runs/demo/teacher/model.pt --epochs 3
"""

from __future__ import annotations

import argparse
import time

from kdforge.data import build_data
from kdforge.engine.env import seed_everything
from kdforge.engine.loop import fit
from kdforge.methods import create_method
from kdforge.models import create_model, load_weights

VARIANTS = {
    "kd (tau 4, CE .5, KD .5)": ("kd", {"ce_weight": 0.5, "kd_weight": 0.5}),
    "atf frozen teacher, KL": ("atf", {"teacher_stop": 0.0, "divergence": "fixed", "alpha": 1.0}),
    "atf frozen teacher, adaptive": ("atf", {"teacher_stop": 0.0, "divergence": "adaptive"}),
    "atf teacher BN eval, gap weight, adaptive": (
        "atf",
        {"teacher_bn": "eval", "reverse_mode": "gap", "divergence": "adaptive"},
    ),
    "atf teacher BN train, gap weight, adaptive": ("atf", {"reverse_mode": "gap", "divergence": "adaptive"}),
    "atf confidence weight, adaptive": ("atf", {"divergence": "adaptive", "reverse_mode": "confidence"}),
    "atf confidence weight, KL (alpha 1)": ("atf", {"alpha": 1.0, "reverse_mode": "confidence"}),
    "atf fixed weight, alpha 0.5": ("atf", {"reverse_mode": "fixed"}),
    "atf confidence weight, alpha 0.5": ("atf", {"reverse_mode": "confidence"}),
    "atf defaults (gap weight, alpha 0.5)": ("atf", {}),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="runs/demo/teacher/model.pt")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--only", nargs="+", default=None, help="substrings: run only the variants whose name has one")
    args = p.parse_args()
    variants = {k: v for k, v in VARIANTS.items() if args.only is None or any(o in k for o in args.only)}
    data = build_data("embedded", batch_size=128, eval_batch_size=500)
    for (name, (method, params)), seed in ((v, s) for v in variants.items() for s in args.seeds):
        seed_everything(seed)
        teacher = load_weights(create_model("resnet20", num_classes=10), args.teacher)
        m = create_method(method, create_model("resnet8", num_classes=10), teacher, **params)
        t = time.time()
        r = fit(
            m,
            data,
            train={"epochs": args.epochs, "progress": False, "seed": seed},
            optim={"lr": 0.1, "nesterov": True},
            schedule={"name": "cosine", "warmup_epochs": 0.5},
        )
        curve = [(h.get("test_top1"), h.get("teacher_top1")) for h in r.history]
        print(
            f"{name} [seed {seed}]: (student, tuned teacher) top-1 per epoch {curve}  {time.time() - t:.0f} s",
            flush=True,
        )


if __name__ == "__main__":
    main()
