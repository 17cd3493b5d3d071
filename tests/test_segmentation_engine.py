"""Segmentation through the whole engine: the task layer, its methods, config checks, the run directory, resume,
``kdforge eval`` and a user's own VOC-layout folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cases import make_batch, make_method
from test_segmentation_data import _voc

from kdforge.api import run
from kdforge.cli import main
from kdforge.config import config_from_dict
from kdforge.data import build_data
from kdforge.engine.evaluation import evaluate
from kdforge.errors import ConfigError
from kdforge.losses.dense import cwd_loss, fckd_losses, match_size, pixel_kd_loss
from kdforge.methods import Progress
from kdforge.registry import TASKS
from kdforge.tasks.segmentation import SegmentationEvaluator, masked_cross_entropy
from kdforge.validation import validate

P = Progress(epoch=0, step=0, epoch_float=0.0, fraction=0.0)
TINY = {"name": "cifar10_seg", "batch_size": 16, "eval_batch_size": 32, "train_subset": 64, "test_subset": 32}
FAST = {"epochs": 1, "progress": False, "seed": 0, "log_every": 2}


def _cfg(model: str, method: dict, teacher: dict | None = None, **train) -> dict:
    cfg = {
        "task": {"name": "segmentation"},
        "model": {"name": model},
        "method": method,
        "data": dict(TINY),
        "optim": {"lr": 0.05},
        "train": {**FAST, **train},
    }
    if teacher is not None:
        cfg["teacher"] = teacher
    return cfg


# ---------------------------------------------------------------------------------------------------- methods


@pytest.mark.parametrize("name", ["pixel_kd", "cwd", "fckdnet"])
def test_method_parts_are_the_task_loss_plus_the_pure_distillation_losses(name: str) -> None:
    method = make_method(name, "segmentation")
    method.eval()  # fixed BN statistics, so the recomputation below sees the same outputs
    batch = make_batch(method, "segmentation")
    out = method(batch, P)
    with torch.no_grad():
        s = method.student.forward_features(batch.input)
        t = method.teacher.forward_features(batch.input)
    mask = batch.targets
    torch.testing.assert_close(out.losses["ce"], masked_cross_entropy(s.logits, mask))
    if name == "pixel_kd":
        expected = {"kd": 10.0 * pixel_kd_loss(s.logits, t.logits, 1.0, mask != 255)}
    elif name == "cwd":
        expected = {"cwd": 5.0 * cwd_loss(match_size(s.seg_logits, t.seg_logits), t.seg_logits, 1.0)}
    else:
        parts = fckd_losses(s.logits, t.logits, 4.0)
        expected = {"spatial": 3.0 * parts["spatial"], "channel": 10.0 * parts["channel"]}
    for key, value in expected.items():
        torch.testing.assert_close(out.losses[key], value, msg=key)
    torch.testing.assert_close(out.loss, sum(out.losses.values()))
    assert out.logits is None


def test_a_classification_method_is_refused_for_segmentation_and_vice_versa() -> None:
    seg = TASKS.get("segmentation")(num_classes=4)
    with pytest.raises(ConfigError, match="method 'kd' distils classification, not segmentation"):
        validate(config_from_dict(_cfg("fcn_resnet8", {"name": "kd"}, {"name": "fcn_resnet8", "checkpoint": "x"})))
    with pytest.raises(ConfigError, match="dataset 'cifar10_seg' is a segmentation dataset"):
        validate(
            config_from_dict({**_cfg("resnet8", {"name": "vanilla"}), "task": {"name": "classification"}}), "train"
        )
    with pytest.raises(ConfigError, match="unknown model 'resnet8'"):
        validate(config_from_dict(_cfg("resnet8", {"name": "vanilla"})), "train")
    with pytest.raises(ConfigError, match="task.ignore_indx"):
        validate(
            config_from_dict(
                {**_cfg("fcn_resnet8", {"name": "vanilla"}), "task": {"name": "segmentation", "ignore_indx": 3}}
            ),
            "train",
        )
    assert seg.evaluator().primary == "mIoU"


# ---------------------------------------------------------------------------------------------------- the engine


def test_evaluate_through_the_task_equals_the_evaluator_on_all_predictions() -> None:
    data = build_data("cifar10_seg", batch_size=8, eval_batch_size=7, train_subset=16, test_subset=20)
    task = TASKS.get("segmentation")(num_classes=11)
    torch.manual_seed(0)
    model = task.build_model("fcn_resnet8").eval()
    got = evaluate(model, data.test, task=task)
    ref = SegmentationEvaluator(11)
    with torch.no_grad():
        for batch in data.test:
            ref.update(model(batch.input).argmax(1), batch.targets)
    assert got == ref.compute()
    assert set(got) >= {"mIoU", "aAcc", "mAcc"}


def test_train_distill_resume_and_eval_a_segmenter(tmp_path: Path, capsys) -> None:
    teacher_dir = tmp_path / "teacher"
    result = run(config_from_dict(_cfg("fcn_resnet14", {"name": "vanilla"})), "train", teacher_dir)
    summary = json.loads((teacher_dir / "summary.json").read_text())
    assert summary["task"] == "segmentation" and summary["primary"] == "mIoU"
    assert {"best_mIoU", "final_mIoU", "final_aAcc", "final_mAcc"} <= set(summary)
    assert summary["final_mIoU"] == result.final["mIoU"] and np.isnan(result.best_top1)
    record = json.loads((teacher_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert "test_mIoU" in record and "train_top1" not in record

    teacher = {"name": "fcn_resnet14", "checkpoint": str(teacher_dir)}
    straight = run(config_from_dict(_cfg("fcn_resnet8", {"name": "cwd"}, teacher, epochs=2)), "distill", tmp_path / "a")
    run(config_from_dict(_cfg("fcn_resnet8", {"name": "cwd"}, teacher, epochs=1)), "distill", tmp_path / "b")
    resumed = run(
        config_from_dict(_cfg("fcn_resnet8", {"name": "cwd"}, teacher, epochs=2)),
        "distill",
        tmp_path / "b",
        resume=True,
    )
    assert resumed.final == straight.final  # the masks, the augmentation and the task loss resume bit for bit
    a = torch.load(tmp_path / "a" / "student.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "student.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)

    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "a")]) == 0
    printed = capsys.readouterr().out
    assert "mIoU" in printed and f"{straight.final['mIoU']:.2f}" in printed


def test_a_voc_folder_trains_and_is_scored_at_its_own_image_sizes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    masks = {f"im{i}": rng.integers(0, 21, (24 + 4 * i, 32 + 2 * i)).astype(np.uint8) for i in range(6)}
    masks["im0"][0] = 255  # a border of ignored pixels
    root = _voc(tmp_path / "voc", masks, {"train": ["im0", "im1", "im2", "im3"], "val": ["im4", "im5", "im0"]})
    data = build_data("seg_folder", root=str(root), batch_size=2, eval_batch_size=2, image_size=24)
    assert data.num_classes == 21 and len(data.train) == 2
    batch = next(iter(data.train))
    assert batch.input.shape == (2, 3, 24, 24) and batch.targets.shape == (2, 24, 24)
    task = TASKS.get("segmentation")(num_classes=21)
    counted = SegmentationEvaluator(21)
    for b in data.test:  # padded to a multiple of 8 with ignored pixels: every original pixel once, no other
        counted.update(torch.zeros_like(b.targets), b.targets)
    labelled = sum(int((masks[n] != 255).sum()) for n in ("im4", "im5", "im0"))
    assert int(counted.state().sum()) == labelled
    out = run(
        config_from_dict(
            {
                **_cfg("fcn_resnet8", {"name": "vanilla"}),
                "data": {
                    "name": "seg_folder",
                    "root": str(root),
                    "batch_size": 2,
                    "eval_batch_size": 2,
                    "image_size": 24,
                },
            }
        ),
        "train",
        tmp_path / "run",
    )
    assert np.isfinite(out.final["aAcc"])
    del task
