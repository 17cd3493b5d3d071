"""The training loop: learning, outputs, checkpoints, resume, schedules, evaluation counts, atomic writes."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from torch import nn

from kdforge.api import fit
from kdforge.config import OptimConfig, ScheduleConfig
from kdforge.data.batch import Batch
from kdforge.engine.checkpoint import atomic_write_bytes, load_checkpoint, save_checkpoint
from kdforge.engine.loop import evaluate
from kdforge.engine.optim import build_optimizer, lr_factor
from kdforge.errors import CheckpointError, ConfigError, KDForgeError
from kdforge.methods import create_method

QUIET = {"progress": False}


def test_fit_learns_and_writes_run_dir(tmp_path, toy_data, tiny_net):
    result = fit(
        tiny_net(),
        toy_data,
        train={"epochs": 6, **QUIET},
        optim={"lr": 0.1},
        schedule={"name": "cosine"},
        out_dir=tmp_path / "run",
    )
    assert result.final_top1 > 60.0  # chance is 25 %; the quadrant task is easy
    out = tmp_path / "run"
    assert {"config.yaml", "env.json", "metrics.jsonl", "last.pt", "best.pt", "model.pt", "summary.json"} <= {
        p.name for p in out.iterdir()
    }
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3, 4, 5, 6]
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]
    assert max(r["test_top1"] for r in lines) == pytest.approx(result.best_top1)
    assert lines[-1]["best_top1"] == pytest.approx(result.best_top1)
    best = load_checkpoint(out / "best.pt")
    assert best["epoch"] == result.best_epoch
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_top1"] == pytest.approx(result.final_top1)
    assert not list(out.glob("*.tmp"))


def test_student_pt_is_a_plain_state_dict(tmp_path, toy_data, tiny_net):
    teacher = tiny_net(seed=5)
    method = create_method("kd", tiny_net(), teacher)
    fit(method, toy_data, train={"epochs": 1, **QUIET}, out_dir=tmp_path / "kd")
    state = load_checkpoint(tmp_path / "kd" / "student.pt")
    assert set(state) == set(tiny_net().state_dict())
    fresh = tiny_net(seed=9).eval()
    fresh.load_state_dict(state)
    torch.testing.assert_close(
        fresh(toy_data.test.images[:4]).detach(), method.student.eval()(toy_data.test.images[:4]).detach()
    )


def test_resume_gives_identical_weights(tmp_path, toy_data, tiny_net, monkeypatch):
    common = {"optim": {"lr": 0.1}, "schedule": {"name": "multistep", "milestones": [2]}}
    full = fit(tiny_net(), toy_data, train={"epochs": 4, **QUIET}, out_dir=tmp_path / "full", **common)
    # An interrupted run: the same schedule, stopped after 2 of 4 epochs, then resumed in a fresh process state.
    import kdforge.engine.loop as loop

    calls = {"n": 0}
    real_evaluate = loop.evaluate

    def stop_after_two(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(loop, "evaluate", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_net(), toy_data, train={"epochs": 4, **QUIET}, out_dir=tmp_path / "part", **common)
    monkeypatch.setattr(loop, "evaluate", real_evaluate)
    assert load_checkpoint(tmp_path / "part" / "last.pt")["epoch"] == 2
    torch.manual_seed(1234)  # the resumed process starts from other RNG state; resume must restore it
    resumed = fit(
        tiny_net(seed=77), toy_data, train={"epochs": 4, **QUIET}, out_dir=tmp_path / "part", resume=True, **common
    )
    a = load_checkpoint(tmp_path / "full" / "model.pt")
    b = load_checkpoint(tmp_path / "part" / "model.pt")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed.final_top1 == full.final_top1
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3, 4]


def test_run_dir_guard(tmp_path, toy_data, tiny_net):
    fit(tiny_net(), toy_data, train={"epochs": 1, **QUIET}, out_dir=tmp_path / "r")
    with pytest.raises(ConfigError, match="already holds a run; pass --resume"):
        fit(tiny_net(), toy_data, train={"epochs": 1, **QUIET}, out_dir=tmp_path / "r")
    fit(tiny_net(), toy_data, train={"epochs": 1, **QUIET}, out_dir=tmp_path / "r", force=True)
    with pytest.raises(ConfigError, match="holds no last.pt"):
        fit(tiny_net(), toy_data, train={"epochs": 1, **QUIET}, out_dir=tmp_path / "new", resume=True)


def test_non_finite_loss_stops_with_a_clear_message(tmp_path, toy_data, nan_net):
    with pytest.raises(KDForgeError, match=r"training loss became nan in epoch 1 \(step 1\).*lower optim.lr"):
        fit(nan_net(), toy_data, train={"epochs": 1, "log_every": 1, **QUIET}, out_dir=tmp_path / "nan")


def test_grad_clip_bounds_the_update(toy_data, tiny_net):
    net = tiny_net()
    before = [p.detach().clone() for p in net.parameters()]
    fit(
        net,
        toy_data,
        train={"epochs": 1, "grad_clip": 1e-3, **QUIET},
        optim={"lr": 1.0, "momentum": 0.0, "weight_decay": 0.0},
    )
    # With ‖g‖ ≤ 1e-3 per step and lr 1, four SGD steps move the weights by at most 4e-3 in total norm.
    moved = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(net.parameters(), before, strict=True)))
    assert 0 < moved.item() <= 4e-3 + 1e-6


class _FixedLogits(nn.Module):
    """Returns preset logits for each input index (stored in the first pixel)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x[:, 0, 0, 0].long()]


def test_evaluate_counts_are_exact():
    # 5 samples, 6 classes. Targets 0..4. Ranks of the target: 1st, 1st, 3rd, 6th, 5th.
    logits = torch.tensor(
        [
            [9, 1, 2, 3, 4, 5],
            [1, 9, 2, 3, 4, 5],
            [9, 8, 7, 1, 2, 3],
            [9, 8, 7, 1, 6, 5],
            [9, 8, 7, 6, 5, 4],
        ],
        dtype=torch.float32,
    )
    x = torch.arange(5, dtype=torch.float32).view(5, 1, 1, 1).expand(5, 3, 2, 2).contiguous()
    batches = [Batch(x[:3], torch.arange(3), torch.arange(3)), Batch(x[3:], torch.arange(3, 5), torch.arange(3, 5))]
    result = evaluate(_FixedLogits(logits), batches)
    assert result["count"] == 5
    assert result["top1"] == pytest.approx(40.0)
    assert result["top5"] == pytest.approx(80.0)  # ranks ≤ 5: samples 0, 1, 2, 4
    expected_loss = nn.functional.cross_entropy(logits, torch.arange(5)).item()
    assert result["loss"] == pytest.approx(expected_loss, rel=1e-6)


def test_lr_schedules_by_hand():
    steps = 10
    ms = lr_factor(ScheduleConfig(name="multistep", milestones=[2, 3], gamma=0.1), 0.1, 4, steps)
    assert [ms(s) for s in (0, 19, 20, 29, 30, 39)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    cos = lr_factor(ScheduleConfig(name="cosine", min_lr=0.0), 0.1, 4, steps)
    assert cos(0) == pytest.approx(1.0) and cos(20) == pytest.approx(0.5) and cos(40) == pytest.approx(0.0)
    assert cos(10) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    warm = lr_factor(ScheduleConfig(name="constant", warmup_epochs=1, warmup_start=0.1), 0.1, 4, steps)
    assert [warm(s) for s in (0, 5, 10, 30)] == pytest.approx([0.1, 0.55, 1.0, 1.0])
    cos_floor = lr_factor(ScheduleConfig(name="cosine", min_lr=0.01), 0.1, 4, steps)
    assert cos_floor(40) == pytest.approx(0.1)


def test_optimizer_groups_scale_and_decay_split():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    groups = [
        {"name": "a", "params": list(net[0].parameters()), "lr_scale": 1.0},
        {"name": "b", "params": list(net[1].parameters()), "lr_scale": 0.1},
    ]
    opt = build_optimizer(groups, OptimConfig(lr=0.2, weight_decay=1e-3, decay_norm_and_bias=False, nesterov=True))
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["nesterov"]
    lrs = sorted((round(g["lr"], 9), g["weight_decay"], len(g["params"])) for g in opt.param_groups)
    assert lrs == [(0.02, 0.0, 2), (0.2, 0.0, 1), (0.2, 1e-3, 1)]
    adamw = build_optimizer(groups, OptimConfig(name="adamw", lr=1e-3, betas=(0.8, 0.9)))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["betas"] == (0.8, 0.9)


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "ckpt.pt"
    save_checkpoint({"v": torch.tensor([1])}, target)

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space left") as info:
        save_checkpoint({"v": torch.tensor([2])}, target)
    # One line for the CLI (a KDForgeError) that is still an OSError with its errno for Python callers.
    assert isinstance(info.value, KDForgeError) and info.value.errno == 28
    want = f"cannot write {target}: No space left on device; the previous version of the file is unchanged"
    assert str(info.value) == want
    monkeypatch.undo()
    assert load_checkpoint(target)["v"].item() == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left behind
    atomic_write_bytes(target, b"x")
    assert target.read_bytes() == b"x"


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_load_refuses_pickled_code_and_truncated_files(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"obj": _Evil()}, evil)
    with pytest.raises(CheckpointError, match="arbitrary pickled code"):
        load_checkpoint(evil)
    good = tmp_path / "good.pt"
    save_checkpoint({"w": torch.randn(100, 100)}, good)
    truncated = tmp_path / "trunc.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(truncated)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def _interrupted_then_resumed(make_method, data, out, epochs, monkeypatch, **kwargs):
    """Run ``epochs`` epochs with a crash after the second evaluation, then resume from ``last.pt``."""
    import kdforge.engine.loop as loop

    calls = {"n": 0}
    real_evaluate = loop.evaluate

    def stop_after_two(*args, **kw):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        return real_evaluate(*args, **kw)

    monkeypatch.setattr(loop, "evaluate", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        fit(make_method(), data, train={"epochs": epochs, **QUIET}, out_dir=out, **kwargs)
    monkeypatch.setattr(loop, "evaluate", real_evaluate)
    torch.manual_seed(4321)
    return fit(make_method(), data, train={"epochs": epochs, **QUIET}, out_dir=out, resume=True, **kwargs)


def test_teacher_finetuning_run_exports_evaluates_and_resumes_exactly(tmp_path, toy_data, tiny_net, monkeypatch):
    def make():
        return create_method("atf", tiny_net(seed=0), tiny_net(seed=5), teacher_lr_scale=0.5)

    full = fit(make(), toy_data, train={"epochs": 3, **QUIET}, optim={"lr": 0.1}, out_dir=tmp_path / "full")
    out = tmp_path / "full"
    assert {"student.pt", "teacher.pt"} <= {p.name for p in out.iterdir()}
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("teacher_top1" in r for r in lines)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_teacher_top1"] == pytest.approx(lines[-1]["teacher_top1"])
    tuned = load_checkpoint(out / "teacher.pt")
    pretrained = tiny_net(seed=5).state_dict()
    assert set(tuned) == set(pretrained)
    assert any(not torch.equal(tuned[k], pretrained[k]) for k in tuned)

    # A crash and resume restores the tuned teacher, the gap EMA and the optimizer's teacher group exactly.
    resumed = _interrupted_then_resumed(make, toy_data, tmp_path / "part", 3, monkeypatch, optim={"lr": 0.1})
    for name in ("student.pt", "teacher.pt"):
        a, b = load_checkpoint(out / name), load_checkpoint(tmp_path / "part" / name)
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    assert resumed.final_top1 == full.final_top1


def test_dml_alternating_updates_each_peer_per_batch(tmp_path, toy_data, tiny_net):
    method = create_method("dml", tiny_net(seed=0), None, context={"num_classes": 4}, update="alternating")
    fit(method, toy_data, train={"epochs": 2, **QUIET}, out_dir=tmp_path / "dml")
    ckpt = load_checkpoint(tmp_path / "dml" / "last.pt")
    steps = 2 * len(toy_data.train)
    assert ckpt["step"] == steps
    assert ckpt["scheduler"]["last_epoch"] == steps  # the schedule advances once per batch, not per peer update
    # SGD keeps one momentum buffer per parameter, and every peer's parameters were updated.
    assert len(ckpt["optimizer"]["state"]) == sum(1 for _ in method.parameters())
    line = json.loads((tmp_path / "dml" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"peer1_top1", "ensemble_top1"} <= set(line)
    assert {"student.pt", "peer1.pt"} <= {p.name for p in (tmp_path / "dml").iterdir()}


def test_atomic_writes_get_the_permissions_of_a_plain_open(tmp_path):
    import os

    from kdforge.engine.checkpoint import atomic_write_text

    atomic_write_text(tmp_path / "a.txt", "x")
    (tmp_path / "b.txt").write_text("x")
    assert os.stat(tmp_path / "a.txt").st_mode == os.stat(tmp_path / "b.txt").st_mode


def test_gradient_accumulation_equals_the_larger_batch():
    from dist_worker import OPTIM, TRAIN, make_data, make_method

    results = []
    for batch_size, accum in ((16, 1), (8, 2), (4, 4)):
        method = make_method("kd", norm=False)  # BN-free: a micro-batch's statistics would differ from the batch's
        history = fit(
            method,
            make_data(0, 1, batch_size),
            train={**TRAIN, "epochs": 2, "grad_accum": accum},
            optim=OPTIM,
            schedule={"name": "cosine"},
        ).history
        results.append((method.student.state_dict(), history))
    (want, want_hist), *others = results
    for got, hist in others:
        for key, value in want.items():
            torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6)
        assert [h["step"] for h in hist] == [h["step"] for h in want_hist] == [6, 12]  # optimizer updates
        assert hist[-1]["train_loss"] == pytest.approx(want_hist[-1]["train_loss"], rel=1e-5)
