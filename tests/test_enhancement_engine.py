"""Low-light enhancement through the whole engine: the registered task, its datasets, its four distillation methods,
the run directory, resume and ``kdforge eval``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cases import make_batch, make_method
from test_enhancement_data import _assert_paired, _lol

from kdforge.api import run
from kdforge.cli import main
from kdforge.config import config_from_dict
from kdforge.data import build_data, cifar10_source
from kdforge.data.synth.lowlight import TEST_SEED, synthesize
from kdforge.errors import ConfigError, DataError
from kdforge.losses.image import (
    attention_distill_loss,
    enhancement_loss,
    feature_distill_loss,
    lowlight_kd_loss,
    output_distill_loss,
)
from kdforge.methods import Progress
from kdforge.registry import DATASETS, TASKS
from kdforge.tasks.enhancement import EnhancementTask
from kdforge.validation import validate

P = Progress(epoch=0, step=0, epoch_float=0.0, fraction=0.0)
TINY = {
    "name": "cifar10_lowlight",
    "batch_size": 8,
    "eval_batch_size": 16,
    "train_subset": 16,
    "test_subset": 16,
    "image_size": 16,
}
FAST = {"epochs": 1, "progress": False, "seed": 0, "log_every": 1}


def _cfg(model: str, method: dict, teacher: dict | None = None, **train) -> dict:
    cfg = {
        "task": {"name": "enhancement"},
        "model": {"name": model},
        "method": method,
        "data": dict(TINY),
        "optim": {"name": "adamw", "lr": 2e-3, "weight_decay": 0.0},
        "train": {**FAST, **train},
    }
    if teacher is not None:
        cfg["teacher"] = teacher
    return cfg


# ---------------------------------------------------------------------------------------------------- the task


def test_the_task_is_registered_with_its_models_and_metrics() -> None:
    task = TASKS.get("enhancement")()
    assert isinstance(task, EnhancementTask)
    assert task.model_names() == ["unet_enhancer_w12", "unet_enhancer_w32", "unet_enhancer_w8"]
    assert task.summary_metrics == ("psnr", "ssim") and task.evaluator().primary == "psnr"
    model = task.build_model("unet_enhancer_w8", num_classes=0)  # the engine passes the data's class count
    x = torch.rand(2, 3, 16, 16)
    out = task.train_outputs(model, x)
    assert len(out.feats) == 7 and torch.equal(out.out, model(x))
    assert DATASETS.meta("cifar10_lowlight")["task"] == DATASETS.meta("lol")["task"] == "enhancement"


# ---------------------------------------------------------------------------------------------------- methods


@pytest.mark.parametrize("name", ["output_kd", "feature_kd", "at_enh", "lowlight_kd"])
def test_method_parts_are_the_task_loss_plus_the_pure_distillation_losses(name: str) -> None:
    params = {"feature_weight": 0.5} if name == "lowlight_kd" else {}
    method = make_method(name, "enhancement", **params)
    batch = make_batch(method, "enhancement")
    out = method(batch, P)
    with torch.no_grad():
        s = method.student.forward_features(batch.input)
        t = method.teacher.forward_features(batch.input)
    expected = enhancement_loss(s.out, batch.targets)
    if name == "output_kd":
        expected["kd_output"] = 1.0 * output_distill_loss(s.out, t.out)
    elif name == "feature_kd":
        expected["kd_feature"] = 10.0 * feature_distill_loss(s.feats, t.feats, method.adapter)
    elif name == "at_enh":
        expected["kd_attention"] = 1000.0 * attention_distill_loss(s.feats, t.feats, 2.0)
    else:
        expected.update(lowlight_kd_loss(s.out, t.out, s.feats, t.feats, feature_weight=0.5, adapter=method.adapter))
        assert set(expected) == {"l1", "ssim", "kd_attention", "kd_output", "kd_gradient", "kd_feature"}
    assert list(out.losses) == list(expected)
    for key, value in expected.items():
        torch.testing.assert_close(out.losses[key], value, msg=key)
    torch.testing.assert_close(out.loss, sum(out.losses.values()))
    assert out.logits is None
    assert set(method.exports()) == {"student"}  # FitNets regressors are not exported


def test_method_stage_selection_and_bad_settings() -> None:
    method = make_method("at_enh", "enhancement", stages=[0, -1])
    batch = make_batch(method, "enhancement")
    with torch.no_grad():
        s = method.student.forward_features(batch.input)
        t = method.teacher.forward_features(batch.input)
    want = 1000.0 * attention_distill_loss([s.feats[0], s.feats[6]], [t.feats[0], t.feats[6]])
    torch.testing.assert_close(method(batch, P).losses["kd_attention"], want)
    fk = make_method("feature_kd", "enhancement", stages=[3])
    assert len(fk.adapter.convs) == 1 and fk.adapter.convs[0].in_channels == 32  # the w=4 student's bottleneck
    with pytest.raises(ConfigError, match="out of range"):
        make_method("feature_kd", "enhancement", stages=[7])
    with pytest.raises(ConfigError, match="out of range"):
        make_method("at_enh", "enhancement", stages=[-8])
    with pytest.raises(ConfigError, match="every distillation weight is 0"):
        make_method("lowlight_kd", "enhancement", attention_weight=0.0, output_weight=0.0, gradient_weight=0.0)
    assert make_method("lowlight_kd", "enhancement").adapter is None  # FitNets off by default: no idle parameters


def test_enhancement_methods_are_refused_for_classification() -> None:
    with pytest.raises(ConfigError, match="method 'output_kd' distils enhancement, not classification"):
        validate(
            config_from_dict(
                {
                    "model": {"name": "resnet8"},
                    "teacher": {"name": "resnet8", "checkpoint": "x"},
                    "method": {"name": "output_kd"},
                }
            )
        )
    with pytest.raises(ConfigError, match="dataset 'cifar10_lowlight' is a enhancement dataset"):
        validate(
            config_from_dict({**_cfg("resnet8", {"name": "vanilla"}), "task": {"name": "classification"}}), "train"
        )


# ---------------------------------------------------------------------------------------------------- data


def test_cifar10_lowlight_inputs_are_raw_degraded_images_and_the_test_split_is_fixed() -> None:
    src = cifar10_source(None)
    a = build_data("cifar10_lowlight", batch_size=4, eval_batch_size=5, train_subset=8, test_subset=10, seed=1)
    b = build_data("cifar10_lowlight", batch_size=4, eval_batch_size=10, train_subset=8, test_subset=10, seed=2)
    assert a.mean == (0.0, 0.0, 0.0) and a.std == (1.0, 1.0, 1.0) and a.num_train == 8
    lows, _ = synthesize(src.test_images[:10], TEST_SEED)
    got = torch.cat([batch.input for batch in a.test])
    assert torch.equal(got, torch.from_numpy(lows).float() / 255.0)  # raw [0, 1], not mean/std-normalised
    assert torch.equal(torch.cat([batch.targets for batch in a.test]), torch.from_numpy(src.test_images[:10]) / 255.0)
    assert torch.equal(got, torch.cat([batch.input for batch in b.test]))  # the run's seed does not touch the test
    assert [batch.index.tolist() for batch in a.test] == [list(range(5)), list(range(5, 10))]
    train_lows, _ = synthesize(src.train_images[:8], 1)  # the training split is degraded with the run's seed
    batch = next(iter(a.train))
    assert batch.input.shape == (4, 3, 32, 32) and batch.targets.shape == (4, 3, 32, 32)
    for k, i in enumerate(batch.index.tolist()):  # joint flips only: the input is a flip of its own degraded image
        ref = torch.from_numpy(train_lows[i]).float() / 255.0
        assert any(torch.equal(batch.input[k], f(ref)) for f in _FLIPS)
    with pytest.raises(DataError, match="larger than the 32 px"):
        build_data("cifar10_lowlight", batch_size=4, train_subset=8, test_subset=4, image_size=40)


_FLIPS = (lambda t: t, lambda t: t.flip(2), lambda t: t.flip(1), lambda t: t.flip(1).flip(2))


def test_training_batches_resume_mid_epoch_and_crop_jointly() -> None:
    data = build_data("cifar10_lowlight", batch_size=4, train_subset=16, test_subset=4, image_size=16, seed=3)
    data.train.set_epoch(1)
    full = list(data.train)
    assert len(full) == 4 and all(b.input.shape == (4, 3, 16, 16) for b in full)
    data.train.set_epoch(1, 2)
    tail = list(data.train)
    assert len(tail) == 2
    for x, y in zip(full[2:], tail, strict=True):
        assert torch.equal(x.input, y.input) and torch.equal(x.targets, y.targets) and torch.equal(x.index, y.index)
    data.train.set_epoch(1)  # start_batch is used once
    assert torch.equal(next(iter(data.train)).input, full[0].input)
    data.train.set_epoch(2)
    assert not torch.equal(next(iter(data.train)).input, full[0].input)


def test_lol_dataset_trains_on_crops_and_evaluates_whole_images(tmp_path: Path) -> None:
    _lol(tmp_path, {f"{i}.png": (20 + i, 24) for i in range(4)}, "our485")
    _lol(tmp_path, {"a.png": (18, 22), "b.png": (18, 22), "c.png": (20, 16)}, "eval15")
    data = build_data("lol", root=str(tmp_path), batch_size=2, eval_batch_size=4, image_size=16)
    assert data.num_train == 4 and len(data.train) == 2 and data.image_size == 16
    for batch in data.train:
        assert batch.input.shape == (2, 3, 16, 16)
        _assert_paired(batch.input, batch.targets)
    sizes = [tuple(b.input.shape) for b in data.test]
    assert sizes == [(2, 3, 18, 22), (1, 3, 20, 16)]  # whole images, same-size neighbours batched
    for batch in data.test:
        _assert_paired(batch.input, batch.targets)
    with pytest.raises(DataError, match="needs data.root"):
        build_data("lol", batch_size=2)
    with pytest.raises(DataError, match="smaller than crop_size"):
        build_data("lol", root=str(tmp_path), batch_size=2, image_size=32)


# ---------------------------------------------------------------------------------------------------- the engine


@pytest.mark.slow  # ~20 s on the shared CPU
def test_train_distill_resume_and_eval_an_enhancer(tmp_path: Path, capsys) -> None:
    teacher_dir = tmp_path / "teacher"
    result = run(config_from_dict(_cfg("unet_enhancer_w12", {"name": "vanilla"})), "train", teacher_dir)
    summary = json.loads((teacher_dir / "summary.json").read_text())
    assert summary["task"] == "enhancement" and summary["primary"] == "psnr"
    assert {"best_psnr", "final_psnr", "final_ssim"} <= set(summary)
    assert summary["final_psnr"] == result.final["psnr"] and np.isfinite(summary["final_ssim"])
    record = json.loads((teacher_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert "test_psnr" in record and "test_ssim" in record and "train_top1" not in record

    teacher = {"name": "unet_enhancer_w12", "checkpoint": str(teacher_dir)}
    method = {"name": "lowlight_kd", "feature_weight": 1.0}
    straight = run(config_from_dict(_cfg("unet_enhancer_w8", method, teacher, epochs=2)), "distill", tmp_path / "a")
    assert {"kd_attention", "kd_output", "kd_gradient", "kd_feature"} <= {
        k.removeprefix("loss_") for k in straight.history[-1]
    }
    run(config_from_dict(_cfg("unet_enhancer_w8", method, teacher, epochs=1)), "distill", tmp_path / "b")
    resumed = run(
        config_from_dict(_cfg("unet_enhancer_w8", method, teacher, epochs=2)), "distill", tmp_path / "b", resume=True
    )
    assert resumed.final == straight.final  # the degradation, crops, flips and the adapters resume bit for bit
    a = torch.load(tmp_path / "a" / "student.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "student.pt", weights_only=True)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(k.startswith("adapter") for k in a)

    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "a")]) == 0
    printed = capsys.readouterr().out
    assert "psnr" in printed and "ssim" in printed and f"{straight.final['psnr']:.2f}" in printed

    # --pictures: input, teacher, student, ground truth; the ground-truth tiles are the test split's clean images
    from PIL import Image

    from kdforge.report.enhancement_pictures import CAPTION, GUTTER

    assert main(["eval", "--checkpoint", str(tmp_path / "a"), "--pictures", "2"]) == 0
    assert f"pictures: {tmp_path / 'a' / 'enhanced.png'}" in capsys.readouterr().out
    grid = np.asarray(Image.open(tmp_path / "a" / "enhanced.png").convert("RGB"))
    data = build_data("cifar10_lowlight", **{k: v for k, v in TINY.items() if k != "name"}, augment=False)
    clean = next(iter(data.test)).targets[:2]
    side, zoom = clean.shape[-1], 4  # whole test images (image_size crops the training images only)
    assert (
        grid.shape[1] == 4 * (side * zoom + GUTTER) + GUTTER
        and grid.shape[0] == CAPTION + 2 * (side * zoom + CAPTION + GUTTER) + GUTTER
    )
    for i in range(2):
        x0, y0 = GUTTER + 3 * (side * zoom + GUTTER), CAPTION + i * (side * zoom + CAPTION + GUTTER) + GUTTER
        tile = grid[y0 : y0 + side * zoom : zoom, x0 : x0 + side * zoom : zoom]
        expected = clean[i].clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(tile, expected)
    assert main(["eval", "--checkpoint", str(tmp_path / "a"), "--pictures", "1", "--teacher", "none"]) == 0
    alone = np.asarray(Image.open(tmp_path / "a" / "enhanced.png"))
    assert alone.shape[1] == 3 * (side * zoom + GUTTER) + GUTTER  # no teacher column
    # --baseline adds the "student alone" column; drawn from the teacher's run here, it must repeat the teacher's
    assert main(["eval", "--checkpoint", str(tmp_path / "a"), "--pictures", "1", "--baseline", str(teacher_dir)]) == 0
    five = np.asarray(Image.open(tmp_path / "a" / "enhanced.png").convert("RGB"))
    cell = side * zoom + GUTTER
    assert five.shape[1] == 5 * cell + GUTTER
    top = CAPTION + GUTTER
    teacher_tile = five[top : top + side * zoom, GUTTER + cell : GUTTER + cell + side * zoom]
    alone_tile = five[top : top + side * zoom, GUTTER + 2 * cell : GUTTER + 2 * cell + side * zoom]
    student_tile = five[top : top + side * zoom, GUTTER + 3 * cell : GUTTER + 3 * cell + side * zoom]
    np.testing.assert_array_equal(alone_tile, teacher_tile)
    assert not np.array_equal(student_tile, teacher_tile)
