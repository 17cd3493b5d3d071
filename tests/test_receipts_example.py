"""The receipt example of docs/examples/receipts.md runs end to end, shrunk to seconds: every command it shows."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_receipt_example_script_runs_every_step(tmp_path: Path) -> None:
    out = tmp_path / "receipts"
    env = {
        **os.environ,
        "KDFORGE": f"{sys.executable} -m kdforge",
        "PYTHON": sys.executable,
        "RECEIPTS_ARGS": "--per-class 16 --val-per-class 8 --size 32",
        "PYTHONPATH": str(REPO),
    }
    quick = ["train.epochs=1", "data.image_size=32", "data.batch_size=8", "data.num_workers=0", "train.progress=false"]
    proc = subprocess.run(
        ["bash", "scripts/receipts_example.sh", str(out), *quick],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for run in ("teacher", "student", "student_alone"):
        assert (out / run / "summary.json").is_file(), run
    assert (out / "student" / "export" / "student.torchscript.pt").is_file()
    profile = json.loads((out / "profile_teacher.json").read_text())
    assert {row["role"] for row in profile} == {"teacher", "student"}
    assert (out / "report" / "confusion_matrix.png").is_file() and (out / "report" / "roc.png").is_file()
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == 16 and {r["class"] for r in rows} <= {"other", "receipt"}
