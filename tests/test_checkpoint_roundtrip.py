"""Checkpoint round trip over every method: save mid-run, load into a fresh method, the next step is bit-identical.

The checkpoint holds what the engine's ``last.pt`` holds for a method (``state_dict``, ``extra_state``, the
optimizer state and the RNG state), written and read by the engine's own functions. A method that keeps state
outside both (a counter, a memory bank, an RNG stream) would diverge on the step after loading.
"""

from __future__ import annotations

import pytest
import torch
from cases import make_batch, make_method, method_task_pairs, pair_id

from kdforge.engine.checkpoint import load_checkpoint, save_checkpoint
from kdforge.engine.env import rng_state, seed_everything, set_rng_state
from kdforge.engine.step import update_step
from kdforge.methods import Progress

STEPS = 4  # a checkpoint after step 2 of 4, then the third step on both sides


def _make(name, task):
    method = make_method(name, task)
    optimizer = torch.optim.SGD(method.trainable_parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    return method, optimizer


def _step(method, optimizer, task, step: int) -> None:
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for sub in range(method.substeps):
        progress = Progress(0, step, step / STEPS, step / (2 * STEPS), sub)
        batch = make_batch(method, task, seed=100 + step)
        update_step(method, batch, progress, optimizer, scaler, torch.device("cpu"), torch.float32)
    method.on_step_end(progress)


def _state(method) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in method.state_dict().items()}


@pytest.mark.parametrize("pair", method_task_pairs(), ids=pair_id)
def test_checkpoint_mid_run_then_the_next_step_is_bit_identical(pair, tmp_path):
    name, task = pair
    seed_everything(0)
    method, optimizer = _make(name, task)
    method.train()
    method.on_epoch_start(0)
    for step in range(2):
        _step(method, optimizer, task, step)
    ckpt = {
        "method": method.state_dict(),
        "extra": method.extra_state(),
        "optimizer": optimizer.state_dict(),
        "rng": rng_state(),
    }
    save_checkpoint(ckpt, tmp_path / "last.pt")
    _step(method, optimizer, task, 2)
    want = _state(method)

    seed_everything(123)  # another random state than the run had: only the checkpoint may restore it
    fresh, fresh_opt = _make(name, task)
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)  # weights that differ before loading
    fresh.train()
    loaded = load_checkpoint(tmp_path / "last.pt")
    fresh.load_state_dict(loaded["method"])
    fresh.load_extra_state(loaded["extra"])
    fresh_opt.load_state_dict(loaded["optimizer"])
    set_rng_state(loaded["rng"])
    _step(fresh, fresh_opt, task, 2)
    got = _state(fresh)
    assert got.keys() == want.keys()
    changed = [k for k in want if not torch.equal(want[k], got[k])]
    assert not changed, f"differs after the step following the load: {changed}"
