"""scripts/gpu_check.sh: the dry mode runs every step on the CPU and writes a well-formed report; the report pieces
(bf16 peak lookup, FLOP count, rendering of partial results) are right."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def test_bf16_peak_is_read_from_the_device_name():
    gc = _gpu_check()
    assert gc.bf16_peak("NVIDIA H200")[0] == pytest.approx(989.4e12)
    assert gc.bf16_peak("NVIDIA H100 80GB HBM3")[0] == pytest.approx(989.4e12)
    assert gc.bf16_peak("NVIDIA H100 PCIe")[0] == pytest.approx(756e12)
    assert gc.bf16_peak("NVIDIA A100-SXM4-80GB")[0] == pytest.approx(312e12)
    peak, line = gc.bf16_peak("Some GPU")
    assert peak is None and "not computed" in line


def test_flops_per_image_follow_the_stated_formula():
    from kdforge.models import create_model
    from kdforge.profile import count_macs

    gc = _gpu_check()
    t = count_macs(create_model("resnet20", num_classes=10), (1, 3, 32, 32))
    s = count_macs(create_model("resnet8", num_classes=10), (1, 3, 32, 32))
    assert gc._flops_per_image("kd", "resnet20", "resnet8")[0] == 2 * (t + 3 * s)
    assert gc._flops_per_image("atf", "resnet20", "resnet8")[0] == 2 * (4 * t + 3 * s)
    assert gc._flops_per_image("kd", "resnet20", "resnet8", cached=True)[0] == 2 * 3 * s


def test_bench_plan_covers_every_row_once_headline_first():
    gc = _gpu_check()
    plan = gc.bench_plan()
    assert len(plan) == len(set(plan)) == len(gc.PAIRS) * len(gc.METHODS) * len(gc.SETTINGS) + 1
    assert plan[0] == ("kd", gc.PAIRS[0], gc.SETTINGS[0]) and plan[2][2][3]  # the third row is compiled
    assert sum(1 for _, _, s in plan if s == gc.FAST) == 1


def test_partial_results_render(tmp_path):
    gc = _gpu_check()
    gc._save(tmp_path, "env", {"device": "NVIDIA H200", "date": "d", "dry_run": False})
    row = {"method": "kd", "teacher": "resnet32x4", "student": "resnet8x4", "batch": 64, "setting": "x"}
    gc._save(tmp_path, "bench", {"device": "H200", "peak": "p", "rows": [{**row, "status": "not run: 3 s"}],
                                 "workers": 8, "steps": 20, "warmup": 5, "rounds": 3})  # fmt: skip
    md = (tmp_path / "gpu_check.md").read_text()
    assert "# GPU check, NVIDIA H200" in md and "not run: 3 s" in md and "## Full CIFAR-10" in md
    assert json.loads((tmp_path / "gpu_check.json").read_text())["bench"]["rows"][0]["status"] == "not run: 3 s"


@pytest.mark.slow
@pytest.mark.heavy
def test_dry_run_runs_every_step_on_the_cpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--dry-run", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["env"]["dry_run"] is True
    # Every cuda test was collected (and, on this CPU, would be skipped).
    assert report["cuda_tests"]["rc"] == 0 and "collected" in " ".join(report["cuda_tests"]["tail"])
    rows = report["bench"]["rows"]
    gc = _gpu_check()
    assert len(rows) == len(gc.PAIRS) * len(gc.METHODS) * len(gc.SETTINGS) + 1
    assert all(r["status"] == "ok" for r in rows), [r["status"] for r in rows if r["status"] != "ok"]
    assert any(r["compile"] and "compiled once" not in r.get("note", "") for r in rows)  # the compile path started
    assert all(r["ratio"] is not None and r["tflops"] > 0 for r in rows)
    train = report["train"]
    assert train["teacher"]["status"] == "ok" and train["kd"]["status"] == "ok"
    assert all(v.startswith("exit 0") for v in report["steps"].values()), report["steps"]
    md = (tmp_path / "gpu_check.md").read_text()
    assert "dry run on the CPU" in md and "| kd | resnet32x4 → resnet8x4 | 256 |" in md
