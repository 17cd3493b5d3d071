"""Segmentation runs downstream of training: ``kdforge report`` tables and plots in the run's primary metric (mIoU),
mask pictures from ``kdforge eval --pictures``, and ``kdforge export``/``profile`` of a segmentation student. Every
check runs on tiny real runs of ``cifar10_seg`` trained once per module."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from kdforge.api import build_network, mask_pictures, run
from kdforge.cli import main
from kdforge.config import config_from_dict
from kdforge.data import build_data
from kdforge.errors import CheckpointError, ConfigError, KDForgeError
from kdforge.export import export_student, load_run_model
from kdforge.models import create_model
from kdforge.registry import TASKS
from kdforge.report.masks import IGNORE_COLOR, MaskGrid, colorize, voc_palette
from kdforge.report.table import build_groups, scan_runs, write_report

TINY = {"name": "cifar10_seg", "batch_size": 16, "eval_batch_size": 16, "train_subset": 32, "test_subset": 16}


def _cfg(model: str, method: dict[str, Any], teacher: Path | None = None, *, seed: int = 0) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "task": {"name": "segmentation"},
        "model": {"name": model},
        "method": method,
        "data": dict(TINY),
        "optim": {"lr": 0.05},
        "train": {"epochs": 2, "progress": False, "seed": seed, "log_every": 2},
    }
    if teacher is not None:
        cfg["teacher"] = {"name": "fcn_resnet8", "checkpoint": str(teacher)}
    return cfg


@pytest.fixture(scope="module")
def seg_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A teacher, the student alone and two seeds of CWD, 2 epochs each on 32 canvases (teacher and student are one
    architecture: the report tells the teacher run from the student alone by ``teacher.checkpoint``)."""
    root = tmp_path_factory.mktemp("seg") / "runs"
    teacher = root / "teacher"
    run(config_from_dict(_cfg("fcn_resnet8", {"name": "vanilla"}, seed=5)), "train", teacher)
    run(config_from_dict(_cfg("fcn_resnet8", {"name": "vanilla"})), "train", root / "alone")
    for seed in (0, 1):
        run(config_from_dict(_cfg("fcn_resnet8", {"name": "cwd"}, teacher, seed=seed)), "distill", root / f"cwd{seed}")
    return root


def _summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text())


def _test_curve(run_dir: Path, key: str) -> list[tuple[float, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return [(float(r["epoch"]), float(r[key])) for r in records if key in r]


# ---------------------------------------------------------------------------------------------------- report


@pytest.mark.slow  # the module's four tiny training runs: about 30 s on two CPU cores
def test_report_tables_are_in_the_runs_primary_metric(seg_runs: Path, tmp_path: Path) -> None:
    (group,) = build_groups(scan_runs(seg_runs))
    assert (group.dataset, group.teacher, group.student, group.primary) == (
        "cifar10_seg",
        "fcn_resnet8",
        "fcn_resnet8",
        "mIoU",
    )
    rows = {r.label: r for r in group.rows}
    assert list(rows) == ["vanilla", "student alone", "CWD"]
    teacher, alone, cwd = rows["vanilla"], rows["student alone"], rows["CWD"]
    assert teacher.role == "teacher" and teacher.runs[0].path == (seg_runs / "teacher").resolve()
    # Golden values straight from the summaries the engine wrote.
    seeds = [_summary(seg_runs / f"cwd{s}") for s in (0, 1)]
    assert cwd.best.n == 2
    assert cwd.best.mean == pytest.approx(np.mean([s["best_mIoU"] for s in seeds]))
    assert cwd.best.std == pytest.approx(np.std([s["best_mIoU"] for s in seeds], ddof=1))
    assert cwd.final.mean == pytest.approx(np.mean([s["final_mIoU"] for s in seeds]))
    assert alone.best.mean == _summary(seg_runs / "alone")["best_mIoU"]
    assert cwd.gain_best.mean == pytest.approx(cwd.best.mean - alone.best.mean)
    assert teacher.final.mean == _summary(seg_runs / "teacher")["final_mIoU"] and teacher.published is None
    # The curves are the test mIoU per epoch from metrics.jsonl.
    assert cwd.runs[0].curve == _test_curve(seg_runs / "cwd0", "test_mIoU") and len(cwd.runs[0].curve) == 2

    report = write_report(seg_runs, tmp_path / "report", command="kdforge report runs", plots=False)
    md = report.markdown.read_text()
    # The task's other summary metrics follow the primary's final column, mean ± std over the same runs.
    header = (
        "| network | method | n | best mIoU | final mIoU | final aAcc | final mAcc | gain (best) over student alone |"
    )
    assert header in md
    assert "top-1" not in md and "Best = highest test mIoU over the evaluated epochs" in md
    assert "joint scale + crop + flip of input and target" in md
    others = " | ".join(
        f"{np.mean([s[k] for s in seeds]):.2f} ± {np.std([s[k] for s in seeds], ddof=1):.2f}"
        for k in ("final_aAcc", "final_mAcc")
    )
    assert (
        f"| fcn_resnet8 | CWD | 2 | {cwd.best.format()} | {cwd.final.format()} | {others} | {cwd.gain_best.mean:+.2f} |"
        in md
    )
    table = list(csv.DictReader(io.StringIO(report.csv.read_text())))
    assert [r["metric"] for r in table] == ["mIoU"] * 3
    assert float(table[2]["best_mean"]) == pytest.approx(cwd.best.mean, abs=1e-4)


@pytest.mark.slow  # the module's four tiny training runs: about 30 s on two CPU cores
def test_report_plots_are_labelled_with_the_primary_metric(
    seg_runs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kdforge.report.plots as plots

    seen: dict[str, Any] = {}

    def curves(data: Any, path: Any, *, title: str = "", ylabel: str = "") -> Path:
        seen["curves"], seen["curves_label"] = data, ylabel
        return Path(path)

    def gains(data: Any, path: Any, *, title: str = "", ylabel: str = "") -> Path:
        seen["gains_label"] = ylabel
        return Path(path)

    monkeypatch.setattr(plots, "plot_seed_curves", curves)
    monkeypatch.setattr(plots, "plot_gains", gains)
    write_report(seg_runs, tmp_path / "report", command="kdforge report runs")
    assert seen["curves_label"] == "test mIoU (%)"
    assert seen["gains_label"] == "best mIoU minus the student alone's (points)"
    assert seen["curves"]["CWD"] == [_test_curve(seg_runs / f"cwd{s}", "test_mIoU") for s in (0, 1)]
    assert seen["curves"]["teacher fcn_resnet8"] == [_test_curve(seg_runs / "teacher", "test_mIoU")]


@pytest.mark.slow  # the module's four tiny training runs: about 30 s on two CPU cores
def test_report_writes_real_pngs_for_segmentation(seg_runs: Path, tmp_path: Path) -> None:
    report = write_report(seg_runs, tmp_path / "report", command="kdforge report runs")
    assert sorted(p.name for p in report.plots) == [
        "cifar10_seg_fcn_resnet8_fcn_resnet8_curves.png",
        "cifar10_seg_fcn_resnet8_fcn_resnet8_gains.png",
    ]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in report.plots)


@pytest.mark.slow  # the module's four tiny training runs: about 30 s on two CPU cores
def test_classification_and_segmentation_runs_get_separate_tables(seg_runs: Path, tmp_path: Path) -> None:
    root = tmp_path / "mixed"
    shutil.copytree(seg_runs, root / "seg")  # the copies' teacher.checkpoint still names the original teacher
    cls = root / "cls"
    for name, teacher, best in (("t", None, 80.0), ("kd", "resnet20", 71.0)):
        d = cls / name
        d.mkdir(parents=True)
        config: dict[str, Any] = {"model": {"name": "resnet8" if teacher else "resnet20"}, "method": {"name": "kd"}}
        config["data"] = {"name": "cifar10"}
        if teacher:
            config["teacher"] = {"name": teacher, "checkpoint": str(cls / "t")}
        (d / "config.yaml").write_text(yaml.safe_dump(config))
        (d / "summary.json").write_text(json.dumps({"best_top1": best, "final_top1": best - 1}))
    report = write_report(root, tmp_path / "report", command="kdforge report mixed", plots=False)
    assert [(g.dataset, g.primary) for g in report.groups] == [("cifar10", "top1"), ("cifar10_seg", "mIoU")]
    md = report.markdown.read_text()
    assert "| best top-1 | final top-1 |" in md and "| best mIoU | final mIoU |" in md
    assert "Best = highest test top-1 or mIoU over the evaluated epochs" in md
    table = list(csv.DictReader(io.StringIO(report.csv.read_text())))
    assert [r["metric"] for r in table] == ["top1", "top1", "mIoU", "mIoU", "mIoU"]


@pytest.mark.slow  # the module's four tiny training runs: about 30 s on two CPU cores
def test_a_summary_without_its_primary_metric_is_one_clear_error(seg_runs: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    (broken / "teacher").mkdir(parents=True)
    (broken / "teacher" / "config.yaml").write_text((seg_runs / "teacher" / "config.yaml").read_text())
    summary = {k: v for k, v in _summary(seg_runs / "cwd0").items() if k != "best_mIoU"}
    (broken / "cwd").mkdir()
    (broken / "cwd" / "config.yaml").write_text((seg_runs / "cwd0" / "config.yaml").read_text())
    (broken / "cwd" / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(KDForgeError, match=r"summary.json has no 'best_mIoU'"):
        build_groups(scan_runs(broken))


# ---------------------------------------------------------------------------------------------------- pictures


def test_voc_palette_matches_the_devkit_colours() -> None:
    palette = voc_palette()
    # VOCdevkit's colours: background, aeroplane, bicycle, bird, boat ... person (15); 255 is "void".
    assert palette[:5].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128]]
    assert palette[15].tolist() == [192, 128, 128] and palette[255].tolist() == list(IGNORE_COLOR)
    assert len({tuple(c) for c in palette}) == 256
    mask = np.array([[0, 1], [255, 4]])
    assert colorize(mask, palette[:5]).tolist() == [[[0, 0, 0], [128, 0, 0]], [list(IGNORE_COLOR), [0, 0, 128]]]
    with pytest.raises(KDForgeError, match="mask holds class 7 but the palette has 5 colours"):
        colorize(np.array([[7]]), palette[:5])


def _png(path: Path) -> np.ndarray:
    import matplotlib.image

    return (matplotlib.image.imread(path)[..., :3] * 255).round().astype(np.uint8)


def _panel(grid: MaskGrid, picture: np.ndarray, row: int, column: str) -> np.ndarray:
    x0, y0, x1, y1 = grid.boxes[(row, column)]
    return picture[y0:y1, x0:x1]


def _drawn(rgb: np.ndarray, scale: int) -> np.ndarray:
    return np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1)


@pytest.mark.slow  # the module's four tiny training runs: about 30 s on two CPU cores
def test_mask_pictures_show_the_models_argmax_in_the_palette(seg_runs: Path, tmp_path: Path) -> None:
    grid = mask_pictures(seg_runs / "cwd0", 3, out=tmp_path / "m.png")
    picture = _png(grid.path)
    # The run distilled from seg_runs/teacher: it is drawn without being asked for.
    assert grid.columns == ("input", "teacher fcn_resnet8", "student fcn_resnet8", "ground truth")
    assert picture.shape == (grid.height, grid.width, 3) and len(grid.boxes) == 3 * 4
    assert grid.scale == 3 and grid.stride == 1  # 64-pixel canvases drawn 3x
    assert all(x1 - x0 == y1 - y0 == 192 for x0, y0, x1, y1 in grid.boxes.values())

    data = build_data("cifar10_seg", batch_size=16, eval_batch_size=16, train_subset=32, test_subset=16)
    batch = next(iter(data.test))
    task = TASKS.get("segmentation")(num_classes=11)
    palette = voc_palette()
    seen: set[int] = set()
    for column, run_dir in (("student fcn_resnet8", seg_runs / "cwd0"), ("teacher fcn_resnet8", seg_runs / "teacher")):
        net = build_network("fcn_resnet8", 11, run_dir, task).eval()
        with torch.no_grad():
            argmax = net(batch.input[:3]).argmax(1).numpy()
        for i in range(3):
            expected = _drawn(colorize(argmax[i], palette), grid.scale)
            np.testing.assert_array_equal(_panel(grid, picture, i, column), expected)
            seen.update(np.unique(argmax[i]).tolist())
    masks = batch.targets[:3].numpy()
    mean, std = np.array(data.mean), np.array(data.std)
    for i in range(3):
        np.testing.assert_array_equal(
            _panel(grid, picture, i, "ground truth"), _drawn(colorize(masks[i], palette), grid.scale)
        )
        rgb = np.clip(np.round((batch.input[i].permute(1, 2, 0).numpy() * std + mean) * 255), 0, 255)
        got = _panel(grid, picture, i, "input").astype(int)
        assert np.abs(got - _drawn(rgb, grid.scale)).max() <= 1  # float32 de-normalisation, rounded
        seen.update(np.unique(masks[i]).tolist())
    # The legend names every class drawn, by the dataset's class names, in index order.
    names = data.classes
    assert grid.legend == tuple((k, names[k]) for k in sorted(seen))


@pytest.mark.slow  # the module's four tiny training runs: about 30 s on two CPU cores
def test_eval_pictures_from_the_cli_with_a_chosen_or_no_teacher(seg_runs: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "chosen.png"
    args = ["eval", "--checkpoint", str(seg_runs / "cwd1"), "--pictures", "2", "--pictures-out", str(out)]
    assert main([*args, "--teacher", str(seg_runs / "alone")]) == 0
    printed = capsys.readouterr().out
    assert "mIoU" in printed
    assert f"pictures: {out} (input, teacher fcn_resnet8, student fcn_resnet8, ground truth)" in printed
    assert _png(out).shape[0] > 2 * 192
    # The chosen teacher (the student alone's run) is drawn, not the run's own teacher.
    picture, grid = _png(out), mask_pictures(seg_runs / "cwd1", 2, teacher=seg_runs / "alone", out=tmp_path / "b.png")
    np.testing.assert_array_equal(picture, _png(grid.path))
    data = build_data("cifar10_seg", batch_size=16, eval_batch_size=16, train_subset=32, test_subset=16)
    net = build_network("fcn_resnet8", 11, seg_runs / "alone", TASKS.get("segmentation")(num_classes=11)).eval()
    with torch.no_grad():
        argmax = net(next(iter(data.test)).input[:1]).argmax(1).numpy()[0]
    expected = _drawn(colorize(argmax, voc_palette()), grid.scale)
    np.testing.assert_array_equal(_panel(grid, picture, 0, "teacher fcn_resnet8"), expected)

    assert main(["eval", "--checkpoint", str(seg_runs / "alone"), "--pictures", "1", "--teacher", "none"]) == 0
    assert "pictures: " + str(seg_runs / "alone" / "masks.png") + " (input, student fcn_resnet8, ground truth)" in (
        capsys.readouterr().out
    )
    assert main(["eval", "--checkpoint", str(seg_runs / "alone"), "--teacher", "x"]) == 2
    assert "--teacher, --baseline and --pictures-out go with --pictures N" in capsys.readouterr().err


@pytest.mark.slow  # the module's four tiny training runs: about 30 s on two CPU cores
def test_mask_pictures_errors_are_one_clear_line(seg_runs: Path, tmp_path: Path) -> None:
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copy(seg_runs / "cwd0" / "student.pt", moved / "student.pt")
    config = yaml.safe_load((seg_runs / "cwd0" / "config.yaml").read_text())
    config["teacher"]["checkpoint"] = str(tmp_path / "gone")
    (moved / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(CheckpointError, match=r"the run's teacher checkpoint .*gone does not exist .*--teacher none"):
        mask_pictures(moved, 1)
    assert mask_pictures(moved, 1, teacher="none").columns == ("input", "student fcn_resnet8", "ground truth")

    weights = tmp_path / "resnet8.pt"
    torch.save(create_model("resnet8", num_classes=10).state_dict(), weights)
    overrides = {"model": {"name": "resnet8"}, "data": {"name": "embedded", "test_subset": 8}}
    with pytest.raises(ConfigError, match="--pictures draws segmentation masks; .* is a classification run"):
        mask_pictures(weights, 1, overrides=overrides)
    with pytest.raises(ConfigError, match="at least 1 picture"):
        mask_pictures(seg_runs / "cwd0", 0)


# ---------------------------------------------------------------------------------------------------- export, profile


def _flop_counter_macs(model: torch.nn.Module, size: int) -> int:
    """MACs by PyTorch's own FLOP counter (2 FLOPs per multiply-accumulate): an independent count."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(torch.zeros(1, 3, size, size))
    return counter.get_total_flops() // 2


@pytest.mark.slow  # the module's four tiny training runs: about 30 s on two CPU cores
def test_export_a_segmentation_student_checked_and_profiled(seg_runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "export"
    result = export_student(seg_runs / "cwd0", out, formats="torchscript", runs=2, warmup=0)
    (check,) = result.checks
    assert check["status"] == "ok" and check["max_abs_diff"] <= 1e-4
    task = TASKS.get("segmentation")(num_classes=11)
    eager = build_network("fcn_resnet8", 11, seg_runs / "cwd0", task).eval()
    scripted = torch.jit.load(str(out / "student.torchscript.pt"))
    x = next(iter(build_data("cifar10_seg", batch_size=4, eval_batch_size=3, test_subset=3).test)).input
    with torch.no_grad():
        reference, got = eager(x), scripted(x)
    assert got.shape == (3, 11, 64, 64)  # per-pixel logits at the input size, for another batch size than traced
    torch.testing.assert_close(got, reference, atol=1e-4, rtol=0)
    meta = json.loads((out / "export.json").read_text())
    assert meta["task"] == "segmentation" and meta["num_classes"] == 11 and meta["input_shape"] == ["batch", 3, 64, 64]
    teacher, student = result.profile
    assert (teacher["role"], teacher["model"], student["model"]) == ("teacher", "fcn_resnet8", "fcn_resnet8")
    assert student["params"] == sum(p.numel() for p in eager.parameters())
    assert student["macs"] == _flop_counter_macs(eager, 64) and student["image_size"] == 64
    with pytest.raises(ConfigError, match="unknown segmentation model 'resnet20'; did you mean"):
        export_student(seg_runs / "cwd0", tmp_path / "x", formats="torchscript", teacher="resnet20", profile=False)


def test_export_loads_a_segmenter_of_a_voc_folder_with_the_folders_class_count(tmp_path: Path) -> None:
    from test_segmentation_data import _voc

    rng = np.random.default_rng(0)
    masks = {f"im{i}": rng.integers(0, 21, (16, 16)).astype(np.uint8) for i in range(2)}
    root = _voc(tmp_path / "voc", masks, {"train": ["im0"], "val": ["im1"]})
    weights = tmp_path / "seg.pt"
    torch.save(TASKS.get("segmentation")(num_classes=21).build_model("fcn_resnet8").state_dict(), weights)
    overrides = {
        "task": {"name": "segmentation"},
        "model": {"name": "fcn_resnet8"},
        "data": {"name": "seg_folder", "root": str(root)},
    }
    loaded = load_run_model(weights, overrides)
    assert loaded.task_name == "segmentation" and loaded.num_classes == 21 and loaded.image_size == 512
    assert loaded.build("pspnet_resnet20").decode_head.conv_seg.out_channels == 21


@pytest.mark.parametrize("task_flag", [[], ["--task", "segmentation"]])
def test_profile_a_segmentation_pair_at_the_tasks_input_size(task_flag: list[str], capsys) -> None:
    argv = ["profile", "--model", "fcn_resnet8", "--teacher", "pspnet_resnet20", "--runs", "1", "--warmup", "0"]
    assert main([*argv, *task_flag, "--json"]) == 0
    teacher, student = json.loads(capsys.readouterr().out)
    task = TASKS.get("segmentation")(num_classes=11)  # cifar10_seg: 11 classes on 64x64 canvases
    for row, name in ((teacher, "pspnet_resnet20"), (student, "fcn_resnet8")):
        net = task.build_model(name)
        assert row["model"] == name and row["image_size"] == 64
        assert row["params"] == sum(p.numel() for p in net.parameters())
        assert row["macs"] == _flop_counter_macs(net, 64)
        assert row["latency"][0]["batch"] == 1 and row["latency"][0]["median_ms"] > 0
    assert main(["profile", "--model", "fcn_resnet8", "--num-classes", "21", "--image-size", "96", "--json",
                 "--runs", "1", "--warmup", "0"]) == 0  # fmt: skip
    (row,) = json.loads(capsys.readouterr().out)
    net21 = TASKS.get("segmentation")(num_classes=21).build_model("fcn_resnet8")
    assert row["image_size"] == 96 and row["macs"] == _flop_counter_macs(net21, 96)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "fcn_resnt8"], "unknown model 'fcn_resnt8' (no task has it); did you mean fcn_resnet8"),
        (["--model", "resnet8", "--task", "segmentation"], "unknown segmentation model 'resnet8'; did you mean"),
        (["--model", "fcn_resnet8", "--teacher", "resnet20"], "unknown segmentation model 'resnet20'"),
        (["--model", "fcn_resnet8", "--task", "segmentaton"], "did you mean 'segmentation'"),
    ],
)
def test_profile_errors_are_one_line(argv: list[str], message: str, capsys) -> None:
    assert main(["profile", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
