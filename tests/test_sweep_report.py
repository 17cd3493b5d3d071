"""``kdforge sweep`` and ``kdforge report``: plan expansion and errors, a tiny real sweep with skip and resume, the GPU
scheduler with a fake launcher, and report aggregation checked against numbers computed by hand."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from kdforge.cli import main
from kdforge.config import load_config
from kdforge.errors import ConfigError, KDForgeError
from kdforge.report.published import PUBLISHED, lookup
from kdforge.report.table import (
    BEGIN,
    END,
    build_groups,
    group_notes,
    markdown_table,
    plot_units,
    replace_section,
    scan_runs,
    t_quantile_975,
    write_report,
)
from kdforge.sweep import SWEEP_DIR, expand_sweep, launch_subprocess, parallel_slots, run_sweep

FAST = {
    "data.name": "embedded",
    "data.train_subset": 256,
    "data.test_subset": 100,
    "data.batch_size": 64,
    "data.num_workers": 0,
    "train.epochs": 1,
    "train.progress": False,
    "schedule.name": "cosine",
}


def _spec(out: Path, **changes: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "out": str(out),
        "overrides": dict(FAST),
        "teachers": {"resnet8": {}},
        "pairs": [["resnet8", "resnet8"]],
        "methods": {"student": {"method.name": "vanilla"}, "kd": {"method.temperature": 2.0}},
        "seeds": [0, 1],
    }
    spec.update(changes)
    return spec


# ----------------------------------------------------------------------------------------------------------------
# Plan expansion and validation


def test_plan_expansion(tmp_path):
    teacher_dir = tmp_path / "given_teacher"
    teacher_dir.mkdir()
    spec = _spec(
        tmp_path / "sweep",
        base={"method": {"name": "kd", "temperature": 8.0, "ce_weight": 0.5}, "optim": {"lr": 0.02}},
        teachers={"resnet8": {"train.epochs": 3}, "resnet14": str(teacher_dir)},
        pairs=[["resnet8", "resnet8"], ["resnet14", "resnet8"]],
        methods={"student": {"method.name": "vanilla"}, "kd": {"method.temperature": 2.0}, "dkd": {}},
    )
    plan = expand_sweep(spec)
    out = tmp_path / "sweep"
    # The sweep trains the one teacher given as overrides, on the sweep's budget plus its own overrides.
    assert [t.key for t in plan.teachers] == ["embedded/teachers/resnet8"]
    teacher = plan.teachers[0]
    assert teacher.command == "train" and teacher.config.train.epochs == 3 and teacher.config.method.name == "vanilla"
    assert teacher.config.teacher is None and teacher.config.optim.lr == 0.02
    keys = [r.key for r in plan.runs]
    # The student alone does not depend on the teacher: one run per seed, shared by both pairs.
    assert keys.count("embedded/resnet8/student/seed0") == 1
    assert len(keys) == 2 + 2 * 2 * 2 and len(set(keys)) == len(keys)
    runs = {r.key: r for r in plan.runs}
    kd = runs["embedded/resnet8_resnet8/kd/seed1"]
    assert kd.command == "distill" and kd.out == out / kd.key
    assert kd.config.train.seed == 1 and kd.config.train.epochs == 1
    # The label's overrides win over the base; the base's parameters of the same method stay.
    assert kd.config.method.params == {"temperature": 2.0, "ce_weight": 0.5}
    assert kd.config.teacher.name == "resnet8" and kd.config.teacher.checkpoint == str(teacher.out)
    # method.name defaults to the label; another method drops the base's kd parameters.
    dkd = runs["embedded/resnet14_resnet8/dkd/seed0"]
    assert dkd.config.method.name == "dkd" and dkd.config.method.params == {}
    assert dkd.config.teacher.checkpoint == str(teacher_dir)
    assert runs["embedded/resnet8/student/seed1"].config.teacher is None
    assert all(r.state() == "new" for r in plan.all_runs)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"method": {}}, "unknown key 'method'; closest valid keys: methods"),
        ({"out": None}, "'out' is required"),
        ({"pairs": []}, "pairs must be a non-empty list"),
        ({"pairs": [["resnet8"]]}, "each entry of pairs must be [teacher, student]"),
        ({"seeds": [0, 0]}, "seeds repeat a value"),
        ({"seeds": ["a"]}, "seeds must be a non-empty list of integers"),
        ({"teachers": {}}, "teacher 'resnet8' has no entry under teachers"),
        ({"teachers": {"resnet8": {}, "resnet20": {}}}, "teachers lists resnet20, which no pair uses"),
        ({"teachers": {"resnet8": "no/such/dir"}}, "no/such/dir does not exist"),
        ({"methods": {"kd": {"method.temprature": 2}}}, "closest valid keys: method.temperature"),
        ({"methods": {"kdd": {}}}, "sweep run embedded/resnet8_resnet8/kdd/seed0: method.name: unknown method 'kdd'"),
        ({"overrides": {"train.epoch": 1}}, "unknown config key 'train.epoch'; closest valid keys: train.epochs"),
        ({"methods": {"kd": {"method..x": 1}}}, "has an empty part"),
    ],
)
def test_plan_errors(tmp_path, change, message):
    spec = {**_spec(tmp_path), **change}
    with pytest.raises(ConfigError) as info:
        expand_sweep(spec)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_cli_sweep_dry_run_and_error(tmp_path, capsys):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(_spec(tmp_path / "out")))
    assert main(["sweep", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "5 runs: 0 done, 0 to resume, 5 new" in out and "embedded/resnet8_resnet8/kd/seed1" in out
    assert not (tmp_path / "out").exists()  # a dry run writes nothing
    path.write_text(yaml.safe_dump(_spec(tmp_path / "out", seeds=[])))
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kdforge: error:") and err.count("\n") == 1
    assert main(["sweep", str(path), "--gpus", ","]) == 2


# ----------------------------------------------------------------------------------------------------------------
# A tiny real sweep: runs, skips on a second call, resumes an interrupted run, restarts a broken one


def _epochs(run_dir: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_tiny_sweep_runs_skips_and_resumes(tmp_path):
    out = tmp_path / "sweep"
    plan = expand_sweep(_spec(out))
    result = run_sweep(plan, log=lambda _: None)
    assert not result.failed and len(result.ran) == 5 and not result.skipped
    for run in plan.all_runs:
        summary = json.loads((run.out / "summary.json").read_text())
        assert summary["epochs"] == 1 and 0 <= summary["best_top1"] <= 100
    kd = out / "embedded/resnet8_resnet8/kd/seed1"
    assert json.loads((kd / "summary.json").read_text())["teacher_top1"] == pytest.approx(
        json.loads((out / "embedded/teachers/resnet8/summary.json").read_text())["final_top1"]
    )

    again = run_sweep(expand_sweep(_spec(out)), log=lambda _: None)
    assert again.ran == [] and len(again.skipped) == 5

    # Interrupted: kd/seed1 lost its summary and is now asked for 2 epochs, so it resumes from epoch 1's last.pt.
    # student/seed0 died before its first checkpoint: only a partial metrics.jsonl is left, so it restarts.
    (kd / "summary.json").unlink()
    student = out / "embedded/resnet8/student/seed0"
    for name in ("summary.json", "last.pt"):
        (student / name).unlink()
    overrides = {**FAST, "train.epochs": 2}
    plan = expand_sweep(_spec(out, overrides=overrides))
    states = {r.key: r.state() for r in plan.all_runs}
    assert states["embedded/resnet8_resnet8/kd/seed1"] == "resume"
    assert states["embedded/resnet8/student/seed0"] == "new"
    assert list(states.values()).count("done") == 3
    result = run_sweep(plan, log=lambda _: None)
    assert sorted(result.ran) == ["embedded/resnet8/student/seed0", "embedded/resnet8_resnet8/kd/seed1"]
    assert _epochs(kd) == [1, 2]  # epoch 1 was not trained again
    assert json.loads((kd / "summary.json").read_text())["epochs"] == 2
    assert _epochs(student) == [1, 2]

    # The report over the sweep: one group, the teacher row found through teacher.checkpoint although T == S; the
    # seeds now differ in train.epochs, so each budget is its own row and gains compare like with like.
    report = write_report(out, tmp_path / "report", command="kdforge report", plots=False)
    (group,) = report.groups
    rows = {r.label: r for r in group.rows}
    assert list(rows) == [
        "vanilla",
        "student alone (train.epochs=1)",
        "student alone (train.epochs=2)",
        "KD (train.epochs=1)",
        "KD (train.epochs=2)",
    ]
    assert (
        rows["vanilla"].role == "teacher"
        and rows["vanilla"].runs[0].path == (out / "embedded/teachers/resnet8").resolve()
    )
    gain = rows["KD (train.epochs=2)"].gain_best.mean
    assert gain == pytest.approx(
        rows["KD (train.epochs=2)"].best.mean - rows["student alone (train.epochs=2)"].best.mean
    )


# ----------------------------------------------------------------------------------------------------------------
# GPU spreading


class FakeProcess:
    """Finishes after ``polls`` calls to ``poll`` with ``code``."""

    def __init__(self, polls: int, code: int) -> None:
        self.polls, self.code = polls, code

    def poll(self) -> int | None:
        self.polls -= 1
        return self.code if self.polls <= 0 else None


def test_gpu_scheduler_with_fake_launcher(tmp_path):
    out = tmp_path / "sweep"
    plan = expand_sweep(_spec(out, seeds=[0, 1, 2]))
    # One run left half-done: the scheduler passes --resume for it.
    resumed = next(r for r in plan.runs if r.key.endswith("kd/seed2"))
    resumed.out.mkdir(parents=True)
    (resumed.out / "last.pt").write_bytes(b"")
    launched: list[dict[str, Any]] = []
    active: list[FakeProcess] = []

    def launcher(argv: list[str], env: dict[str, str], log: Path) -> FakeProcess:
        active[:] = [p for p in active if p.polls > 0]
        proc = FakeProcess(polls=2, code=1 if "student/seed1" in str(log).replace("__", "/") else 0)
        active.append(proc)
        launched.append({"argv": argv, "gpu": env["CUDA_VISIBLE_DEVICES"], "log": log, "active": len(active)})
        return proc

    result = run_sweep(plan, gpus=["0", "3"], launcher=launcher, log=lambda _: None, poll_s=0.0)
    assert len(launched) == len(plan.all_runs) == 1 + 3 + 3
    assert max(x["active"] for x in launched) == 2  # never more runs than GPUs at once
    assert {x["gpu"] for x in launched} == {"0", "3"}
    # The teacher runs alone first: every distillation run starts after it finished.
    assert launched[0]["argv"][3] == "train" and "teachers" in launched[0]["argv"][-1]
    first = launched[0]["argv"]
    assert first[:4] == [sys.executable, "-m", "kdforge", "train"] and first[4] == "--config"
    assert load_config(first[5]) == plan.teachers[0].config  # the launch config is the resolved run config
    assert Path(first[5]).is_relative_to(out / SWEEP_DIR)
    argv = {Path(x["argv"][x["argv"].index("--out") + 1]): x["argv"] for x in launched}
    assert "--resume" in argv[resumed.out] and "--resume" not in argv[plan.teachers[0].out]
    assert all(x["log"].parent == out / SWEEP_DIR / "logs" for x in launched)
    assert list(result.failed) == ["embedded/resnet8/student/seed1"]
    assert len(result.ran) == len(plan.all_runs) - 1


@pytest.mark.parametrize("teacher_code", [0, 1])
def test_students_alone_run_beside_the_teacher_and_distillation_waits_for_it(tmp_path, teacher_code):
    plan = expand_sweep(_spec(tmp_path / "sweep", seeds=[0, 1, 2]))
    teacher: list[FakeProcess] = []
    launched: list[tuple[str, bool]] = []  # (command, was the teacher still running at the launch)

    def launcher(argv: list[str], env: dict[str, str], log: Path) -> FakeProcess:
        running = bool(teacher) and teacher[0].polls > 0
        launched.append((argv[3], running))
        proc = FakeProcess(polls=4 if not teacher else 1, code=teacher_code if not teacher else 0)
        if not teacher:
            teacher.append(proc)
        return proc

    result = run_sweep(plan, workers=2, launcher=launcher, log=lambda _: None, poll_s=0.0)
    # the teacher first, the three students alone on the second worker while it trains
    assert launched[:4] == [("train", False), ("train", True), ("train", True), ("train", True)]
    assert all(not running for cmd, running in launched if cmd == "distill")
    distill_keys = [r.key for r in plan.runs if r.command == "distill"]
    if teacher_code == 0:
        assert [cmd for cmd, _ in launched[4:]] == ["distill"] * 3 and not result.failed
    else:  # a failed teacher: its distillation runs are marked failed unlaunched, the students alone still ran
        assert len(launched) == 4 and sorted(result.failed) == sorted([plan.teachers[0].key, *distill_keys])
        assert all(result.failed[k] == "not run: a teacher of the sweep failed" for k in distill_keys)


@pytest.mark.parametrize("slow_code", [0, 1])
def test_a_distillation_run_starts_when_its_own_teacher_is_done(tmp_path, slow_code):
    """Two teachers, one fast and one slow: the fast one's distillation runs take the freed worker while the slow
    one still trains, and the slow one's wait for it (or, when it fails, are recorded failed unlaunched)."""
    spec = _spec(
        tmp_path / "sweep",
        teachers={"resnet14": {}, "resnet20": {}},
        pairs=[["resnet14", "resnet8"], ["resnet20", "resnet8"]],
        methods={"kd": {"method.temperature": 2.0}},
    )
    plan = expand_sweep(spec)
    assert [r.after for r in plan.runs] == [("embedded/teachers/resnet14",)] * 2 + [("embedded/teachers/resnet20",)] * 2
    slow: list[FakeProcess] = []
    launched: list[tuple[str, bool]] = []  # (log name, was the slow teacher still running at the launch)

    def launcher(argv: list[str], env: dict[str, str], log: Path) -> FakeProcess:
        launched.append((log.stem, bool(slow) and slow[0].polls > 0))
        if log.stem.endswith("teachers__resnet20"):
            slow.append(FakeProcess(polls=20, code=slow_code))
            return slow[0]
        return FakeProcess(polls=2, code=0)

    result = run_sweep(plan, workers=2, launcher=launcher, log=lambda _: None, poll_s=0.0)
    names = [name for name, _ in launched]
    assert names[:2] == ["embedded__teachers__resnet14", "embedded__teachers__resnet20"]
    # both resnet14 runs start (one after the other on the freed worker) while resnet20 still trains
    assert launched[2:4] == [(f"embedded__resnet14_resnet8__kd__seed{s}", True) for s in (0, 1)]
    late = [(name, running) for name, running in launched if "resnet20_resnet8" in name]
    if slow_code == 0:
        assert late == [(f"embedded__resnet20_resnet8__kd__seed{s}", False) for s in (0, 1)] and not result.failed
    else:
        assert late == [] and len(result.ran) == 3
        assert {k: v for k, v in result.failed.items() if "kd/" in k} == {
            f"embedded/resnet20_resnet8/kd/seed{s}": "not run: a teacher of the sweep failed" for s in (0, 1)
        }


def test_cpu_workers_share_the_cores_and_run_at_most_n_at_once(tmp_path):
    assert parallel_slots(None, 3, cpus=8) == {
        f"worker {i}": {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"} for i in range(3)
    }
    assert parallel_slots(None, 4, cpus=2)["worker 3"]["OMP_NUM_THREADS"] == "1"  # never 0 threads
    assert parallel_slots(None, 1, cpus=2, threads=1) == {"worker 0": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}}
    with pytest.raises(ConfigError, match="give --workers N with it"):
        parallel_slots(None, None, threads=1)
    with pytest.raises(ConfigError, match="--threads must be at least 1"):
        parallel_slots(None, 2, threads=0)
    assert parallel_slots(None, None) == {} and parallel_slots(["1"], None) == {"GPU 1": {"CUDA_VISIBLE_DEVICES": "1"}}
    with pytest.raises(ConfigError, match="not both"):
        parallel_slots(["0"], 2)
    with pytest.raises(ConfigError, match="at least 1"):
        parallel_slots(None, 0)
    plan = expand_sweep(_spec(tmp_path / "sweep", seeds=[0, 1, 2]))
    launched: list[tuple[str, int]] = []
    active: list[FakeProcess] = []

    def launcher(argv: list[str], env: dict[str, str], log: Path) -> FakeProcess:
        active[:] = [p for p in active if p.polls > 0]
        active.append(FakeProcess(polls=3, code=0))
        launched.append((env["OMP_NUM_THREADS"], len(active)))
        return active[-1]

    result = run_sweep(plan, workers=2, launcher=launcher, log=lambda _: None, poll_s=0.0)
    assert len(result.ran) == len(launched) == len(plan.all_runs)
    assert max(n for _, n in launched) == 2 and {t for t, _ in launched} == {str(max(1, (os.cpu_count() or 1) // 2))}


def test_a_signal_stops_the_parallel_sweep_after_passing_it_to_the_running_runs(tmp_path):
    import signal

    from kdforge.engine.signals import TrainingInterrupted

    launched: list[Path] = []

    class Child(FakeProcess):
        def __init__(self) -> None:
            super().__init__(polls=10**9, code=0)  # runs until signalled
            self.signals: list[int] = []

        def send_signal(self, sig: int) -> None:
            self.signals.append(sig)
            self.polls, self.code = 1, 2  # writes last.pt and exits with kdforge's error status

    children: list[Child] = []

    def launcher(argv: list[str], env: dict[str, str], log: Path) -> Child:
        launched.append(log)
        children.append(Child())
        if len(children) == 2:  # the scheduler's own process gets SIGTERM once both workers run
            os.kill(os.getpid(), signal.SIGTERM)
        return children[-1]

    # a teacher given as a checkpoint: no teacher phase, six runs for two workers
    plan = expand_sweep({**_spec(tmp_path / "sweep", seeds=[0, 1, 2]), "teachers": {"resnet8": str(tmp_path)}})
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted, match="sweep stopped by SIGTERM.*run the same kdforge sweep again"):
        run_sweep(plan, workers=2, launcher=launcher, log=lambda _: None, poll_s=0.0)
    assert len(plan.runs) == 6 and len(launched) == 2  # nothing started after the signal
    assert [c.signals for c in children] == [[signal.SIGTERM], [signal.SIGTERM]]
    assert signal.getsignal(signal.SIGTERM) == before  # the scheduler's handler is gone again


def test_sweep_cli_rejects_bad_workers_before_writing(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(_spec(tmp_path / "out")))
    assert main(["sweep", str(path), "--workers", "0"]) == 2
    assert main(["sweep", str(path), "--workers", "2", "--gpus", "0"]) == 2
    assert not (tmp_path / "out").exists()


def test_gpu_scheduler_skips_distillation_after_teacher_failure(tmp_path):
    plan = expand_sweep(_spec(tmp_path / "sweep"))
    result = run_sweep(plan, gpus=["0"], launcher=lambda *a: FakeProcess(1, 1), log=lambda _: None, poll_s=0.0)
    assert result.failed["embedded/teachers/resnet8"].startswith("exit status 1")
    assert result.failed["embedded/resnet8_resnet8/kd/seed0"] == "not run: a teacher of the sweep failed"
    assert "embedded/resnet8/student/seed0" in result.failed  # the fake launcher fails every run


def test_launch_subprocess_sets_gpu_and_logs(tmp_path):
    log = tmp_path / "logs" / "run.log"
    code = "import os; print('gpu', os.environ['CUDA_VISIBLE_DEVICES'])"
    proc = launch_subprocess([sys.executable, "-c", code], {"CUDA_VISIBLE_DEVICES": "5"}, log)
    assert proc.wait(timeout=60) == 0  # type: ignore[attr-defined]
    assert log.read_text().strip() == "gpu 5"


# ----------------------------------------------------------------------------------------------------------------
# Report: aggregation golden values, Markdown, CSV, published column, plots


def _fake_run(
    root: Path,
    name: str,
    *,
    model: str,
    method: dict[str, Any],
    best: float,
    final: float,
    dataset: str = "cifar100",
    teacher: str | None = None,
    teacher_dir: Path | None = None,
    epochs: int = 240,
    seed: int = 0,
    extra: dict[str, Any] | None = None,
) -> Path:
    run = root / name
    run.mkdir(parents=True)
    config: dict[str, Any] = {
        "model": {"name": model},
        "method": method,
        "data": {"name": dataset, "train_subset": None, "batch_size": 64},
        "optim": {"name": "sgd", "lr": 0.05},
        "train": {"epochs": epochs, "seed": seed},
    }
    if teacher:
        config["teacher"] = {"name": teacher, "checkpoint": str(teacher_dir)}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    summary = {"best_top1": best, "final_top1": final, "train_time_s": 120.0, "epochs": epochs, **(extra or {})}
    (run / "summary.json").write_text(json.dumps(summary))
    # Three evaluated epochs ending at the final accuracy, the middle one at the best.
    records = [(1, final - 10), (2, best), (3, final)]
    (run / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "test_top1": v}) + "\n" for e, v in records))
    (run / "env.json").write_text(json.dumps({"device": "cpu", "platform": "Linux-x86_64", "cpu_count": 2}))
    return run


@pytest.fixture
def fake_runs(tmp_path) -> Path:
    root = tmp_path / "runs"
    t = _fake_run(root, "teacher", model="resnet32x4", method={"name": "vanilla"}, best=79.0, final=78.5)
    for seed, (b, f) in enumerate([(72.0, 71.0), (73.0, 72.0)]):
        _fake_run(
            root, f"vanilla/seed{seed}", model="resnet8x4", method={"name": "vanilla"}, best=b, final=f, seed=seed
        )
    kd = {"name": "kd", "temperature": 4.0}
    for seed, (b, f) in enumerate([(74.0, 73.5), (75.0, 74.5), (76.0, 75.0)]):
        _fake_run(
            root, f"kd/seed{seed}", model="resnet8x4", method=kd, best=b, final=f, teacher="resnet32x4", teacher_dir=t
        )
    kd2 = {"name": "kd", "temperature": 2.0}
    _fake_run(
        root, "kd_t2/seed0", model="resnet8x4", method=kd2, best=73.0, final=73.0, teacher="resnet32x4", teacher_dir=t
    )
    atf = {"name": "atf"}
    _fake_run(
        root, "atf/seed0", model="resnet8x4", method=atf, best=77.0, final=76.0, teacher="resnet32x4", teacher_dir=t,
        extra={"final_teacher_top1": 78.0},
    )  # fmt: skip
    # A second group on a short CIFAR-10 budget: no published numbers apply.
    t10 = _fake_run(
        root, "c10/teacher", model="resnet20", method={"name": "vanilla"}, best=67, final=67, dataset="cifar10"
    )
    _fake_run(
        root, "c10/v", model="resnet8", method={"name": "vanilla"}, best=50, final=50, dataset="cifar10", epochs=5
    )
    _fake_run(
        root, "c10/kd", model="resnet8", method=kd, best=55, final=54, dataset="cifar10", epochs=5,
        teacher="resnet20", teacher_dir=t10,
    )  # fmt: skip
    (root / "broken").mkdir()  # no summary.json: not a finished run, ignored
    (root / "broken" / "config.yaml").write_text("model: {name: resnet8}\n")
    return root


def test_a_primary_metric_in_fractions_gets_four_decimals(tmp_path):
    """COCO AP is a fraction: at two decimals the student alone (0.1257) and LD (0.1235) would both read 0.12."""
    root = tmp_path / "runs"

    def det_run(name: str, value: float, **kw: Any) -> Path:
        run = _fake_run(root, name, model=kw.pop("model", "gfl_resnet8"), best=value, final=value, **kw)
        summary = {k: v for k, v in json.loads((run / "summary.json").read_text()).items() if "top1" not in k}
        summary.update(primary="AP", best_AP=value, final_AP=value)
        (run / "summary.json").write_text(json.dumps(summary))
        return run

    t = det_run("teacher", 0.2038, model="gfl_resnet20", method={"name": "vanilla"})
    alone, ld = [0.1275, 0.1302, 0.1194], [0.1235, 0.1250]
    for seed, v in enumerate(alone):
        det_run(f"alone{seed}", v, method={"name": "vanilla"}, seed=seed)
    for seed, v in enumerate(ld):
        det_run(f"ld{seed}", v, method={"name": "ld"}, teacher="gfl_resnet20", teacher_dir=t, seed=seed)
    (group,) = build_groups(scan_runs(root))
    table = markdown_table(group)
    assert "| gfl_resnet20 (teacher) | vanilla | 1 | 0.2038 | 0.2038 |" in table
    a = f"{np.mean(alone):.4f} ± {np.std(alone, ddof=1):.4f}"
    b = f"{np.mean(ld):.4f} ± {np.std(ld, ddof=1):.4f}"
    assert f"| gfl_resnet8 | student alone | 3 | {a} | {a} |" in table
    assert f"| gfl_resnet8 | LD | 2 | {b} | {b} | {np.mean(ld) - np.mean(alone):+.4f} |" in table


def test_hashing_runs_with_precision_recall_records_get_a_seed_averaged_plot(tmp_path, monkeypatch):
    """task.pr_curve records precision/recall per Hamming radius; the report averages them over each row's seeds
    (a radius where one seed retrieves nothing, NaN, takes the other seeds' value) and plots one line per row."""
    import kdforge.report.retrieval_pictures as pictures

    root = tmp_path / "runs"

    def hash_run(name: str, prs: list[tuple[float, float, float]], recs: list[float], **kw: Any) -> Path:
        run = _fake_run(root, name, model=kw.pop("model", "hash_resnet8"), best=0.3, final=0.3, **kw)
        summary = {k: v for k, v in json.loads((run / "summary.json").read_text()).items() if "top1" not in k}
        (run / "summary.json").write_text(json.dumps({**summary, "primary": "map", "best_map": 0.3, "final_map": 0.3}))
        # an earlier evaluation with other values: only the last one counts
        early = {"epoch": 1, "test_map": 0.1} | {f"test_pr_precision@{r}": 0.0 for r in range(3)}
        last = {"epoch": 3, "test_map": 0.3}
        for r in range(3):
            early[f"test_pr_recall@{r}"] = 0.0
            last[f"test_pr_precision@{r}"], last[f"test_pr_recall@{r}"] = prs[r], recs[r]
        (run / "metrics.jsonl").write_text(json.dumps(early) + "\n" + json.dumps(last) + "\n")
        return run

    t = hash_run("teacher", [0.9, 0.8, 0.1], [0.1, 0.5, 1.0], model="hash_resnet20", method={"name": "vanilla"})
    nan = float("nan")
    hash_run("alone0", [0.6, 0.5, 0.1], [0.0, 0.4, 1.0], method={"name": "vanilla"})
    hash_run("alone1", [nan, 0.3, 0.1], [0.2, 0.6, 1.0], method={"name": "vanilla"}, seed=1)
    hash_run("brcd0", [0.7, 0.6, 0.1], [0.1, 0.5, 1.0], method={"name": "brcd"}, teacher="hash_resnet20",
             teacher_dir=t)  # fmt: skip
    _fake_run(root, "other/teacher", model="resnet20", method={"name": "vanilla"}, best=60, final=60)  # no PR records
    drawn: dict[str, Any] = {}
    real = pictures.plot_precision_recall

    def spy(curves, path, **kw):
        drawn[Path(path).name] = {k: (p.tolist(), r.tolist()) for k, (p, r) in curves.items()}
        return real(curves, path, **kw)

    monkeypatch.setattr(pictures, "plot_precision_recall", spy)
    report = write_report(root, tmp_path / "report", command="kdforge report runs")
    (name,) = drawn
    assert name.endswith("_pr.png") and (tmp_path / "report" / name) in report.plots
    curves = drawn[name]
    assert list(curves) == ["teacher hash_resnet20", "student alone", "BRCD"]
    assert curves["teacher hash_resnet20"] == ([0.9, 0.8, 0.1], [0.1, 0.5, 1.0])
    (p, r) = curves["student alone"]
    assert p == pytest.approx([0.6, 0.4, 0.1]) and r == pytest.approx([0.1, 0.5, 1.0])
    assert f"({name})" in report.markdown.read_text()


def test_plot_axes_name_each_metric_in_its_own_unit():
    assert plot_units("top1") == ("%", "points") and plot_units("mIoU") == ("%", "points")
    assert plot_units("psnr") == ("dB", "dB")
    assert plot_units("AP") == plot_units("mAP50") == plot_units("map") == ("", "")  # fractions: no "%"


def test_report_aggregation_golden(fake_runs):
    groups = build_groups(scan_runs(fake_runs))
    assert [(g.dataset, g.teacher, g.student) for g in groups] == [
        ("cifar10", "resnet20", "resnet8"),
        ("cifar100", "resnet32x4", "resnet8x4"),
    ]
    rows = {r.label: r for r in groups[1].rows}
    assert list(rows) == [
        "vanilla",
        "student alone",
        "KD (method.temperature=2.0)",
        "KD (method.temperature=4.0)",
        "ATF",
    ]
    teacher, alone, kd = rows["vanilla"], rows["student alone"], rows["KD (method.temperature=4.0)"]
    assert teacher.role == "teacher" and teacher.network == "resnet32x4 (teacher)" and teacher.best.n == 1
    assert alone.best.mean == pytest.approx(72.5) and alone.best.std == pytest.approx(math.sqrt(0.5))
    assert kd.best.mean == pytest.approx(75.0) and kd.best.std == pytest.approx(1.0) and kd.best.n == 3
    assert kd.final.mean == pytest.approx((73.5 + 74.5 + 75.0) / 3)
    assert kd.final.std == pytest.approx(float(np.std([73.5, 74.5, 75.0], ddof=1)))
    # gain = 75.0 - 72.5; its error combines both spreads: sqrt(1.0² + 0.5)
    assert kd.gain_best.mean == pytest.approx(2.5) and kd.gain_best.std == pytest.approx(math.sqrt(1.5))
    assert kd.gain_final == pytest.approx(kd.final.mean - 71.5)
    assert rows["ATF"].gain_best.std == pytest.approx(math.sqrt(0.5))
    assert rows["ATF"].extras["teacher"].mean == 78.0
    # Published numbers: the CIFAR-100 240-epoch protocol matches; CIFAR-10 at 5 epochs never does.
    assert teacher.published.top1 == 79.42 and alone.published.top1 == 72.50 and kd.published.top1 == 73.33
    assert rows["ATF"].published is None
    assert all(r.published is None for r in groups[0].rows)


def test_published_lookup():
    assert lookup("cifar100", "resnet32x4", "resnet8x4", "dkd", 240).top1 == 76.32
    assert lookup("cifar100", "resnet110", "resnet20", "dkd").tag == "LS"  # marked [LS] in BENCHMARKS.md
    assert lookup("cifar100", "resnet32x4", "ShuffleV1", "ls_kd") is None  # n/r
    assert lookup("cifar100", "resnet32x4", "resnet8x4", "kd", 5) is None  # a short budget is not the protocol
    assert lookup("cifar10", "resnet20", "resnet8", "kd") is None
    assert lookup("imagenet", "resnet34", "resnet18", "dkd", 100).top1 == 71.70
    assert lookup("cifar100", "wrn_40_2", "wrn_40_1", "ls_dkd").top1 == 74.89
    assert all(0 < p.top1 < 100 and p.source for p in PUBLISHED.values())


def test_report_files_and_plots(fake_runs, tmp_path):
    import matplotlib.image

    out = tmp_path / "report"
    report = write_report(fake_runs, out, command="kdforge report runs")
    md = report.markdown.read_text()
    assert "- Table: `kdforge report runs`" in md and "- Device: CPU (x86_64, 2 cores)" in md
    assert "### cifar100: resnet32x4 → resnet8x4" in md
    assert (
        "| resnet8x4 | KD (method.temperature=4.0) | 3 | 75.00 ± 1.00 | 74.33 ± 0.76 | +2.50 | 2.0 min | 73.33 [CRD] |"
        in md
    )
    assert "| resnet32x4 (teacher) | vanilla | 1 | 79.00 | 78.50 |  | 2.0 min | 79.42 [CRD] |" in md
    assert "| resnet8 | KD | 1 | 55.00 | 54.00 | +5.00 | 2.0 min | — |" in md
    assert "ATF's fine-tuned teacher ends at 78.00 % top-1 (the pretrained teacher: 78.50 %)." in md
    assert "[CRD] RepDistiller README" in md
    rows = list(csv.DictReader(io.StringIO(report.csv.read_text())))
    kd = next(r for r in rows if r["label"] == "KD (method.temperature=4.0)")
    assert float(kd["best_mean"]) == 75.0 and float(kd["gain_best"]) == 2.5 and kd["n"] == "3"
    assert float(kd["published_top1"]) == 73.33 and "RepDistiller" in kd["published_source"]
    assert len(rows) == 3 + 5
    assert len(report.plots) == 4
    for png in report.plots:
        assert f"({png.name})" in md
        image = matplotlib.image.imread(png)
        assert image.shape[0] > 100 and image.shape[1] > 100
        assert float(image[..., :3].std()) > 0.01  # not a single colour


def test_replace_section_keeps_hand_written_text():
    legacy = (
        "# Results\n\nintro\n\n## A\n\n- old command\n\n| old |\n\n"
        "Notes on this table (by hand):\n\n- keep me\n\n## B\n\nother\n"
    )
    text = replace_section(legacy, "A", "- new\n\n| new |\n")
    assert "old" not in text and "- new" in text and "- keep me" in text and "## B\n\nother" in text
    assert text.index(END) < text.index("Notes on this table") < text.index("## B")
    again = replace_section(text, "A", "- newer\n")
    assert "- newer" in again and "- new\n" not in again and again.count(BEGIN) == 1 and "- keep me" in again
    assert replace_section(again, "A", "- newer\n") == again  # idempotent
    appended = replace_section("# Results\n", "C", "- c\n")
    assert appended.startswith("# Results\n\n## C\n\n" + BEGIN)


def test_cli_report(fake_runs, tmp_path, capsys):
    doc = tmp_path / "RESULTS.md"
    doc.write_text("# Results\n\n## Mine\n\nold\n\nNotes: by hand\n")
    code = main(["report", str(fake_runs), "--out", str(tmp_path / "rep"), "--markdown", str(doc), "--section", "Mine"])
    assert code == 0, capsys.readouterr().err
    text = doc.read_text()
    assert "Notes: by hand" in text and "| resnet8 | KD | 1 | 55.00 |" in text and "old" not in text
    assert "](rep/" in text  # plot links relative to the document
    assert main(["report", str(fake_runs), "--markdown", str(doc)]) == 2
    assert main(["report", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err


def test_report_ignores_keys_older_runs_lack(fake_runs):
    # A key added to the config schema after some runs were made must not split one setting into two rows.
    path = fake_runs / "kd/seed2/config.yaml"
    config = yaml.safe_load(path.read_text())
    config["train"]["new_switch"] = True
    path.write_text(yaml.safe_dump(config))
    rows = {r.label: r for r in build_groups(scan_runs(fake_runs))[1].rows}
    assert rows["KD (method.temperature=4.0)"].best.n == 3


def test_budget_names_a_teachers_own_share_of_the_training_set(tmp_path) -> None:
    root = tmp_path / "runs"
    t = _fake_run(
        root, "t", model="resnet20", method={"name": "vanilla"}, best=60, final=60, dataset="cifar10", epochs=20
    )
    _fake_run(root, "v", model="resnet8", method={"name": "vanilla"}, best=50, final=50, dataset="cifar10", epochs=5)
    kd = {"name": "kd", "temperature": 4.0}
    _fake_run(
        root, "kd", model="resnet8", method=kd, best=55, final=54, dataset="cifar10", epochs=5, teacher="resnet20",
        teacher_dir=t,
    )  # fmt: skip
    same = write_report(root, tmp_path / "same", command="kdforge report runs", plots=False).markdown.read_text()
    assert "the full training set, the full test set; teacher 20 epochs; each student run 5 epochs" in same
    config = yaml.safe_load((t / "config.yaml").read_text())
    config["data"]["train_subset"] = 4000
    (t / "config.yaml").write_text(yaml.safe_dump(config))
    other = write_report(root, tmp_path / "other", command="kdforge report runs", plots=False).markdown.read_text()
    assert "teacher 20 epochs on 4,000 training images; each student run 5 epochs" in other


def test_budget_states_the_split_a_retrieval_protocol_defines(tmp_path) -> None:
    # cifar10_hash trains on 5,000 images whatever train_subset says (that cuts its database), so "the full training
    # set" would misstate the budget; its registry entry names the protocol instead.
    root = tmp_path / "runs"
    t = _fake_run(
        root, "t", model="hash_resnet20", method={"name": "vanilla"}, best=0.3, final=0.3, dataset="cifar10_hash"
    )
    _fake_run(
        root, "kd", model="hash_resnet8", method={"name": "code_kd"}, best=0.2, final=0.2, dataset="cifar10_hash",
        teacher="hash_resnet20", teacher_dir=t, extra={"task": "hashing"},
    )  # fmt: skip
    text = write_report(root, tmp_path / "rep", command="kdforge report runs", plots=False).markdown.read_text()
    assert "Budget: protocol (a): 500 training images per class, half the test set as queries" in text
    assert "full training set" not in text and "two views per image (CIBHash's random resized crop" in text
    config = yaml.safe_load((root / "kd" / "config.yaml").read_text())
    config["data"]["train_subset"] = 20000
    (root / "kd" / "config.yaml").write_text(yaml.safe_dump(config))
    text = write_report(root, tmp_path / "rep2", command="kdforge report runs", plots=False).markdown.read_text()
    assert "database; data.train_subset 20,000; teacher 240 epochs with no data.train_subset;" in text


def test_t_quantiles_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in range(1, 201):
        assert t_quantile_975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-4), df
    with pytest.raises(ValueError, match="degree of freedom"):
        t_quantile_975(0)


def _paired_runs(root: Path) -> None:
    """Student alone, KD and BRCD-like runs of seeds 0-2 (BRCD also seed 3, which nothing else has)."""
    t = _fake_run(root, "t", model="hash_resnet20", method={"name": "vanilla"}, best=0.3, final=0.3, dataset="h")
    finals = {
        "vanilla": [0.50, 0.52, 0.47],
        "kd": [0.53, 0.535, 0.50],
        "brcd": [0.54, 0.55, 0.51, 0.90],
    }
    for name, values in finals.items():
        for seed, value in enumerate(values):
            _fake_run(
                root, f"{name}/seed{seed}", model="hash_resnet8", method={"name": name}, best=value, final=value,
                dataset="h", seed=seed, **({} if name == "vanilla" else {"teacher": "hash_resnet20", "teacher_dir": t}),
            )  # fmt: skip


def test_paired_differences_by_seed_match_scipy_ttest_rel(tmp_path):
    stats = pytest.importorskip("scipy.stats")
    root = tmp_path / "runs"
    _paired_runs(root)
    (group,) = build_groups(scan_runs(root), against=["kd"])
    (base, vs_alone), (kd_label, vs_kd) = group.paired
    assert (base, kd_label) == ("student alone", "KD")
    student, kd, brcd = [0.50, 0.52, 0.47], [0.53, 0.535, 0.50], [0.54, 0.55, 0.51]
    expected = {
        "KD": stats.ttest_rel(kd, student).confidence_interval(0.95),
        "BRCD": stats.ttest_rel(brcd, student).confidence_interval(0.95),
    }
    assert [label for label, _ in vs_alone] == ["KD", "BRCD"]
    for label, paired in vs_alone:
        # seed 3 of BRCD has no student-alone partner and is left out
        assert paired.seeds == [0, 1, 2]
        assert paired.interval == pytest.approx((expected[label].low, expected[label].high), abs=1e-5)
    assert vs_alone[0][1].mean == pytest.approx((0.03 + 0.015 + 0.03) / 3)
    ((label, paired),) = vs_kd
    ci = stats.ttest_rel(brcd, kd).confidence_interval(0.95)
    assert label == "BRCD" and paired.interval == pytest.approx((ci.low, ci.high), abs=1e-5)
    notes = "\n".join(group_notes(group))
    assert "Paired by seed against student alone (final top-1, row minus student alone" in notes
    assert f"KD {vs_alone[0][1].format(4)}" in notes and "Paired by seed against KD" in notes
    assert vs_alone[0][1].format(4).endswith("(3 seeds)") and " [+" in vs_alone[0][1].format(4)


def test_pairing_needs_unambiguous_seeds_and_a_known_against(tmp_path, capsys):
    root = tmp_path / "runs"
    _paired_runs(root)
    # two student-alone runs of seed 1 (e.g. two sweeps in one folder): no pairing against that row
    _fake_run(
        root, "vanilla2/seed1", model="hash_resnet8", method={"name": "vanilla"}, best=0.6, final=0.6, dataset="h",
        seed=1,
    )  # fmt: skip
    (group,) = build_groups(scan_runs(root))
    assert group.paired == []
    with pytest.raises(KDForgeError, match="--against crd: no method row"):
        build_groups(scan_runs(root), against=["CRD"])
    out = tmp_path / "rep"
    assert main(["report", str(root), "--out", str(out), "--against", "crd"]) == 2
    assert "--against crd" in capsys.readouterr().err and not out.exists()  # nothing half-written


def test_fake_runs_pair_one_seed_without_an_interval(fake_runs):
    rows = {label: p for base, pairs in build_groups(scan_runs(fake_runs))[1].paired for label, p in pairs}
    assert rows["ATF"].seeds == [0] and rows["ATF"].interval is None and rows["ATF"].mean == pytest.approx(76 - 71)
    assert rows["ATF"].format() == "+5.00 (1 seed)"
    assert rows["KD (method.temperature=2.0)"].mean == pytest.approx(73 - 71)
    # the three KD (T=4) runs were all written as seed 0: which pairs with which is unknown, so none is paired
    assert "KD (method.temperature=4.0)" not in rows
