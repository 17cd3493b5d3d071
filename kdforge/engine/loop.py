"""The training loop.

:func:`fit` reads top to bottom: set up (device, optimizer, schedule, DDP), open the run directory and resume, then
per epoch train (:func:`_train_epoch`: one :func:`~kdforge.engine.step.update_step` per optimizer step, log points,
mid-epoch checkpoints, the stop signal) and end the epoch (:func:`_end_epoch`: evaluate, write metrics and
checkpoints), then finish (export, ``summary.json``). Everything that changes while training lives in a
:class:`RunState` (saved in checkpoints) and an :class:`EpochSums` (one epoch's running sums); what stays fixed for
the run lives in a :class:`_Run`. Methods customise training only through the narrow interface of
:class:`kdforge.methods.base.Method`; the loop never asks which method it runs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
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
    environment,
    resolve_device,
    resolve_precision,
    rng_state,
    seed_everything,
    set_rng_state,
)
from kdforge.engine.evaluation import evaluate
from kdforge.engine.logging import Console, MetricsWriter, format_parts
from kdforge.engine.optim import build_optimizer, build_scheduler
from kdforge.engine.rundir import RUN_MARKERS, prepare_run_dir
from kdforge.engine.signals import StopRequest, TrainingInterrupted, interrupted
from kdforge.engine.step import update_step
from kdforge.engine.teacher_cache import attach_teacher_cache
from kdforge.engine.teacher_fold import fold_frozen_teacher
from kdforge.errors import CheckpointError, ConfigError, KDForgeError
from kdforge.methods.base import Method, Progress, StepOutput
from kdforge.seeding import mix_seed


@dataclass
class FitResult:
    """Outcome of :func:`fit`: the best and final test metrics, time and the per-epoch records.

    ``primary`` names the task's primary metric (``top1`` for classification, ``mIoU``, ``AP``, ``psnr``, ...);
    ``best`` is its best value (at ``best_epoch``) and ``final`` every test metric of the last evaluation. The
    ``*_top1``/``final_top5`` fields are the classification numbers (NaN for other tasks).
    """

    best_top1: float
    best_epoch: int
    final_top1: float
    final_top5: float
    train_time_s: float
    history: list[dict[str, Any]] = field(default_factory=list)
    out_dir: Path | None = None
    primary: str = "top1"
    best: float = float("nan")
    final: dict[str, float] = field(default_factory=dict)


@dataclass
class RunState:
    """What changes while training and is saved in checkpoints (``extra_keys`` excepted).

    Attributes:
        epoch: epochs completed; the next epoch to train (0-based).
        step: optimizer steps taken so far.
        best_top1, best_epoch: the best value of the task's primary test metric so far (top-1 for classification;
            the name is kept for checkpoint compatibility) and its (1-based) epoch; ``None``/``0`` before any.
        history: one record per completed epoch (what ``metrics.jsonl`` holds).
        resume_batch: batches of ``epoch`` already trained when resuming a mid-epoch checkpoint (0 otherwise).
        partial: that epoch's running sums from the checkpoint (see :meth:`EpochSums.to_partial`).
        train_time: seconds spent in training epochs so far.
        stop_now: the run stops at the next opportunity (a signal, agreed over ranks under DDP).
        extra_keys: ``<name>_<primary>`` keys of the method's extra evaluators logged by this process.
    """

    epoch: int = 0
    step: int = 0
    best_top1: float | None = None
    best_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    resume_batch: int = 0
    partial: dict[str, Any] | None = None
    train_time: float = 0.0
    stop_now: bool = False
    extra_keys: set[str] = field(default_factory=set)


@dataclass
class _Run:
    """What stays fixed for a whole :func:`fit` call: the method, data, configs, device and the training machinery."""

    method: Method
    data: Any
    train_cfg: TrainConfig
    optim_cfg: OptimConfig
    sched_cfg: ScheduleConfig
    info: distributed.DistInfo
    device: torch.device
    dtype: torch.dtype
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    step_fn: Callable[[Batch, Progress], StepOutput]
    no_sync: Callable[[], Any] | None
    n_batches: int
    accum: int
    steps_per_epoch: int
    epochs: int
    skip_mode: bool
    buffers: list[Tensor] | None
    primary: str = "top1"  # the task's primary test metric, tracked as the best
    higher_is_better: bool = True
    stop: StopRequest = field(default_factory=StopRequest)
    config: RunConfig | None = None
    run_dir: Path | None = None  # the run directory (every rank knows it)
    out: Path | None = None  # where files are written: the run directory on rank 0, None elsewhere
    metrics: MetricsWriter | None = None
    console: Console | None = None

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch


@dataclass
class EpochSums:
    """One epoch's running sums: loss parts and train accuracy stay on the device and are read back at log points
    only (one host sync per log line instead of one per loss part per step)."""

    sums: dict[str, Tensor]
    correct: Tensor
    seen: int = 0
    counted: int | Tensor = 0  # batches whose loss entered the sums
    skipped: int | Tensor = 0  # non-finite steps skipped
    t0: float = 0.0  # perf_counter at the epoch's start (shifted back by a resumed epoch's elapsed time)
    logged: int = 0  # batches covered by the last log line
    has_accuracy: bool = True  # False once a step returns no class logits (dense tasks): no train top-1

    @classmethod
    def start(cls, device: torch.device, b0: int, partial: dict[str, Any] | None) -> EpochSums:
        """Empty sums, or those of a mid-epoch checkpoint when resuming at batch ``b0`` > 0."""
        t0 = time.perf_counter()
        if b0 and partial is not None:
            return cls(
                sums={k: v.to(device) for k, v in partial["sums"].items()},
                correct=partial["correct"].to(device),
                seen=partial["seen"],
                counted=partial["counted"],
                skipped=partial["skipped"],
                t0=t0 - partial["elapsed"],
                logged=b0,
            )
        return cls(sums={}, correct=torch.zeros((), device=device), t0=t0)

    def add_losses(self, results: list[StepOutput], applied: bool | Tensor) -> None:
        """Add the loss parts of an update's micro-batches; a skip-mode device verdict masks them without a host
        read."""
        for result in results:
            for name, value in {"loss": result.loss, **result.losses}.items():
                value = value.detach().float()
                if applied is not True:
                    value = torch.where(applied, value, torch.zeros_like(value))
                self.sums[name] = self.sums[name] + value if name in self.sums else value

    def add_accuracy(self, group: list[Batch], results: list[StepOutput]) -> None:
        """Train accuracy over the batches' labels; a dual-view method returns logits for every view."""
        for mb, result in zip(group, results, strict=True):
            if result.logits is None:  # a dense task's step: images seen, no label accuracy
                self.has_accuracy = False
                self.seen += len(mb)
                continue
            reps = result.logits.shape[0] // len(mb)
            hits = result.logits.detach().argmax(dim=1) == mb.target.repeat_interleave(reps)
            self.correct += hits.sum() / reps
            self.seen += len(mb)

    def to_partial(self) -> dict[str, Any]:
        """The sums as a mid-epoch checkpoint stores them (host tensors and plain numbers)."""
        return {
            "sums": {k: v.detach().cpu() for k, v in self.sums.items()},
            "correct": self.correct.detach().cpu(),
            "seen": self.seen,
            "elapsed": time.perf_counter() - self.t0,
            "skipped": int(self.skipped),
            "counted": int(self.counted),
        }


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


def fit(
    method: Method,
    data: Any,
    *,
    train: TrainConfig | Mapping[str, Any] | None = None,
    optim: OptimConfig | Mapping[str, Any] | None = None,
    schedule: ScheduleConfig | Mapping[str, Any] | None = None,
    out_dir: str | Path | None = None,
    config: RunConfig | None = None,
    resume: bool = False,
    force: bool = False,
    device: torch.device | None = None,
) -> FitResult:
    """Train ``method`` on ``data`` and evaluate it every ``train.eval_every`` epochs.

    Under torchrun (an initialised process group, see :mod:`kdforge.engine.distributed`) the trainable module is
    wrapped in DistributedDataParallel, ``data`` must be this rank's shard (``build_data(rank=..., world_size=...)``),
    logged losses and accuracies are summed over ranks, and only rank 0 prints and writes ``out_dir``.

    Args:
        method: a :class:`Method` (from ``create_method``; :func:`kdforge.api.fit` also takes a plain network).
        data: a ``DataBundle`` (``kdforge.data.build_data``) or any object with ``train``/``test`` loaders
            that yield :class:`Batch` and offer ``set_epoch`` and ``len``.
        train, optim, schedule: configs or plain dicts of their keys.
        out_dir: run directory for ``metrics.jsonl``, checkpoints (``last.pt``, ``best.pt``), the exported
            networks (``student.pt``/``model.pt``), ``config.yaml``, ``env.json`` and ``summary.json``;
            ``None`` writes nothing.
        config: the full run config, saved as ``config.yaml`` (the CLI passes it).
        resume: continue from ``out_dir/last.pt``.
        force: overwrite a run directory that already holds a run.
        device: the device ``train.device`` resolved to, when the caller resolved it already (the API does).
    """
    if not isinstance(method, Method):
        raise TypeError(
            f"fit trains a kdforge Method, got {type(method).__name__}; wrap a plain network with "
            "kdforge.create_method('vanilla', net) or call kdforge.fit (the API wraps it)"
        )
    train_cfg: TrainConfig = _as_config(TrainConfig, train)
    device = device if device is not None else resolve_device(train_cfg.device)
    run = _set_up(method, data, train_cfg, _as_config(OptimConfig, optim), _as_config(ScheduleConfig, schedule), device)
    state = _open_run(run, out_dir, config, resume=resume, force=force)
    run.stop.install()
    try:
        for epoch in range(state.epoch, run.epochs):
            sums, totals = _train_epoch(run, state, epoch)
            _end_epoch(run, state, epoch, sums, totals)
        assert run.metrics is not None
        run.metrics.close()
    finally:
        run.stop.uninstall()
    return _finish(run, state)


def _as_config(cls: type, value: Any) -> Any:
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    return _dataclass_from_dict(cls, value, f"{cls.__name__.removesuffix('Config').lower()}.")


def _set_up(
    method: Method,
    data: Any,
    train_cfg: TrainConfig,
    optim_cfg: OptimConfig,
    sched_cfg: ScheduleConfig,
    device: torch.device,
) -> _Run:
    """Seed, move the method to its device, build optimizer, schedule and scaler, wrap it in DDP under torchrun."""
    info = distributed.current()
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
    if train_cfg.fold_teacher != "off":
        # One probe batch traces which BatchNorms read only their convolution (the fold is exact only there).
        example = next(iter(data.test)).input[:2].to(device)
        fold_frozen_teacher(method, example, mode=train_cfg.fold_teacher)
    attach_teacher_cache(method, data, mode=train_cfg.teacher_cache, device=device, dtype=dtype)
    if info.enabled:
        _check_shards(data, info)
    n_batches = len(data.train)
    if n_batches == 0:
        raise ConfigError("the training set yields no batch: lower data.batch_size or use more data")
    accum = train_cfg.grad_accum
    steps_per_epoch = math.ceil(n_batches / accum)  # optimizer updates; the last group of an epoch may be short
    optimizer = build_optimizer(method.param_groups(), optim_cfg)
    scheduler = build_scheduler(optimizer, sched_cfg, optim_cfg.lr, train_cfg.epochs, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    if train_cfg.nonfinite == "skip" and device.type == "cuda":
        for pg in optimizer.param_groups:
            if "capturable" in pg:  # Adam's step count on the GPU: a skipped step is undone without a host read
                pg["capturable"] = True
    ddp = _wrap_ddp(method, train_cfg, device) if info.enabled else None
    # Compile the whole trainable forward (student, adapters, teacher call) but keep the eager module for
    # evaluation and checkpoints, whose state-dict keys must not carry the compiler's "_orig_mod." prefix.
    trainable: nn.Module = ddp if ddp is not None else method
    skip_mode = train_cfg.nonfinite == "skip"
    probe = method.task.evaluator()
    return _Run(
        method=method,
        data=data,
        train_cfg=train_cfg,
        optim_cfg=optim_cfg,
        sched_cfg=sched_cfg,
        info=info,
        device=device,
        dtype=dtype,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        step_fn=torch.compile(trainable) if train_cfg.compile else trainable,
        no_sync=ddp.no_sync if ddp is not None and accum > 1 else None,
        n_batches=n_batches,
        accum=accum,
        steps_per_epoch=steps_per_epoch,
        epochs=train_cfg.epochs,
        skip_mode=skip_mode,
        buffers=list(method.buffers()) if skip_mode else None,
        primary=probe.primary,
        higher_is_better=probe.higher_is_better,
    )


def _wrap_ddp(method: Method, train_cfg: TrainConfig, device: torch.device) -> DistributedDataParallel:
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
    return DistributedDataParallel(method, find_unused_parameters=method.ddp_find_unused_parameters)


def _open_run(
    run: _Run, out_dir: str | Path | None, config: RunConfig | None, *, resume: bool, force: bool
) -> RunState:
    """Create the run directory (rank 0), resume from its ``last.pt`` or write ``config.yaml``/``env.json``, open
    the metrics writer and console; returns the state training starts from."""
    info = run.info
    # Rank 0 creates the run directory and reads the checkpoint; its verdict (or error) reaches every rank.
    run.run_dir = distributed.on_main(lambda: prepare_run_dir(out_dir, resume=resume, force=force)) if out_dir else None
    run.out = run.run_dir if info.is_main else None
    given_config = config is not None
    run.config = config or RunConfig(train=run.train_cfg, optim=run.optim_cfg, schedule=run.sched_cfg)
    state = RunState()
    out = run.out
    if run.run_dir is not None and resume:
        state = _resume(run, run.run_dir / "last.pt")
        if out is not None and given_config:  # a resumed run may extend train.epochs: record what it now runs with
            atomic_write_text(out / "config.yaml", dump_yaml(run.config))
    elif out is not None:
        atomic_write_text(out / "config.yaml", dump_yaml(run.config))
        atomic_write_json(out / "env.json", {**environment(run.device), "world_size": info.world_size})
    state.train_time = sum(r.get("epoch_time_s", 0.0) for r in state.history)
    # TensorBoard follows metrics.jsonl: written only where the run directory is (rank 0 under DDP).
    tb_dir = out / "tensorboard" if out is not None and run.train_cfg.tensorboard else None
    run.metrics = MetricsWriter(out / "metrics.jsonl" if out is not None else None, tensorboard_dir=tb_dir)
    run.console = Console(run.train_cfg.progress and info.is_main)
    ranks = f" on {info.world_size} ranks" if info.enabled else ""
    run.console.print(
        f"training {type(run.method).__name__.lower()} on {run.device}{ranks} ({_dtype_name(run.dtype)}), "
        f"{run.epochs} epochs x {run.steps_per_epoch} steps" + (f", run dir {out}" if out is not None else "")
    )
    return state


def _resume(run: _Run, path: Path) -> RunState:
    """Load method, optimizer, schedule, scaler, this rank's RNG and extra state; the state to continue from."""
    # Rank 0 reads the file and sends it to the others (to the CPU first: rank 0's GPU is not theirs).
    where = torch.device("cpu") if run.info.enabled else run.device
    ckpt = distributed.on_main(lambda: _read_training_checkpoint(path, where))
    run.method.load_state_dict(ckpt["method"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    run.scaler.load_state_dict(ckpt["scaler"])
    own = _rank_state(ckpt, run.info)
    run.method.load_extra_state(own["extra"])
    set_rng_state(own["rng"])
    return RunState(
        epoch=ckpt["epoch"],
        step=ckpt["step"],
        best_top1=_best_from_checkpoint(ckpt["best_top1"]),
        best_epoch=ckpt["best_epoch"],
        history=list(ckpt["history"]),
        resume_batch=int(ckpt.get("batch_in_epoch", 0)),
        partial=own["partial"],
    )


def _train_epoch(run: _Run, state: RunState, epoch: int) -> tuple[EpochSums, _Totals]:
    """Train one epoch (from batch ``state.resume_batch`` when resuming mid-epoch); the epoch's sums and the totals
    of its last log point (the last batch always is one)."""
    method, loader = run.method, run.data.train
    method.train()
    b0, partial = state.resume_batch, state.partial
    state.resume_batch, state.partial = 0, None  # only the first epoch of a resumed run starts mid-way
    loader.set_epoch(epoch, b0)
    if b0 == 0:
        method.on_epoch_start(epoch)  # a mid-epoch checkpoint already holds this epoch's method state
    assert run.console is not None
    run.console.start_epoch(epoch, run.epochs, run.n_batches)
    sums = EpochSums.start(run.device, b0, partial)
    totals: _Totals | None = None
    group: list[Batch] = []
    for i, batch in enumerate(loader, start=b0):
        group.append(batch.to(run.device))
        if len(group) < run.accum and i + 1 < run.n_batches:
            continue
        _optimizer_step(run, state, sums, group, epoch, i)
        group = []
        last = i + 1 == run.n_batches
        if not run.info.enabled:
            state.stop_now = run.stop.requested
        if math.ceil((i + 1) / run.accum) % run.train_cfg.log_every == 0 or last:
            totals = _log_point(run, state, sums, epoch, i)
        every = run.train_cfg.checkpoint_every
        if run.run_dir is not None and not last and (state.stop_now or (every and state.step % every == 0)):
            _save(run, _checkpoint(run, state, epoch, batch_in_epoch=i + 1, partial=sums.to_partial()))
        if state.stop_now and not last:
            raise interrupted(run.stop, epoch, state.step, run.run_dir)
    assert totals is not None
    return sums, totals


def _optimizer_step(run: _Run, state: RunState, sums: EpochSums, group: list[Batch], epoch: int, i: int) -> None:
    """One optimizer step on the micro-batches ``group`` (batch ``i`` ends it): the method's ``substeps`` updates,
    their losses and skip verdicts into ``sums``, the schedule step, the method's step hook."""
    method = run.method
    first: list[StepOutput] | None = None
    group_applied: bool | Tensor = False
    for sub in range(method.substeps):
        progress = Progress(epoch, state.step, epoch + i / run.n_batches, state.step / run.total_steps, sub)
        results, applied = update_step(
            run.step_fn,
            group,
            progress,
            run.optimizer,
            run.scaler,
            run.device,
            run.dtype,
            run.train_cfg.grad_clip,
            run.skip_mode,
            run.buffers,
            run.no_sync,
            run.info.enabled,
        )
        first = results if first is None else first
        if applied is False:  # fp16: the GradScaler's verdict is already on the host
            sums.skipped += 1
            continue  # a skipped step's non-finite loss must not poison the epoch's means
        sums.add_losses(results, applied)
        if applied is not True:
            sums.skipped = sums.skipped + (~applied).long()
        group_applied = group_applied | applied
    sums.counted = sums.counted + len(group) * group_applied
    run.scheduler.step()
    method.on_step_end(progress)
    state.step += 1
    sums.add_accuracy(group, first or [])


def _log_point(run: _Run, state: RunState, sums: EpochSums, epoch: int, i: int) -> _Totals:
    """Read the sums back (all-reduced under DDP, with the stop request), check them and print a progress line."""
    totals = _Totals.gather(sums.sums, sums.counted, sums.correct, sums.seen, run.stop.requested, run.info.enabled)
    state.stop_now = totals.stop
    if not totals.sums or totals.counted == 0:
        raise KDForgeError(
            f"every step of epoch {epoch + 1} so far ({int(sums.skipped)} steps) had a non-finite loss or "
            "gradient and was skipped; lower optim.lr or set train.grad_clip"
        )
    means = totals.means
    if not math.isfinite(means["loss"]):
        last = f"; the last good checkpoint is {run.run_dir / 'last.pt'}" if run.run_dir is not None else ""
        raise KDForgeError(
            f"the training loss became {means['loss']} in epoch {epoch + 1} (step {state.step})"
            f"{last}; lower optim.lr or set train.grad_clip"
        )
    assert run.console is not None
    run.console.update(i + 1 - sums.logged, means, totals.seen / (time.perf_counter() - sums.t0))
    sums.logged = i + 1
    return totals


def _end_epoch(run: _Run, state: RunState, epoch: int, sums: EpochSums, totals: _Totals) -> None:
    """Record the epoch (evaluating when due), write metrics and checkpoints, stop if asked."""
    epoch_time = time.perf_counter() - sums.t0
    state.train_time += epoch_time
    if run.info.enabled:  # evaluate and save the statistics of rank 0 on every rank, as the next forward would
        distributed.broadcast_buffers(run.method, run.method.ddp_ignored_state())
    means = totals.means
    record: dict[str, Any] = {"epoch": epoch + 1, "step": state.step, "lr": run.optimizer.param_groups[0]["lr"]}
    # the task's parts already carry the prefix (a detector's "loss_qfl"): logged once, not as "loss_loss_qfl"
    record.update(
        {f"train_{k}" if k == "loss" else k if k.startswith("loss_") else f"loss_{k}": v for k, v in means.items()}
    )
    if sums.has_accuracy:
        record["train_top1"] = 100.0 * totals.correct / max(totals.seen, 1)
    record["epoch_time_s"] = epoch_time
    record["img_per_s"] = totals.seen / epoch_time
    skipped = 0
    if run.skip_mode:
        skipped = int(sums.skipped)  # one host read per epoch
        record["skipped_steps"] = skipped  # the same on every rank: the skip verdict is agreed
    if getattr(run.data.train, "bad_images", "fail") == "skip":
        record["skipped_images"] = run.data.train.skipped_images  # cumulative over the run so far
    improved = False
    if (epoch + 1) % run.train_cfg.eval_every == 0 or epoch + 1 == run.epochs:
        improved = _evaluate_epoch(run, state, epoch, record)
    state.history.append(record)
    assert run.metrics is not None and run.console is not None
    run.metrics.write(record)
    key, test = f"test_{run.primary}", ""
    if key in record:
        label = "" if run.primary.startswith("top") else f"{run.primary} "
        test = f"  test {label}{_metric(run.primary, record[key])} (best {_metric(run.primary, state.best_top1)})"
    test += "".join(
        f"  {k.removesuffix('_' + run.primary)} {_metric(run.primary, v)}"
        for k, v in record.items()
        if k in state.extra_keys
    )
    train = f"  train {record['train_top1']:.2f}%" if "train_top1" in record else ""
    run.console.end_epoch(
        f"epoch {epoch + 1}/{run.epochs}  {format_parts(means)}{train}{test}  "
        f"lr {record['lr']:.4g}  {epoch_time:.1f}s  {record['img_per_s']:,.0f} img/s"
        + (f"  skipped {skipped} non-finite steps" if skipped else "")
    )
    if run.run_dir is not None:
        ckpt = _checkpoint(run, state, epoch + 1)
        _save(run, ckpt)
        if improved and run.out is not None:
            save_checkpoint(ckpt, run.out / "best.pt")
    if not run.info.enabled:
        state.stop_now = run.stop.requested
    if state.stop_now and epoch + 1 < run.epochs:
        raise interrupted(run.stop, epoch, state.step, run.run_dir)


def _evaluate_epoch(run: _Run, state: RunState, epoch: int, record: dict[str, Any]) -> bool:
    """Test metrics of the student (and the method's extra evaluators) into ``record``; whether the best improved."""
    task, primary = run.method.task, run.primary
    ev = evaluate(run.method, run.data.test, device=run.device, precision=run.dtype, task=task)
    record.update({f"test_{k}": v for k, v in ev.items() if k != "count"})
    for name, net in run.method.evaluators().items():
        value = evaluate(net, run.data.test, device=run.device, precision=run.dtype, task=task)[primary]
        record[f"{name}_{primary}"] = value
        state.extra_keys.add(f"{name}_{primary}")
    value = ev[primary]
    best = state.best_top1
    improved = best is None or (value > best if run.higher_is_better else value < best)
    if improved:
        state.best_top1, state.best_epoch = value, epoch + 1
    record[f"best_{primary}"] = state.best_top1
    return improved


def _checkpoint(
    run: _Run, state: RunState, epochs_done: int, batch_in_epoch: int = 0, partial: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A training checkpoint (``last.pt``/``best.pt``) of the run as it stands.

    A mid-epoch checkpoint (``batch_in_epoch`` > 0) also carries the epoch's running sums, so the resumed epoch logs
    what an uninterrupted one would. Under DDP every rank's RNG, method extra state and sums are gathered (a
    collective: every rank calls this at the same step) so each resumes its own stream.
    """
    method, info = run.method, run.info
    mine = {"rng": rng_state(), "extra": method.extra_state(), "partial": partial}
    gathered = distributed.gather_objects(mine) if info.enabled else None
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "method_name": type(method).__name__,
        "method": method.state_dict(),
        "extra": mine["extra"],
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "epoch": epochs_done,
        "batch_in_epoch": batch_in_epoch,
        "partial": partial,
        "step": state.step,
        "best_top1": state.best_top1,
        "best_epoch": state.best_epoch,
        "history": state.history,
        "config": config_to_dict(run.config) if run.config is not None else None,
        "rng": mine["rng"],
        "world_size": info.world_size,
    }
    if gathered is not None:
        ckpt["rank_states"] = gathered
    return ckpt


def _save(run: _Run, ckpt: dict[str, Any]) -> None:
    if run.out is not None:
        save_checkpoint(ckpt, run.out / "last.pt")


def _finish(run: _Run, state: RunState) -> FitResult:
    """The result; on rank 0 the exported networks and ``summary.json``."""
    final = state.history[-1] if state.history else {}
    primary = run.primary
    best = state.best_top1 if state.best_top1 is not None else float("nan")
    final_metrics = {k.removeprefix("test_"): v for k, v in final.items() if k.startswith("test_")}
    result = FitResult(
        best_top1=best if primary == "top1" else float("nan"),
        best_epoch=state.best_epoch,
        final_top1=final.get("test_top1", float("nan")),
        final_top5=final.get("test_top5", float("nan")),
        train_time_s=state.train_time,
        history=state.history,
        out_dir=run.run_dir,
        primary=primary,
        best=best,
        final=final_metrics,
    )
    out = run.out
    if out is not None:
        for stem, module in run.method.exports().items():
            save_checkpoint(module.state_dict(), out / f"{stem}.pt")
        atomic_write_json(
            out / "summary.json",
            {
                f"best_{primary}": best,
                "best_epoch": result.best_epoch,
                **{f"final_{m}": final_metrics.get(m, float("nan")) for m in _summary_metrics(run)},
                **{
                    f"final_{m}": final_metrics[m]
                    for m in run.method.task.optional_summary_metrics
                    if m in final_metrics
                },
                **{f"final_{k}": final[k] for k in sorted(state.extra_keys) if k in final},
                "epochs": run.epochs,
                "train_time_s": result.train_time_s,
                "world_size": run.info.world_size,
                **({} if run.method.task.name == "classification" else {"task": run.method.task.name}),
                **({} if primary == "top1" else {"primary": primary}),
            },
        )
    assert run.console is not None
    final_value = final_metrics.get(primary, float("nan"))
    label = "top-1" if primary == "top1" else primary
    run.console.print(
        f"done: final {label} {_metric(primary, final_value)}, best {_metric(primary, best)} "
        f"(epoch {state.best_epoch}), train time {state.train_time:.1f}s"
    )
    return result


def _summary_metrics(run: _Run) -> tuple[str, ...]:
    return run.method.task.summary_metrics or (run.primary,)


def _metric(name: str, value: float | None) -> str:
    """A test metric as the console shows it: accuracies in percent, anything else with four significant digits."""
    if value is None:
        return "-"
    return f"{value:.2f}%" if name.startswith("top") else f"{value:.4g}"


def _best_from_checkpoint(value: float | None) -> float | None:
    # Checkpoints written before the task layer stored -1 for "no evaluation yet".
    return None if value is None or value == -1.0 else value


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


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


__all__ = [
    "RUN_MARKERS",
    "EpochSums",
    "FitResult",
    "RunState",
    "TrainingInterrupted",
    "evaluate",
    "fit",
    "prepare_run_dir",
    "update_step",
]
