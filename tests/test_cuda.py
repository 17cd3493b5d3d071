"""CUDA: mixed precision, the device-resident data path, the teacher cache, nccl DDP, SyncBatchNorm, folder-data
copies and bench peak memory on a GPU. Every test is marked ``cuda`` and skipped (by conftest) where
``torch.cuda.is_available()`` is false; ``scripts/gpu_check.sh`` runs them on a lent GPU.

Tolerances are those of tests/test_precision.py (bf16) and, for fp16 (11 significant bits), the same bounds.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from kdforge.data import build_data
from kdforge.data.augment import crop_at, hflip_where
from kdforge.data.folder import FolderLoader, ImageFolderDataset
from kdforge.data.loader import TensorLoader
from kdforge.engine.env import autocast
from kdforge.engine.loop import update_step
from kdforge.engine.teacher_cache import attach_teacher_cache
from kdforge.engine.teacher_fold import fold_frozen_teacher
from kdforge.methods import METHODS, Progress, create_method
from kdforge.models import create_model

pytestmark = pytest.mark.cuda

REPO = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")
PROGRESS = Progress(epoch=0, step=0, epoch_float=0.0, fraction=0.0)
LOSS_RTOL, LOSS_ATOL = 0.03, 0.02
GRAD_COSINE, GRAD_NORM_RTOL = 0.98, 0.10


def _precision_helpers():
    # The method/batch builders of the CPU precision tests, so both files check the same steps.
    from test_precision import _batch, _make

    return _batch, _make


def _step(method, batch, device: torch.device, dtype: torch.dtype):
    method.to(device).train()
    method.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    with autocast(device, dtype):
        out = method(batch.to(device), PROGRESS)
    out.loss.backward()
    grads = [p.grad.detach().float().flatten().cpu() for p in method.parameters() if p.grad is not None]
    return out, torch.cat(grads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", [n for n in METHODS.names() if {"classification", "*"} & set(METHODS.get(n).tasks)])
def test_cuda_autocast_matches_fp32_for_every_method(name, dtype, tiny_net):
    _batch, _make = _precision_helpers()
    ref_method = _make(name, tiny_net)
    method = copy.deepcopy(ref_method)
    batch = _batch(ref_method)
    ref, g_ref = _step(ref_method, batch, CUDA, torch.float32)
    out, g = _step(method, batch, CUDA, dtype)
    assert out.loss.dtype == torch.float32 and all(v.dtype == torch.float32 for v in out.losses.values())
    torch.testing.assert_close(out.loss, ref.loss, rtol=LOSS_RTOL, atol=LOSS_ATOL)
    assert torch.isfinite(g).all()
    assert torch.nn.functional.cosine_similarity(g, g_ref, dim=0) >= GRAD_COSINE
    assert abs(g.norm() / g_ref.norm() - 1) <= GRAD_NORM_RTOL


def test_cuda_fp32_step_matches_the_cpu_step(tiny_net):
    _batch, _make = _precision_helpers()
    cpu_method = _make("kd", tiny_net)
    gpu_method = copy.deepcopy(cpu_method)
    batch = _batch(cpu_method)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    ref, g_ref = _step(cpu_method, batch, CPU, torch.float32)
    out, g = _step(gpu_method, batch, CUDA, torch.float32)
    torch.testing.assert_close(out.loss.cpu(), ref.loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g, g_ref, rtol=1e-3, atol=1e-5)


class _Overflow(nn.Module):
    """Logits scaled past fp16's range on scripted calls, so fp16 autocast produces a genuine inf."""

    def __init__(self, scales: list[float]) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)
        self.scales = scales

    def forward(self, batch, progress):
        from kdforge.methods import StepOutput

        logits = self.lin(batch.input * self.scales.pop(0))  # fp16 matmul: > 65504 becomes inf
        loss = torch.nn.functional.cross_entropy(logits.float(), batch.target)
        return StepOutput(loss, {"ce": loss}, logits)


def test_fp16_grad_scaler_skips_a_real_overflow_on_cuda():
    from kdforge.data.batch import Batch

    torch.manual_seed(0)
    model = _Overflow([1e6, 1.0]).to(CUDA)
    batch = Batch(torch.randn(8, 4), torch.arange(8) % 2, torch.arange(8)).to(CUDA)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**16, growth_interval=1)
    before = copy.deepcopy(model.state_dict())
    results, applied = update_step(model, batch, PROGRESS, optimizer, scaler, CUDA, torch.float16, None, True, [])
    assert applied is False and not torch.isfinite(results[0].loss)
    assert scaler.get_scale() == 2.0**15
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    _, applied = update_step(model, batch, PROGRESS, optimizer, scaler, CUDA, torch.float16, None, True, [])
    assert applied is True and scaler.get_scale() == 2.0**16


@pytest.mark.parametrize("compile_model", [False, True], ids=["eager", "compile"])
def test_channels_last_and_compile_match_eager_on_cuda(compile_model):
    from kdforge.data.batch import Batch

    torch.manual_seed(0)
    teacher, student = create_model("resnet8", num_classes=4), create_model("resnet8", num_classes=4)
    ref = create_method("kd", student, teacher, context={"num_classes": 4}).to(CUDA)
    other = copy.deepcopy(ref).to(memory_format=torch.channels_last)
    fn = torch.compile(other) if compile_model else other
    x = torch.randn(16, 3, 32, 32, device=CUDA)
    batch = Batch(x, torch.arange(16, device=CUDA) % 4, torch.arange(16, device=CUDA))
    batch_cl = Batch(x.contiguous(memory_format=torch.channels_last), batch.target, batch.index)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    opts = [torch.optim.SGD(m.param_groups()[0]["params"], lr=0.05) for m in (ref, other)]
    for _ in range(2):
        (a,), _ = update_step(ref, batch, PROGRESS, opts[0], scaler, CUDA, torch.bfloat16)
        (b,), _ = update_step(fn, batch_cl, PROGRESS, opts[1], scaler, CUDA, torch.bfloat16)
        torch.testing.assert_close(b.loss, a.loss, rtol=LOSS_RTOL, atol=LOSS_ATOL)


def _loaders(device: torch.device, **kwargs) -> TensorLoader:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.arange(64) % 10
    return TensorLoader(
        images, labels, 16, train=True, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2), device=device, seed=3, **kwargs
    )


def test_replayed_views_on_cuda_are_the_cpu_views():
    cpu, gpu = _loaders(CPU, replay_views=4), _loaders(CUDA, replay_views=4)
    for epoch in (0, 1):
        cpu.set_epoch(epoch)
        gpu.set_epoch(epoch)
        for a, b in zip(cpu, gpu, strict=True):
            assert torch.equal(a.index, b.index.cpu()) and torch.equal(a.view_id, b.view_id.cpu())
            torch.testing.assert_close(b.input.cpu(), a.input, rtol=0, atol=1e-6)  # same crops, same flips


def test_fresh_random_crops_on_cuda_are_valid_and_deterministic_per_seed():
    # Fresh crops draw from a torch.Generator on the data's device: CUDA's Philox stream is not the CPU's
    # Mersenne Twister, so CUDA crops are not the CPU crops of the same seed; they are reproducible per seed and
    # every one is a true pad-crop(-flip) of its image, which this checks exhaustively over the 9×9 offsets.
    a, b = _loaders(CUDA), _loaders(CUDA)
    raw = a.images.float()
    mean = torch.tensor(a.mean, device=CUDA).view(1, 3, 1, 1)
    std = torch.tensor(a.std, device=CUDA).view(1, 3, 1, 1)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.input, y.input)
        pixels = (x.input * std + mean) * 255.0
        src = raw[x.index]
        found = torch.zeros(len(src), dtype=torch.bool, device=CUDA)
        for dy in range(9):
            for dx in range(9):
                for flip in (False, True):
                    off = torch.full((len(src),), dy, device=CUDA), torch.full((len(src),), dx, device=CUDA)
                    cand = hflip_where(crop_at(src, *off), torch.full((len(src),), flip, device=CUDA))
                    found |= ((cand - pixels).abs() < 0.05).flatten(1).all(dim=1)
        assert found.all()


def test_build_data_on_cuda_keeps_the_dataset_on_the_device():
    bundle = build_data("embedded", batch_size=32, train_subset=128, test_subset=64, device=CUDA, channels_last=True)
    batch = next(iter(bundle.train))
    assert batch.input.device.type == "cuda" and batch.target.device.type == "cuda"
    assert batch.input.is_contiguous(memory_format=torch.channels_last)
    assert bundle.train.images.device.type == "cuda" and bundle.train.images.dtype == torch.uint8


def test_teacher_cache_on_cuda_replays_the_teacher_exactly():
    torch.manual_seed(0)
    bundle = build_data("embedded", batch_size=32, train_subset=128, test_subset=64, device=CUDA, replay_views=2)
    teacher = create_model("resnet8", num_classes=10)
    method = create_method("kd", create_model("resnet8", num_classes=10), teacher, context={"num_classes": 10})
    method.to(CUDA)
    fold_frozen_teacher(method, torch.zeros(2, 3, 32, 32, device=CUDA))
    assert attach_teacher_cache(method, bundle, mode="on", device=CUDA, dtype=torch.bfloat16)
    cache = method.teacher_cache
    assert cache is not None and cache.device.type == "cuda" and cache.shape == (2, 128, 10)
    batch = next(iter(bundle.train))
    with autocast(CUDA, torch.bfloat16):
        live = method.teacher_logits(batch.input)
    cached = method.teacher_outputs(batch)
    assert cached.dtype == live.dtype == torch.bfloat16
    # Fill batches differ from training batches, and bf16 kernels may round by batch size: one bf16 step apart.
    torch.testing.assert_close(cached.float(), live.float(), rtol=1e-2, atol=1e-2)


def test_sync_batchnorm_conversion_keeps_the_forward():
    torch.manual_seed(0)
    net = create_model("resnet8", num_classes=10).to(CUDA).train()
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(net))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in synced.modules())
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in synced.modules()) == 9
    x = torch.randn(8, 3, 32, 32, device=CUDA)
    # Without a process group SyncBatchNorm normalizes like BatchNorm: outputs and running statistics agree.
    torch.testing.assert_close(synced(x), net(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(synced.bn1.running_mean, net.bn1.running_mean)


_DDP_SCRIPT = """
import copy, os, sys
import torch, torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from kdforge.data.batch import Batch
from kdforge.engine.loop import update_step
from kdforge.methods import Progress, create_method
from kdforge.models import create_model

dev = torch.device("cuda", 0)
torch.cuda.set_device(dev)
dist.init_process_group("nccl", rank=0, world_size=1, device_id=dev)
assert dist.get_backend() == "nccl"
torch.manual_seed(0)
plain = create_method("kd", create_model("resnet8", num_classes=4), create_model("resnet8", num_classes=4),
                      context={"num_classes": 4}).to(dev)
synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain))
assert sum(isinstance(m, nn.SyncBatchNorm) for m in synced.modules()) == 9  # the student's; the teacher is not a child
ddp = DistributedDataParallel(synced)  # as fit wraps it: no device_ids, the module is on one GPU
opts = [torch.optim.SGD(m.param_groups()[0]["params"], lr=0.05, momentum=0.9) for m in (plain, synced)]
scaler = torch.amp.GradScaler("cuda", enabled=False)
torch.backends.cudnn.deterministic = True
torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
g = torch.Generator(device=dev).manual_seed(1)
for step in range(3):
    x = torch.randn(16, 3, 32, 32, device=dev, generator=g)
    batch = Batch(x, torch.arange(16, device=dev) % 4, torch.arange(16, device=dev))
    p = Progress(0, step, 0.0, 0.0)
    (a,), _ = update_step(plain, batch, p, opts[0], scaler, dev, torch.float32)
    (b,), _ = update_step(ddp, batch, p, opts[1], scaler, dev, torch.float32, distributed=True)
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-4, atol=1e-5)
for (n, pa), pb in zip(plain.student.named_parameters(), synced.student.parameters(), strict=True):
    torch.testing.assert_close(pb, pa, rtol=1e-3, atol=1e-4, msg=n)
torch.testing.assert_close(synced.student.bn1.running_mean, plain.student.bn1.running_mean, rtol=1e-4, atol=1e-6)
dist.barrier()
dist.destroy_process_group()
print("DDP-OK")
"""


def test_one_process_nccl_ddp_run_with_sync_bn(tmp_path):
    """One process, world size 1, nccl: DDP (gradient all-reduce) and SyncBatchNorm (synchronized statistics) run
    their collective paths and train exactly like the plain module. A subprocess, so no process group outlives it."""
    script = tmp_path / "ddp.py"
    script.write_text(_DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000), RANK="0", WORLD_SIZE="1")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180, cwd=REPO, env=env)
    assert proc.returncode == 0 and "DDP-OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_folder_data_is_pinned_and_copied_without_blocking(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(4):
                pixels = rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / c / f"{i}.png")
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    loaders = {}
    for device in (CPU, CUDA):
        ds = ImageFolderDataset(tmp_path / "val", 32, train=False)
        loaders[device.type] = FolderLoader(ds, 4, train=False, mean=mean, std=std, device=device, num_workers=1)
    assert loaders["cuda"].loader.pin_memory and not loaders["cpu"].loader.pin_memory
    seen = 0
    for a, b in zip(loaders["cpu"], loaders["cuda"], strict=True):
        assert b.input.device.type == "cuda" and b.target.device.type == "cuda"
        torch.cuda.synchronize()
        torch.testing.assert_close(b.input.cpu(), a.input, rtol=0, atol=1e-6)
        assert torch.equal(b.target.cpu(), a.target)
        seen += len(a)
    assert seen == 8
    # A pinned host batch copied with non_blocking=True lands intact once the stream is synchronized.
    host = torch.arange(1 << 20, dtype=torch.float32).pin_memory()
    dev = host.to(CUDA, non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(dev.cpu(), host)


def test_bench_reports_peak_memory_on_cuda():
    from kdforge.bench import format_bench, run_bench

    report = run_bench(
        "kd", "resnet8", "resnet8", batch_size=32, steps=2, warmup=1, rounds=1, workers=0, device="cuda",
        replay_views=2, teacher_cache=True,
    )  # fmt: skip
    assert [r["path"] for r in report["results"]] == ["kdforge", "kdforge+cache", "reference"]
    for r in report["results"]:
        assert r["peak_mem_mb"] is not None and r["peak_mem_mb"] > 0
    assert "—" not in format_bench(report).split("| kdforge |")[1].split("\n")[0]
    assert report["settings"]["device"] == torch.cuda.get_device_name(0)
