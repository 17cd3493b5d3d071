"""``kdforge demo`` with the shipped teacher: the asset's integrity and accuracy, its bit-for-bit reproduction by
scripts/train_demo_teacher.py, and the demo's fast default path."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdforge import demo
from kdforge.cli import main
from kdforge.engine.evaluation import evaluate
from kdforge.errors import CheckpointError

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "train_demo_teacher.py"


def _record() -> dict:
    return json.loads(demo.TEACHER_RECORD.read_text())


def _train_script(*outs: Path, args: tuple[str, ...] = ()) -> list[bytes]:
    """Runs the script once per path in ``outs``, side by side (each is single-threaded), and returns the weights."""
    procs = [
        subprocess.Popen(
            [sys.executable, str(SCRIPT), "--out", str(out), "--quiet", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for out in outs
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=1800)
        assert proc.returncode == 0, err[-2000:]
    return [out.read_bytes() for out in outs]


def test_shipped_teacher_loads_matches_its_sha256_and_recorded_accuracy():
    record = _record()
    assert demo.sha256_file(demo.TEACHER_ASSET) == record["sha256"]
    assert demo.TEACHER_ASSET.stat().st_size < 2_000_000  # ~1.1 MB of float32 resnet20 weights
    model, meta = demo.load_shipped_teacher()
    assert meta == record
    assert sum(p.numel() for p in model.parameters()) == 272_474
    data = demo.build_demo_data(train_subset=256, device=torch.device("cpu"))
    top1 = evaluate(model, data.test, device="cpu")["top1"]
    assert top1 == pytest.approx(record["test_top1"], abs=1e-9)
    assert record["curve"][-1][1] == pytest.approx(record["test_top1"], abs=1e-9)  # the final epoch is the teacher
    assert top1 > 40.0  # far above chance (10 %): a trained network, not an initialisation


def test_altered_or_missing_asset_is_one_clear_error(tmp_path):
    weights, record = tmp_path / "t.pt", tmp_path / "t.json"
    shutil.copy(demo.TEACHER_ASSET, weights)
    shutil.copy(demo.TEACHER_RECORD, record)
    demo.load_shipped_teacher(10, weights, record)  # the intact copy loads
    blob = bytearray(weights.read_bytes())
    blob[-100] ^= 1
    weights.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="altered: SHA-256 .*--train-teacher"):
        demo.load_shipped_teacher(10, weights, record)
    weights.unlink()
    with pytest.raises(CheckpointError, match="asset missing: .*t.pt"):
        demo.load_shipped_teacher(10, weights, record)


def test_cli_missing_asset_and_teacher_epochs_without_training_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(demo, "TEACHER_ASSET", tmp_path / "absent.pt")
    assert main(["demo", "--out", str(tmp_path / "d"), "--quiet", "--train-subset", "300"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "demo teacher asset missing" in err and "--train-teacher" in err
    assert main(["demo", "--out", str(tmp_path / "d"), "--teacher-epochs", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "add --train-teacher" in err


def test_demo_default_uses_the_shipped_teacher(tmp_path, capsys):
    code = main(["demo", "--out", str(tmp_path / "demo"), "--student-epochs", "1", "--train-subset", "300", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    record = _record()
    teacher_line = next(line for line in out.splitlines() if line.startswith("| teacher"))
    assert "shipped, trained by scripts/train_demo_teacher.py" in teacher_line
    assert f"| {record['test_top1']:.2f} | {record['test_top1']:.2f} | — |" in teacher_line
    assert "student + KD" in out and "student + ATF" in out and "Total time" in out
    assert (tmp_path / "demo" / "curves.png").stat().st_size > 10_000
    assert not (tmp_path / "demo" / "teacher").exists()  # no teacher run: nothing trained for it


def test_teacher_script_is_bit_for_bit_reproducible_on_a_short_run(tmp_path):
    first, second = _train_script(
        tmp_path / "a" / "t.pt", tmp_path / "b" / "t.pt", args=("--epochs", "1", "--subset", "500")
    )
    assert first == second
    rec = json.loads((tmp_path / "a" / "t.json").read_text())
    assert rec["sha256"] == demo.sha256_file(tmp_path / "a" / "t.pt")
    assert rec["epochs"] == 1 and rec["train_subset"] == 500
    state = torch.load(tmp_path / "a" / "t.pt", weights_only=True)
    shipped = torch.load(demo.TEACHER_ASSET, weights_only=True)
    assert list(state) == list(shipped)  # same layout as the shipped asset
    assert any(not torch.equal(state[k], shipped[k]) for k in state)  # a different (shorter) training


@pytest.mark.slow
@pytest.mark.heavy
def test_teacher_script_reproduces_the_shipped_weights(tmp_path):
    record = _record()
    if record["torch"] != torch.__version__:
        pytest.skip(f"the asset was written by torch {record['torch']}; bit-for-bit holds for that version only")
    assert _train_script(tmp_path / "t.pt") == [demo.TEACHER_ASSET.read_bytes()]
