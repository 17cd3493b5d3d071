"""``kdforge bench``: steady-state distillation throughput of kdforge's training path against a reference loop.

The kdforge path is the one ``fit`` runs: the dataset resident on the training device as uint8, batched on-device
augmentation, the precision/``channels_last``/compile settings asked for, and :func:`kdforge.engine.loop.update_step`.
The reference path trains the way RepDistiller and mdistiller do: a ``DataLoader`` whose workers augment one PIL image
at a time (pad-and-crop, flip, to-tensor, normalize), fp32, eager, the teacher's forward every step. Both paths run
the same method class on the same models and data, so their ratio isolates what kdforge's data path and execution
settings buy. Warm-up steps (and compilation) are timed separately and excluded from the steady-state numbers.
Machines are noisy, so the ratio, measured in one process minutes apart, is the headline.

With ``teacher_cache`` a third path, ``kdforge+cache``, runs the kdforge path with the teacher's logits cached
(:mod:`kdforge.engine.teacher_cache`); that needs inputs that repeat, so it goes with ``augment=False`` or
``replay_views=K``, which then apply to both kdforge paths (and ``augment=False`` to the reference too). The one-off
fill pass is timed on its own (``teacher_cache.fill_s``), outside the steady-state numbers.

Both kdforge paths fold the frozen teacher's conv + BatchNorm pairs (:mod:`kdforge.engine.teacher_fold`, exact within
float rounding, skipped for methods that fine-tune their teacher); ``fold_teacher=False`` (``--no-fold-teacher``)
times them unfolded. The reference never folds, as RepDistiller and mdistiller do not.

**Fast mode** (documented in docs/PERFORMANCE.md): ``replay_views=K`` with ``teacher_cache`` (``--replay-views K
--teacher-cache``) times, beside the plain kdforge path, the path a teacher-cacheable method (KD, DKD, ...) trains
with ``data.replay_views=K`` and ``train.teacher_cache=auto``: K fixed crop/flip views per image, the folded teacher
run once per view at the start, its logits gathered every step. ``speedup_fast`` is that path's img/s over the
reference loop's. The reference keeps fresh random crops: it is the training users compare against.

Peak memory: on CUDA each result carries the largest ``torch.cuda.max_memory_allocated`` over its timed rounds
(statistics reset before each round); on the CPU ``None``.
"""

from __future__ import annotations

import os
import platform
import random
import statistics
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset

from kdforge.config import OptimConfig
from kdforge.data import DATASETS, build_data
from kdforge.data.batch import Batch
from kdforge.data.cifar import ArrayData
from kdforge.engine.checkpoint import atomic_write_json
from kdforge.engine.env import resolve_device, resolve_precision, seed_everything
from kdforge.engine.loop import update_step
from kdforge.engine.optim import build_optimizer
from kdforge.engine.teacher_cache import attach_teacher_cache
from kdforge.engine.teacher_fold import fold_frozen_teacher
from kdforge.errors import ConfigError
from kdforge.methods import METHODS, Method, Progress, create_method
from kdforge.models import create_model


@dataclass
class BenchResult:
    """Timing of one training path.

    Attributes:
        path: ``kdforge``, ``kdforge+cache`` (teacher logits cached) or ``reference``.
        img_per_s: steady-state training images per second.
        ms_per_step: steady-state milliseconds per optimizer step (the median round).
        warmup_s: wall time of the warm-up steps (compilation included).
        peak_mem_mb: peak CUDA memory allocated, ``None`` on the CPU.
        settings: what the path ran with (precision, channels_last, compile, workers).
    """

    path: str
    img_per_s: float
    ms_per_step: float
    warmup_s: float
    peak_mem_mb: float | None
    settings: str


class PILCifarDataset(Dataset):
    """Per-sample PIL augmentation as in RepDistiller/mdistiller's CIFAR loaders.

    ``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip()``, ``ToTensor()``, ``Normalize(mean, std)``, written with
    Pillow and numpy (torchvision is not a kdforge dependency). ``rng`` is seeded per worker by the loader.

    Args:
        images: ``[N, 3, H, W]`` uint8.
        labels: ``[N]`` int64.
        mean, std: per-channel normalization.
        padding: zero padding of the random crop.
        augment: crop and flip; ``False`` keeps every image as it is (to-tensor and normalize only).
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        padding: int = 4,
        augment: bool = True,
    ) -> None:
        self.images = np.ascontiguousarray(images.transpose(0, 2, 3, 1))  # PIL wants HWC
        self.labels = labels
        self.mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
        self.padding, self.augment = padding, augment
        self.rng = random.Random(0)

    def __len__(self) -> int:
        return len(self.labels)

    def transform(self, img: Image.Image, top: int, left: int, flip: bool) -> torch.Tensor:
        """The deterministic part: pad, crop at ``(top, left)``, optional mirror, to normalized ``[3, H, W]``."""
        w, h = img.size
        img = ImageOps.expand(img, border=self.padding, fill=0)
        img = img.crop((left, top, left + w, top + h))
        if flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
        return torch.from_numpy((x - self.mean) / self.std)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        img = Image.fromarray(self.images[i])
        if not self.augment:
            return self.transform(img, self.padding, self.padding, False), int(self.labels[i]), i  # the centre crop
        top = self.rng.randint(0, 2 * self.padding)
        left = self.rng.randint(0, 2 * self.padding)
        return self.transform(img, top, left, self.rng.random() < 0.5), int(self.labels[i]), i


def _seed_worker(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    if info is not None:
        info.dataset.rng = random.Random(info.seed % 2**32)


def _cycle(loader: Any) -> Iterator[Batch]:
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        for item in loader:
            if isinstance(item, Batch):
                yield item
            else:
                x, y, index = item
                yield Batch(x, y, index)
        epoch += 1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _TimedPath:
    """One training path, set up once and then timed in rounds of ``steps`` updates."""

    def __init__(
        self,
        method: Method,
        batches: Iterator[Batch],
        *,
        device: torch.device,
        dtype: torch.dtype,
        compile_model: bool,
        channels_last: bool,
        optim: OptimConfig,
    ) -> None:
        self.method, self.batches, self.device, self.dtype = method, batches, device, dtype
        self.channels_last = channels_last
        method.to(device)
        if channels_last:
            method.to(memory_format=torch.channels_last)
        method.train()
        self.optimizer = build_optimizer(method.param_groups(), optim)
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        self.step_fn = torch.compile(method) if compile_model else method

    def run(self, n: int) -> float:
        """Seconds for ``n`` updates, data loading included, with the device synchronized at both ends."""
        _sync(self.device)
        t0 = time.perf_counter()
        for _ in range(n):
            batch = next(self.batches).to(self.device)
            if self.channels_last:
                batch.input = batch.input.contiguous(memory_format=torch.channels_last)
            for sub in range(self.method.substeps):
                progress = Progress(0, 0, 0.0, 0.0, sub)
                update_step(self.step_fn, batch, progress, self.optimizer, self.scaler, self.device, self.dtype)
        _sync(self.device)
        return time.perf_counter() - t0


def run_bench(
    method: str = "kd",
    teacher: str = "resnet20",
    student: str = "resnet8",
    *,
    data: str = "embedded",
    root: str | None = None,
    batch_size: int = 128,
    steps: int = 20,
    warmup: int = 5,
    device: str = "auto",
    precision: str = "auto",
    channels_last: bool | None = None,
    compile_model: bool = False,
    reference: bool = True,
    rounds: int = 3,
    workers: int | None = None,
    params: dict[str, Any] | None = None,
    seed: int = 0,
    augment: bool = True,
    replay_views: int = 0,
    teacher_cache: bool = False,
    fold_teacher: bool = True,
) -> dict[str, Any]:
    """Time the kdforge path (and the reference loop) for ``method`` on ``teacher`` → ``student``.

    Teachers are randomly initialized: throughput does not depend on the weights, and the benchmark needs no
    checkpoint. ``augment``/``replay_views`` are the data keys of the same names; ``teacher_cache`` also times the
    kdforge path with the teacher's logits cached (path ``kdforge+cache``). Returns a JSON-ready dict: ``settings``,
    ``results`` (one :class:`BenchResult` dict per path), ``speedup`` (kdforge img/s ÷ reference img/s, when the
    reference ran) and, with ``teacher_cache``, ``teacher_cache`` (fill seconds, views, images, bytes and the
    cached ÷ uncached img/s ``speedup``) and, with the reference too, ``speedup_fast`` (kdforge+cache ÷ reference).
    ``fold_teacher`` folds the frozen teacher's conv + BN pairs on the kdforge paths where that is exact
    (``settings.folded_pairs`` counts them).
    """
    if steps < 1 or warmup < 0 or batch_size < 1 or rounds < 1 or replay_views < 0:
        raise ConfigError(
            "bench needs --steps >= 1, --warmup >= 0, --rounds >= 1, --batch-size >= 1 and --replay-views >= 0"
        )
    if replay_views and not augment:
        raise ConfigError("bench: --replay-views replays crop/flip views, which --no-augment switches off")
    if teacher_cache and augment and not replay_views:
        raise ConfigError(
            "bench --teacher-cache needs inputs that repeat: add --no-augment or --replay-views K (fresh random "
            "crops would make cached teacher logits wrong)"
        )
    cls = METHODS.get(method)
    if cls.needs_views or cls.needs_negatives:
        raise ConfigError(
            f"bench times single-view methods; '{method}' needs "
            f"{'dual-view' if cls.needs_views else 'negative-sample'} batches, which the reference loop does not build"
        )
    dev = resolve_device(device)
    dtype = resolve_precision(precision, dev)
    use_cl = dev.type == "cuda" if channels_last is None else channels_last
    source, mean, std = DATASETS.get(data)(root, False)
    if not isinstance(source, ArrayData):
        raise ConfigError(f"bench runs on in-memory datasets (embedded, cifar10, cifar100, cifar10_jpeg), not '{data}'")
    n_needed = batch_size * (steps * rounds + warmup)
    subset = min(n_needed, len(source.train_labels))
    num_classes = int(source.train_labels.max()) + 1
    n_workers = min(4, os.cpu_count() or 1) if workers is None else workers
    optim = OptimConfig(lr=0.05, momentum=0.9, weight_decay=5e-4)
    params = dict(params or {})

    def make_method() -> Method:
        seed_everything(seed)
        s_net = create_model(student, num_classes=num_classes)
        t_net = create_model(teacher, num_classes=num_classes) if cls.needs_teacher else None
        context = {
            "num_classes": num_classes,
            "num_train": bundle.num_train,
            "train_targets": bundle.train_targets,
            "epochs": 1,
            "steps_per_epoch": steps * rounds + warmup,
        }
        return create_method(method, s_net, t_net, context=context, **params)

    def make_bundle() -> Any:
        return build_data(
            data,
            root=root,
            batch_size=batch_size,
            train_subset=subset,
            device=dev,
            seed=seed,
            channels_last=use_cl,
            augment=augment,
            replay_views=replay_views,
        )

    example = torch.zeros(2, *source.train_images.shape[1:], device=dev)
    folded: list[int] = []

    def kdforge_path(own: Any) -> _TimedPath:
        # Each kdforge path iterates a loader of its own: interleaved rounds must not share one loader's epoch.
        built = make_method()
        folded.append(len(fold_frozen_teacher(built.to(dev), example, mode="auto" if fold_teacher else "off")))
        return _TimedPath(
            built,
            _cycle(own.train),
            device=dev,
            dtype=dtype,
            compile_model=compile_model,
            channels_last=use_cl,
            optim=optim,
        )

    bundle = make_bundle()
    precision_name = str(dtype).removeprefix("torch.")
    crops = f"{replay_views} replayed crop/flip views" if replay_views else "random crop/flip" if augment else "no aug"
    kd_label = f"{precision_name}, channels_last={use_cl}, compile={compile_model}, data on {dev.type}, {crops}"
    paths = {"kdforge": kdforge_path(bundle)}
    if folded[0]:
        kd_label += f", teacher folded ({folded[0]} conv+BN)"
    labels = {"kdforge": kd_label}
    cache_info: dict[str, Any] | None = None
    if teacher_cache:
        cache_data = make_bundle()
        paths["kdforge+cache"] = cached = kdforge_path(cache_data)
        _sync(dev)
        t0 = time.perf_counter()
        attach_teacher_cache(cached.method, cache_data, mode="on", device=dev, dtype=dtype)
        _sync(dev)
        table = cached.method.teacher_cache
        assert table is not None
        cache_info = {
            "fill_s": time.perf_counter() - t0,
            "views": table.shape[0],
            "images": table.shape[1],
            "bytes": table.numel() * table.element_size(),
        }
        labels["kdforge+cache"] = f"{kd_label}, teacher logits cached"
    if reference:
        idx = np.arange(subset)
        dataset = PILCifarDataset(source.train_images[idx], source.train_labels[idx], mean, std, augment=augment)
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=n_workers,
            pin_memory=dev.type == "cuda",
            persistent_workers=n_workers > 0,
            worker_init_fn=_seed_worker,
            generator=torch.Generator().manual_seed(seed),
        )
        paths["reference"] = _TimedPath(
            make_method(),
            _cycle(loader),
            device=dev,
            dtype=torch.float32,
            compile_model=False,
            channels_last=False,
            optim=optim,
        )
        labels["reference"] = f"float32, eager, PIL per sample, {n_workers} workers, " + (
            "random crop/flip" if augment else "no aug"
        )
    warmup_s = {name: path.run(warmup) for name, path in paths.items()}
    # Rounds alternate between the paths so a burst of load on a shared machine hits both; the median round is
    # reported.
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    peaks: dict[str, float | None] = {}
    for _ in range(rounds):
        for name, path in paths.items():
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            seconds[name].append(path.run(steps))
            peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None
            peaks[name] = peak if peaks.get(name) is None else max(peaks[name] or 0.0, peak or 0.0)
    results: dict[str, BenchResult] = {}
    for name in paths:
        median = statistics.median(seconds[name])
        results[name] = BenchResult(
            name, steps * batch_size / median, 1000.0 * median / steps, warmup_s[name], peaks[name], labels[name]
        )
    out: dict[str, Any] = {
        "settings": {
            "method": method,
            "teacher": teacher if cls.needs_teacher else None,
            "student": student,
            "data": data,
            "batch_size": batch_size,
            "steps": steps,
            "rounds": rounds,
            "warmup": warmup,
            "device": str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "params": params,
            "augment": augment,
            "replay_views": replay_views,
            "teacher_cache": teacher_cache,
            "fold_teacher": fold_teacher,
            "folded_pairs": folded[0],
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        },
        "results": [asdict(r) for r in results.values()],
    }
    if reference:
        out["speedup"] = results["kdforge"].img_per_s / results["reference"].img_per_s
    if cache_info is not None:
        cache_info["speedup"] = results["kdforge+cache"].img_per_s / results["kdforge"].img_per_s
        out["teacher_cache"] = cache_info
        if reference:
            out["speedup_fast"] = results["kdforge+cache"].img_per_s / results["reference"].img_per_s
    return out


def format_bench(report: dict[str, Any]) -> str:
    """Markdown table of a :func:`run_bench` report, with the speed-up line."""
    s = report["settings"]
    pair = f"{s['teacher']} → {s['student']}" if s["teacher"] else s["student"]
    lines = [
        f"{s['method']} {pair}, batch {s['batch_size']}, median of {s['rounds']} alternating rounds of {s['steps']} "
        f"steps after {s['warmup']} warm-up steps, "
        f"{s['device']} ({s['threads']} threads), torch {s['torch']}, {s['date']}",
        "",
        "| path | img/s | ms/step | warm-up (s) | peak memory (MiB) | settings |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in report["results"]:
        mem = "—" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:,.0f}"
        lines.append(
            f"| {r['path']} | {r['img_per_s']:,.0f} | {r['ms_per_step']:.1f} | {r['warmup_s']:.1f} | {mem} | "
            f"{r['settings']} |"
        )
    if "speedup" in report:
        lines += ["", f"kdforge / reference: **{report['speedup']:.2f}×**"]
    if "teacher_cache" in report:
        c = report["teacher_cache"]
        lines += [
            "",
            f"kdforge+cache / kdforge: **{c['speedup']:.2f}×**; the cache ({c['views']} views × {c['images']:,} "
            f"images, {c['bytes'] / 2**20:.1f} MiB) took {c['fill_s']:.2f} s to fill, once per run",
        ]
    if "speedup_fast" in report:
        lines += ["", f"fast mode (kdforge+cache) / reference: **{report['speedup_fast']:.2f}×**"]
    return "\n".join(lines)


def write_bench(report: dict[str, Any], path: str | Path) -> None:
    """The report as JSON, written atomically."""
    atomic_write_json(path, report)


__all__ = ["BenchResult", "PILCifarDataset", "format_bench", "run_bench", "write_bench"]
