"""``kdforge export`` / ``kdforge profile`` and TensorBoard logging: MAC golden values, checked exports, bad input.

Latency is measured, never asserted beyond being positive. Tests that need an extra (onnx, onnxruntime,
tensorboard) skip without it; everything else runs on the core install.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import kdforge.export as export_mod
from kdforge.api import fit
from kdforge.cli import main
from kdforge.config import load_config
from kdforge.engine.checkpoint import save_checkpoint
from kdforge.errors import ConfigError, KDForgeError
from kdforge.export import export_student, load_run_model, parse_formats
from kdforge.models import create_model
from kdforge.profile import count_macs, format_profile, measure_latency, profile_model, state_dict_bytes
from kdforge.validation import validate

FAST = ["--runs", "2", "--warmup", "0"]


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A distill-style run directory: config.yaml (resnet8 student, resnet20 teacher, CIFAR-10) and student.pt."""
    run = tmp_path / "run"
    run.mkdir()
    cfg = {"model": {"name": "resnet8"}, "teacher": {"name": "resnet20"}, "data": {"name": "cifar10"}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=10)
    with torch.no_grad():  # non-trivial BN statistics, so eval mode differs from train mode
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    save_checkpoint(model.state_dict(), run / "student.pt")
    return run


# ----------------------------------------------------------------------------------------------------------------
# MACs, size, latency


class HandNet(nn.Module):
    """Every counted layer kind once, with MACs worked out by hand in the test below (8x8 input)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)  # out 8x8x8 = 512 elements x (3 x 3x3 = 27) = 13,824
        self.bn = nn.BatchNorm2d(8)  # not counted
        self.grouped = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=4)  # out 8x4x4 = 128 x (2 x 9 = 18) = 2,304
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)  # in 8x4x4 = 128 x (4 x 2x2 = 16) = 2,048; out 4x8x8
        self.fc = nn.Linear(4 * 8 * 8, 10)  # 10 x 256 = 2,560

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.up(self.grouped(torch.relu(self.bn(self.conv(x)))))
        return self.fc(x.flatten(1))


def test_macs_match_a_hand_count():
    net = HandNet()
    assert count_macs(net, (1, 3, 8, 8)) == 13_824 + 2_304 + 2_048 + 2_560
    assert count_macs(net, (2, 3, 8, 8)) == 2 * 20_736  # MACs scale with the batch
    assert net.training  # the mode is restored
    assert not net.conv._forward_hooks  # and the hooks removed


@pytest.mark.parametrize(
    ("name", "classes", "size", "exact", "published", "rel"),
    [
        # torchvision's ResNet18_Weights.IMAGENET1K_V1 card: "GFLOPS 1.81" (torchvision counts multiply-accumulates).
        ("resnet18", 1000, 224, 1_814_073_344, 1.81e9, 0.01),
        # ../shared/BENCHMARKS.md section 0: resnet32x4 ~1.08 GMAC, resnet8x4 ~0.18 GMAC on 32x32 CIFAR-100 inputs.
        ("resnet32x4", 100, 32, 1_083_040_768, 1.08e9, 0.01),
        ("resnet8x4", 100, 32, 177_071_104, 0.18e9, 0.03),
    ],
)
def test_macs_match_published_counts(name, classes, size, exact, published, rel):
    macs = count_macs(create_model(name, num_classes=classes), (1, 3, size, size))
    assert macs == exact
    assert macs == pytest.approx(published, rel=rel)


def test_state_dict_size_is_the_weight_file_size(tmp_path):
    model = create_model("resnet8x4", num_classes=100)
    size = state_dict_bytes(model)
    params = sum(p.numel() for p in model.parameters())
    assert size > 4 * params  # fp32 weights plus BN running statistics
    torch.save(model.state_dict(), tmp_path / "w.pt")
    assert (tmp_path / "w.pt").stat().st_size == pytest.approx(size, rel=0.02)


def test_latency_and_profile_structure():
    net = create_model("resnet8", num_classes=10).train()
    lat = measure_latency(net, (2, 3, 32, 32), runs=3, warmup=1, threads=1)
    assert lat["batch"] == 2 and lat["runs"] == 3 and lat["threads"] == 1
    assert 0 < lat["median_ms"] <= lat["p90_ms"]
    assert net.training  # restored
    with pytest.raises(KDForgeError):
        measure_latency(net, (1, 3, 32, 32), runs=0)

    rows = [
        profile_model(create_model("resnet20", num_classes=10), "resnet20", 32, role="teacher", runs=2, warmup=0),
        profile_model(net, "resnet8", 32, role="student", batch_sizes=(1, 4), runs=2, warmup=0),
    ]
    assert rows[1]["macs"] == 12_507_392 - (100 - 10) * 64  # resnet8 (see test_cli_profile) with a 10-class head
    assert {lat["batch"] for lat in rows[1]["latency"]} == {1, 4}
    table = format_profile(rows)
    lines = table.splitlines()
    assert lines[0].startswith("| role | model | input | params | MACs | size (MiB) | CPU ms b1")
    assert "| student | resnet8 | 32x32 |" in table and "| teacher | resnet20 |" in table
    assert "CPU ms b4" in table and "thread(s)" in table
    assert "Student vs teacher:" in table and "fewer MACs" in table
    json.dumps(rows)  # JSON-serialisable


# ----------------------------------------------------------------------------------------------------------------
# Export


def test_parse_formats():
    assert parse_formats("torchscript, ONNX,torchscript") == ["torchscript", "onnx"]
    with pytest.raises(ConfigError, match="unknown export format 'tflite'"):
        parse_formats("torchscript,tflite")
    with pytest.raises(ConfigError):
        parse_formats(" , ")


def test_load_run_model_from_run_dir_and_bare_file(run_dir, tmp_path):
    loaded = load_run_model(run_dir)
    assert (loaded.name, loaded.num_classes, loaded.image_size, loaded.teacher) == ("resnet8", 10, 32, "resnet20")
    assert not loaded.model.training
    bare = tmp_path / "bare.pt"
    bare.write_bytes((run_dir / "student.pt").read_bytes())
    with pytest.raises(ConfigError, match=r"pass model\.name"):
        load_run_model(bare)
    assert load_run_model(bare, {"model": {"name": "resnet8", "num_classes": 10}}).name == "resnet8"


def test_torchscript_export_reproduces_the_model(run_dir, tmp_path):
    out = tmp_path / "exp"
    result = export_student(run_dir, out, formats="torchscript", batch_size=3, runs=2, warmup=0)
    ts = out / "student.torchscript.pt"
    assert result.files["torchscript"] == ts
    (check,) = result.checks
    assert check["status"] == "ok" and check["max_abs_diff"] <= check["atol"]
    # The file stands alone: loaded without kdforge's model code, it gives the eager model's eval-mode logits for a
    # batch size other than the one it was traced with.
    scripted = torch.jit.load(str(ts))
    model = load_run_model(run_dir).model
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), atol=1e-4, rtol=1e-4)
    assert [r["role"] for r in result.profile] == ["teacher", "student"]
    profile = json.loads((out / "profile.json").read_text())
    assert profile[1]["model"] == "resnet8" and profile[1]["macs"] > 0
    assert {lat["batch"] for lat in profile[1]["latency"]} == {1, 3}
    summary = json.loads((out / "export.json").read_text())
    assert summary["model"] == "resnet8" and summary["input_shape"] == ["batch", 3, 32, 32]
    assert summary["checks"][0]["format"] == "torchscript"
    assert (out / "profile.md").read_text().startswith("| role |")
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_export_default_out_dir_and_no_teacher(run_dir):
    result = export_student(run_dir, formats=["torchscript"], teacher="none", runs=1, warmup=0)
    assert result.out_dir == run_dir / "export"
    assert [r["role"] for r in result.profile] == ["student"]


def test_failed_check_writes_nothing(run_dir, tmp_path, monkeypatch):
    class Off(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x) + 1e-2

    real_load = torch.jit.load
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: Off(real_load(*a, **k)))
    out = tmp_path / "exp"
    with pytest.raises(KDForgeError, match=r"torchscript export does not match PyTorch: max \|diff\|"):
        export_student(run_dir, out, formats="torchscript", runs=1, warmup=0)
    assert list(out.iterdir()) == []


def test_cli_export_torchscript(run_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    code, stdout, err = _run(
        capsys, "export", "--checkpoint", str(run_dir), "--out", str(out), "--format", "torchscript", *FAST
    )
    assert code == 0, err
    assert "torchscript:" in stdout and "max |diff| vs PyTorch" in stdout
    assert "| teacher | resnet20 |" in stdout and "| student | resnet8 |" in stdout
    assert (out / "student.torchscript.pt").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--checkpoint", "{tmp}/missing"], "does not exist"),
        (["--checkpoint", "{run}", "--format", "tflite"], "unknown export format 'tflite'"),
        (["--checkpoint", "{tmp}/bare.pt"], "does not say which architecture"),
        (["--checkpoint", "{run}", "--out", "{tmp}/afile"], "cannot write to output directory"),
        (["--checkpoint", "{run}", "--teacher", "resnet9999"], "unknown model 'resnet9999'"),
        (["--checkpoint", "{run}", "--batch-size", "0"], "--batch-size must be at least 1"),
        (["--checkpoint", "{run}", "--threads", "0"], "--threads must be at least 1"),
        (["--checkpoint", "{tmp}/truncated.pt"], "cannot read checkpoint"),
    ],
)
def test_cli_export_bad_input_is_one_line(run_dir, tmp_path, capsys, args, message):
    (tmp_path / "bare.pt").write_bytes((run_dir / "student.pt").read_bytes())
    (tmp_path / "afile").write_text("not a directory")
    weights = (run_dir / "student.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(weights[: len(weights) // 2])
    argv = [a.format(tmp=tmp_path, run=run_dir) for a in args]
    before = sorted(p.name for p in run_dir.iterdir())
    code, _, err = _run(capsys, "export", *argv, *FAST)
    assert code == 2
    assert err.startswith("kdforge: error:") and message in err and err.count("\n") == 1
    assert sorted(p.name for p in run_dir.iterdir()) == before  # no export/ directory, no half-written file


def test_onnx_without_the_extra(run_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(export_mod, "onnx_available", lambda: False)
    with pytest.raises(KDForgeError, match=r"kdforge\[onnx\]"):
        export_student(run_dir, tmp_path / "a", formats="onnx", runs=1, warmup=0)
    assert not (tmp_path / "a").exists()
    # The default (both formats) exports TorchScript and says why ONNX was skipped.
    result = export_student(run_dir, tmp_path / "b", teacher="none", runs=1, warmup=0)
    assert [c["status"] for c in result.checks] == ["ok", "skipped"]
    assert "kdforge[onnx]" in result.checks[1]["note"]
    assert not (tmp_path / "b" / "student.onnx").exists()


def test_onnx_export_matches_pytorch_with_dynamic_batch(run_dir, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "exp"
    result = export_student(run_dir, out, formats="onnx", teacher="none", runs=1, warmup=0)
    (check,) = result.checks
    assert check["status"] == "ok" and check["max_abs_diff"] <= check["atol"]
    session = ort.InferenceSession(str(out / "student.onnx"), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.name == "input" and not isinstance(inp.shape[0], int)  # symbolic batch axis
    x = torch.randn(7, 3, 32, 32)
    with torch.no_grad():
        expected = load_run_model(run_dir).model(x)
    got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert json.loads((out / "export.json").read_text())["onnx_opset"] == export_mod.ONNX_OPSET


def test_onnx_without_onnxruntime_is_checked_structurally(run_dir, tmp_path, monkeypatch):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if it were not installed
    result = export_student(run_dir, tmp_path / "exp", formats="onnx", teacher="none", runs=1, warmup=0)
    (check,) = result.checks
    assert check["status"] == "skipped" and "onnxruntime missing" in check["note"]
    assert (tmp_path / "exp" / "student.onnx").is_file()  # onnx.checker passed


# ----------------------------------------------------------------------------------------------------------------
# kdforge profile


def test_cli_profile(tmp_path, capsys):
    out = tmp_path / "p.json"
    code, stdout, err = _run(
        capsys, "profile", "--model", "resnet8", "--teacher", "resnet20", "--batch-size", "2", "--out", str(out), *FAST
    )
    assert code == 0, err
    assert "| teacher | resnet20 |" in stdout and "Student vs teacher:" in stdout
    rows = json.loads(out.read_text())
    assert [r["model"] for r in rows] == ["resnet20", "resnet8"]
    assert rows[1]["macs"] == 12_507_392 and all(lat["median_ms"] > 0 for lat in rows[1]["latency"])
    code, _, err = _run(capsys, "profile", "--model", "resnet9999", *FAST)
    assert code == 2 and "unknown model 'resnet9999'" in err


# ----------------------------------------------------------------------------------------------------------------
# TensorBoard


def test_tensorboard_key_is_validated(monkeypatch):
    import kdforge.engine.logging as logging_mod

    cfg = load_config(None, ["method.name=vanilla", "train.tensorboard=true"])
    monkeypatch.setattr(logging_mod, "tensorboard_available", lambda: False)
    with pytest.raises(ConfigError, match=r"install kdforge\[tensorboard\]"):
        validate(cfg, "train")
    with pytest.raises(ConfigError, match="train.tensorboard must be true/false"):
        load_config(None, ["train.tensorboard=maybe"])


def test_tensorboard_scalars_are_written(tmp_path, toy_data, tiny_net):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    result = fit(tiny_net(), toy_data, train={"epochs": 2, "progress": False, "tensorboard": True}, out_dir=out)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/top1", "test/top1", "test/top5", "lr"} <= tags
    top1 = events.Scalars("test/top1")
    assert [e.step for e in top1] == [1, 2]
    assert top1[-1].value == pytest.approx(result.final_top1)
    assert (out / "metrics.jsonl").is_file()  # alongside, not instead


def test_tensorboard_writer_is_closed_after_success_and_error(tmp_path, toy_data, tiny_net, nan_net, monkeypatch):
    pytest.importorskip("tensorboard")
    import torch.utils.tensorboard as tb

    writers = []

    class Recording(tb.SummaryWriter):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.closed = False
            writers.append(self)

        def close(self) -> None:
            self.closed = True
            super().close()

    monkeypatch.setattr(tb, "SummaryWriter", Recording)
    train = {"epochs": 1, "progress": False, "tensorboard": True, "log_every": 1}
    fit(tiny_net(), toy_data, train=train, out_dir=tmp_path / "ok")
    assert writers[-1].closed

    def failing_run() -> None:
        try:
            fit(nan_net(), toy_data, train=train, out_dir=tmp_path / "nan")
        except KDForgeError:
            return
        raise AssertionError("the run should stop on the non-finite loss")

    failing_run()
    gc.collect()  # the writer closes when the failed run's frame goes (CPython frees it on return already)
    assert len(writers) == 2 and writers[-1].closed


def test_no_tensorboard_dir_by_default(tmp_path, toy_data, tiny_net):
    fit(tiny_net(), toy_data, train={"epochs": 1, "progress": False}, out_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "tensorboard").exists()
