"""Every shipped config file loads and validates; the smoke configs run end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kdforge.config import load_config
from kdforge.methods import METHODS
from kdforge.validation import validate

# Run configs; configs/sweeps holds sweep files (a different schema, checked in tests/test_sweep_report.py).
CONFIGS = sorted(
    p for p in (Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml") if p.parent.name != "sweeps"
)
SWEEPS = sorted((Path(__file__).resolve().parents[1] / "configs" / "sweeps").glob("*.yaml"))


REPO = Path(__file__).resolve().parents[1]


def _command(path: Path) -> str:
    method = METHODS.get(yaml.safe_load(path.read_text())["method"]["name"])
    return "distill" if method.needs_teacher else "train"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[2])))
def test_config_file_validates(path):
    cfg = load_config(path)
    validate(cfg, _command(path))
    assert cfg.train.seed is not None
    if METHODS.get(cfg.method.name).needs_teacher:
        assert cfg.teacher is not None and cfg.teacher.checkpoint


def test_cifar100_configs_follow_the_recipe():
    for path in (p for p in CONFIGS if "cifar100" in p.parts):
        cfg = load_config(path)
        small = cfg.model.name in ("MobileNetV2", "ShuffleV1", "ShuffleV2")
        if cfg.method.name == "dml":  # DML's own recipe (METHODS.md 2.7)
            assert cfg.train.epochs == 200 and cfg.schedule.milestones == [60, 120, 180] and cfg.optim.lr == 0.1
            assert cfg.teacher is None
            continue
        assert cfg.train.epochs == 240 and cfg.schedule.milestones == [150, 180, 210] and cfg.schedule.gamma == 0.1
        if cfg.data.views == "jda":  # CCD's recipe: nesterov, wd 1e-4, 128 items per batch
            assert cfg.method.name in ("ccd", "kd_jda") and cfg.data.batch_size == 128
            assert cfg.optim.weight_decay == 1e-4 and cfg.optim.nesterov and cfg.data.jda_p == 0.3
            assert cfg.optim.lr == (0.02 if small else 0.1), path
            continue
        assert cfg.data.batch_size == 64 and cfg.optim.weight_decay == 5e-4
        assert cfg.optim.lr == (0.01 if small else 0.05), path
        if cfg.method.name == "kd":
            assert cfg.method.params == {"temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9}
        if cfg.method.name == "dkd" and cfg.method.params.get("logit_norm", "none") == "none":
            beta = {"resnet56": 2.0, "resnet110": 2.0, "wrn_40_2": 6.0, "vgg13": 6.0}.get(cfg.teacher.name, 8.0)
            assert cfg.method.params["beta"] == beta and cfg.method.params["warmup_epochs"] == 20.0


def test_generated_configs_are_up_to_date():
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_configs.py"), "--check"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_method_has_configs_for_the_standard_pairs():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from make_configs import NO_STANDARD_PAIRS
    finally:
        sys.path.pop(0)
    for method in METHODS.names():
        if method in NO_STANDARD_PAIRS:
            continue
        pairs = list((REPO / "configs" / "cifar100").glob(f"{method}/*.yaml"))
        assert len(pairs) == 12, method
        assert (REPO / "configs" / "imagenet" / method / "resnet34_resnet18.yaml").is_file(), method


def test_every_method_has_a_smoke_config():
    smoke = {p.stem for p in CONFIGS if p.parent.name == "smoke"}
    assert set(METHODS.names()) <= smoke


def test_smoke_configs_run(tmp_path):
    from kdforge.api import run

    root = Path(__file__).resolve().parents[1] / "configs" / "smoke"
    teacher_dir = tmp_path / "vanilla"
    res = run(load_config(root / "vanilla.yaml", ["train.progress=false"]), "train", teacher_dir)
    assert res.final_top1 > 10.0
    for path in sorted(root.glob("*.yaml")):
        if path.stem == "vanilla":
            continue
        overrides = ["train.progress=false", "train.epochs=1"]
        if METHODS.get(yaml.safe_load(path.read_text())["method"]["name"]).needs_teacher:
            overrides.append(f"teacher.checkpoint={teacher_dir}")
        result = run(load_config(path, overrides), "distill", tmp_path / path.stem)
        assert result.final_top1 == result.final_top1  # finite, not NaN
        assert (tmp_path / path.stem / "student.pt").is_file()


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_sweep_file_validates(path):
    from kdforge.sweep import load_sweep

    plan = load_sweep(path, root=REPO)
    assert plan.runs
