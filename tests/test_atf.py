"""ATF's correctness (issue 14): anchors, the tuning window, the teacher's decay, the gap weight, SHAKE's loss, pairing.

Golden values are computed here with numpy from the formulas of the reference code (SHAKE ``helper/loops.py``,
``distiller_zoo/KD.py``), independently of kdforge's losses.
"""

from __future__ import annotations

import copy
import sys
import warnings

import numpy as np
import pytest
import torch

from kdforge.config import OptimConfig
from kdforge.data.batch import Batch
from kdforge.engine.optim import build_optimizer
from kdforge.methods import Progress, create_method
from kdforge.models import create_model

SHAKE_PI = 3.1415  # SHAKE multiplies by this literal, not by math.pi


def _resnet(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("resnet8", num_classes=10)


def _pretrained(seed: int = 1) -> torch.nn.Module:
    """A resnet8 with non-trivial BN statistics, so that train- and eval-mode BN give different outputs."""
    net = _resnet(seed)
    g = torch.Generator().manual_seed(seed + 100)
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(16, 3, 16, 16, generator=g) * 2.0 + 0.5)
    net.eval()
    return net


def _batch(seed: int = 0, b: int = 6) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(b, 3, 16, 16, generator=g), torch.randint(0, 10, (b,), generator=g), torch.arange(b))


def _progress(step: int = 0, fraction: float = 0.0, epoch_float: float = 0.0) -> Progress:
    return Progress(int(epoch_float), step, epoch_float, fraction)


def _optimizer(method: torch.nn.Module, weight_decay: float = 5e-4, momentum: float = 0.9) -> torch.optim.Optimizer:
    cfg = OptimConfig(name="sgd", lr=0.1, momentum=momentum, nesterov=momentum > 0, weight_decay=weight_decay)
    return build_optimizer(method.param_groups(), cfg)


def _step(method, opt, progress: Progress, batch: Batch | None = None) -> None:
    method.train()
    out = method(batch or _batch(progress.step), progress)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    opt.step()


def _same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- defect 1: the KL anchor compares like with like -----------------------------------------------------------


@pytest.mark.parametrize("bn", ["eval", "train", "frozen"])
@pytest.mark.parametrize("scope", ["all", "last_stage", "classifier"])
def test_kl_anchor_is_exactly_zero_before_any_update_in_every_bn_policy(bn, scope):
    teacher = _pretrained()
    pretrained = copy.deepcopy(teacher.state_dict())
    method = create_method("atf", _resnet(0), teacher, anchor="kl", teacher_bn=bn, teacher_scope=scope)
    method.train()
    out = method(_batch(), _progress())
    assert out.losses["anchor"].item() == 0.0
    # The anchor's forward of t0 in the tuned copy's BN modes leaves t0 bit-identical (buffers included).
    assert _same_state(method.teacher.state_dict(), pretrained) and not method.teacher.training


def test_train_mode_bn_really_differs_from_eval_mode_here():
    """Guards the test above: on this teacher a train-mode and an eval-mode forward disagree, so a zero anchor
    under ``teacher_bn=train`` means t0 ran in train mode too, not that the modes happen to agree."""
    teacher = _pretrained()
    x = _batch().input
    with torch.no_grad():
        eval_logits = teacher(x)
        teacher.train()
        train_logits = teacher(copy.deepcopy(x))
    assert (eval_logits - train_logits).abs().max() > 1e-2


def test_last_stage_scope_tunes_only_the_last_stage_and_classifier():
    method = create_method("atf", _resnet(0), _pretrained(), teacher_scope="last_stage", teacher_bn="train")
    tuned = {n for n, p in method.tuned_teacher.named_parameters() if p.requires_grad}
    assert tuned and all(n.startswith(("layer3.", "fc.")) for n in tuned)
    assert any(n.startswith("layer3.") for n in tuned) and {"fc.weight", "fc.bias"} <= tuned
    method.train()
    bns = [(n, m) for n, m in method.tuned_teacher.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    trunk_bn = [m for n, m in bns if not n.startswith("layer3.")]
    last_bn = [m for n, m in bns if n.startswith("layer3.")]
    assert all(not m.training for m in trunk_bn) and last_bn and all(m.training for m in last_bn)


# ---- defect 2: the teacher does not move before teacher_start --------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "before", "after"),
    [
        ({"teacher_start": 0.5}, _progress(1, fraction=0.49, epoch_float=4.9), _progress(2, 0.5, 5.0)),
        ({"teacher_start_epoch": 2.0}, _progress(1, fraction=0.19, epoch_float=1.99), _progress(2, 0.2, 2.0)),
        ({"teacher_every": 2}, _progress(3, fraction=0.1, epoch_float=1.0), _progress(4, 0.1, 1.0)),
    ],
)
def test_teacher_is_bit_identical_until_it_is_tuned(kwargs, before, after):
    teacher = _pretrained()
    pretrained = copy.deepcopy(teacher.state_dict())
    method = create_method("atf", _resnet(0), teacher, teacher_scope="all", teacher_bn="train", **kwargs)
    opt = _optimizer(method)
    student_before = copy.deepcopy(method.student.state_dict())
    for _ in range(3):  # SGD with momentum, nesterov and weight decay 5e-4, as the engine builds it
        _step(method, opt, before)
    assert _same_state(method.tuned_teacher.state_dict(), pretrained)  # weights and BN statistics
    assert not _same_state(method.student.state_dict(), student_before)  # the student did learn meanwhile
    _step(method, opt, after)
    assert not _same_state(method.tuned_teacher.state_dict(), pretrained)


# ---- defect 3: no weight decay of the teacher toward zero ------------------------------------------------------


def test_teacher_group_decays_toward_its_pretrained_weights_not_toward_zero():
    method = create_method(
        "atf",
        _resnet(0),
        _pretrained(),
        teacher_scope="all",
        teacher_bn="eval",
        teacher_ce_weight=0.0,
        reverse_weight=0.0,
    )
    groups = {g["name"]: g for g in method.param_groups()}
    assert groups["teacher"]["weight_decay"] == 0.0
    opt = _optimizer(method, weight_decay=5e-4, momentum=0.0)
    pretrained = copy.deepcopy(method.tuned_teacher.state_dict())
    _step(method, opt, _progress())
    # At θ = θ0 the only teacher term (the l2 anchor) has zero gradient: the teacher does not shrink toward 0.
    assert _same_state(method.tuned_teacher.state_dict(), pretrained)
    # Off θ0 by δ, one plain SGD step moves it back by lr·scale·λ·2δ (decay toward θ0, rate 2λ).
    with torch.no_grad():
        for p in method.tuned_teacher.parameters():
            p.add_(0.01)
    _step(method, opt, _progress(1))
    lr_t = 0.1 * method.teacher_lr_scale
    for (name, p), p0 in zip(method.tuned_teacher.named_parameters(), method.teacher.parameters(), strict=True):
        expected = p0 + 0.01 * (1 - lr_t * 2 * method.anchor_weight)
        torch.testing.assert_close(p, expected, rtol=0, atol=1e-6, msg=name)


# ---- defect 4: the gap weight measures the gap -----------------------------------------------------------------


def test_gap_weight_is_the_share_of_the_starting_gap_still_open():
    method = create_method("atf", _resnet(0), _pretrained(), gap_momentum=0.5, reverse_mode="gap")
    g = torch.tensor
    # Before tuning starts the average is tracked; the first update fixes G0 and has w = 1.
    for _ in range(2):
        method._track_gap(g(4.0), active=False)
    assert method._track_gap(g(4.0), active=True).item() == pytest.approx(1.0)
    assert method.gap_start.item() == pytest.approx(4.0)
    # The gap halves and then stops shrinking: w settles at 0.5 and stays there (it does not drift back to 1).
    ws = [method._track_gap(g(2.0), active=True).item() for _ in range(30)]
    assert ws[0] == pytest.approx(0.75) and ws[1] == pytest.approx(0.625)
    assert ws[-1] == pytest.approx(0.5, abs=1e-6) and ws[-10:] == pytest.approx([0.5] * 10, abs=1e-5)
    # A gap wider than at the start is clipped to 1.
    for _ in range(10):
        w = method._track_gap(g(100.0), active=True)
    assert w.item() == 1.0
    assert {"gap_ema", "gap_start", "gap_started"} <= set(method.state_dict())


def test_gap_weight_scales_the_reverse_term_in_a_step():
    method = create_method(
        "atf", _resnet(0), _pretrained(), gap_momentum=0.5, reverse_mode="gap", teacher_scope="all", teacher_bn="eval"
    )
    ref = create_method("atf", _resnet(0), _pretrained(), reverse_mode="fixed", teacher_scope="all", teacher_bn="eval")
    method.eval()
    ref.eval()
    batch = _batch()
    method.gap_start.fill_(1e6)
    method.gap_started.fill_(True)
    method.gap_ema.fill_(0.0)
    method.gap_seen.fill_(True)
    out, full = method(batch, _progress()), ref(batch, _progress())
    w = method.gap_ema / method.gap_start  # = 0.5·gap / 1e6
    torch.testing.assert_close(out.losses["rev"], w * full.losses["rev"])


# ---- defect 5: the student term is LS-KD's at the start --------------------------------------------------------


def test_student_term_equals_ls_kd_while_the_teacher_is_the_pretrained_one():
    batch = _batch()
    lskd = create_method("ls_kd", _resnet(0), _pretrained())
    lskd.eval()
    expected = lskd(batch, _progress()).loss
    for kwargs in ({"teacher_stop": 0.0}, {"teacher_bn": "eval", "teacher_scope": "all"}):
        atf = create_method("atf", _resnet(0), _pretrained(), **kwargs)
        atf.eval()
        out = atf(batch, _progress())
        torch.testing.assert_close(out.losses["ce"] + out.losses["kd"], expected)


# ---- defect 6: the shadow variant is SHAKE's loss ----------------------------------------------------------------


def _np_ln(z: np.ndarray) -> np.ndarray:
    # F.layer_norm(z, (C,), None, None, 1e-7) * 3.1415: population variance.
    return (z - z.mean(1, keepdims=True)) / np.sqrt(z.var(1, keepdims=True) + 1e-7) * SHAKE_PI


def _np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def _np_distill_kl(y_s: np.ndarray, y_t: np.ndarray, t: float) -> float:
    # SHAKE distiller_zoo/KD.py DistillKL(y_s, y_t): KL(softmax(y_t/T) ‖ softmax(y_s/T))·T²/B.
    log_ps, log_pt = _np_log_softmax(y_s / t), _np_log_softmax(y_t / t)
    return float((np.exp(log_pt) * (log_pt - log_ps)).sum() * t * t / y_s.shape[0])


def _np_ce(z: np.ndarray, y: np.ndarray) -> float:
    return float(-_np_log_softmax(z)[np.arange(len(y)), y].mean())


SHAKE = {
    "variant": "shadow",
    "logit_norm": "layernorm",
    "ln_scale": SHAKE_PI,
    "temperature": 4.0,
    "divergence": "fixed",
    "alpha": 1.0,
    "reverse_mode": "fixed",
    "ce_weight": 1.0,
    "kd_weight": 1.0,
    "teacher_ce_weight": 1.0,
    "reverse_weight": 1.0,
    "anchor": "l2",
    "anchor_weight": 1.0,
}


def test_shadow_variant_equals_shakes_loss():
    teacher = _pretrained()
    method = create_method("atf", _resnet(0), teacher, **SHAKE)
    method.eval()
    batch = _batch()
    out = method(batch, _progress())
    with torch.no_grad():
        feats = teacher.forward_features(batch.input)
        fc = teacher.get_classifier()
        z_h = method.shadow(feats.feats[-3:], fc.weight, fc.bias).double().numpy()
        z_s = method.student(batch.input).double().numpy()
        z_t = teacher(batch.input).double().numpy()
    y = batch.target.numpy()
    n_s, n_t, n_h = _np_ln(z_s), _np_ln(z_t), _np_ln(z_h)
    # loops.py with --distill shake -a 0 -b 1 (gamma 1): CE on the normalized student logits, then loss_kd.
    parts = {
        "ce": _np_ce(n_s, y),
        "kd": _np_distill_kl(n_s, n_h, 4.0),  # criterion_div(logit_s, pred_feat_s.detach())
        "rev": _np_distill_kl(n_h, n_s, 4.0),  # criterion_div(pred_feat_s, logit_s.detach())
        "t_ce": _np_ce(n_h, y),  # criterion_cls(pred_feat_s, target)
        "anchor": float(((n_h - n_t) ** 2).mean()),  # F.mse_loss(pred_feat_s, logit_t.detach())
    }
    for key, value in parts.items():
        assert out.losses[key].item() == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert out.loss.item() == pytest.approx(sum(parts.values()), rel=1e-4)


def test_shadow_terms_send_gradients_where_shake_does():
    method = create_method("atf", _resnet(0), _pretrained(), **SHAKE)
    method.train()
    out = method(_batch(), _progress())
    head = list(method.shadow.parameters())
    student = list(method.student.parameters())
    # The student's KD term reaches only the student; the reversed term and the anchor only the head.
    g_kd = torch.autograd.grad(out.losses["kd"], head + student, allow_unused=True, retain_graph=True)
    assert all(g is None for g in g_kd[: len(head)]) and any(g is not None and g.any() for g in g_kd[len(head) :])
    for key in ("rev", "anchor", "t_ce"):
        g = torch.autograd.grad(out.losses[key], head + student, allow_unused=True, retain_graph=True)
        assert all(x is None for x in g[len(head) :]) and any(x is not None and x.any() for x in g[: len(head)]), key


# ---- pairing: seed s gives every method the same student init and data order -----------------------------------


def test_seed_pairs_student_init_and_data_order_across_methods(tmp_path):
    from kdforge.api import build_run
    from kdforge.config import config_from_dict
    from kdforge.engine.checkpoint import save_checkpoint

    save_checkpoint(_resnet(7).state_dict(), tmp_path / "t.pt")
    methods = [
        {"name": "vanilla"},
        {"name": "kd"},
        {"name": "dkd"},
        {"name": "ls_kd"},
        {"name": "atf"},
        {"name": "atf", **SHAKE},
    ]
    seen = []
    for seed in (3, 4):
        for m in methods:
            cfg = {
                "model": {"name": "resnet8"},
                "method": m,
                "data": {"name": "embedded", "train_subset": 200, "test_subset": 20, "batch_size": 50},
                "train": {"seed": seed},
            }
            if m["name"] != "vanilla":
                cfg["teacher"] = {"name": "resnet8", "checkpoint": str(tmp_path / "t.pt")}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                method, data = build_run(config_from_dict(cfg), "distill" if m["name"] != "vanilla" else "train")
            data.train.set_epoch(1)
            batches = [(b.index.clone(), b.input.clone()) for b, _ in zip(data.train, range(2), strict=False)]
            seen.append((seed, copy.deepcopy(method.student.state_dict()), batches))
    for seed in (3, 4):
        runs = [s for s in seen if s[0] == seed]
        for _, state, batches in runs[1:]:
            assert _same_state(state, runs[0][1])  # the same student initialisation
            for (i, x), (i0, x0) in zip(batches, runs[0][2], strict=True):
                assert torch.equal(i, i0) and torch.equal(x, x0)  # the same order and the same crops/flips
    a, b = (next(s for s in seen if s[0] == seed) for seed in (3, 4))
    assert not _same_state(a[1], b[1]) and not torch.equal(a[2][0][0], b[2][0][0])  # seeds do differ


# ---- the protocol script: validation split and paired statistics ---------------------------------------------------


def _protocol():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "atf_protocol.py"
    spec = importlib.util.spec_from_file_location("atf_protocol", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_validation_split_is_disjoint_balanced_and_keeps_the_students_images(tmp_path):
    from kdforge.data import balanced_subset
    from kdforge.data.cifar import load_jpeg_npz

    proto = _protocol()
    labels = np.repeat(np.arange(10), 50)[np.random.default_rng(0).permutation(500)]
    students, val = proto.split_indices(labels, 200, 100)
    assert np.array_equal(students, balanced_subset(labels, 200))  # what data.train_subset=200 trains on
    assert not set(students) & set(val) and len(val) == 100
    assert np.bincount(labels[val], minlength=10).tolist() == [10] * 10
    # A tiny JPEG .npz: the written file's train split is exactly the students' images, its test split the rest.
    from PIL import Image

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (500, 8, 8, 3), dtype=np.uint8)
    blobs = []
    for img in images:
        import io

        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=95)
        blobs.append(np.frombuffer(buf.getvalue(), dtype=np.uint8))
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
    src = tmp_path / "src.npz"
    np.savez(
        src, train_jpeg=np.concatenate(blobs), train_offsets=offsets, train_labels=labels,
        test_jpeg=blobs[0], test_offsets=np.array([0, len(blobs[0])]), test_labels=labels[:1],
        classes=np.array([str(c) for c in range(10)]),
    )  # fmt: skip
    out = proto.write_split(src, tmp_path / "val.npz", 200, 100)
    full, split = load_jpeg_npz(src, cache=False), load_jpeg_npz(out, cache=False)
    assert np.array_equal(split.train_images, full.train_images[students])
    assert np.array_equal(split.train_labels, labels[students])
    assert np.array_equal(split.test_images, full.train_images[val])


def test_paired_t_interval_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    proto = _protocol()  # its quantiles are the report's t_quantile_975, checked in test_sweep_report.py
    a = {0: 60.1, 1: 61.0, 2: 59.7, 3: 60.4, 4: 60.9, 7: 50.0}
    b = {0: 59.5, 1: 60.2, 2: 59.9, 3: 59.8, 4: 60.0, 8: 70.0}
    p = proto.Paired.of(a, b)  # seeds 7 and 8 have no partner and are left out
    d = np.array([0.6, 0.8, -0.2, 0.6, 0.9])
    lo, hi = stats.t.interval(0.95, 4, loc=d.mean(), scale=d.std(ddof=1) / np.sqrt(5))
    assert p.seeds == [0, 1, 2, 3, 4] and p.mean == pytest.approx(d.mean())
    assert p.interval == pytest.approx((lo, hi), abs=1e-3)
    assert p.format() == f"{d.mean():+.2f} [{lo:+.2f}, {hi:+.2f}] (5 seeds)"
    assert proto.Paired.of(a, {9: 1.0}) is None


def test_protocol_report_reads_sweep_runs_and_pairs_by_seed(tmp_path):
    import json

    proto = _protocol()
    values = {"kd": [60.0, 61.0, 59.0], "atf": [61.0, 61.5, 60.0]}
    for label, tops in values.items():
        for seed, top in enumerate(tops):
            run = tmp_path / "cifar10_jpeg" / "resnet20_resnet8" / label / f"seed{seed}"
            run.mkdir(parents=True)
            summary = {"final_top1": top, "best_top1": top + 1}
            summary["teacher_top1"] = 80.0  # the teacher before training (every distillation run's summary)
            if label == "atf":
                summary["final_teacher_top1"] = 70.0 + seed  # the tuned teacher at the end
            (run / "summary.json").write_text(json.dumps(summary))
    final, teacher = proto.collect(tmp_path)
    assert final == {"atf": {0: 61.0, 1: 61.5, 2: 60.0}, "kd": {0: 60.0, 1: 61.0, 2: 59.0}}
    assert teacher == {"atf": {0: 70.0, 1: 71.0, 2: 72.0}, "kd": {0: 80.0, 1: 80.0, 2: 80.0}}
    table = proto.markdown(final, teacher, "validation", {"atf": "alpha 0.5"})
    row = next(line for line in table.splitlines() if line.startswith("| atf "))
    # Differences 1.0, 0.5, 1.0: mean 0.833, sd 0.289, half-width t(0.975, 2)·sd/√3 = 4.303·0.1667 = 0.717.
    # on the validation split every row is also compared with atf (the provisional defaults): its own cell is empty
    assert row == "| atf | alpha 0.5 | 0,1,2 | 60.83 ± 0.76 | 71.00 ± 1.00 |  | +0.83 [+0.12, +1.55] (3 seeds) |"
    kd_row = next(line for line in table.splitlines() if line.startswith("| kd "))
    assert kd_row.endswith("| -0.83 [-1.55, -0.12] (3 seeds) |  |")
    test_table = proto.markdown(final, teacher, "test")
    assert "Δ vs atf" not in test_table and "Δ vs kd" in test_table


def test_protocol_report_names_the_overrides_of_screen_and_confirmation_rows():
    # The screen and the confirmation write into one folder, so either stage's table must name both sweeps' rows.
    proto = _protocol()
    val = proto._stage_settings("validation")
    assert val == proto._stage_settings("confirm")
    assert val["atf_ln_pi"] == "name atf, logit_norm layernorm, temperature 4.0"  # screen only
    assert val["atf_scope_all_every2"] == "name atf, teacher_scope all, teacher_every 2"  # confirmation only
    assert "atf_ln_pi" not in proto._stage_settings("test")
