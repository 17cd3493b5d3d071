"""DATS (reconstructed): its loss parts recomputed by hand, what gets gradient, the deployable student."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdforge.data.batch import Batch
from kdforge.errors import ConfigError
from kdforge.methods import Progress, create_method
from kdforge.models import create_model
from kdforge.models.attention_sampled import AttentionSampledNet
from kdforge.models.dense.attention_sampling import attention_sample, trilinear_attention

P = Progress(epoch=0, step=0, epoch_float=0.0, fraction=0.0)


def _method(**params):
    torch.manual_seed(0)
    student = create_model("dats_resnet8", num_classes=5)
    teacher = create_model("resnet8", num_classes=5)
    return create_method("dats", student, teacher, **params)


def _batch(n: int = 6, size: int = 16) -> Batch:
    g = torch.Generator().manual_seed(1)
    return Batch(torch.randn(n, 3, size, size, generator=g), torch.randint(0, 5, (n,), generator=g), torch.arange(n))


def test_a_plain_student_is_refused_with_one_line() -> None:
    with pytest.raises(ConfigError, match="dats_resnet8"):
        create_method("dats", create_model("resnet8", num_classes=5), create_model("resnet8", num_classes=5))


def test_loss_parts_recomputed_by_hand() -> None:
    m = _method(temperature=10.0, kd_weight=0.7, glance_weight=0.2, teacher_ce_weight=0.5, feature_weight=2.0)
    m.eval()  # fixed BN statistics, so the hand computation sees the same numbers
    # float64 networks, so both sides see the same logits; the losses themselves compute in float32 (hence rtol)
    m.double()
    b = _batch()
    b.input = b.input.double()
    torch.manual_seed(7)
    out = m(b, P)
    torch.manual_seed(7)
    s_net, t_net = m.student, m.detail_teacher
    glance = s_net.backbone.forward_features(b.input)
    att = trilinear_attention(glance.feats[-1])
    channel = torch.randint(att.shape[1], (b.input.shape[0],))
    detail = att[torch.arange(len(channel)), channel].unsqueeze(1) + 0.01
    structure = att.sum(dim=1, keepdim=True)
    xs = attention_sample(b.input, structure, 16)
    xd = attention_sample(b.input, detail, 16)
    s = s_net.classify(xs)
    t_logits = t_net(xd)
    t_pooled = t_net.forward_features(xd).pooled
    y = b.target
    expected = {
        "ce": F.cross_entropy(s.logits, y),
        "glance_ce": 0.2 * F.cross_entropy(glance.logits, y),
        "teacher_ce": 0.5 * F.cross_entropy(t_logits, y),
        "kd": 0.7 * 100 * F.kl_div(F.log_softmax(s.logits / 10, 1), F.softmax(t_logits / 10, 1), reduction="batchmean"),
        "feature": 2.0 * ((F.normalize(m.adapter(s.pooled), dim=1) - F.normalize(t_pooled, dim=1)) ** 2).mean(),
    }
    for key, value in expected.items():
        # The KL of two nearly equal distributions at τ = 10 is a small difference of large terms: computed in
        # float32 by the method, it keeps ~4 significant digits.
        rtol = 1e-3 if key == "kd" else 1e-5
        torch.testing.assert_close(
            out.losses[key].double(), value, rtol=rtol, atol=1e-8, msg=lambda m, k=key: f"{k}: {m}"
        )
    torch.testing.assert_close(out.loss.double(), sum(expected.values()), rtol=1e-5, atol=1e-8)


def test_distillation_terms_do_not_reach_the_teacher() -> None:
    m = _method(glance_weight=0.0, teacher_ce_weight=0.0)
    m.train()
    m(_batch(), P).loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in m.detail_teacher.parameters())
    assert m.student.refiner.dw.weight.grad.abs().sum() > 0
    groups = {g["name"]: g for g in m.param_groups()}
    assert groups["teacher"]["lr_scale"] == 0.1
    n_teacher = sum(p.numel() for p in groups["teacher"]["params"])
    assert n_teacher == sum(p.numel() for p in m.detail_teacher.parameters())
    ids = {id(p) for g in groups.values() for p in g["params"]}
    assert ids == {id(p) for p in m.parameters()}, "every trainable parameter is in exactly one group"


def test_deployed_student_is_deterministic_loadable_and_traceable() -> None:
    m = _method()
    exported = m.exports()["student"]
    assert isinstance(exported, AttentionSampledNet)
    fresh = create_model("dats_resnet8", num_classes=5)
    fresh.load_state_dict(exported.state_dict())
    fresh.eval()
    x = torch.randn(3, 3, 24, 24)
    torch.testing.assert_close(fresh(x), fresh(x))
    traced = torch.jit.trace(fresh, x)
    x2 = torch.randn(3, 3, 24, 24)
    torch.testing.assert_close(traced(x2), fresh(x2), rtol=1e-4, atol=1e-5)


def test_attention_picture_panels_and_file(tmp_path) -> None:
    from PIL import Image

    from kdforge.data import _embedded_arrays
    from kdforge.data.augment import CIFAR10_MEAN, CIFAR10_STD, normalize
    from kdforge.data.synth.scenes import make_scenes
    from kdforge.report.attention_pictures import attention_rows, plot_attention

    src = _embedded_arrays()
    scenes = make_scenes(src.test_images[:50], src.test_labels[:50], 3, seed=0)
    x = normalize(torch.from_numpy(scenes.images), CIFAR10_MEAN, CIFAR10_STD)
    torch.manual_seed(0)
    model = create_model("dats_resnet8", num_classes=10)
    rows = attention_rows(model, x, torch.Generator().manual_seed(1))
    assert list(rows) == ["input", "structure map", "structure image", "detail map", "detail image"]
    assert rows["structure image"].shape == x.shape and rows["structure map"].ndim == 3
    torch.testing.assert_close(rows["structure image"], model.eval().resample(x, rows["structure map"][:, None]))
    path = plot_attention(rows, CIFAR10_MEAN, CIFAR10_STD, tmp_path / "att.png", titles=["a", "b", "c"])
    w, h = Image.open(path).size
    assert w > h > 300


def test_eval_pictures_draw_a_trained_students_attention(tmp_path, capsys) -> None:
    from PIL import Image

    from kdforge.api import attention_pictures_of, pictures_of, run
    from kdforge.cli import main
    from kdforge.config import config_from_dict

    def train(model: str, out: str) -> None:
        cfg = {
            "model": {"name": model},
            "method": {"name": "vanilla"},
            "data": {"name": "embedded", "batch_size": 16, "train_subset": 32, "test_subset": 8, "num_workers": 0},
            "train": {"epochs": 1, "progress": False, "seed": 0},
        }
        run(config_from_dict(cfg), "train", tmp_path / out)

    train("dats_resnet8", "dats")
    assert main(["eval", "--checkpoint", str(tmp_path / "dats"), "--pictures", "3"]) == 0
    assert f"pictures: {tmp_path / 'dats' / 'attention.png'}" in capsys.readouterr().out
    three = Image.open(tmp_path / "dats" / "attention.png").size
    five = Image.open(attention_pictures_of(tmp_path / "dats", 5, out=tmp_path / "five.png")).size
    assert five[0] == three[0] and five[1] > three[1]  # one row per image, five panels across
    again = attention_pictures_of(tmp_path / "dats", 3, out=tmp_path / "again.png")
    assert again.read_bytes() == (tmp_path / "dats" / "attention.png").read_bytes()  # the detail channel is seeded

    train("resnet8", "plain")
    with pytest.raises(ConfigError, match=r"attention-sampled student \(dats_\*\).*--report"):
        pictures_of(tmp_path / "plain", 2)
    with pytest.raises(ConfigError, match="--teacher is not drawn"):
        pictures_of(tmp_path / "dats", 2, teacher=tmp_path / "plain")
