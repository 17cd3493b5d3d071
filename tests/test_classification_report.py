"""kdforge eval's classification report: numbers, text and pictures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from kdforge.report.classification import (
    classification_report,
    format_classification_report,
    write_classification_report,
)


def test_three_class_report_numbers_and_files(tmp_path: Path) -> None:
    # predictions: class 0 always right, class 1 half confused with 2, class 2 always right
    target = torch.tensor([0, 0, 1, 1, 2, 2])
    pred = torch.tensor([0, 0, 1, 2, 2, 2])
    logits = torch.nn.functional.one_hot(pred, 3).float() * 5
    report = classification_report(logits, target, ["cat", "dog", "ship"])
    assert report.confusion.tolist() == [[2, 0, 0], [0, 1, 1], [0, 0, 2]]
    dog, ship = report.per_class[1], report.per_class[2]
    assert dog["precision"] == 1.0 and dog["recall"] == 0.5 and dog["f1"] == pytest.approx(2 / 3)
    assert ship["precision"] == pytest.approx(2 / 3) and ship["recall"] == 1.0
    assert report.topk == {"top1": pytest.approx(500 / 6)}  # top-5 of 3 classes is omitted
    assert report.roc is None
    text = format_classification_report(report)
    assert "confusion matrix" in text and "dog" in text and "ROC" not in text
    files = write_classification_report(report, tmp_path)
    assert [f.name for f in files] == ["report.json", "confusion_matrix.png"]
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["confusion_matrix"] == [[2, 0, 0], [0, 1, 1], [0, 0, 2]]
    assert Image.open(tmp_path / "confusion_matrix.png").size[0] > 100


def test_two_class_report_has_roc_and_thresholds(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 2, (200,), generator=g)
    logits = torch.randn(200, 2, generator=g)
    logits[:, 1] += 1.5 * target  # informative but imperfect
    report = classification_report(logits, target, ["other", "receipt"])
    assert report.positive == "receipt"
    assert 0.6 < report.roc.auc < 1.0
    recalls = [t["recall"] for t in report.thresholds]
    assert recalls == sorted(recalls, reverse=True), "a higher threshold never raises recall"
    names = [f.name for f in write_classification_report(report, tmp_path)]
    assert names == ["report.json", "confusion_matrix.png", "roc.png"]
    assert "ROC AUC (receipt as positive)" in format_classification_report(report)


def test_class_names_must_match_logits() -> None:
    with pytest.raises(ValueError, match="2 class names for 3 logits"):
        classification_report(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), ["a", "b"])


def test_cli_eval_report_on_a_run(tmp_path: Path, capsys) -> None:
    import yaml

    from kdforge.api import evaluate_checkpoint
    from kdforge.cli import main
    from kdforge.engine.checkpoint import save_checkpoint
    from kdforge.models import create_model

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(
        yaml.safe_dump({"model": {"name": "resnet8"}, "data": {"name": "embedded", "test_subset": 100}})
    )
    torch.manual_seed(0)
    save_checkpoint(create_model("resnet8", num_classes=10).state_dict(), run / "student.pt")
    assert main(["eval", "--checkpoint", str(run), "--report", str(tmp_path / "rep")]) == 0
    printed = capsys.readouterr().out
    assert "confusion matrix" in printed and "airplane" in printed
    saved = json.loads((tmp_path / "rep" / "report.json").read_text())
    cm = torch.tensor(saved["confusion_matrix"])
    assert int(cm.sum()) == 100
    top1 = evaluate_checkpoint(run)["top1"]
    assert saved["topk"]["top1"] == pytest.approx(top1) == pytest.approx(100.0 * cm.trace().item() / 100)
