"""Teacher-output reuse: replayed augmentation views, the teacher-logit cache, its exactness and where it is refused."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kdforge.api import fit
from kdforge.bench import PILCifarDataset, format_bench, run_bench
from kdforge.config import config_from_dict
from kdforge.data import build_data
from kdforge.data.batch import Batch
from kdforge.data.loader import TensorLoader, mix_seed
from kdforge.engine.env import autocast
from kdforge.engine.teacher_cache import attach_teacher_cache, cache_blocker
from kdforge.errors import ConfigError, DataError
from kdforge.methods import create_method
from kdforge.methods.base import Progress, StepOutput
from kdforge.methods.kd import KD
from kdforge.models import create_model
from kdforge.validation import validate

CPU = torch.device("cpu")
TRAIN = {"epochs": 2, "progress": False, "seed": 0, "device": "cpu", "log_every": 4}
OPTIM = {"lr": 0.05, "nesterov": True}


def _images(n: int = 48, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 12, 12), generator=g, dtype=torch.uint8), torch.arange(n) % 3


def _loader(replay_views: int, **kw) -> TensorLoader:
    images, labels = _images()
    args = {"train": True, "mean": (0.5,) * 3, "std": (0.25,) * 3, "seed": 7, "replay_views": replay_views} | kw
    return TensorLoader(images, labels, 8, **args)


def _seen(loader: TensorLoader, epochs: range) -> list[tuple[int, int, torch.Tensor]]:
    """``(index, view, pixels)`` of every training sample shown in ``epochs``."""
    out = []
    for epoch in epochs:
        loader.set_epoch(epoch)
        for batch in loader:
            assert batch.view_id is not None
            for pos in range(len(batch)):
                out.append((int(batch.index[pos]), int(batch.view_id[pos]), batch.input[pos]))
    return out


def test_a_replayed_view_is_the_same_pixels_in_every_epoch_position_rank_and_cache_pass():
    k = 3
    seen = _seen(_loader(k), range(6))
    first: dict[tuple[int, int], torch.Tensor] = {}
    repeats = 0
    for idx, view, x in seen:
        if (idx, view) in first:
            assert torch.equal(first[idx, view], x), (idx, view)
            repeats += 1
        else:
            first[idx, view] = x
    assert repeats > 100  # 6 epochs of 48 samples over 3 views: most (index, view) pairs recur
    # The rank 1 shard of a two-process run shows the same view of a sample with the same pixels.
    for idx, view, x in _seen(_loader(k, rank=1, world_size=2), range(6)):
        assert torch.equal(first[idx, view], x)
    # The cache pass (every sample in index order, another batch size) replays training's inputs exactly.
    loader = _loader(k)
    for view in range(k):
        for batch in loader.iter_view(view, 20):
            for pos, idx in enumerate(batch.index.tolist()):
                if (idx, view) in first:
                    assert torch.equal(first[idx, view], batch.input[pos])


def test_views_differ_and_are_drawn_evenly():
    k = 8
    loader = _loader(k)
    views = torch.stack([next(loader.iter_view(v, 48)).input for v in range(k)], dim=1)  # [N, K, C, H, W]
    flat = views.flatten(2)
    distinct = [len({tuple(row.tolist()) for row in flat[i]}) for i in range(len(flat))]
    # 8 crops/flips out of 162 drawn independently: all distinct for ~84% of samples, never fewer than half.
    assert sum(d == k for d in distinct) >= 0.7 * len(distinct)
    assert min(distinct) >= k // 2
    counts = torch.zeros(len(flat), k)
    for idx, view, _ in _seen(loader, range(40)):
        counts[idx, view] += 1
    per_view = counts.sum(0)
    assert (per_view - per_view.mean()).abs().max() < 0.2 * per_view.mean()
    assert (counts > 0).sum(1).float().mean() > k - 1  # 40 epochs visit (nearly) every view of every sample


def test_no_replay_keeps_the_random_crop_flip_of_before_bit_for_bit():
    """K = 0 against a golden written out per sample: the (seed, epoch, 0, batch, 1) stream draws dy, dx, flip."""
    images, labels = _images()
    mean, std, seed, bs, pad = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), 7, 8, 4
    loader = TensorLoader(images, labels, bs, train=True, mean=mean, std=std, seed=seed)
    epoch = 2
    loader.set_epoch(epoch)
    batches = list(loader)
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(mix_seed(seed, epoch)))
    for i, batch in enumerate(batches):
        assert batch.view_id is None
        idx = perm[i * bs : (i + 1) * bs]
        assert torch.equal(batch.index, idx)
        g = torch.Generator().manual_seed(mix_seed(seed, epoch, 0, i, 1))
        dy = torch.randint(0, 2 * pad + 1, (bs,), generator=g).tolist()
        dx = torch.randint(0, 2 * pad + 1, (bs,), generator=g).tolist()
        flip = (torch.rand(bs, generator=g) < 0.5).tolist()
        for pos, j in enumerate(idx.tolist()):
            padded = F.pad(images[j].float(), (pad, pad, pad, pad))
            x = padded[:, dy[pos] : dy[pos] + 12, dx[pos] : dx[pos] + 12]
            x = x.flip(2) if flip[pos] else x
            want = (x / 255.0 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
            assert torch.equal(batch.input[pos], want), (i, pos)


def test_replay_views_needs_augmentation_an_in_memory_set_and_no_jda():
    with pytest.raises(DataError, match="replay_views"):
        build_data("embedded", augment=False, replay_views=2, train_subset=64, test_subset=16)
    with pytest.raises(DataError, match="replay_views"):
        build_data("embedded", views="jda", replay_views=2, train_subset=64, test_subset=16)
    with pytest.raises(ValueError, match="replay_views"):
        _loader(-1)
    with pytest.raises(ValueError, match="random augmentation"):
        next(_loader(0).iter_view(0, 8))
    base = {"method": {"name": "vanilla"}}
    for data, fragment in [
        ({"replay_views": -1}, "data.replay_views must be >= 0"),
        ({"replay_views": 4, "augment": False}, "data.augment=false"),
        ({"replay_views": 4, "name": "folder", "root": "x"}, "in-memory dataset"),
    ]:
        with pytest.raises(ConfigError, match=fragment):
            validate(config_from_dict(base | {"data": data}), "train")
    jda = {"method": {"name": "ccd"}, "teacher": {"name": "resnet8"}, "data": {"views": "jda", "replay_views": 4}}
    with pytest.raises(ConfigError, match="data.views=jda"):
        validate(config_from_dict(jda))
    validate(config_from_dict(base | {"data": {"replay_views": 4}}), "train")


def _data(**kw):
    return build_data("embedded", batch_size=32, eval_batch_size=100, train_subset=256, test_subset=64, seed=0, **kw)


def _kd(name: str = "kd", **params):
    torch.manual_seed(0)
    student = create_model("resnet8", num_classes=10)
    teacher = create_model("resnet8", num_classes=10)
    return create_method(name, student, teacher, context={"num_classes": 10, "num_train": 256}, **params)


def _count_teacher_calls(method) -> list[int]:
    calls = [0]

    def count(module, args):
        calls[0] += 1

    method.teacher.register_forward_pre_hook(count)
    return calls


@pytest.mark.parametrize("data_kw", [{"augment": False}, {"replay_views": 4}], ids=["no-augment", "replay-4"])
def test_a_cached_run_trains_exactly_like_an_uncached_one(data_kw):
    states, calls = {}, {}
    for mode in ("off", "on"):
        method = _kd()
        calls[mode] = _count_teacher_calls(method)
        fit(method, _data(**data_kw), train=TRAIN | {"teacher_cache": mode}, optim=OPTIM)
        assert (method.teacher_cache is not None) == (mode == "on")
        states[mode] = method.student.state_dict()
    for key, want in states["off"].items():
        torch.testing.assert_close(states["on"][key], want, rtol=1e-5, atol=1e-6, msg=key)
    views = data_kw.get("replay_views", 1)
    assert calls["off"][0] == 2 * 256 // 32  # the teacher's forward every step
    assert calls["on"][0] == views * math.ceil(256 / 100)  # only the fill passes, none while training


def test_cached_outputs_are_the_teachers_logits_of_the_batch_under_autocast():
    data, method = _data(replay_views=3), _kd("dkd")
    assert attach_teacher_cache(method, data, mode="on", device=CPU, dtype=torch.bfloat16)
    cache = method.teacher_cache
    assert cache is not None and cache.shape == (3, 256, 10) and cache.dtype == torch.float32
    assert "teacher_cache" not in " ".join(method.state_dict()) and all(b is not cache for b in method.buffers())
    data.train.set_epoch(5)
    batch = next(iter(data.train))
    with torch.no_grad(), autocast(CPU, torch.bfloat16):
        got, want = method.teacher_outputs(batch), method.teacher_logits(batch.input)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=0.02, atol=0.02)
    wrong = method.teacher_outputs(Batch(batch.input, batch.target, batch.index, view_id=(batch.view_id + 1) % 3))
    assert not torch.allclose(wrong.float(), want.float(), rtol=0.02, atol=0.02)
    with pytest.raises(RuntimeError, match="no view_id"):
        method.teacher_outputs(Batch(batch.input, batch.target, batch.index))
    assert not attach_teacher_cache(method, data, mode="off", device=CPU, dtype=torch.float32)
    assert method.teacher_cache is None


def test_on_refuses_fresh_random_augmentation_with_the_reason():
    with pytest.raises(ConfigError, match="teacher_cache=on.*data.replay_views=K"):
        fit(_kd(), _data(), train=TRAIN | {"teacher_cache": "on", "epochs": 1}, optim=OPTIM)
    assert not attach_teacher_cache(_kd(), _data(), mode="auto", device=CPU, dtype=torch.float32)


@pytest.mark.parametrize("name", ["atf", "amkd", "fitnet"])
def test_auto_leaves_methods_alone_whose_teacher_sees_more_than_the_batch(name):
    method, data = _kd(name), _data(augment=False)
    assert cache_blocker(method, data) is not None
    assert not attach_teacher_cache(method, data, mode="auto", device=CPU, dtype=torch.float32)
    assert method.teacher_cache is None
    with pytest.raises(ConfigError, match="cannot be reused exactly"):
        attach_teacher_cache(method, data, mode="on", device=CPU, dtype=torch.float32)


def test_the_cacheable_flag_is_not_inherited_by_a_rewritten_step():
    class KDOnFeatures(KD):
        def forward_train(self, batch: Batch, progress: Progress) -> StepOutput:
            return super().forward_train(batch, progress)

    class Restated(KDOnFeatures):
        teacher_cacheable = True

    torch.manual_seed(0)
    nets = create_model("resnet8", num_classes=10), create_model("resnet8", num_classes=10)
    assert cache_blocker(_kd("ls_kd"), _data(augment=False)) is None  # same step as KD: inherits the flag
    assert "asks its teacher" in cache_blocker(KDOnFeatures(*nets), _data(augment=False))
    assert cache_blocker(Restated(*nets), _data(augment=False)) is None


def test_an_interrupted_cached_run_resumes_bit_exactly(tmp_path: Path):
    train = TRAIN | {"checkpoint_every": 2, "teacher_cache": "on"}
    ref = _kd()
    fit(ref, _data(replay_views=4), train=train, optim=OPTIM, out_dir=tmp_path / "ref")

    class Crash(RuntimeError):
        pass

    method = _kd()
    steps = [0]

    def crash_at_step_7(module, args):
        if module.training:
            steps[0] += 1
            if steps[0] == 7:
                raise Crash

    hook = method.student.register_forward_pre_hook(crash_at_step_7)
    with pytest.raises(Crash):
        fit(method, _data(replay_views=4), train=train, optim=OPTIM, out_dir=tmp_path / "cut")
    hook.remove()
    resumed = _kd()
    calls = _count_teacher_calls(resumed)
    fit(resumed, _data(replay_views=4), train=train, optim=OPTIM, out_dir=tmp_path / "cut", resume=True)
    assert calls[0] == 4 * math.ceil(256 / 100)  # the cache was rebuilt, then never the teacher again
    got = torch.load(tmp_path / "cut" / "student.pt", weights_only=True)
    want = torch.load(tmp_path / "ref" / "student.pt", weights_only=True)
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_bench_times_the_cached_path_beside_the_uncached_one(capsys):
    from kdforge.cli import main

    kw = {"batch_size": 8, "steps": 1, "warmup": 0, "rounds": 1, "workers": 0, "device": "cpu"}
    report = run_bench("kd", "resnet8", "resnet8", replay_views=2, teacher_cache=True, **kw)
    assert [r["path"] for r in report["results"]] == ["kdforge", "kdforge+cache", "reference"]
    cache = report["teacher_cache"]
    assert (cache["views"], cache["images"], cache["bytes"]) == (2, 8, 2 * 8 * 10 * 4) and cache["fill_s"] > 0
    by_path = {r["path"]: r["img_per_s"] for r in report["results"]}
    assert cache["speedup"] == pytest.approx(by_path["kdforge+cache"] / by_path["kdforge"])
    assert report["speedup"] == pytest.approx(by_path["kdforge"] / by_path["reference"])
    assert "kdforge+cache / kdforge" in format_bench(report)
    with pytest.raises(ConfigError, match="--no-augment or --replay-views"):
        run_bench("kd", "resnet8", "resnet8", teacher_cache=True, **kw)
    args = ["bench", "--teacher", "resnet8", "--batch-size", "8", "--steps", "1", "--rounds", "1", "--warmup", "0"]
    assert main([*args, "--no-reference", "--no-augment", "--teacher-cache"]) == 0
    assert "kdforge+cache / kdforge" in capsys.readouterr().out


def test_the_reference_loop_can_skip_augmentation():
    images, labels = _images(4)
    ds = PILCifarDataset(images.numpy(), labels.numpy(), (0.0,) * 3, (1.0,) * 3, augment=False)
    x, _, _ = ds[1]
    torch.testing.assert_close(x, images[1].float() / 255.0)
