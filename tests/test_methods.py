"""The method interface and the methods of the foundation: vanilla and Hinton KD, plus registry-wide checks."""

from __future__ import annotations

import copy

import pytest
import torch
from cases import TASK_CASES, make_batch, make_method, method_task_pairs, pair_id

from kdforge.data.batch import Batch
from kdforge.errors import ConfigError
from kdforge.losses import cross_entropy, kd_loss
from kdforge.methods import METHODS, Progress, create_method, list_methods
from kdforge.methods.params import method_defaults
from kdforge.registry import TASKS

PROGRESS = Progress(epoch=0, step=0, epoch_float=0.0, fraction=0.0)


def _batch(n: int = 8, classes: int = 4, views: int = 0, negatives: bool = False) -> Batch:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 3, 8, 8, generator=g)
    extra = tuple(x + 0.1 * torch.randn(n, 3, 8, 8, generator=g) for _ in range(views))
    batch = Batch(x, torch.randint(0, classes, (n,), generator=g), torch.arange(n), extra)
    if negatives:  # other-class samples (triplet KD, AMKD); their labels do not matter to these checks
        batch.negative, batch.negative_index = torch.randn(n, 3, 8, 8, generator=g), torch.arange(n).flip(0)
    return batch


def _batch_for(method) -> Batch:
    return _batch(views=1 if method.needs_views else 0, negatives=method.needs_negatives)


def _make(name, tiny_net, method_student, **params):
    teacher = tiny_net(seed=1) if METHODS.get(name).needs_teacher else None
    return create_method(
        name,
        method_student(name),
        teacher,
        context={"num_classes": 4, "num_train": 64, "epochs": 2, "steps_per_epoch": 4},
        **params,
    )


@pytest.mark.parametrize("pair", method_task_pairs(), ids=pair_id)
def test_every_method_step_reaches_every_trainable_parameter(pair):
    name, task = pair
    method = make_method(name, task)
    method.train()
    out = method(make_batch(method, task), PROGRESS)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    if task == "classification":
        assert out.logits.shape == (8 * (2 if method.needs_views else 1), 4)
    assert out.losses and all(v.ndim == 0 for v in out.losses.values())
    out.loss.backward()
    missing = [n for n, p in method.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    # FGD's spatial-attention convolutions (conv_mask_s/t, 1 output channel) feed a softmax over positions, which a
    # constant shift leaves unchanged: their bias has gradient exactly 0 in exact arithmetic (float32 rounding leaves
    # 0 or a few ulps, per CPU). Kept for parity with the reference's nn.Conv2d; checked to be (near) zero instead.
    for n, p in method.named_parameters():
        if n.endswith(("conv_mask_s.bias", "conv_mask_t.bias")) and p.requires_grad:
            assert p.grad is None or p.grad.abs().max() < 1e-5, (n, p.grad)
            missing = [m for m in missing if m != n]
    if missing:
        # A block whose last layer is zero-initialised by its reference (FGD's GcBlock context, mmrazor
        # ``last_zero_init``) passes no gradient upstream at the first step; after one update it must.
        torch.optim.SGD(method.trainable_parameters(), lr=0.1).step()
        method.zero_grad()
        method(make_batch(method, task, seed=4), PROGRESS).loss.backward()
        missing = [n for n in missing if (g := method.get_parameter(n).grad) is None or not g.any()]
    assert not missing, f"no gradient reaches {missing}"


@pytest.mark.parametrize("pair", method_task_pairs(), ids=pair_id)
def test_every_method_keeps_a_frozen_teacher_identical(pair):
    name, task = pair
    method = make_method(name, task)
    if method.teacher is None:
        pytest.skip("no teacher")
    # Methods that fine-tune the teacher do it on a copy: the pretrained original (their anchor) stays frozen.
    before = copy.deepcopy(method.teacher.state_dict())
    opt = torch.optim.SGD(method.trainable_parameters(), lr=0.5, momentum=0.9)
    method.train()
    for _ in range(3):
        out = method(make_batch(method, task), PROGRESS)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert not method.teacher.training
    after = method.teacher.state_dict()
    for key, value in before.items():
        assert torch.equal(value, after[key]), f"teacher {key} changed"  # BN running stats included
    assert not any(k.startswith("teacher") for k in method.state_dict())
    assert all(not p.requires_grad for p in method.teacher.parameters())


def test_every_task_has_a_test_case():
    assert set(TASKS.names()) <= set(TASK_CASES), "add the new task to tests/cases.py TASK_CASES"


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_is_listed_with_its_status(name):
    row = next(r for r in list_methods() if r["name"] == name)
    assert row["status"] in ("exact", "reconstructed") and row["family"] and row["paper"]
    assert isinstance(method_defaults(METHODS.get(name)), dict)


def test_kd_total_and_parts(tiny_net, method_student):
    method = _make("kd", tiny_net, method_student, temperature=2.0, ce_weight=0.3, kd_weight=0.7)
    method.eval()  # deterministic BN for the reference computation
    batch = _batch()
    out = method(batch, PROGRESS)
    zs = method.student(batch.input)
    zt = method.teacher(batch.input)
    torch.testing.assert_close(out.losses["ce"], 0.3 * cross_entropy(zs, batch.target))
    torch.testing.assert_close(out.losses["kd"], 0.7 * kd_loss(zs, zt, 2.0))
    torch.testing.assert_close(out.loss, out.losses["ce"] + out.losses["kd"])


def test_kd_with_teacher_equal_to_student_is_ce_only(tiny_net):
    student = tiny_net(seed=0)
    method = create_method("kd", student, copy.deepcopy(student), ce_weight=1.0, kd_weight=1.0)
    method.eval()
    out = method(_batch(), PROGRESS)
    assert out.losses["kd"].item() == pytest.approx(0.0, abs=1e-6)


def test_vanilla_is_cross_entropy_and_exports_model(tiny_net, method_student):
    method = _make("vanilla", tiny_net, method_student)
    method.eval()
    batch = _batch()
    out = method(batch, PROGRESS)
    torch.testing.assert_close(out.loss, cross_entropy(method.student(batch.input), batch.target))
    assert set(method.exports()) == {"model"}


def test_teacher_follows_to_and_train(tiny_net, method_student):
    method = _make("kd", tiny_net, method_student)
    method.to(torch.float64)
    assert next(method.teacher.parameters()).dtype == torch.float64
    method.train()
    assert method.student.training and not method.teacher.training


def test_create_method_errors(tiny_net):
    with pytest.raises(ConfigError, match="needs a teacher"):
        create_method("kd", tiny_net())
    with pytest.raises(ConfigError, match="trains without a teacher"):
        create_method("vanilla", tiny_net(), tiny_net())
    with pytest.raises(ConfigError, match="teacher predicts 5 classes but the student 4"):
        create_method("kd", tiny_net(4), tiny_net(5))
    with pytest.raises(ConfigError, match="temperature must be positive"):
        create_method("kd", tiny_net(), tiny_net(), temperature=0.0)
    with pytest.raises(ConfigError, match="closest valid keys: method.temperature"):
        create_method("kd", tiny_net(), tiny_net(), temp=2.0)
    with pytest.raises(KeyError, match="did you mean 'kd'"):
        create_method("kdd", tiny_net(), tiny_net())
