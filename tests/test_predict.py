"""``kdforge predict``: same preprocessing as evaluation, same logits as the network, clear handling of bad files."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from kdforge.data import _embedded_arrays
from kdforge.data.augment import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD
from kdforge.data.folder import ImageFolderDataset
from kdforge.engine.checkpoint import save_checkpoint
from kdforge.errors import DataError, KDForgeError
from kdforge.export import export_student
from kdforge.models import create_model
from kdforge.predict import list_images, load_predictor, predict, write_csv


def _randomise_bn(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture
def cifar_run(tmp_path: Path) -> tuple[Path, nn.Module]:
    run = tmp_path / "run"
    run.mkdir()
    cfg = {"model": {"name": "resnet8"}, "data": {"name": "embedded"}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    model = _randomise_bn(create_model("resnet8", num_classes=10))
    save_checkpoint(model.state_dict(), run / "student.pt")
    return run, model


@pytest.fixture
def cifar_images(tmp_path: Path) -> tuple[Path, np.ndarray]:
    folder = tmp_path / "images"
    folder.mkdir()
    arrays = _embedded_arrays().test_images[:10]
    for i, img in enumerate(arrays):
        Image.fromarray(img.transpose(1, 2, 0)).save(folder / f"{i:02d}.png")
    return folder, arrays


def _normalise(arrays: np.ndarray, mean, std) -> torch.Tensor:
    x = torch.from_numpy(arrays).float() / 255
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def test_run_directory_predictions_equal_the_network_on_the_test_arrays(cifar_run, cifar_images, tmp_path) -> None:
    run, model = cifar_run
    folder, arrays = cifar_images
    predictor = load_predictor(run)
    assert predictor.preprocess.classes[:2] == ("airplane", "automobile")
    result = predict(predictor, list_images([folder]), topk=3, batch_size=4, progress=False)
    with torch.no_grad():
        probs = torch.softmax(model(_normalise(arrays, CIFAR10_MEAN, CIFAR10_STD)), dim=1)
    conf, idx = probs.topk(3, dim=1)
    assert [r["class"] for r in result.rows] == [predictor.preprocess.classes[i] for i in idx[:, 0].tolist()]
    np.testing.assert_allclose([r["confidence"] for r in result.rows], conf[:, 0].numpy(), atol=1e-5)
    np.testing.assert_allclose([r["confidence_3"] for r in result.rows], conf[:, 2].numpy(), atol=1e-5)
    out = write_csv(result, tmp_path / "pred.csv", topk=3)
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["file", "class", "confidence", "class_2", "confidence_2", "class_3", "confidence_3"]
    assert len(rows) == 10 and rows[0]["file"].endswith("00.png")


def test_exported_torchscript_predicts_like_the_weights(cifar_run, cifar_images) -> None:
    run, _ = cifar_run
    folder, _ = cifar_images
    export_student(run, formats="torchscript", profile=False)
    files = list_images([folder])
    eager = predict(load_predictor(run), files, topk=2, progress=False)
    scripted = predict(load_predictor(run / "export" / "student.torchscript.pt"), files, topk=2, progress=False)
    assert [r["class"] for r in eager.rows] == [r["class"] for r in scripted.rows]
    np.testing.assert_allclose(
        [r["confidence"] for r in eager.rows], [r["confidence"] for r in scripted.rows], atol=1e-5
    )


def test_folder_runs_use_the_evaluation_centre_crop(tmp_path: Path) -> None:
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in ("cat", "dog"):
            (root / split / name).mkdir(parents=True)
            Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(root / split / name / "a.png")
    run = tmp_path / "run"
    run.mkdir()
    cfg = {"model": {"name": "resnet8"}, "data": {"name": "folder", "root": str(root), "image_size": 32}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    model = _randomise_bn(create_model("resnet8", num_classes=2))
    save_checkpoint(model.state_dict(), run / "student.pt")
    predictor = load_predictor(run)
    assert predictor.preprocess.classes == ("cat", "dog") and predictor.preprocess.crop == "center"
    files = list_images([root / "val"])
    result = predict(predictor, files, topk=2, progress=False)
    expected = ImageFolderDataset([(f, 0) for f in files], 32, train=False)
    batch = torch.stack([expected[(i, 0)][0] for i in range(len(files))]).numpy()
    with torch.no_grad():
        probs = torch.softmax(model(_normalise(batch, IMAGENET_MEAN, IMAGENET_STD)), dim=1)
    np.testing.assert_allclose([r["confidence"] for r in result.rows], probs.max(dim=1).values.numpy(), atol=1e-5)


def test_unreadable_images_are_listed_or_stop_the_run(cifar_run, cifar_images) -> None:
    run, _ = cifar_run
    folder, _ = cifar_images
    (folder / "broken.png").write_bytes(b"not an image")
    predictor = load_predictor(run)
    result = predict(predictor, list_images([folder]), progress=False)
    assert len(result.rows) == 10 and [f.name for f, _ in result.failed] == ["broken.png"]
    with pytest.raises(DataError, match="cannot read image .*broken.png"):
        predict(predictor, list_images([folder]), on_error="stop", progress=False)


def test_inputs_and_sources_must_exist(tmp_path: Path) -> None:
    (tmp_path / "list.txt").write_text("a.png\n")
    with pytest.raises(DataError, match="does not exist"):
        list_images([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        list_images([tmp_path / "empty"])
    assert list_images([tmp_path / "list.txt"]) == [tmp_path / "a.png"]
    with pytest.raises(KDForgeError, match="does not exist"):
        load_predictor(tmp_path / "nothing.pt")


def test_cli_predict_writes_the_csv_and_lists_unreadable_files(cifar_run, cifar_images, tmp_path, capsys) -> None:
    from kdforge.cli import main

    run, _ = cifar_run
    folder, _ = cifar_images
    (folder / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "p.csv"
    assert main(["predict", str(run), str(folder), "--out", str(out), "--topk", "2", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "10 images" in captured.out and "broken.png" in captured.err
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 10 and set(rows[0]) == {"file", "class", "confidence", "class_2", "confidence_2"}
    assert main(["predict", str(run), str(folder), "--out", str(tmp_path / "q.csv"), "--on-error", "stop"]) != 0
    assert "cannot read image" in capsys.readouterr().err
    assert not (tmp_path / "q.csv").exists(), "a stopped run writes no half CSV"
