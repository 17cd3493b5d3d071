"""The training loop and evaluation.

One function, read top to bottom: build the optimizer and schedule from the method's parameter groups, then for
each epoch run the method's ``forward_train`` under autocast, step, evaluate, write metrics and checkpoints. Methods
customise training only through the narrow interface of :class:`kdforge.methods.base.Method`; the loop never asks
which method it runs.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from kdforge.config import (
    OptimConfig,
    RunConfig,
    ScheduleConfig,
    TrainConfig,
    _dataclass_from_dict,
    config_to_dict,
    dump_yaml,
)
from kdforge.data.batch import Batch
from kdforge.data.loader import mix_seed
from kdforge.engine import distributed
from kdforge.engine.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    atomic_write_json,
    atomic_write_text,
    load_checkpoint,
    save_checkpoint,
)
from kdforge.engine.env import (
    autocast,
    environment,
    eval_mode,
    resolve_device,
    resolve_precision,
    rng_state,
    seed_everything,
    set_rng_state,
)
from kdforge.engine.logging import Console, MetricsWriter, format_parts
from kdforge.engine.optim import build_optimizer, build_scheduler
from kdforge.engine.teacher_cache import attach_teacher_cache
from kdforge.errors import CheckpointError, ConfigError, KDForgeError
from kdforge.methods.base import Method, Progress, StepOutput
from kdforge.methods.vanilla import Vanilla

RUN_MARKERS = ("metrics.jsonl", "last.pt")


@dataclass
class FitResult:
    """Outcome of :func:`fit`: best and final test accuracy (top-1/top-5, %), time and the per-epoch records."""

    best_top1: float
    best_epoch: int
    final_top1: float
    final_top5: float
    train_time_s: float
    history: list[dict[str, Any]] = field(default_factory=list)
    out_dir: Path | None = None


def _as_config(cls: type, value: Any) -> Any:
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    return _dataclass_from_dict(cls, value, f"{cls.__name__.removesuffix('Config').lower()}.")


@torch.no_grad()
def evaluate(
    model: nn.Module | Callable[[Tensor], Tensor],
    loader: Iterable[Batch],
    *,
    device: torch.device | str | None = None,
    precision: str | torch.dtype = "fp32",
) -> dict[str, float]:
    """Top-1/top-5 accuracy (%) and mean cross-entropy of ``model`` over ``loader``.

    Counts are summed, never per-batch means averaged, so the result is exact for any batch split. A
    :class:`Method` is evaluated through its ``forward_eval`` (the student). A loader sharded over the processes of
    a distributed run (``world_size`` > 1) has its counts summed over ranks (the shards are disjoint and complete,
    no sample is padded in twice), so every rank returns the accuracy on the whole set.
    """
    module = model if isinstance(model, nn.Module) else None
    fn = model.forward_eval if isinstance(model, Method) else model
    if device is None:
        param = next(module.parameters(), None) if module is not None else None
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    dtype = precision if isinstance(precision, torch.dtype) else resolve_precision(precision, device)
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # correct@1, correct@5, loss sum, count
    with eval_mode(module) if module is not None else contextlib.nullcontext():
        for batch in loader:
            batch = batch.to(device)
            with autocast(device, dtype):
                logits = fn(batch.input)
            logits = logits.float()
            k = min(5, logits.shape[1])
            topk = logits.topk(k, dim=1).indices
            hit = topk == batch.target[:, None]
            loss = nn.functional.cross_entropy(logits, batch.target, reduction="sum")
            totals += torch.stack([hit[:, 0].sum(), hit.any(dim=1).sum(), loss, torch.tensor(len(batch))]).to(totals)
    if getattr(loader, "world_size", 1) > 1:
        distributed.all_reduce_sum(totals)
    c1, c5, loss_sum, n = totals.tolist()
    if n == 0:
        raise KDForgeError("evaluation data is empty")
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "loss": loss_sum / n, "count": int(n)}


def prepare_run_dir(out_dir: str | Path, *, resume: bool, force: bool) -> Path:
    """Create ``out_dir``; refuse one that already holds a run unless resuming or forced (then it is cleared)."""
    out = Path(out_dir)
    holds_run = out.is_dir() and any((out / m).exists() for m in RUN_MARKERS)
    if resume:
        if not (out / "last.pt").is_file():
            raise ConfigError(f"--resume: {out} holds no last.pt to resume from; start the run without --resume")
    elif holds_run:
        if not force:
            raise ConfigError(
                f"{out} already holds a run; pass --resume to continue it, --force to overwrite it, "
                "or choose another --out"
            )
        for child in out.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


class TrainingInterrupted(KDForgeError):
    """Training stopped on SIGTERM/SIGINT after writing ``last.pt``; ``--resume`` continues exactly."""


class _StopRequest:
    """SIGTERM/SIGINT during ``fit``: remembered, the running step finishes, ``last.pt`` is written, then it stops.

    A second signal stops at once (``KeyboardInterrupt``). Handlers are only installed from the main thread (Python
    allows no other) and are restored when ``fit`` returns or raises.
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def install(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            self.uninstall()
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def _params(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def update_step(
    step_fn: Callable[[Batch, Progress], StepOutput],
    batches: Batch | Sequence[Batch],
    progress: Progress,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    dtype: torch.dtype,
    grad_clip: float | None = None,
    skip_nonfinite: bool = False,
    buffers: list[Tensor] | None = None,
    no_sync: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
    distributed: bool = False,
) -> tuple[list[StepOutput], bool]:
    """One optimizer update: the method's forward under autocast, a (scaled) backward, optional clipping, the step.

    ``fit`` and ``kdforge bench`` both train through this function, so the benchmark times exactly the update
    users run. ``batches`` may be several micro-batches (``train.grad_accum``): each one's loss is divided by their
    number and backpropagated in turn, so the update uses the mean gradient over all of them; under DDP ``no_sync``
    (the wrapper's context) keeps all but the last backward from all-reducing. Nothing here reads a value back to
    the host. With ``skip_nonfinite``, an update whose losses or gradients are not finite changes nothing:
    parameters and optimizer state stay as they were, and ``buffers`` (the method's BN statistics, memory banks,
    ...), which the forward passes already updated, are put back; the verdict stays on the device (one copy of the
    parameters, optimizer state and buffers per step). fp16 runs detect the step through the GradScaler, which
    reads its verdict on the host as PyTorch's scaler always does. With ``distributed`` the verdict is agreed over
    all ranks, so no rank steps while another skips.

    Returns:
        ``(results, applied)``: the method's output for each micro-batch and whether the optimizer step was taken:
        a ``bool``, or with ``skip_nonfinite`` outside fp16 a 0-dim bool tensor on the device (reading it syncs).
    """
    group = [batches] if isinstance(batches, Batch) else list(batches)
    saved = [b.detach().clone() for b in buffers] if skip_nonfinite and buffers else []
    optimizer.zero_grad(set_to_none=True)
    results = []
    for k, batch in enumerate(group):
        # Gradients of the first micro-batches only accumulate locally; the last backward all-reduces their sum.
        sync = no_sync() if no_sync is not None and k < len(group) - 1 else contextlib.nullcontext()
        with sync:
            with autocast(device, dtype):
                result = step_fn(batch, progress)
            loss = result.loss / len(group) if len(group) > 1 else result.loss
            scaler.scale(loss).backward()
        results.append(result)

    if grad_clip is not None:
        scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
        torch.nn.utils.clip_grad_norm_(_params(optimizer), grad_clip)
    if skip_nonfinite and not scaler.is_enabled():
        grads = [p.grad.detach().float().norm() for p in _params(optimizer) if p.grad is not None]
        finite = torch.isfinite(torch.stack([r.loss.detach().float() for r in results])).all()
        if grads:
            finite = finite & torch.isfinite(torch.stack(grads)).all()
        if distributed:
            # All-reduced gradients agree already; a rank's non-finite loss with finite gradients would not.
            bad = (~finite).to(torch.float64).reshape(1)
            finite = distributed.all_reduce_sum(bad)[0] == 0
        return results, _step_if_finite(optimizer, finite, buffers or [], saved)
    scale = scaler.get_scale() if skip_nonfinite and scaler.is_enabled() else None
    scaler.step(optimizer)
    scaler.update()
    if scale is not None and scaler.get_scale() < scale:  # the scaler found inf/NaN and skipped the step
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for b, old in zip(buffers or [], saved, strict=False):
                b.copy_(old)
        return results, False
    return results, True


@torch.no_grad()
def _step_if_finite(
    optimizer: torch.optim.Optimizer, finite: Tensor, buffers: list[Tensor], saved: list[Tensor]
) -> Tensor:
    """Take the optimizer step, then put parameters, optimizer state and ``buffers`` back wherever ``finite`` is false.

    Everything stays on the device: the verdict selects between new and old values with ``torch.where`` instead of
    being read by the host, at the price of one copy of the parameters and optimizer state per step. State the step
    created (SGD momentum, Adam moments and step count on a first step) is put back to zeros, which is exactly the
    state a fresh optimizer starts from (SGD without dampening, Adam/AdamW).

    Returns:
        ``finite`` (0-dim bool on the device): whether the step was kept.
    """
    params = [p for p in _params(optimizer) if p.grad is not None]
    old_params = [p.detach().clone() for p in params]
    old_state = {
        p: {k: v.clone() for k, v in optimizer.state[p].items() if isinstance(v, Tensor)}
        for p in params
        if p in optimizer.state
    }
    optimizer.step()
    for p, old in zip(params, old_params, strict=True):
        p.copy_(torch.where(finite, p, old))
    for p in params:
        before = old_state.get(p, {})
        for key, value in optimizer.state.get(p, {}).items():
            if isinstance(value, Tensor):
                old = before[key] if key in before else torch.zeros_like(value)
                value.copy_(torch.where(finite.to(value.device), value, old))
    for b, old in zip(buffers, saved, strict=False):
        b.copy_(torch.where(finite, b, old))
    return finite


def fit(
    method: Method | nn.Module,
    data: Any,
    *,
    train: TrainConfig | Mapping[str, Any] | None = None,
    optim: OptimConfig | Mapping[str, Any] | None = None,
    schedule: ScheduleConfig | Mapping[str, Any] | None = None,
    out_dir: str | Path | None = None,
    config: RunConfig | None = None,
    resume: bool = False,
    force: bool = False,
) -> FitResult:
    """Train ``method`` on ``data`` and evaluate it every ``train.eval_every`` epochs.

    Under torchrun (an initialised process group, see :mod:`kdforge.engine.distributed`) the trainable module is
    wrapped in DistributedDataParallel, ``data`` must be this rank's shard (``build_data(rank=..., world_size=...)``),
    logged losses and accuracies are summed over ranks, and only rank 0 prints and writes ``out_dir``.

    Args:
        method: a :class:`Method` (from ``create_method``), or a plain ``nn.Module`` to train with cross-entropy.
        data: a ``DataBundle`` (``kdforge.data.build_data``) or any object with ``train``/``test`` loaders
            that yield :class:`Batch` and offer ``set_epoch`` and ``len``.
        train, optim, schedule: configs or plain dicts of their keys.
        out_dir: run directory for ``metrics.jsonl``, checkpoints (``last.pt``, ``best.pt``), the exported
            networks (``student.pt``/``model.pt``), ``config.yaml``, ``env.json`` and ``summary.json``;
            ``None`` writes nothing.
        config: the full run config, saved as ``config.yaml`` (the CLI passes it).
        resume: continue from ``out_dir/last.pt``.
        force: overwrite a run directory that already holds a run.
    """
    train_cfg: TrainConfig = _as_config(TrainConfig, train)
    optim_cfg: OptimConfig = _as_config(OptimConfig, optim)
    sched_cfg: ScheduleConfig = _as_config(ScheduleConfig, schedule)
    if not isinstance(method, Method):
        method = Vanilla(method)
    info = distributed.current()
    device = resolve_device(train_cfg.device)
    dtype = resolve_precision(train_cfg.precision, device)
    # Rank 0 keeps the run's seed (a one-process run and rank 0 draw alike); the others get streams of their own.
    seed_everything(train_cfg.seed if info.is_main else mix_seed(train_cfg.seed, info.rank), train_cfg.deterministic)

    method.to(device)
    if device.type == "cuda" and train_cfg.channels_last:
        method.to(memory_format=torch.channels_last)
    if method.needs_negatives and hasattr(data.train, "negatives"):
        # Declared on the method class, so neither a config key nor a Python-API caller has to repeat it; a custom
        # loader without the switch must fill Batch.negative itself (the method says so if it does not).
        data.train.negatives = True
    attach_teacher_cache(method, data, mode=train_cfg.teacher_cache, device=device, dtype=dtype)
    if info.enabled:
        _check_shards(data, info)
    n_batches = len(data.train)
    if n_batches == 0:
        raise ConfigError("the training set yields no batch: lower data.batch_size or use more data")
    accum = train_cfg.grad_accum
    steps_per_epoch = math.ceil(n_batches / accum)  # optimizer updates; the last group of an epoch may be short
    epochs = train_cfg.epochs
    optimizer = build_optimizer(method.param_groups(), optim_cfg)
    scheduler = build_scheduler(optimizer, sched_cfg, optim_cfg.lr, epochs, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    if train_cfg.nonfinite == "skip" and device.type == "cuda":
        for pg in optimizer.param_groups:
            if "capturable" in pg:  # Adam's step count on the GPU: a skipped step is undone without a host read
                pg["capturable"] = True
    trainable: nn.Module = method
    ddp: DistributedDataParallel | None = None
    if info.enabled:
        if train_cfg.sync_bn:
            if device.type != "cuda":
                raise ConfigError("train.sync_bn=true needs CUDA (SyncBatchNorm has no CPU kernel); set it to false")
            nn.SyncBatchNorm.convert_sync_batchnorm(method)  # in place: the method is not itself a BN layer
        # The frozen teacher is not a submodule, so DDP neither reduces nor broadcasts it. State a method keeps
        # identical on every rank itself (CRD's memory banks, updated from all-gathered rows) is left out of the
        # per-step buffer broadcast, which would otherwise copy rank 0's banks over everyone's.
        ignored = method.ddp_ignored_state()
        if ignored:
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(method, ignored)
        ddp = DistributedDataParallel(method, find_unused_parameters=method.ddp_find_unused_parameters)
        trainable = ddp
    # Compile the whole trainable forward (student, adapters, teacher call) but keep the eager module for
    # evaluation and checkpoints, whose state-dict keys must not carry the compiler's "_orig_mod." prefix.
    step_fn = torch.compile(trainable) if train_cfg.compile else trainable
    no_sync = ddp.no_sync if ddp is not None and accum > 1 else None

    # Rank 0 creates the run directory and reads the checkpoint; its verdict (or error) reaches every rank.
    run_dir = distributed.on_main(lambda: prepare_run_dir(out_dir, resume=resume, force=force)) if out_dir else None
    out = run_dir if info.is_main else None  # where files are written: rank 0 only
    given_config = config is not None
    if config is None:
        config = RunConfig(train=train_cfg, optim=optim_cfg, schedule=sched_cfg)
    start_epoch, step, best_top1, best_epoch, history = 0, 0, -1.0, 0, []
    resume_batch, partial = 0, None  # batches already done in start_epoch, and that epoch's running sums
    if run_dir is not None and resume:
        # Rank 0 reads the file and sends it to the others (to the CPU first: rank 0's GPU is not theirs).
        where = torch.device("cpu") if info.enabled else device
        ckpt = distributed.on_main(lambda: _read_training_checkpoint(run_dir / "last.pt", where))
        method.load_state_dict(ckpt["method"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        own = _rank_state(ckpt, info)
        method.load_extra_state(own["extra"])
        set_rng_state(own["rng"])
        start_epoch, step = ckpt["epoch"], ckpt["step"]
        resume_batch, partial = int(ckpt.get("batch_in_epoch", 0)), own["partial"]
        best_top1, best_epoch, history = ckpt["best_top1"], ckpt["best_epoch"], list(ckpt["history"])
        if out is not None and given_config:  # a resumed run may extend train.epochs: record what it now runs with
            atomic_write_text(out / "config.yaml", dump_yaml(config))
    elif out is not None:
        atomic_write_text(out / "config.yaml", dump_yaml(config))
        atomic_write_json(out / "env.json", {**environment(device), "world_size": info.world_size})
    # TensorBoard follows metrics.jsonl: written only where the run directory is (rank 0 under DDP).
    tb_dir = out / "tensorboard" if out is not None and train_cfg.tensorboard else None
    metrics = MetricsWriter(out / "metrics.jsonl" if out is not None else None, tensorboard_dir=tb_dir)
    console = Console(train_cfg.progress and info.is_main)
    ranks = f" on {info.world_size} ranks" if info.enabled else ""
    console.print(
        f"training {type(method).__name__.lower()} on {device}{ranks} ({_dtype_name(dtype)}), {epochs} epochs "
        f"x {steps_per_epoch} steps" + (f", run dir {out}" if out is not None else "")
    )

    train_time = sum(r.get("epoch_time_s", 0.0) for r in history)
    total_steps = epochs * steps_per_epoch
    log_every = train_cfg.log_every
    extra_keys: set[str] = set()

    def make_checkpoint(epochs_done: int, batch_in_epoch: int = 0, part: dict[str, Any] | None = None) -> dict:
        # A mid-epoch checkpoint (batch_in_epoch > 0) also carries the epoch's running sums, so the resumed
        # epoch logs what an uninterrupted one would. Under DDP every rank's RNG, method extra state and sums are
        # gathered (a collective: every rank calls this at the same step) so each resumes its own stream.
        mine = {"rng": rng_state(), "extra": method.extra_state(), "partial": part}
        gathered = distributed.gather_objects(mine) if info.enabled else None
        ckpt = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "method_name": type(method).__name__,
            "method": method.state_dict(),
            "extra": mine["extra"],
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "epoch": epochs_done,
            "batch_in_epoch": batch_in_epoch,
            "partial": part,
            "step": step,
            "best_top1": best_top1,
            "best_epoch": best_epoch,
            "history": history,
            "config": config_to_dict(config),
            "rng": mine["rng"],
            "world_size": info.world_size,
        }
        if gathered is not None:
            ckpt["rank_states"] = gathered
        return ckpt

    skip_mode = train_cfg.nonfinite == "skip"
    buffers = list(method.buffers()) if skip_mode else None
    stop = _StopRequest().install()
    # Under DDP a stop request (SIGTERM/SIGINT) is agreed at the log points, where ranks exchange their sums anyway:
    # every rank then stops after the same step instead of leaving its partners waiting in the next all-reduce.
    stop_now = False
    try:
        for epoch in range(start_epoch, epochs):
            method.train()
            b0 = resume_batch if epoch == start_epoch else 0
            data.train.set_epoch(epoch, b0)
            if b0 == 0:
                method.on_epoch_start(epoch)  # a mid-epoch checkpoint already holds this epoch's method state
            console.start_epoch(epoch, epochs, n_batches)
            # Loss parts are accumulated on the device and read back only every `log_every` steps: one host sync per
            # log line instead of one per loss part per step.
            sums: dict[str, Tensor] = {}
            correct = torch.zeros((), device=device)
            seen, logged, t0 = 0, 0, time.perf_counter()
            skipped, counted = 0, 0  # non-finite steps skipped; batches whose loss entered the sums
            if b0 and partial is not None:
                sums = {k: v.to(device) for k, v in partial["sums"].items()}
                correct = partial["correct"].to(device)
                seen, logged, t0 = partial["seen"], b0, t0 - partial["elapsed"]
                skipped, counted = partial["skipped"], partial["counted"]
            group: list[Batch] = []
            for i, batch in enumerate(data.train, start=b0):
                group.append(batch.to(device))
                if len(group) < accum and i + 1 < n_batches:
                    continue
                first, group_applied = None, False
                for sub in range(method.substeps):
                    progress = Progress(epoch, step, epoch + i / n_batches, step / total_steps, sub)
                    results, applied = update_step(
                        step_fn,
                        group,
                        progress,
                        optimizer,
                        scaler,
                        device,
                        dtype,
                        train_cfg.grad_clip,
                        skip_mode,
                        buffers,
                        no_sync,
                        info.enabled,
                    )
                    first = results if first is None else first
                    if applied is False:  # fp16: the GradScaler's verdict is already on the host
                        skipped += 1
                        continue  # a skipped step's non-finite loss must not poison the epoch's means
                    for result in results:
                        for name, value in {"loss": result.loss, **result.losses}.items():
                            value = value.detach().float()
                            if applied is not True:  # skip mode: a device verdict, masked in without a host read
                                value = torch.where(applied, value, torch.zeros_like(value))
                            sums[name] = sums[name] + value if name in sums else value
                    if applied is not True:
                        skipped = skipped + (~applied).long()
                    group_applied = group_applied | applied
                counted = counted + len(group) * group_applied
                scheduler.step()
                method.on_step_end(progress)
                step += 1
                for mb, result in zip(group, first or [], strict=True):
                    # Train accuracy over the batch's labels; a dual-view method returns logits for every view.
                    reps = result.logits.shape[0] // len(mb)
                    hits = result.logits.detach().argmax(dim=1) == mb.target.repeat_interleave(reps)
                    correct += hits.sum() / reps
                    seen += len(mb)
                group = []
                if not info.enabled:
                    stop_now = stop.requested
                if math.ceil((i + 1) / accum) % log_every == 0 or i + 1 == n_batches:
                    totals = _Totals.gather(sums, counted, correct, seen, stop.requested, info.enabled)
                    stop_now = totals.stop
                    if not totals.sums or totals.counted == 0:
                        raise KDForgeError(
                            f"every step of epoch {epoch + 1} so far ({int(skipped)} steps) had a non-finite loss or "
                            "gradient and was skipped; lower optim.lr or set train.grad_clip"
                        )
                    means = totals.means
                    if not math.isfinite(means["loss"]):
                        last = f"; the last good checkpoint is {run_dir / 'last.pt'}" if run_dir is not None else ""
                        raise KDForgeError(
                            f"the training loss became {means['loss']} in epoch {epoch + 1} (step {step})"
                            f"{last}; lower optim.lr or set train.grad_clip"
                        )
                    console.update(i + 1 - logged, means, totals.seen / (time.perf_counter() - t0))
                    logged = i + 1
                every = train_cfg.checkpoint_every
                if run_dir is not None and i + 1 < n_batches and (stop_now or (every and step % every == 0)):
                    part = {
                        "sums": {k: v.detach().cpu() for k, v in sums.items()},
                        "correct": correct.detach().cpu(),
                        "seen": seen,
                        "elapsed": time.perf_counter() - t0,
                        "skipped": int(skipped),
                        "counted": int(counted),
                    }
                    ckpt = make_checkpoint(epoch, i + 1, part)
                    if out is not None:
                        save_checkpoint(ckpt, out / "last.pt")
                if stop_now and i + 1 < n_batches:
                    raise _interrupted(stop, epoch, step, run_dir)
            epoch_time = time.perf_counter() - t0
            train_time += epoch_time
            if info.enabled:  # evaluate and save the statistics of rank 0 on every rank, as the next forward would
                distributed.broadcast_buffers(method, method.ddp_ignored_state())
            record: dict[str, Any] = {"epoch": epoch + 1, "step": step, "lr": optimizer.param_groups[0]["lr"]}
            record.update({f"train_{k}" if k == "loss" else f"loss_{k}": v for k, v in means.items()})
            record["train_top1"] = 100.0 * totals.correct / max(totals.seen, 1)
            record["epoch_time_s"] = epoch_time
            record["img_per_s"] = totals.seen / epoch_time
            if skip_mode:
                skipped = int(skipped)  # one host read per epoch
                record["skipped_steps"] = skipped  # the same on every rank: the skip verdict is agreed
            if getattr(data.train, "bad_images", "fail") == "skip":
                record["skipped_images"] = data.train.skipped_images  # cumulative over the run so far
            if (epoch + 1) % train_cfg.eval_every == 0 or epoch + 1 == epochs:
                ev = evaluate(method, data.test, device=device, precision=dtype)
                record.update({"test_top1": ev["top1"], "test_top5": ev["top5"], "test_loss": ev["loss"]})
                for name, net in method.evaluators().items():
                    record[f"{name}_top1"] = evaluate(net, data.test, device=device, precision=dtype)["top1"]
                    extra_keys.add(f"{name}_top1")
                improved = ev["top1"] > best_top1
                if improved:
                    best_top1, best_epoch = ev["top1"], epoch + 1
                record["best_top1"] = best_top1
            else:
                improved = False
            history.append(record)
            metrics.write(record)
            test = f"  test {record['test_top1']:.2f}% (best {best_top1:.2f}%)" if "test_top1" in record else ""
            test += "".join(f"  {k.removesuffix('_top1')} {v:.2f}%" for k, v in record.items() if k in extra_keys)
            console.end_epoch(
                f"epoch {epoch + 1}/{epochs}  {format_parts(means)}  train {record['train_top1']:.2f}%{test}  "
                f"lr {record['lr']:.4g}  {epoch_time:.1f}s  {record['img_per_s']:,.0f} img/s"
                + (f"  skipped {skipped} non-finite steps" if skipped else "")
            )
            if run_dir is not None:
                ckpt = make_checkpoint(epoch + 1)
                if out is not None:
                    save_checkpoint(ckpt, out / "last.pt")
                    if improved:
                        save_checkpoint(ckpt, out / "best.pt")
            if not info.enabled:
                stop_now = stop.requested
            if stop_now and epoch + 1 < epochs:
                raise _interrupted(stop, epoch, step, run_dir)

        metrics.close()
    finally:
        stop.uninstall()

    final = history[-1] if history else {}
    result = FitResult(
        best_top1=best_top1,
        best_epoch=best_epoch,
        final_top1=final.get("test_top1", float("nan")),
        final_top5=final.get("test_top5", float("nan")),
        train_time_s=train_time,
        history=history,
        out_dir=run_dir,
    )
    if out is not None:
        for stem, module in method.exports().items():
            save_checkpoint(module.state_dict(), out / f"{stem}.pt")
        atomic_write_json(
            out / "summary.json",
            {
                "best_top1": result.best_top1,
                "best_epoch": result.best_epoch,
                "final_top1": result.final_top1,
                "final_top5": result.final_top5,
                **{f"final_{k}": final[k] for k in sorted(extra_keys) if k in final},
                "epochs": epochs,
                "train_time_s": result.train_time_s,
                "world_size": info.world_size,
            },
        )
    console.print(
        f"done: final top-1 {result.final_top1:.2f}%, best {result.best_top1:.2f}% (epoch {best_epoch}), "
        f"train time {train_time:.1f}s"
    )
    return result


@dataclass
class _Totals:
    """An epoch's running loss sums, accuracy and sample count at a log point: this rank's, or all ranks' summed."""

    sums: dict[str, float]
    counted: float
    correct: float
    seen: float
    stop: bool

    @property
    def means(self) -> dict[str, float]:
        return {k: v / self.counted for k, v in self.sums.items()}

    @classmethod
    def gather(
        cls, sums: dict[str, Tensor], counted: int | Tensor, correct: Tensor, seen: int, stop: bool, reduce: bool
    ) -> _Totals:
        # One device-to-host read per log point; under DDP the same vector is all-reduced first (one collective).
        names = list(sums)
        head = torch.stack(list(sums.values())).double() if sums else correct.new_zeros(0, dtype=torch.float64)
        tail = torch.stack(
            [torch.as_tensor(v, dtype=torch.float64, device=correct.device) for v in (counted, seen, float(stop))]
        )
        vec = torch.cat([head, tail, correct.double().reshape(1)])
        if reduce:
            distributed.all_reduce_sum(vec)
        values = vec.tolist()
        k = len(names)
        return cls(dict(zip(names, values[:k], strict=True)), values[k], values[-1], values[k + 1], values[k + 2] > 0)


def _check_shards(data: Any, info: distributed.DistInfo) -> None:
    for split in ("train", "test"):
        world = getattr(getattr(data, split), "world_size", info.world_size)
        if world != info.world_size:
            raise ConfigError(
                f"the {split} loader is sharded for {world} processes but {info.world_size} are running; build the "
                "data with build_data(..., rank=<rank>, world_size=<world size>)"
            )


def _read_training_checkpoint(path: Path, device: torch.device) -> dict[str, Any]:
    ckpt = load_checkpoint(path, map_location=device)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a kdforge training checkpoint")
    return ckpt


def _rank_state(ckpt: dict[str, Any], info: distributed.DistInfo) -> dict[str, Any]:
    """This rank's RNG, method extra state and partial sums from a checkpoint (rank 0's if it was written by a run
    with another number of processes; such a resume continues correctly but not bit-identically)."""
    states = ckpt.get("rank_states")
    if states is not None and len(states) == info.world_size:
        return states[info.rank]
    return {"rng": ckpt["rng"], "extra": ckpt["extra"], "partial": ckpt.get("partial") if info.is_main else None}


def _interrupted(stop: _StopRequest, epoch: int, step: int, out: Path | None) -> TrainingInterrupted:
    if stop.signal_name is None:  # under DDP another rank received the signal
        return TrainingInterrupted(
            f"stopped with the other ranks in epoch {epoch + 1} after step {step}"
            + (f"; {out / 'last.pt'} holds it: continue with --resume" if out is not None else "")
        )
    where = f"; {out / 'last.pt'} holds it: continue with --resume" if out is not None else ""
    return TrainingInterrupted(f"stopped by {stop.signal_name} in epoch {epoch + 1} after step {step}{where}")


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
