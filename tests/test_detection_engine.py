"""Detection through the whole engine: the registered task, its datasets (synthetic canvases and a COCO folder),
its distillation methods (golden by composition with the pure losses), the run directory, resume and
``kdforge eval``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cases import make_batch, make_method
from PIL import Image
from torch import nn

from kdforge.api import run
from kdforge.cli import main
from kdforge.config import config_from_dict, load_config
from kdforge.data import build_data
from kdforge.errors import ConfigError, DataError
from kdforge.export import export_student
from kdforge.losses.detection import class_kd_loss, hcl_loss, ld_loss, ld_vlr_loss, pkd_loss, teacher_share
from kdforge.methods import Progress
from kdforge.methods.shared_kd import step2_weight
from kdforge.registry import TASKS
from kdforge.tasks.detection import DetectionEvaluator, Detections, DetectionTask
from kdforge.validation import validate

P = Progress(epoch=0, step=0, epoch_float=0.0, fraction=0.0)
TINY = {"name": "cifar10_det", "batch_size": 8, "eval_batch_size": 16, "train_subset": 16, "test_subset": 16}
FAST = {"epochs": 1, "progress": False, "seed": 0, "log_every": 1}


def _cfg(model: str, method: dict, teacher: dict | None = None, **train) -> dict:
    cfg = {
        "task": {"name": "detection"},
        "model": {"name": model},
        "method": method,
        "data": dict(TINY),
        "optim": {"lr": 0.01},
        "train": {**FAST, **train},
    }
    if teacher is not None:
        cfg["teacher"] = teacher
    return cfg


# ---------------------------------------------------------------------------------------------------- the task


def test_detection_is_a_registered_task_with_ap_as_primary() -> None:
    cls = TASKS.get("detection")
    assert cls is DetectionTask and cls.summary_metrics == ("AP", "AP50", "AP75")
    assert "gfl_resnet8" in cls.model_names() and "gfl_resnet56" in cls.model_names()
    task = cls(num_classes=3)
    assert task.evaluator().primary == "AP" and task.evaluator().higher_is_better
    model = task.build_model("gfl_resnet8", num_classes=99)  # the engine's keyword is replaced by the task's
    assert model.num_classes == 3
    with pytest.raises(ConfigError, match="num_classes >= 1"):
        cls(num_classes=0)


def test_predict_takes_only_outputs_and_clips_to_the_input_size() -> None:
    task = DetectionTask(num_classes=2)
    torch.manual_seed(0)
    model = task.build_model("gfl_resnet8").eval()
    x = torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        out, feats = model(x), task.train_outputs(model, x)
    assert task.image_size(out) == (48, 80) == task.image_size(feats)
    a, b = task.predict(out), task.predict(feats)
    explicit = task.predict(out, image_size=(48, 80))
    for da, db, de in zip(a, b, explicit, strict=True):
        assert torch.equal(da.boxes, db.boxes) and torch.equal(da.boxes, de.boxes)
        if len(da.boxes):
            assert da.boxes[:, 0::2].max() <= 80 and da.boxes[:, 1::2].max() <= 48 and da.boxes.min() >= 0


def test_class_kd_loss_against_a_hand_written_formula() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g)
    for temperature, beta in ((1.0, 2.0), (2.0, 0.0), (0.5, 1.0)):
        sn, tn = s.double().numpy() / temperature, t.double().numpy() / temperature
        p, q = 1 / (1 + np.exp(-sn)), 1 / (1 + np.exp(-tn))
        bce = -(q * np.log(p) + (1 - q) * np.log(1 - p))
        expected = (bce * np.abs(q - p) ** beta).sum(1)
        got = class_kd_loss(s, t, temperature, beta)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert torch.allclose(class_kd_loss(s, s), torch.zeros(6), atol=1e-7)  # a student equal to its teacher: 0
    s.requires_grad_(True)
    class_kd_loss(s, t).sum().backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------- methods


@pytest.mark.parametrize("name", ["det_kd", "ld", "pkd", "fgd"])
def test_method_parts_are_the_task_loss_plus_the_pure_distillation_losses(name: str) -> None:
    method = make_method(name, "detection")
    method.eval()  # fixed statistics, so the recomputation below sees the same outputs
    batch = make_batch(method, "detection")
    out = method(batch, P)
    task = method.task
    targets = batch.targets
    with torch.no_grad():
        s = method.student.forward_features(batch.input)
        t = method.teacher.forward_features(batch.input)
    for key, value in task.loss(s, targets).items():
        torch.testing.assert_close(out.losses[key], value, msg=key)
    fs, ft = task.flatten(s), task.flatten(t)
    a = task.assign(fs, targets)
    if name == "det_kd":
        expected = {
            "cls_kd": class_kd_loss(fs.cls_logits.flatten(0, 1), ft.cls_logits.flatten(0, 1)).sum()
            / a.pos_mask.sum().clamp(min=1)
        }
    elif name == "ld":
        pos = a.pos_mask
        assert pos.any()
        w = fs.cls_logits.sigmoid().amax(-1)[pos]
        region = task.valuable_region(fs, targets)
        assert (region > 0).any()
        expected = {
            "ld": ld_loss(fs.edge_logits[pos], ft.edge_logits[pos], w, 10.0, 0.25),
            "ld_vlr": ld_vlr_loss(fs.edge_logits, ft.edge_logits, region, 10.0, 0.0625),
        }
    elif name == "pkd":
        with torch.no_grad():
            adapted = [adapter(f) for adapter, f in zip(method.adapters, s.feats, strict=True)]
        expected = {"pkd": pkd_loss(adapted, t.feats, 6.0)}
    else:
        expected = {}
        with torch.no_grad():
            for loss, sf, tf in zip(method.losses, s.feats, t.feats, strict=True):
                for key, value in loss(sf, tf, targets["boxes"], targets["labels"] >= 0, (64, 64)).items():
                    expected[key] = expected.get(key, 0.0) + value
        assert set(expected) == {"fgd_fg", "fgd_bg", "fgd_mask", "fgd_rela"}
    for key, value in expected.items():
        torch.testing.assert_close(out.losses[key], value, msg=key)
    assert set(out.losses) == set(task.loss(s, targets)) | set(expected)
    torch.testing.assert_close(out.loss, sum(out.losses.values()))
    assert out.logits is None


def test_feature_methods_adapt_widths_and_train_their_modules_with_the_student() -> None:
    pkd = make_method("pkd", "detection")  # gfl_resnet8 (FPN 32) -> gfl_resnet20 (FPN 48)
    assert all(isinstance(a, nn.Conv2d) and (a.in_channels, a.out_channels) == (32, 48) for a in pkd.adapters)
    same = type(pkd)(pkd.student, pkd.student)
    assert all(isinstance(a, nn.Identity) for a in same.adapters)
    for method in (pkd, make_method("fgd", "detection")):
        group = {id(p) for g in method.param_groups() for p in g["params"]}
        extra = [p for n, p in method.named_parameters() if not n.startswith("student.")]
        assert extra and all(id(p) in group for p in extra)
        assert set(method.exports()) == {"student"}
    with pytest.raises(ValueError, match="loss_weight"):
        type(pkd)(pkd.student, pkd.teacher, loss_weight=-1.0)


def test_a_classification_method_is_refused_for_detection() -> None:
    teacher = {"name": "gfl_resnet20", "checkpoint": "x"}
    with pytest.raises(ConfigError, match="method 'kd' distils classification, not detection"):
        validate(config_from_dict(_cfg("gfl_resnet8", {"name": "kd"}, teacher)))
    with pytest.raises(ConfigError, match="unknown model 'resnet8'"):
        validate(config_from_dict(_cfg("resnet8", {"name": "vanilla"})), "train")


# ---------------------------------------------------------------------------------------------------- data


def test_cifar10_det_batches_boxes_in_the_canvas_and_is_deterministic() -> None:
    a = build_data("cifar10_det", batch_size=4, eval_batch_size=8, train_subset=8, test_subset=8, seed=3)
    b = build_data("cifar10_det", batch_size=4, eval_batch_size=8, train_subset=8, test_subset=8, seed=3)
    assert a.num_classes == 10 and a.image_size == 96 and len(a.train) == 2
    ba, bb = next(iter(a.train)), next(iter(b.train))
    assert torch.equal(ba.input, bb.input) and all(torch.equal(ba.targets[k], bb.targets[k]) for k in ba.targets)
    assert ba.input.shape == (4, 3, 96, 96) and set(ba.targets) == {"boxes", "labels", "image_ids"}
    boxes, labels = ba.targets["boxes"], ba.targets["labels"]
    valid = labels >= 0
    assert valid.any(dim=1).all()  # every canvas keeps an object through the augmentation here
    assert (boxes[valid] >= 0).all() and (boxes[valid] <= 96).all()
    assert (boxes[valid][:, 2:] - boxes[valid][:, :2] >= 4).all()
    test = next(iter(a.test))
    assert torch.equal(test.targets["image_ids"], torch.arange(8))
    with pytest.raises(DataError, match="multiple of 16"):
        build_data("cifar10_det", batch_size=4, eval_batch_size=8, train_subset=8, test_subset=8, image_size=72)


def _coco(root: Path, sizes: dict[str, list[tuple[int, int]]]) -> tuple[Path, dict[str, list[list[float]]]]:
    """A COCO layout with images of the given ``(W, H)`` and one or two boxes each; returns the root and boxes."""
    rng = np.random.default_rng(0)
    boxes: dict[str, list[list[float]]] = {}
    (root / "annotations").mkdir(parents=True)
    for split, whs in sizes.items():
        (root / split).mkdir()
        images, anns = [], []
        for i, (w, h) in enumerate(whs):
            name = f"{split}_{i}.png"
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / split / name)
            images.append({"id": 10 + i, "file_name": name, "width": w, "height": h})
            for j in range(1 + i % 2):
                box = [2.0 + 3 * j, 3.0 + j, w / 2, h / 3]
                boxes.setdefault(split, []).append(box)
                anns.append(
                    {"id": len(anns) + 1, "image_id": 10 + i, "category_id": 7 + 2 * j, "bbox": box, "iscrowd": 0,
                     "area": box[2] * box[3]}
                )  # fmt: skip
        cats = [{"id": 7, "name": "cat"}, {"id": 9, "name": "dog"}]
        data = {"images": images, "annotations": anns, "categories": cats}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return root, boxes


def test_coco_det_letterboxes_and_scores_in_original_image_coordinates(tmp_path: Path) -> None:
    root, _ = _coco(tmp_path / "coco", {"train": [(80, 40), (40, 64), (64, 64), (50, 30)], "val": [(96, 48), (32, 80)]})
    data = build_data("coco_det", root=str(root), batch_size=2, eval_batch_size=2, image_size=32)
    assert data.num_classes == 2 and data.classes == ["cat", "dog"] and len(data.train) == 2
    batch = next(iter(data.test))
    assert batch.input.shape == (2, 3, 32, 32)
    t = batch.targets
    torch.testing.assert_close(t["scales"], torch.tensor([32 / 96, 32 / 80]))
    assert t["sizes"].tolist() == [[48, 96], [80, 32]]
    # targets in original pixels: image 0 (96x48) has box [2, 3, 2 + 48, 3 + 16]
    torch.testing.assert_close(t["boxes"][0, 0], torch.tensor([2.0, 3.0, 50.0, 19.0]))
    # detections at the gt boxes in letterboxed pixels score AP 1 once mapped back (and 0 without the scales)
    preds = []
    for i in range(2):
        valid = t["labels"][i] >= 0
        preds.append(
            Detections(t["boxes"][i][valid] * t["scales"][i], torch.ones(int(valid.sum())), t["labels"][i][valid])
        )
    mapped, unmapped = DetectionEvaluator(2), DetectionEvaluator(2)
    mapped.update(preds, t)
    unmapped.update(preds, {k: v for k, v in t.items() if k not in ("scales", "sizes")})
    assert mapped.compute()["AP"] == pytest.approx(1.0) and unmapped.compute()["AP50"] < 0.5
    train = next(iter(build_data("coco_det", root=str(root), batch_size=4, eval_batch_size=2, image_size=32,
                                 augment=False).train))  # fmt: skip
    valid = train.targets["labels"] >= 0
    assert (train.targets["boxes"][valid] <= 32 + 1e-4).all() and "scales" not in train.targets
    with pytest.raises(DataError, match="needs data.root"):
        build_data("coco_det", batch_size=2, eval_batch_size=2)


def test_a_coco_run_saves_its_class_count_so_export_needs_no_annotations(tmp_path: Path) -> None:
    """A user's COCO folder gives its class count only through its annotation files: the run directory records it
    (``model.num_classes`` in config.yaml), so ``kdforge export`` works without reading them, even once they moved."""
    root, _ = _coco(tmp_path / "coco", {"train": [(40, 40), (48, 32)], "val": [(40, 40)]})
    cfg = config_from_dict(
        {
            "task": {"name": "detection"},
            "model": {"name": "gfl_resnet8"},
            "method": {"name": "vanilla"},
            "data": {"name": "coco_det", "root": str(root), "batch_size": 2, "eval_batch_size": 2, "image_size": 32},
            "train": {"epochs": 1, "progress": False},
        }
    )
    run(cfg, "train", tmp_path / "run")
    assert cfg.model.num_classes is None  # the caller's config is not changed
    assert load_config(tmp_path / "run" / "config.yaml").model.num_classes == 2
    root.rename(tmp_path / "moved")
    result = export_student(tmp_path / "run", tmp_path / "export", formats="torchscript", profile=False)
    assert result.checks[0]["status"] == "ok"
    assert result.files["torchscript"].is_file()


# ---------------------------------------------------------------------------------------------------- the engine


@pytest.mark.slow
def test_train_distill_resume_and_eval_a_detector(tmp_path: Path, capsys) -> None:
    teacher_dir = tmp_path / "teacher"
    result = run(config_from_dict(_cfg("gfl_resnet8", {"name": "vanilla"})), "train", teacher_dir)
    summary = json.loads((teacher_dir / "summary.json").read_text())
    assert summary["task"] == "detection" and summary["primary"] == "AP"
    assert {"best_AP", "final_AP", "final_AP50", "final_AP75"} <= set(summary)
    assert summary["final_AP50"] == result.final["AP50"] and 0.0 <= result.final["AP50"] <= 1.0
    record = json.loads((teacher_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert "test_AP" in record and "train_top1" not in record

    teacher = {"name": "gfl_resnet8", "checkpoint": str(teacher_dir)}
    method = {"name": "ld"}
    straight = run(config_from_dict(_cfg("gfl_resnet8", method, teacher, epochs=2)), "distill", tmp_path / "a")
    run(config_from_dict(_cfg("gfl_resnet8", method, teacher, epochs=1)), "distill", tmp_path / "b")
    resumed = run(config_from_dict(_cfg("gfl_resnet8", method, teacher, epochs=2)), "distill", tmp_path / "b",
                  resume=True)  # fmt: skip
    assert resumed.final == straight.final  # augmentation, assignment and both LD terms resume bit for bit
    a = torch.load(tmp_path / "a" / "student.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "student.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = json.loads((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[-1])
    # every part logged once under its own name: the task's (already "loss_"-prefixed) and LD's two terms
    assert {k for k in losses if k.startswith("loss")} == {
        "loss_qfl",
        "loss_giou",
        "loss_dfl",
        "loss_ld",
        "loss_ld_vlr",
    }

    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "a")]) == 0
    printed = capsys.readouterr().out
    assert "AP" in printed and f"{straight.final['AP']:.2f}" in printed
    assert main(["eval", "--checkpoint", str(tmp_path / "a"), "--pictures", "2"]) == 0
    assert "pictures: 2 PNGs" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "a" / "pictures").glob("*.png")) == [
        "detection_000.png",
        "detection_001.png",
    ]


# ---------------------------------------------------------------------------------------------------- shared_kd


def test_hcl_and_teacher_share_against_hand_computation() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    mse = lambda a, b: float(((a - b) ** 2).mean())  # noqa: E731
    pool = lambda x, k: x.reshape(2, 3, k, 8 // k, k, 8 // k).mean(dim=(3, 5))  # noqa: E731
    # sizes 4, 2, 1 (all < 8): weights 1, 1/2, 1/4, 1/8
    expected = (mse(s, t) + mse(pool(s, 4), pool(t, 4)) / 2 + mse(pool(s, 2), pool(t, 2)) / 4 + mse(s.mean((2, 3)),
                t.mean((2, 3))) / 8) / (1 + 1 / 2 + 1 / 4 + 1 / 8)  # fmt: skip
    assert hcl_loss(s, t).item() == pytest.approx(expected, rel=1e-6)
    small_s, small_t = s[..., :2, :2], t[..., :2, :2]  # only size 1 < 2 is pooled
    expected_small = (mse(small_s, small_t) + mse(small_s.mean((2, 3)), small_t.mean((2, 3))) / 2) / 1.5
    assert hcl_loss(small_s, small_t).item() == pytest.approx(expected_small, rel=1e-6)
    assert hcl_loss(s, s).item() == 0.0
    feats = [
        torch.randn(1, 2, 8, 8, generator=g),
        torch.randn(1, 2, 4, 4, generator=g),
        torch.randn(1, 2, 2, 2, generator=g),
    ]
    shared = teacher_share(feats)
    assert torch.equal(shared[0], feats[0])
    for lvl in (1, 2):
        h = feats[lvl].shape[-1]
        lower = feats[lvl - 1].reshape(1, 2, h, 2, h, 2).mean(dim=(3, 5))
        torch.testing.assert_close(shared[lvl], (feats[lvl] + lower) / 2)


def test_shared_kd_parts_and_schedule() -> None:
    assert [step2_weight(f) for f in (0.0, 0.3, 1 / 3, 0.5, 2 / 3, 0.9)] == pytest.approx([0, 0, 0, 0.5, 1, 1])
    method = make_method("shared_kd", "detection")
    method.eval()
    batch = make_batch(method, "detection")
    progress = Progress(epoch=1, step=5, epoch_float=1.5, fraction=0.5)
    out = method(batch, progress)
    with torch.no_grad():
        s = method.student.forward_features(batch.input)
        t = method.teacher.forward_features(batch.input)
        adapted = [a(f) for a, f in zip(method.adapters, s.feats, strict=True)]
    share = sum(hcl_loss(a, b) for a, b in zip(adapted, teacher_share(t.feats), strict=True))
    raw = sum(hcl_loss(a, b) for a, b in zip(adapted, t.feats, strict=True))
    mutual = sum(
        torch.nn.functional.mse_loss(
            s.feats[i], torch.nn.functional.interpolate(s.feats[i + 1], size=s.feats[i].shape[-2:], mode="bilinear")
        )
        for i in range(2)
    )
    torch.testing.assert_close(out.losses["share"], share)
    torch.testing.assert_close(out.losses["raw"], 0.5 * raw)
    torch.testing.assert_close(out.losses["mutual"], 0.1 * mutual)
    torch.testing.assert_close(out.loss, sum(out.losses.values()))
    assert not type(method).exact
