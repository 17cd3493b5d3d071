"""Crash and stop safety: mid-epoch checkpoints, SIGKILL and SIGTERM, and bit-exact resume on the CPU."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from kdforge.api import fit
from kdforge.data import build_data
from kdforge.data.batch import Batch
from kdforge.engine.checkpoint import load_checkpoint
from kdforge.errors import ConfigError
from kdforge.models import create_model

REPO = Path(__file__).resolve().parents[1]
TRAIN = {"epochs": 2, "checkpoint_every": 2, "progress": False, "seed": 0, "device": "cpu", "log_every": 3}
OPTIM = {"lr": 0.05, "nesterov": True}

# The child trains exactly like `_reference` but slowly (a sleep before every forward), so the parent can stop it.
CHILD = textwrap.dedent(
    """
    import sys, time
    import torch
    from kdforge.data import build_data
    from kdforge.api import fit
    from kdforge.errors import KDForgeError
    from kdforge.models import create_model

    torch.set_num_threads({threads})  # the parent's (conftest), whatever OMP_NUM_THREADS says: same float rounding
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=10)
    model.register_forward_pre_hook(lambda module, args: time.sleep(0.15))
    data = build_data("embedded", batch_size=32, train_subset=320, test_subset=64, seed=0)
    try:
        fit(model, data, train={train}, optim={optim}, out_dir=sys.argv[1])
    except KDForgeError as err:
        print(err, file=sys.stderr)
        sys.exit(3)
    """
).format(train=TRAIN, optim=OPTIM, threads=torch.get_num_threads())


def _data():
    return build_data("embedded", batch_size=32, train_subset=320, test_subset=64, seed=0)


def _model():
    torch.manual_seed(0)
    return create_model("resnet8", num_classes=10)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    fit(_model(), _data(), train=TRAIN, optim=OPTIM, out_dir=out)
    return out


def _assert_same_run(out: Path, ref: Path) -> None:
    got = torch.load(out / "model.pt", weights_only=True)
    want = torch.load(ref / "model.pt", weights_only=True)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    h_got = load_checkpoint(out / "last.pt")["history"]
    h_want = load_checkpoint(ref / "last.pt")["history"]
    for a, b in zip(h_got, h_want, strict=True):
        for key in ("train_loss", "train_top1", "test_top1", "step", "lr"):
            assert a[key] == pytest.approx(b[key], abs=1e-9), key


def _resume_and_compare(out: Path, ref: Path) -> None:
    assert not (out / "summary.json").exists()  # the run really was cut short
    fit(_model(), _data(), train=TRAIN, optim=OPTIM, out_dir=out, resume=True)
    _assert_same_run(out, ref)


def _start_child(out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for_mid_epoch_checkpoint(child: subprocess.Popen, out: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert child.poll() is None, child.communicate()
        if (out / "last.pt").is_file():
            return
        time.sleep(0.02)
    child.kill()
    pytest.fail("the child wrote no checkpoint in time")


def test_mid_epoch_checkpoint_then_crash_resumes_bit_exactly(tmp_path, reference):
    class Crash(RuntimeError):
        pass

    class CrashingLoader:
        """The real loader, failing at the 8th batch of the first epoch (after the step-6 checkpoint)."""

        def __init__(self, inner):
            self.inner, self.epoch = inner, 0

        def set_epoch(self, epoch, start_batch=0):
            self.epoch = epoch
            self.inner.set_epoch(epoch, start_batch)

        def __len__(self):
            return len(self.inner)

        def __iter__(self):
            for i, batch in enumerate(self.inner):
                if self.epoch == 0 and i == 7:
                    raise Crash
                yield batch

    data = _data()
    data.train = CrashingLoader(data.train)
    with pytest.raises(Crash):
        fit(_model(), data, train=TRAIN, optim=OPTIM, out_dir=tmp_path)
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert (ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["step"]) == (0, 6, 6)
    _resume_and_compare(tmp_path, reference)


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path, reference):
    child = _start_child(tmp_path)
    _wait_for_mid_epoch_checkpoint(child, tmp_path)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert load_checkpoint(tmp_path / "last.pt")["step"] < 20  # killed before the end
    _resume_and_compare(tmp_path, reference)


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(tmp_path, reference):
    child = _start_child(tmp_path)
    _wait_for_mid_epoch_checkpoint(child, tmp_path)
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 3, err
    assert "stopped by SIGTERM" in err and "--resume" in err
    assert "Traceback" not in err
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["step"] < 20
    _resume_and_compare(tmp_path, reference)


def test_signal_handlers_are_restored_after_fit(tmp_path):
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    fit(_model(), _data(), train={**TRAIN, "epochs": 1}, optim=OPTIM)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_negative_checkpoint_every_is_refused():
    from kdforge.config import config_from_dict
    from kdforge.validation import validate

    cfg = config_from_dict(
        {"model": {"name": "resnet8"}, "method": {"name": "vanilla"}, "train": {"checkpoint_every": -1}}
    )
    with pytest.raises(ConfigError, match="checkpoint_every"):
        validate(cfg, "train")


def test_full_disk_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    from kdforge.cli import main

    def no_space(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_space)
    args = ["train", "--config", str(REPO / "configs/smoke/vanilla.yaml"), "--out", str(tmp_path / "run")]
    assert main([*args, "train.epochs=1", "train.progress=false"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kdforge: error: cannot write ") and "No space left on device" in err
    assert len(err.splitlines()) == 1
    assert not [p for p in (tmp_path / "run").rglob("*") if p.is_file()]  # nothing half-written


def _snapshot(method, optimizer):
    state = {k: v.clone() for k, v in method.state_dict().items()}
    momenta = {id(p): s["momentum_buffer"].clone() for p, s in optimizer.state.items() if "momentum_buffer" in s}
    return state, momenta


@pytest.mark.parametrize("poison", ["loss", "gradient"])
def test_skipped_step_changes_nothing(tiny_net, toy_data, poison):
    from kdforge.engine.loop import update_step
    from kdforge.methods import Progress, create_method

    method = create_method("vanilla", tiny_net(), None, context={"num_classes": 4})
    method.train()
    optimizer = torch.optim.SGD(method.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    batches = iter(toy_data.train)
    good, bad = next(batches), next(batches)
    args = (optimizer, scaler, torch.device("cpu"), torch.float32, None, True, list(method.buffers()))
    progress = Progress(0, 0, 0.0, 0.0)
    assert update_step(method, good, progress, *args)[1]  # momentum buffers now exist
    before = _snapshot(method, optimizer)
    if poison == "loss":
        bad.input = bad.input.clone()
        bad.input[0] = float("nan")
    else:  # finite loss, infinite gradient
        handle = method.student.fc.weight.register_hook(lambda g: g * float("inf"))
    (result,), applied = update_step(method, bad, progress, *args)
    if poison == "gradient":
        handle.remove()
        assert torch.isfinite(result.loss)
    assert not applied
    after = _snapshot(method, optimizer)
    assert before[0].keys() == after[0].keys()
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])  # weights and BN statistics
    assert all(torch.equal(before[1][k], after[1][k]) for k in before[1])  # momentum
    assert update_step(method, good, progress, *args)[1]


def test_skip_verdict_with_distributed_flag_runs_in_one_process(tiny_net, toy_data):
    # Regression: update_step's `distributed` parameter shadowed the module of collectives, so a DDP run with
    # train.nonfinite=skip died on its first step ('bool' object has no attribute 'all_reduce_sum'). In one process
    # the agreement is the identity: the verdict must be the same as without the flag.
    from kdforge.engine.step import update_step
    from kdforge.methods import Progress, create_method

    method = create_method("vanilla", tiny_net(), None)
    optimizer = torch.optim.SGD(method.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    good = next(iter(toy_data.train))
    bad = Batch(good.input.clone(), good.target, good.index)
    bad.input[0] = float("nan")
    args = (optimizer, scaler, torch.device("cpu"), torch.float32, None, True, list(method.buffers()))
    progress = Progress(0, 0, 0.0, 0.0)
    assert bool(update_step(method, good, progress, *args, None, True)[1])
    assert not bool(update_step(method, bad, progress, *args, None, True)[1])


def test_nonfinite_steps_are_skipped_and_counted_or_stop_the_run(tiny_net, toy_data, tmp_path):
    from kdforge.errors import KDForgeError

    toy_data.train.images[0] = float("nan")  # the batch holding sample 0 (one per epoch) has a NaN loss
    train = {"epochs": 2, "progress": False, "seed": 0, "log_every": 1}
    result = fit(tiny_net(), toy_data, train={**train, "nonfinite": "skip"}, out_dir=tmp_path / "skip")
    assert [r["skipped_steps"] for r in result.history] == [1, 1]
    assert all(torch.isfinite(torch.tensor([r["train_loss"], r["test_loss"]])).all() for r in result.history)
    weights = torch.load(tmp_path / "skip" / "model.pt", weights_only=True)
    # The NaN batch's forward had already updated the BN statistics; a skipped step must have put them back.
    assert all(torch.isfinite(v.float()).all() for v in weights.values())
    with pytest.raises(KDForgeError, match="training loss became nan"):
        fit(tiny_net(), toy_data, train=train, out_dir=tmp_path / "stop")


@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
def test_a_skipped_first_step_leaves_the_state_of_a_fresh_optimizer(tiny_net, toy_data, optimizer_name):
    from kdforge.engine.loop import update_step
    from kdforge.methods import Progress, create_method

    batches = iter(toy_data.train)
    good, bad = next(batches), next(batches)
    bad.input = bad.input.clone()
    bad.input[0] = float("nan")
    progress = Progress(0, 0, 0.0, 0.0)

    def make():
        method = create_method("vanilla", tiny_net(seed=0), None, context={"num_classes": 4})
        method.train()
        if optimizer_name == "sgd":
            opt = torch.optim.SGD(method.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        else:
            opt = torch.optim.AdamW(method.parameters(), lr=0.01)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        return method, (opt, scaler, torch.device("cpu"), torch.float32, None, True, list(method.buffers()))

    skipped, args = make()
    _, applied = update_step(skipped, bad, progress, *args)
    # The verdict stays a device tensor: the loop masks the step's losses with it and reads it once per epoch.
    assert isinstance(applied, torch.Tensor) and applied.shape == () and not applied
    for _ in range(2):
        update_step(skipped, good, progress, *args)
    fresh, fresh_args = make()
    for _ in range(2):
        update_step(fresh, good, progress, *fresh_args)
    for key, value in fresh.state_dict().items():
        assert torch.equal(skipped.state_dict()[key], value), key
