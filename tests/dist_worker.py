"""Training scenarios run under torchrun by tests/test_distributed.py (not collected by pytest itself).

python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_worker.py MODE OUT [ARGS...]

Each mode trains through the real ``kdforge.fit`` on gloo and writes what the test checks into ``OUT`` (every rank
its own ``rank<r>.pt``/``.json``; rank 0 also the run directory ``fit`` writes).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from conftest import TinyNet

from kdforge.api import fit
from kdforge.data.jda import JDAPolicy
from kdforge.data.loader import TensorLoader
from kdforge.engine import distributed
from kdforge.engine.loop import TrainingInterrupted, evaluate
from kdforge.errors import ConfigError
from kdforge.methods import METHODS, create_method
from kdforge.models import create_model

N_TRAIN, N_TEST = 96, 37  # 37 test images: an odd count the two ranks cannot split evenly
TRAIN = {"device": "cpu", "precision": "fp32", "progress": False, "log_every": 2, "seed": 0}
OPTIM = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}


def make_data(rank: int, world: int, batch_size: int, *, augment: bool = False, views: bool = False) -> SimpleNamespace:
    """Learnable 4-class 8×8 images (class = brighter quadrant), sharded for ``rank`` of ``world``."""
    g = torch.Generator().manual_seed(0)
    n = N_TRAIN + N_TEST
    labels = torch.randint(0, 4, (n,), generator=g)
    images = torch.randint(0, 160, (n, 3, 8, 8), generator=g)
    for i, y in enumerate(labels.tolist()):
        r, c = divmod(y, 2)
        images[i, :, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] += 90
    images = images.to(torch.uint8)
    common = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "rank": rank, "world_size": world}
    train = TensorLoader(
        images[:N_TRAIN],
        labels[:N_TRAIN],
        batch_size,
        train=True,
        augment=augment,
        views=JDAPolicy() if views else None,
        **common,
    )
    test = TensorLoader(images[N_TRAIN:], labels[N_TRAIN:], 16, train=False, **common)
    return SimpleNamespace(train=train, test=test, num_classes=4, num_train=N_TRAIN, train_targets=labels[:N_TRAIN])


class DoubleNet(TinyNet):
    """TinyNet in float64 (inputs cast on the way in): comparisons tight enough to tell a wrong gradient from
    float32 rounding that a relation loss amplifies over many steps."""

    def __init__(self, norm: bool = True) -> None:
        super().__init__(norm=norm)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.double())


def make_method(name: str, norm: bool = True, net: type[TinyNet] = TinyNet, **params):
    torch.manual_seed(0)
    declared = METHODS.get(name).student_models  # e.g. DATS trains only its attention-sampled networks
    student = create_model(declared[0], num_classes=4) if declared else net(norm=norm)
    torch.manual_seed(1)
    teacher = net(norm=norm) if METHODS.get(name).needs_teacher else None
    torch.manual_seed(2)
    context = {"num_classes": 4, "num_train": N_TRAIN, "epochs": 1, "steps_per_epoch": 3}
    context["train_targets"] = make_data(0, 1, 8).train_targets
    return create_method(name, student, teacher, context=context, **params)


def equal(out: Path, batch_size: int, accum: int, name: str = "kd", **params) -> None:
    """``name`` with BN-free nets for 2 epochs; each rank saves its student and its evaluation of the test set."""
    info = distributed.current()
    method = make_method(name, norm=False, **params)
    data = make_data(info.rank, info.world_size, batch_size)
    fit(
        method,
        data,
        train={**TRAIN, "epochs": 2, "grad_accum": accum},
        optim=OPTIM,
        schedule={"name": "cosine"},
        out_dir=out / "run",
    )
    torch.save(method.student.state_dict(), out / f"rank{info.rank}.pt")
    ev = evaluate(method, data.test)
    (out / f"rank{info.rank}.json").write_text(json.dumps(ev))


def methods(out: Path, names: list[str]) -> None:
    """Every method for one short epoch under DDP; each rank records a checksum of every trainable tensor."""
    info = distributed.current()
    params = {
        "atf": {"teacher_start": 0.0, "teacher_stop": 0.5},  # a tuning window: teacher params unused in late steps
        "bilateral": {"teacher_stop": 0.5},
        "dml": {"update": "alternating"},
        "crd": {"nce_k": 16, "feat_dim": 8},
    }
    sums = {}
    for name in names:
        method = make_method(name, **params.get(name, {}))
        data = make_data(info.rank, info.world_size, 8, augment=True, views=METHODS.get(name).needs_views)
        fit(method, data, train={**TRAIN, "epochs": 1}, optim=OPTIM)
        state = {k: v.double().sum().item() for k, v in method.state_dict().items() if v.is_floating_point()}
        sums[name] = state
    try:  # SyncBatchNorm has no CPU kernel: refused up front, on every rank, before any step
        fit(make_method("kd"), make_data(info.rank, info.world_size, 8), train={**TRAIN, "sync_bn": True}, optim=OPTIM)
    except ConfigError as err:
        sums["sync_bn_error"] = str(err)
    (out / f"rank{info.rank}.json").write_text(json.dumps(sums))


def segmentation(out: Path, names: list[str]) -> None:
    """Segmentation under DDP: the evaluator of a sharded test split (an odd count) against one process on all of
    it, and every segmentation method for one short epoch (checksums of every trainable tensor per rank)."""
    from kdforge.data.dense_loader import DenseTensorLoader
    from kdforge.engine.evaluation import evaluate as evaluate_task
    from kdforge.registry import TASKS

    info = distributed.current()
    task = TASKS.get("segmentation")(num_classes=4)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 255, (N_TRAIN + N_TEST, 3, 16, 16), generator=g).to(torch.uint8)
    masks = torch.randint(0, 4, (N_TRAIN + N_TEST, 16, 16), generator=g)
    masks[:, 0] = 255
    common = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}

    def loaders(rank: int, world: int) -> SimpleNamespace:
        train = DenseTensorLoader(
            images[:N_TRAIN], masks[:N_TRAIN], 8, train=True, rank=rank, world_size=world, **common
        )
        test = DenseTensorLoader(
            images[N_TRAIN:], masks[N_TRAIN:], 5, train=False, rank=rank, world_size=world, **common
        )
        return SimpleNamespace(train=train, test=test, num_classes=4, num_train=N_TRAIN, train_targets=None)

    torch.manual_seed(0)
    student = task.build_model("fcn_resnet8").eval()
    results = {"sharded": evaluate_task(student, loaders(info.rank, info.world_size).test, task=task)}
    results["single"] = evaluate_task(student, loaders(0, 1).test, task=task)
    for name in names:
        torch.manual_seed(0)
        s_net = task.build_model("fcn_resnet8")
        t_net = task.build_model("fcn_resnet14") if METHODS.get(name).needs_teacher else None
        method = create_method(name, s_net, t_net, task=task)
        fit(method, loaders(info.rank, info.world_size), train={**TRAIN, "epochs": 1}, optim=OPTIM)
        results[name] = {k: v.double().sum().item() for k, v in method.state_dict().items() if v.is_floating_point()}
    (out / f"rank{info.rank}.json").write_text(json.dumps(results))


def hashing(out: Path, names: list[str]) -> None:
    """Hashing under DDP: mAP (and a method's teacher-database mAP) of sharded queries and database (odd counts,
    gathered to rank 0 by index) against one process, and every hashing method for two short epochs (BRCD clusters
    its rank-summed code table at the second) with checksums per rank."""
    from kdforge.data.hashing import HashingLoader
    from kdforge.engine.evaluation import evaluate as evaluate_task
    from kdforge.registry import TASKS

    info = distributed.current()
    task = TASKS.get("hashing")(bits=16, topk=20)
    g = torch.Generator().manual_seed(0)
    n_db = 29
    images = torch.randint(0, 255, (N_TRAIN + N_TEST + n_db, 3, 16, 16), generator=g).to(torch.uint8)
    labels = torch.randint(0, 4, (N_TRAIN + N_TEST + n_db,), generator=g)
    common = {"image_size": 16}

    def loaders(rank: int, world: int) -> SimpleNamespace:
        shard = {"rank": rank, "world_size": world, **common}
        db = HashingLoader(images[-n_db:], labels[-n_db:], 4, train=False, **shard)
        test = HashingLoader(
            images[N_TRAIN : N_TRAIN + N_TEST], labels[N_TRAIN : N_TRAIN + N_TEST], 5, train=False,
            extra_splits={"database": db}, **shard,
        )  # fmt: skip
        train = HashingLoader(images[:N_TRAIN], labels[:N_TRAIN], 8, train=True, **shard)
        return SimpleNamespace(train=train, test=test, num_classes=4, num_train=N_TRAIN, train_targets=None)

    torch.manual_seed(0)
    student, teacher = task.build_model("hash_resnet8").eval(), task.build_model("hash_resnet14").eval()
    probe = create_method("code_kd", student, teacher, task=task)
    results = {"sharded": evaluate_task(probe, loaders(info.rank, info.world_size).test, task=task)}
    results["single"] = evaluate_task(probe, loaders(0, 1).test, task=task)
    for name in names:
        torch.manual_seed(0)
        s_net = task.build_model("hash_resnet8")
        t_net = task.build_model("hash_resnet14") if METHODS.get(name).needs_teacher else None
        context = {"num_train": N_TRAIN, "epochs": 2}
        method = create_method(name, s_net, t_net, task=task, context=context)
        fit(method, loaders(info.rank, info.world_size), train={**TRAIN, "epochs": 2}, optim=OPTIM)
        # BRCD's table of recorded teacher codes is per rank by design (each rank records its shard; clustering sums
        # the tables): every other tensor, its clusters included, must be identical across ranks.
        own = set(method.ddp_ignored_state())
        state = method.state_dict().items()
        results[name] = {k: v.double().sum().item() for k, v in state if v.is_floating_point() and k not in own}
    (out / f"rank{info.rank}.json").write_text(json.dumps(results))


def detection(out: Path, names: list[str]) -> None:
    """Detection under DDP: COCO AP of a sharded test split (an odd count, gathered to rank 0 and ordered by image
    id) against one process on all of it, and every detection method for one short epoch (checksums per rank)."""
    from kdforge.registry import TASKS

    # score_threshold 0: an untrained detector's scores sit at the 0.01 prior, and the metric must see detections
    task = TASKS.get("detection")(num_classes=4, score_threshold=0.0, max_per_image=20)
    g = torch.Generator().manual_seed(0)
    n = N_TRAIN + N_TEST
    images = torch.randint(0, 255, (n, 3, 64, 64), generator=g).to(torch.uint8)
    wh = 8 + torch.rand(n, 3, 2, generator=g) * 40
    xy = torch.rand(n, 3, 2, generator=g) * (64 - wh)
    labels = torch.randint(0, 4, (n, 3), generator=g)
    labels[::3, 2] = -1
    targets = {"boxes": torch.cat((xy, xy + wh), -1), "labels": labels, "image_ids": torch.arange(n)}
    # lr 0.1 (OPTIM's) diverges on a detector fed noise images; 0.01 is GFL's
    _detector_ddp(out, names, task, images, targets, "gfl_resnet8", "gfl_resnet20", lr=0.01)


def _detector_ddp(
    out: Path, names: list[str], task, images: torch.Tensor, targets: dict, student: str, teacher: str, lr: float
) -> None:
    """The metric of a sharded test split (the last N_TEST images) against one process on all of it, then every
    method in ``names`` for one short epoch on the first N_TRAIN // 2 (checksums of every float tensor per rank)."""
    from kdforge.data.dense_loader import DenseTensorLoader
    from kdforge.engine.evaluation import evaluate as evaluate_task

    info = distributed.current()
    n = len(images)
    common = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    # Half the training images: three steps per rank still carry gradients, buffers and every method's state
    # through the all-reduce, and these are among the costliest DDP checks of make test.
    n_train = N_TRAIN // 2

    def part(sl: slice) -> dict:
        return {k: v[sl] for k, v in targets.items()}

    def loaders(rank: int, world: int) -> SimpleNamespace:
        train = DenseTensorLoader(
            images[:n_train], part(slice(0, n_train)), 8, train=True, rank=rank, world_size=world, **common
        )
        test = DenseTensorLoader(
            images[N_TRAIN:], part(slice(N_TRAIN, n)), 5, train=False, rank=rank, world_size=world, **common
        )
        return SimpleNamespace(train=train, test=test, num_classes=4, num_train=n_train, train_targets=None)

    torch.manual_seed(0)
    net = task.build_model(student).eval()
    results = {"sharded": evaluate_task(net, loaders(info.rank, info.world_size).test, task=task)}
    results["single"] = evaluate_task(net, loaders(0, 1).test, task=task)
    for name in names:
        torch.manual_seed(0)
        s_net = task.build_model(student)
        t_net = task.build_model(teacher) if METHODS.get(name).needs_teacher else None
        method = create_method(name, s_net, t_net, task=task)
        fit(method, loaders(info.rank, info.world_size), train={**TRAIN, "epochs": 1}, optim={**OPTIM, "lr": lr})
        results[name] = {k: v.double().sum().item() for k, v in method.state_dict().items() if v.is_floating_point()}
    (out / f"rank{info.rank}.json").write_text(json.dumps(results))


def enhancement(out: Path, names: list[str]) -> None:
    """Enhancement under DDP: mean PSNR/SSIM of a sharded test split (an odd count, two image sizes, so the ranks'
    batches differ in shape) against one process on all of it, and every enhancement method for one short epoch
    (checksums of every trainable tensor per rank)."""
    from kdforge.data.lowlight import EnhancementLoader, InMemoryPairs
    from kdforge.engine.evaluation import evaluate as evaluate_task
    from kdforge.registry import TASKS

    info = distributed.current()
    task = TASKS.get("enhancement")()
    g = torch.Generator().manual_seed(0)
    highs = torch.randint(0, 255, (N_TRAIN + N_TEST, 3, 16, 16), generator=g).to(torch.uint8)
    lows = (highs.float() * 0.2).to(torch.uint8)
    big = torch.randint(0, 255, (N_TEST // 2, 3, 20, 20), generator=g).to(torch.uint8)
    test_highs = list(highs[N_TRAIN:]) + list(big)  # sizes 16, then 20
    test_lows = [(h.float() * 0.2).to(torch.uint8) for h in test_highs]
    train = InMemoryPairs(lows[:N_TRAIN], highs[:N_TRAIN], [str(i) for i in range(N_TRAIN)])
    test = InMemoryPairs(test_lows, test_highs, [str(i) for i in range(len(test_highs))])

    def loaders(rank: int, world: int) -> SimpleNamespace:
        common = {"rank": rank, "world_size": world}
        return SimpleNamespace(
            train=EnhancementLoader(train, 8, train=True, crop_size=12, **common),
            test=EnhancementLoader(test, 5, train=False, **common),
            num_classes=0,
            num_train=N_TRAIN,
            train_targets=None,
        )

    torch.manual_seed(0)
    student = task.build_model("unet_enhancer_w8").eval()
    results = {"sharded": evaluate_task(student, loaders(info.rank, info.world_size).test, task=task)}
    results["single"] = evaluate_task(student, loaders(0, 1).test, task=task)
    for name in names:
        torch.manual_seed(0)
        s_net = task.build_model("unet_enhancer_w8")
        t_net = task.build_model("unet_enhancer_w12") if METHODS.get(name).needs_teacher else None
        method = create_method(name, s_net, t_net, task=task)
        fit(
            method,
            loaders(info.rank, info.world_size),
            train={**TRAIN, "epochs": 1},
            optim={"name": "adamw", "lr": 1e-3},
        )
        results[name] = {k: v.double().sum().item() for k, v in method.state_dict().items() if v.is_floating_point()}
    (out / f"rank{info.rank}.json").write_text(json.dumps(results))


def oriented(out: Path, names: list[str]) -> None:
    """Oriented detection under DDP: DOTA-style mAP of a sharded test split (an odd count; counts summed, matched
    detections gathered to rank 0 and ordered by image id) against one process on all of it, and every
    oriented-detection method for one short epoch (checksums per rank)."""
    from kdforge.registry import TASKS

    # score_threshold 0: an untrained detector's scores sit at the 0.01 prior, and the metric must see detections;
    # five per image keep the rotated-IoU matching cheap (100 per image made this the slowest test of make test)
    task = TASKS.get("oriented_detection")(
        num_classes=4, reg_max=8, angle_bins=8, score_threshold=0.0, pre_nms_topk=30, max_per_image=5
    )
    g = torch.Generator().manual_seed(0)
    n = N_TRAIN + N_TEST
    images = torch.randint(0, 255, (n, 3, 64, 64), generator=g).to(torch.uint8)
    long = 12 + torch.rand(n, 3, generator=g) * 36
    short = long / (1.5 + 2 * torch.rand(n, 3, generator=g))
    centre = 16 + torch.rand(n, 3, 2, generator=g) * 32
    theta = (torch.rand(n, 3, generator=g) - 0.5) * torch.pi
    rboxes = torch.cat((centre, long[..., None], short[..., None], theta[..., None]), -1)
    labels = torch.randint(0, 4, (n, 3), generator=g)
    labels[::3, 2] = -1
    targets = {"rboxes": rboxes, "labels": labels, "image_id": torch.arange(n)}
    _detector_ddp(out, names, task, images, targets, "ogfl_resnet8", "ogfl_resnet20", lr=0.01)


def resume(out: Path) -> None:
    """CRD (per-rank negative sampling, all-gathered banks) for 2 epochs straight, and 1 epoch then resumed."""
    info = distributed.current()
    results = {}
    for tag, plan in (("straight", [(2, False)]), ("resumed", [(1, False), (2, True)])):
        for epochs, again in plan:
            method = make_method("crd", nce_k=16, feat_dim=8)
            data = make_data(info.rank, info.world_size, 8, augment=True)
            fit(method, data, train={**TRAIN, "epochs": epochs}, optim=OPTIM, out_dir=out / tag, resume=again)
        results[tag] = {k: v.clone() for k, v in method.state_dict().items()}
    torch.save(results, out / f"rank{info.rank}.pt")


class Faulty(TinyNet):
    """Raises on rank 1 at its third training forward: one rank failing mid-run."""

    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            Faulty.calls += 1
            if distributed.current().rank == 1 and Faulty.calls == 3:
                raise RuntimeError("injected fault on rank 1")
        return super().forward(x)


class SelfSignal(TinyNet):
    """Sends SIGTERM to its own process on rank 1 at the third training forward: a stop only one rank received."""

    armed = True
    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and SelfSignal.armed:
            SelfSignal.calls += 1
            if distributed.current().rank == 1 and SelfSignal.calls == 3:
                os.kill(os.getpid(), signal.SIGTERM)
        return super().forward(x)


def stop(out: Path) -> None:
    """A SIGTERM on rank 1 only: both ranks must stop after the same step, then resume to the uninterrupted result."""
    info = distributed.current()
    train = {**TRAIN, "epochs": 2}
    outcome = {}
    for tag in ("straight", "stopped"):
        SelfSignal.armed = tag == "stopped"
        torch.manual_seed(0)
        model = SelfSignal(norm=False)
        data = make_data(info.rank, info.world_size, 4, augment=True)
        try:
            fit(model, data, train=train, optim=OPTIM, out_dir=out / tag)
        except TrainingInterrupted as err:
            outcome["message"] = str(err)
            SelfSignal.armed = False
            fit(model, data, train=train, optim=OPTIM, out_dir=out / tag, resume=True)
        outcome[tag] = {k: v.tolist() for k, v in model.state_dict().items()}
    (out / f"rank{info.rank}.json").write_text(json.dumps(outcome))


def fault(out: Path) -> None:
    info = distributed.current()
    torch.manual_seed(0)
    fit(Faulty(), make_data(info.rank, info.world_size, 8), train={**TRAIN, "epochs": 50}, optim=OPTIM)


def main() -> None:
    mode, out, *rest = sys.argv[1:]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    distributed.init_distributed("cpu", timeout_s=60)
    if mode == "equal":
        equal(out, int(rest[0]), int(rest[1]))
    elif mode == "rkd_global":
        equal(out, int(rest[0]), 1, "rkd", net=DoubleNet, global_batch=True)
    elif mode == "methods":
        methods(out, rest)
    elif mode == "segmentation":
        segmentation(out, rest)
    elif mode == "detection":
        detection(out, rest)
    elif mode == "hashing":
        hashing(out, rest)
    elif mode == "enhancement":
        enhancement(out, rest)
    elif mode == "oriented":
        oriented(out, rest)
    elif mode == "resume":
        resume(out)
    elif mode == "fault":
        fault(out)
    elif mode == "stop":
        stop(out)
    else:
        raise SystemExit(f"unknown mode {mode}")
    distributed.shutdown()
    distributed.exit_process(0)  # as the kdforge command does under torchrun


if __name__ == "__main__":
    main()
