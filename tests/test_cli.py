"""The ``kdforge`` command line as a user drives it: listings, train → distill → eval, demo, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from kdforge.cli import main
from kdforge.config import load_config
from kdforge.methods.params import method_defaults
from kdforge.registry import METHODS

REPO = Path(__file__).resolve().parents[1]
FAST = [
    "data.train_subset=256",
    "data.test_subset=100",
    "data.batch_size=64",
    "data.num_workers=0",
    "train.epochs=1",
    "train.progress=false",
]


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_methods_table(capsys):
    code, out, _ = _run(capsys, "methods")
    assert code == 0
    assert "kd" in out and "vanilla" in out and "exact" in out and "Hinton" in out
    code, out, _ = _run(capsys, "methods", "--json")
    assert {"kd", "vanilla"} <= {r["name"] for r in json.loads(out)}


def test_models_table_counts(capsys):
    _, out, _ = _run(capsys, "models", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["resnet8x4"]["params"] == 1_233_540
    assert rows["resnet18"]["params"] == 11_689_512
    _code, out, _ = _run(capsys, "models", "--family", "cifar")
    assert "resnet32x4" in out and "7,433,860" in out and "resnet34" not in out


def test_a_closed_pipe_ends_quietly():
    """`kdforge ... | head`: the reader leaves early; kdforge exits without a traceback."""
    import subprocess
    import sys

    out = subprocess.run(
        f'"{sys.executable}" -m kdforge models | head -c 1', shell=True, capture_output=True, text=True, timeout=120
    )
    assert len(out.stdout) == 1 and "Traceback" not in out.stderr and "BrokenPipe" not in out.stderr, out.stderr


def test_datasets_table(capsys):
    code, out, _ = _run(capsys, "datasets")
    assert code == 0 and "embedded" in out and "cifar100" in out and "folder" in out


def test_train_distill_eval_end_to_end(tmp_path, capsys):
    teacher = tmp_path / "teacher"
    code, _, err = _run(capsys, "train", "--out", str(teacher), "model.name=resnet8", *FAST)
    assert code == 0, err
    assert (teacher / "model.pt").is_file() and (teacher / "config.yaml").is_file()
    env = json.loads((teacher / "env.json").read_text())
    assert env["torch"] == torch.__version__ and "git_commit" in env

    student = tmp_path / "kd"
    code, out, err = _run(
        capsys,
        "distill",
        "--out",
        str(student),
        "model.name=resnet8",
        "teacher.name=resnet8",
        f"teacher.checkpoint={teacher}",
        "method.temperature=2",
        *FAST,
    )
    assert code == 0, err
    assert "teacher resnet8: test top-1" in out
    # config.yaml names every method parameter, the defaults too: the run stays described if a default changes
    saved = yaml.safe_load((student / "config.yaml").read_text())["method"]
    assert saved == {"name": "kd", **method_defaults(METHODS.get("kd")), "temperature": 2.0}
    assert len(saved) > 2 and load_config(student / "config.yaml").method.params["temperature"] == 2.0
    summary = json.loads((student / "summary.json").read_text())
    assert summary["method"] == "kd" and "teacher_top1" in summary

    code, out, err = _run(capsys, "eval", "--checkpoint", str(student / "student.pt"), "--json", "data.test_subset=100")
    assert code == 0, err
    result = json.loads(out)
    assert result["count"] == 100 and result["model"] == "resnet8"
    assert result["top1"] == pytest.approx(summary["final_top1"], abs=1e-6)

    code, out, _ = _run(capsys, "eval", "--checkpoint", str(student / "last.pt"), "data.test_subset=100")
    assert code == 0 and "resnet8" in out


def test_dry_run_prints_resolved_config(capsys, tmp_path):
    code, out, _ = _run(
        capsys, "distill", "--dry-run", "teacher.name=resnet20", "teacher.checkpoint=x.pt", "optim.lr=0.2"
    )
    assert code == 0 and "lr: 0.2" in out and "name: kd" in out


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["train", "model.name=resnet9"], "unknown model 'resnet9'; did you mean"),
        (["train", "optim.lrr=0.1"], "unknown config key 'optim.lrr'; closest valid keys: optim.lr"),
        (["train", "train.epochs=abc"], "train.epochs must be an integer"),
        (["distill", "method.name=kdd", "teacher.name=resnet8"], "unknown method 'kdd'"),
        (["distill", "model.name=resnet8"], "needs a teacher"),
        (["distill", "teacher.name=resnet8"], "teacher.checkpoint is not set"),
        (["train", "--config", "/nonexistent.yaml"], "does not exist"),
        (["eval", "--checkpoint", "/nonexistent.pt"], "does not exist"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, fragment, capsys, tmp_path):
    code, _out, err = _run(capsys, *argv, "--out", str(tmp_path / "r")) if argv[0] != "eval" else _run(capsys, *argv)
    assert code == 2
    assert fragment in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "r").exists()  # nothing half-written


def test_teacher_of_another_architecture_or_class_count(tmp_path, capsys):
    teacher = tmp_path / "t"
    assert _run(capsys, "train", "--out", str(teacher), "model.name=resnet8", *FAST)[0] == 0
    code, _, err = _run(
        capsys, "distill", "--out", str(tmp_path / "k"), "teacher.name=resnet14", f"teacher.checkpoint={teacher}", *FAST
    )
    assert code == 2 and "missing" in err and "layer1.1" in err and err.count("\n") == 1
    code, _, err = _run(
        capsys,
        "distill",
        "--out",
        str(tmp_path / "k2"),
        "teacher.name=resnet8",
        f"teacher.checkpoint={teacher}",
        "teacher.num_classes=100",
        *FAST,
    )
    assert code == 2 and "teacher.num_classes=100 but dataset 'embedded' has 10 classes" in err
    code, _, err = _run(capsys, "eval", "--checkpoint", str(teacher / "model.pt"), "model.name=resnet20")
    assert code == 2 and "missing" in err


def test_eval_of_bare_state_dict_needs_model_name(tmp_path, capsys):
    from kdforge.models import create_model

    path = tmp_path / "w.pt"
    torch.save(create_model("resnet8", num_classes=10).state_dict(), path)
    code, _, err = _run(capsys, "eval", "--checkpoint", str(path))
    assert code == 2 and "pass model.name=" in err
    code, _out, err = _run(capsys, "eval", "--checkpoint", str(path), "model.name=resnet8", "data.test_subset=50")
    assert code == 0, err


def test_run_dir_refused_then_forced(tmp_path, capsys):
    out = tmp_path / "r"
    assert _run(capsys, "train", "--out", str(out), *FAST)[0] == 0
    code, _, err = _run(capsys, "train", "--out", str(out), *FAST)
    assert code == 2 and "already holds a run" in err
    assert _run(capsys, "train", "--out", str(out), "--force", *FAST)[0] == 0
    assert _run(capsys, "train", "--out", str(out), "--resume", "train.epochs=2", "train.progress=false")[0] == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(s)["epoch"] for s in lines] == [1, 2]


def test_demo_quick(tmp_path, capsys):
    code, out, err = _run(
        capsys,
        "demo",
        "--out",
        str(tmp_path / "demo"),
        "--train-teacher",
        "--teacher-epochs",
        "1",
        "--student-epochs",
        "1",
        "--train-subset",
        "300",
        "--quiet",
    )
    assert code == 0, err
    assert "student + KD" in out and "student + ATF" in out and "teacher" in out
    png = tmp_path / "demo" / "curves.png"
    from PIL import Image

    with Image.open(png) as im:
        assert im.size[0] > 300 and im.size[1] > 200
        assert len(np.unique(np.asarray(im.convert("L")))) > 10  # not blank
    assert (tmp_path / "demo" / "results.md").read_text().count("|") > 20


def test_python_module_entry_point():
    proc = subprocess.run(
        [sys.executable, "-m", "kdforge", "methods"], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert proc.returncode == 0 and "kd" in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "kdforge", "train", "model.name=resnt8"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "resnt8" in proc.stderr


@pytest.mark.parametrize("where", ["file", "below_a_file"])
def test_out_naming_an_existing_file_is_one_line(tmp_path, capsys, where):
    # Regression: --out naming a file ended in a 30-line FileExistsError traceback.
    blocker = tmp_path / "notes.txt"
    blocker.write_text("keep me\n")
    out = blocker if where == "file" else blocker / "run"
    code, _out, err = _run(capsys, "train", "--out", str(out), *FAST)
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert str(out) in err and ("existing file" in err or "cannot create the run directory" in err)
    assert blocker.read_text() == "keep me\n"


def test_config_with_a_key_given_twice_is_refused(tmp_path, capsys):
    # Regression: two `method:` blocks were accepted silently, the later one winning.
    path = tmp_path / "twice.yaml"
    path.write_text("model: {name: resnet8}\nmethod: {name: vanilla}\ntrain: {epochs: 1}\nmethod:\n  name: dml\n")
    code, _out, err = _run(capsys, "train", "--config", str(path), "--out", str(tmp_path / "r"))
    assert code == 2 and err.count("\n") == 1
    assert f"{path}: key 'method' is given twice, at lines 2 and 4" in err
    assert not (tmp_path / "r").exists()


def test_pictures_out_names_a_file_or_a_folder_for_it(tmp_path: Path) -> None:
    from kdforge.api import _picture_file

    default = tmp_path / "run" / "attention.png"
    assert _picture_file(None, default) == default
    assert _picture_file(tmp_path / "mine.png", default) == tmp_path / "mine.png"
    assert _picture_file(tmp_path, default) == tmp_path / "attention.png"  # an existing folder
    assert _picture_file(f"{tmp_path}/new/", default) == tmp_path / "new" / "attention.png"  # a folder to make
    assert _picture_file(tmp_path / "new", default) == tmp_path / "new"  # neither: a file of that name
